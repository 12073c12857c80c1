"""Stage two's data path: replay the cached samples' augmentation and stream their teacher features.

One item per training image and epoch: the epoch draws one of the image's cached variants
(`AugmentationPlan.sample_variant`, the plan stored in the cache), falling back to another committed
variant when the drawn one is not in the cache. The image is read and the recorded geometry replayed
with detection.data.augment, so the student sees exactly the teacher's pixels; targets come from the
annotations transformed the same way. The sample's teacher features are read from the cache in the
DataLoader worker that builds the item (one CacheReader per process, opened lazily, so nothing but the
URL is pickled and memory does not grow with the cache), and the collate function pads them to the
student's batch shape with zeros.

Items are built by detection.data.datasets.DetectionDataset (image decoding, target transforms, masks); this
module adds the choice of variant, the check that the plan reproduces the recorded geometry exactly,
and the features.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from cache_contract.geometry import batch_padded_shape, pad_levels
from cache_format import CacheReader
from cache_format.errors import CacheError
from cache_format.remote import is_remote
from cache_format.schema import COL
from detection import comm
from detection.data.augment import AugmentationPlan, AugParams
from detection.data.datasets import CocoIndex, DetectionDataset

logger = logging.getLogger(__name__)


# -- which cache sample holds each (image, variant) -----------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SampleTable:
    """Committed cache samples by image: `samples[row, variant]` is a sample index, -1 if not committed.

    numpy arrays rather than dicts so that the table stays a few bytes per sample and is shared
    copy-on-write with DataLoader workers.
    """

    image_ids: np.ndarray  # [num_images] int64, sorted
    samples: np.ndarray  # [num_images, num_variants] int64

    @classmethod
    def from_reader(cls, reader: CacheReader, num_variants: int) -> SampleTable:
        """Read every committed sample's (image id, variant) from the cache's records."""
        committed = np.flatnonzero(reader.committed())
        if committed.size == 0:
            raise CacheError(
                f"cache {reader.url} has no committed sample",
                "finish stage one (`icd dump ... --resume`) before training a student from it",
            )
        # One bulk read of the records (a chunk per shard), not a lookup per sample: fast at COCO scale.
        records = reader.records()[committed]
        pairs = records[:, [COL["image_id"], COL["variant"]]].astype(np.int64)
        bad = pairs[(pairs[:, 1] < 0) | (pairs[:, 1] >= num_variants)]
        if len(bad):
            raise CacheError(
                f"cache {reader.url} holds variant {int(bad[0, 1])} of image {int(bad[0, 0])}, outside "
                f"the 0..{num_variants - 1} of its augmentation plan",
                "the cache is damaged or was written by another tool; re-create it with `icd dump`",
            )
        image_ids = np.unique(pairs[:, 0])
        samples = np.full((len(image_ids), num_variants), -1, dtype=np.int64)
        rows = np.searchsorted(image_ids, pairs[:, 0])
        flat = rows * num_variants + pairs[:, 1]
        if len(np.unique(flat)) != len(flat):
            raise CacheError(
                f"cache {reader.url} holds the same (image, variant) in more than one sample",
                "the cache is damaged or was written by another tool; re-create it with `icd dump`",
            )
        samples[rows, pairs[:, 1]] = committed
        return cls(image_ids, samples)

    def _row(self, image_id: int) -> int:
        row = int(np.searchsorted(self.image_ids, image_id))
        if row >= len(self.image_ids) or self.image_ids[row] != image_id:
            return -1
        return row

    def has_image(self, image_id: int) -> bool:
        return self._row(image_id) >= 0

    def choose_variant(self, image_id: int, drawn: int) -> int:
        """`drawn` if that variant is cached, else the next cached one (drawn + 1, drawn + 2, ... cyclically)."""
        row = self._row(image_id)
        if row < 0:
            raise KeyError(f"image {image_id} has no committed sample")
        variants = self.samples.shape[1]
        for step in range(variants):
            variant = (int(drawn) + step) % variants
            if self.samples[row, variant] >= 0:
                return variant
        raise KeyError(f"image {image_id} has no committed sample")

    def sample_index(self, image_id: int, variant: int) -> int:
        row = self._row(image_id)
        index = int(self.samples[row, variant]) if row >= 0 else -1
        if index < 0:
            raise KeyError(f"image {image_id} variant {variant} is not in the cache")
        return index


class _VariantChooser:
    """variant_sampler for DetectionDataset: the plan's per-epoch draw, limited to cached variants."""

    def __init__(self, plan: AugmentationPlan, table: SampleTable | None) -> None:
        self.plan, self.table = plan, table

    def __call__(self, epoch: int, image_id: int) -> int:
        drawn = self.plan.sample_variant(epoch, image_id)
        return drawn if self.table is None else self.table.choose_variant(image_id, drawn)


