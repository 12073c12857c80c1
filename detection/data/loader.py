"""The training data stream: an endless seeded sampler, aspect-ratio batches, and the DataLoader factory.

One loader for every trainer: `icd train` collates detection items into lists, `icd distill` passes its
own collate (teacher features padded to the batch); the sampling, batching and exact-resume logic is
the same. Exact resume: the stream is a pure function of (SEED, iteration), so a run resumed at
iteration i rebuilds the loader at i (index arithmetic only, no image reads) and sees the batches the
uninterrupted run would have seen. A user's error raised in a DataLoader worker (a corrupt cache chunk,
an unreadable image) reaches the main process as the exception itself, not as a worker traceback
(WorkerError), so every command ends such a run with its one-line error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from cache_format.errors import IcdError
from detection import comm
from detection.data.datasets import collate
from detection.errors import UserError

Batch = Any
# build_loader(start_iter) -> an iterable of batches positioned at `start_iter`.
LoaderFactory = Callable[[int], Iterable[Batch]]


class LocatableDataset(Protocol):
    """A map-style dataset that can say which image (and variant) an item is without reading it."""

    def __len__(self) -> int: ...

    def __getitem__(self, item: Any) -> Any: ...

    def locate(self, item: Any) -> tuple[Any, int]: ...


class InfiniteSampler(Sampler):
    """An endless, seeded stream of indices, sharded across ranks like DistributedSampler.

    Epoch e is a permutation drawn from `default_rng([seed, e])` (or 0..size-1 without shuffle), padded
    by wrap-around to a multiple of world_size; rank r takes positions r, r + world_size, ... so every
    rank sees the same number of items per epoch. With `yield_epoch` it yields `(epoch, index)` pairs,
    which DetectionDataset accepts, so a per-epoch variant choice needs no shared state.
    """

    def __init__(
        self,
        size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        yield_epoch: bool = False,
        start_epoch: int = 0,
    ) -> None:
        if size <= 0:
            raise UserError("cannot sample from an empty dataset", "check the training dataset has images")
        world_size = comm.get_world_size() if world_size is None else world_size
        rank = comm.get_rank() if rank is None else rank
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.size, self.seed, self.shuffle = int(size), int(seed), bool(shuffle)
        self.rank, self.world_size = int(rank), int(world_size)
        self.yield_epoch, self.start_epoch = bool(yield_epoch), int(start_epoch)

    @property
    def per_rank_epoch_length(self) -> int:
        return math.ceil(self.size / self.world_size)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's indices for one epoch."""
        order = (
            np.random.default_rng([self.seed, int(epoch)]).permutation(self.size)
            if self.shuffle
            else np.arange(self.size)
        )
        total = self.per_rank_epoch_length * self.world_size
        if total > self.size:
            order = np.resize(order, total)  # wrap around, as DistributedSampler pads
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[Any]:
        epoch = self.start_epoch
        while True:
            for i in self.epoch_indices(epoch):
                yield (epoch, int(i)) if self.yield_epoch else int(i)
            epoch += 1


def batch_stream(
    dataset: LocatableDataset, sampler: InfiniteSampler, batch_size: int, group_by_aspect: bool, skip_batches: int = 0
) -> Iterator[list[Any]]:
    """Item indices of each batch, endlessly; optionally grouping landscape and portrait images.

    Written here (not torch's BatchSampler) because the grouping must be resumable: the stream is a pure
    function of the sampler, so resuming at iteration i replays the index arithmetic and drops i batches.
    """
    buckets: dict[bool, list[Any]] = {False: [], True: []}
    emitted = 0
    for item in sampler:
        image, _variant = dataset.locate(item)
        group = group_by_aspect and image.width >= image.height
        buckets[group].append(item)
        if len(buckets[group]) == batch_size:
            batch, buckets[group] = buckets[group], []
            emitted += 1
            if emitted > skip_batches:
                yield batch


class BatchSampler:
    """A DataLoader batch_sampler over `batch_stream` (a re-iterable object, as DataLoader expects)."""

    def __init__(self, **stream_args: Any) -> None:
        self.stream_args = stream_args

    def __iter__(self) -> Iterator[list[Any]]:
        return batch_stream(**self.stream_args)


