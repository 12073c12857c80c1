"""Cached teacher samples for the ICD decoder alone: features and ground truth, no images, no student.

The auxiliary task that trains the decoder (docs/METHOD.md, section 3: identification + localisation)
depends only on the teacher's FPN features and the ground-truth boxes, and the cache holds both. So
fitting the decoder before stage two (`icd fit-decoder`) and measuring what it learnt (signals.py)
read the cache directly: no image is decoded, no detector is built.

Samples are split into fitting and held-out sets BY IMAGE (both flips of an image fall on one side), so
held-out measurements are on images the decoder never saw.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from cache_format import CacheReader
from cache_format.errors import CacheError
from cache_format.schema import COL
from detection.errors import UserError
from stage2_student_distill.data import batch_padded_shape, pad_levels


@dataclass
class TeacherBatch:
    """A batch of cached teacher samples, padded like a student batch would be."""

    features: dict[str, Tensor]  # {level: [N, C, H, W]} zero-padded beyond each sample's valid region
    image_sizes: list[tuple[int, int]]  # resized (h, w) per sample, before padding
    targets: list[dict[str, Tensor]]  # boxes [n, 4] xyxy pixels of the resized image, labels 1..K (detection)
    image_ids: list[int]

    def to(self, device: torch.device | str) -> TeacherBatch:
        return TeacherBatch(
            {k: v.to(device) for k, v in self.features.items()},
            self.image_sizes,
            [{k: v.to(device) for k, v in t.items()} for t in self.targets],
            self.image_ids,
        )


def sample_images(reader: CacheReader) -> tuple[np.ndarray, np.ndarray]:
    """(committed sample indices, their image ids), from one bulk read of the records."""
    committed = np.flatnonzero(reader.committed())
    if committed.size == 0:
        raise CacheError(
            f"cache {reader.url} has no committed sample",
            "finish stage one (`icd dump ... --resume`) before using the cache",
        )
    image_ids = reader.records()[committed][:, COL["image_id"]].astype(np.int64)
    return committed, image_ids


def split_by_image(reader: CacheReader, holdout_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fitting, held-out) committed sample indices; a seeded `holdout_fraction` of the IMAGES is held out.

    At least one image is held out when the fraction is positive, and at least one is kept for fitting.
    """
    if not 0 <= holdout_fraction < 1:
        raise UserError(
            f"held-out fraction {holdout_fraction} is outside [0, 1)",
            "hold out a fraction of the images such as 0.1 (0 holds out none)",
        )
    samples, image_ids = sample_images(reader)
    images = np.unique(image_ids)
    count = 0 if holdout_fraction == 0 else min(len(images) - 1, max(1, round(holdout_fraction * len(images))))
    held = np.random.default_rng(seed).permutation(images)[:count]
    is_held = np.isin(image_ids, held)
    return samples[~is_held], samples[is_held]


class TeacherSampleDataset(Dataset):
    """Item i = the cached sample `indices[i]`: its teacher features, resized size and ground truth.

    The reader opens lazily in each process (only the URL is pickled into DataLoader workers).
    """

    def __init__(self, url: str, indices: Sequence[int], levels: Sequence[str]) -> None:
        self.url = str(url)
        self.indices = [int(i) for i in indices]
        self.levels = list(levels)
        self._reader: CacheReader | None = None

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def reader(self) -> CacheReader:
        if self._reader is None:
            self._reader = CacheReader(self.url)
        return self._reader

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}

    def locate(self, item: int | tuple[int, int]) -> tuple[int, int]:
        """(cached sample index, variant 0) of an item index or an (epoch, index) of InfiniteSampler."""
        return self.indices[item[1] if isinstance(item, tuple) else item], 0

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        sample = self.reader.read_sample(self.locate(item)[0], self.levels)
        return {
            "features": {name: torch.from_numpy(sample.features[name]) for name in self.levels},  # [C, h, w]
            "size": (int(sample.meta.resized_h), int(sample.meta.resized_w)),
            # the cache stores classes 0..K-1; the ICD module takes detection labels 1..K
            "target": {
                "boxes": torch.from_numpy(sample.boxes).float(),
                "labels": torch.from_numpy(sample.classes).long() + 1,
            },
            "image_id": int(sample.meta.image_id),
        }


class TeacherCollate:
    """Items -> TeacherBatch, features zero-padded to the batch's largest size (rounded to `size_divisibility`)."""

    def __init__(self, levels: Sequence[str], strides: Mapping[str, int], size_divisibility: int = 1) -> None:
        self.levels = list(levels)
        self.strides = {name: int(strides[name]) for name in self.levels}
        self.size_divisibility = int(size_divisibility)

    def __call__(self, items: list[dict[str, Any]]) -> TeacherBatch:
        sizes = [item["size"] for item in items]
        padded = batch_padded_shape(sizes, self.size_divisibility)
        features = pad_levels([item["features"] for item in items], padded, self.levels, self.strides)
        return TeacherBatch(features, sizes, [item["target"] for item in items], [item["image_id"] for item in items])


def iter_batches(
    reader: CacheReader, indices: Sequence[int], batch_size: int, levels: Sequence[str] | None = None
) -> Iterator[TeacherBatch]:
    """The given samples (all levels, or the named ones) as batches, in order, read as they are needed."""
    levels = reader.level_names if levels is None else list(levels)
    dataset = TeacherSampleDataset(reader.url, indices, levels)
    dataset._reader = reader
    collate = TeacherCollate(levels, {lv.name: lv.stride for lv in reader.levels if lv.name in levels})
    for start in range(0, len(dataset), batch_size):
        yield collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
