"""The training data stream: an endless seeded sampler, aspect-ratio batches, and the DataLoader factory.

One loader for every trainer: `icd train` collates detection items into lists, `icd distill` passes its
own collate (teacher features padded to the batch); the sampling, batching and exact-resume logic is
the same. Exact resume: the stream is a pure function of (SEED, iteration), so a run resumed at
iteration i rebuilds the loader at i (index arithmetic only, no image reads) and sees the batches the
uninterrupted run would have seen.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np
from torch.utils.data import DataLoader, Sampler

from detection import distributed as comm
from detection.datasets import collate
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

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, rank: int | None = None,
                 world_size: int | None = None, yield_epoch: bool = False, start_epoch: int = 0) -> None:
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
        order = (np.random.default_rng([self.seed, int(epoch)]).permutation(self.size) if self.shuffle
                 else np.arange(self.size))
        total = self.per_rank_epoch_length * self.world_size
        if total > self.size:
            order = np.resize(order, total)  # wrap around, as DistributedSampler pads
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[Any]:
        epoch = self.start_epoch
        while True:
            for i in self.epoch_indices(epoch):
                yield (epoch, int(i)) if self.yield_epoch else int(i)
            epoch += 1


def batch_stream(dataset: LocatableDataset, sampler: InfiniteSampler, batch_size: int, group_by_aspect: bool,
                 skip_batches: int = 0) -> Iterator[list[Any]]:
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


def build_train_loader(cfg: Any, dataset: LocatableDataset,
                       collate_fn: Callable[[list[Any]], Batch] = collate) -> LoaderFactory:
    """A factory start_iter -> DataLoader yielding the batches the uninterrupted run would see from there.

    SOLVER.IMS_PER_BATCH is the total over processes; each rank draws its share from its own slice of
    the seeded sampler (DATALOADER.NUM_WORKERS workers, aspect grouping per DATALOADER.ASPECT_RATIO_GROUPING).
    """
    world = comm.get_world_size()
    total = int(cfg.SOLVER.IMS_PER_BATCH)
    if total < world or total % world:
        raise UserError(f"SOLVER.IMS_PER_BATCH {total} is not divisible by the {world} processes.",
                        f"use a multiple of {world} (images per batch are split evenly across processes).")
    workers = int(cfg.DATALOADER.NUM_WORKERS)
    pin = str(cfg.MODEL.DEVICE).startswith("cuda")

    def build(start_iter: int) -> DataLoader:
        sampler = InfiniteSampler(len(dataset), seed=int(cfg.SEED), shuffle=True, yield_epoch=True)
        batches = BatchSampler(dataset=dataset, sampler=sampler, batch_size=total // world,
                               group_by_aspect=bool(cfg.DATALOADER.ASPECT_RATIO_GROUPING), skip_batches=start_iter)
        return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_fn,
                          pin_memory=pin, persistent_workers=False, prefetch_factor=2 if workers else None)

    return build