# -- the dataset ----------------------------------------------------------------------------------------
class DistillDataset(Dataset):
    """Training items for stage two: DetectionDataset items (+ teacher features from the cache).

    Modes: `cache_url` and `read_features` (cached ICD); `cache_url` without features (online ICD on
    the cache's samples: same images, variants and geometry, the teacher runs live); no cache (online
    ICD on the plan from the config). Item indices are `(epoch, i)` as InfiniteSampler(yield_epoch=True)
    yields them; `locate()` serves detection.data.loader.batch_stream.
    """

    def __init__(
        self,
        index: CocoIndex,
        plan: AugmentationPlan,
        *,
        table: SampleTable | None = None,
        cache_url: str | None = None,
        levels: Sequence[str] = (),
        read_features: bool = False,
        with_masks: bool = False,
    ) -> None:
        if read_features and (cache_url is None or table is None or not levels):
            raise ValueError("reading teacher features needs a cache URL, its sample table and the levels")
        self.plan = plan
        self.table = table
        self.cache_url = cache_url
        self.levels = list(levels)
        self.read_features = read_features
        self.skipped_images = 0
        if table is not None:
            cached = [im for im in index.images if table.has_image(im.id)]
            self.skipped_images = len([im for im in index.training_images() if not table.has_image(im.id)])
            index = dataclasses.replace(index, images=cached)
        self.items = DetectionDataset(
            index, plan, training=True, variant_sampler=_VariantChooser(plan, table), with_masks=with_masks
        )
        self._reader: CacheReader | None = None
        self._reader_pid = -1
        self._fetcher: ThreadPoolExecutor | None = None
        self._fetcher_pid = -1

    def __len__(self) -> int:
        return len(self.items)

    def locate(self, item: Any) -> Any:
        return self.items.locate(item)

    def reader(self) -> CacheReader:
        """This process's CacheReader (opened on first use, so DataLoader workers each open their own)."""
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader = CacheReader(self.cache_url)
            self._reader_pid = os.getpid()
        return self._reader

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"], state["_reader_pid"], state["_fetcher"] = None, -1, None
        return state

    def _fetch_thread(self) -> ThreadPoolExecutor:
        """This process's feature-fetch thread (one per DataLoader worker, like the reader)."""
        self.reader()  # (re)opens per process, and resets the thread after a fork
        if self._fetcher is None or self._fetcher_pid != os.getpid():
            self._fetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="icd-cache-fetch")
            self._fetcher_pid = os.getpid()
        return self._fetcher

    def __getitems__(self, items: list[Any]) -> list[dict[str, Any]]:
        """A whole batch (the DataLoader hands each worker a batch's indices). From an object store its
        samples' teacher features are fetched up to CacheReader.prefetch (8) samples at a time, each
        sample's levels and instances concurrently (CacheReader.read_samples), in a background thread
        while the images are decoded: per-request latency is paid a few times per batch instead of
        several times per sample, and overlaps the image work. From local disk the items are built one
        by one exactly as __getitem__ does (already as fast as the disk; docs/OBJECT_STORAGE.md)."""
        if not self.read_features or not items or not is_remote(str(self.cache_url)):
            return [self[item] for item in items]  # local disk: one sample after the other is fastest
        params = [self.items.sample_params(item) for item in items]  # json sizes only, no image read
        indices = [self.table.sample_index(p.image_id, p.variant) for p in params]
        pending = self._fetch_thread().submit(self.reader().read_samples, indices, self.levels)
        try:
            samples = [self.items[item] for item in items]
        except BaseException:
            with contextlib.suppress(Exception):
                pending.result()  # never leave a fetch running into the next batch; the image error wins
            raise
        cached = pending.result()  # re-raises a read error here, in this worker
        for sample, index, got in zip(samples, indices, cached):
            check_geometry(got.meta, sample["aug"], index, self.cache_url)
            sample["cache_index"] = index
            sample["teacher_features"] = {name: torch.from_numpy(got.features[name]) for name in self.levels}
        return samples

    def __getitem__(self, item: Any) -> dict[str, Any]:
        sample = self.items[item]
        if self.table is None:
            return sample
        p: AugParams = sample["aug"]
        index = self.table.sample_index(p.image_id, p.variant)
        sample["cache_index"] = index
        if self.read_features:
            cached = self.reader().read_sample(index, self.levels)
            check_geometry(cached.meta, p, index, self.cache_url)
            sample["teacher_features"] = {name: torch.from_numpy(cached.features[name]) for name in self.levels}
        else:
            check_geometry(self.reader().meta(index), p, index, self.cache_url)
        return sample