class WorkerError:
    """A user's error (IcdError) raised while a DataLoader worker built a batch, carried to the main process.

    Why: torch re-raises a worker's exception as a new one whose message is the worker's traceback, so a
    corrupt cache chunk read in a worker would end `icd distill` with ~60 lines instead of one. The
    dataset and collate wrappers below catch the error and return it in place of the batch; `_Batches`
    raises the exception object itself (IcdError pickles as itself) in the main process.
    """

    def __init__(self, error: IcdError) -> None:
        self.error = error


class _CatchUserErrors(Dataset):
    """The dataset, with an IcdError from an item returned as a WorkerError instead of raised."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Any) -> Any:
        try:
            return self.dataset[item]
        except IcdError as exc:
            return WorkerError(exc)

    def __getitems__(self, items: list[Any]) -> list[Any]:
        """A batch at once (the wrapped dataset's own __getitems__ when it has one, e.g. concurrent reads)."""
        try:
            getitems = getattr(self.dataset, "__getitems__", None)
            return list(getitems(items)) if getitems else [self.dataset[i] for i in items]
        except IcdError as exc:
            return [WorkerError(exc)]


class _CollateOrError:
    """collate_fn, unless an item is a WorkerError (or collating raises one): then that error is the batch."""

    def __init__(self, collate_fn: Callable[[list[Any]], Batch]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: list[Any]) -> Any:
        for item in items:
            if isinstance(item, WorkerError):
                return item
        try:
            return self.collate_fn(items)
        except IcdError as exc:
            return WorkerError(exc)


class _Batches:
    """Iterates a DataLoader, raising a worker's user error in the main process as the exception itself."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    @property
    def dataset(self) -> Any:
        """The dataset the batches are built from (as DataLoader.dataset, without the error wrapper)."""
        return self.loader.dataset.dataset

    def __iter__(self) -> _Batches:
        # Created now, not at the first batch: a DataLoader iterator draws its workers' base seed from
        # torch's global RNG when created, and exact resume depends on when that draw happens.
        self._batches = iter(self.loader)
        return self

    def __next__(self) -> Batch:
        batch = next(self._batches)
        if isinstance(batch, WorkerError):
            raise batch.error
        return batch


def build_train_loader(
    cfg: Any,
    dataset: LocatableDataset,
    collate_fn: Callable[[list[Any]], Batch] = collate,
    *,
    ims_per_batch: int | None = None,
    group_by_aspect: bool | None = None,
) -> LoaderFactory:
    """A factory start_iter -> DataLoader yielding the batches the uninterrupted run would see from there.

    SOLVER.IMS_PER_BATCH (or `ims_per_batch`) is the total over processes; each rank draws its share from
    its own slice of the seeded sampler (DATALOADER.NUM_WORKERS workers, aspect grouping per
    DATALOADER.ASPECT_RATIO_GROUPING, or `group_by_aspect`).
    """
    world = comm.get_world_size()
    total = int(cfg.SOLVER.IMS_PER_BATCH if ims_per_batch is None else ims_per_batch)
    if total < world or total % world:
        raise UserError(
            f"SOLVER.IMS_PER_BATCH {total} is not divisible by the {world} processes.",
            f"use a multiple of {world} (images per batch are split evenly across processes).",
        )
    grouped = bool(cfg.DATALOADER.ASPECT_RATIO_GROUPING if group_by_aspect is None else group_by_aspect)
    workers = int(cfg.DATALOADER.NUM_WORKERS)
    pin = str(cfg.MODEL.DEVICE).startswith("cuda")

    def build(start_iter: int) -> _Batches:
        sampler = InfiniteSampler(len(dataset), seed=int(cfg.SEED), shuffle=True, yield_epoch=True)
        batches = BatchSampler(
            dataset=dataset,
            sampler=sampler,
            batch_size=total // world,
            group_by_aspect=grouped,
            skip_batches=start_iter,
        )
        return _Batches(
            DataLoader(
                _CatchUserErrors(dataset),
                batch_sampler=batches,
                num_workers=workers,
                collate_fn=_CollateOrError(collate_fn),
                pin_memory=pin,
                persistent_workers=False,
                prefetch_factor=2 if workers else None,
            )
        )

    return build