def check_geometry(meta: Any, p: AugParams, index: int, url: str | None) -> None:
    """The plan's replay of (image, variant) must be the geometry stage one recorded, or pixels differ."""
    recorded = (meta.image_id, meta.variant, meta.scale, meta.flip, meta.resized_h, meta.resized_w)
    replayed = (p.image_id, p.variant, p.scale, p.flip, p.resized_h, p.resized_w)
    if recorded != replayed:
        raise CacheError(
            f"cache {url} sample {index} recorded (image, variant, scale, flip, h, w) = {recorded}, but replaying "
            f"its augmentation plan on this annotation file gives {replayed}",
            "train on the annotation file and images the cache was dumped from (DATASETS.TRAIN), or re-dump it",
        )


# -- batching ---------------------------------------------------------------------------------------------
def _pinned(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.pin_memory()
    if isinstance(value, dict):
        return {key: _pinned(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_pinned(item) for item in value]
    return value


@dataclass
class DistillBatch:
    """One stage-two batch: the dataset's items (image, target, aug, image_id, cache_index) and the cache's
    teacher features padded to the batch, {level: [N, C, H, W]}, or None when the teacher runs live."""

    samples: list[dict[str, Any]]
    teacher_features: dict[str, Tensor] | None = None

    def pin_memory(self) -> DistillBatch:
        """What DataLoader(pin_memory=True) calls on a custom batch type (CUDA runs)."""
        return DistillBatch(_pinned(self.samples), _pinned(self.teacher_features))


class CachedTeacherFeatures:
    """The teacher-feature source of a cached run: the batch's own, read and padded in the loader's workers."""

    def __init__(self, levels: Sequence[str], device: torch.device) -> None:
        self.levels = list(levels)
        self.device = device

    def __call__(self, batch: DistillBatch, images: Sequence[Tensor]) -> dict[str, Tensor]:
        assert batch.teacher_features is not None, "a cached run's batch carries the teacher's features"
        return {name: batch.teacher_features[name].to(self.device, non_blocking=True) for name in self.levels}


class DistillCollate:
    """Items -> DistillBatch, padding the cached teacher features to the batch's shape (runs in workers)."""

    def __init__(self, levels: Sequence[str], strides: Mapping[str, int], size_divisibility: int) -> None:
        self.levels = list(levels)
        self.strides = {name: int(strides[name]) for name in self.levels}
        self.size_divisibility = int(size_divisibility)

    def __call__(self, items: list[dict[str, Any]]) -> DistillBatch:
        features = None
        if items and "teacher_features" in items[0]:
            sizes = [tuple(item["image"].shape[-2:]) for item in items]
            padded = batch_padded_shape(sizes, self.size_divisibility)
            features = pad_levels([item.pop("teacher_features") for item in items], padded, self.levels, self.strides)
        return DistillBatch(items, features)


def report_skipped(dataset: DistillDataset, reader: CacheReader) -> None:
    """Warn (once, rank 0) when training images have no committed sample in the cache, saying why.

    A finished cache (one with a manifest) holds every sample its dump committed - the reader refuses it
    otherwise - so its missing images were skipped by that dump; an unfinished one may still get them.
    """
    if not dataset.skipped_images or not comm.is_main_process():
        return
    if reader.finished:
        logger.warning(
            "%d training image(s) have no sample in the finished cache %s and are skipped: its dump "
            "skipped them (unreadable with CACHE.SKIP_UNREADABLE, or not in the dataset it was dumped "
            "from)",
            dataset.skipped_images,
            reader.url,
        )
    else:
        logger.warning(
            "%d training image(s) have no committed sample in cache %s and are skipped: its dump has "
            "not finished (no manifest); finish it with `icd dump ... --resume` to train on them",
            dataset.skipped_images,
            reader.url,
        )
