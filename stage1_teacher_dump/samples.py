"""The samples of a dump: every training image times every augmentation variant, in a fixed order.

Sample i is (image i // V, variant i % V) over the images sorted by id, so the numbering depends only
on the annotation file and the plan; the cache stores each sample's image id and variant, so readers
never need this formula.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from detection.data.augment import AugmentationPlan, AugParams, apply_boxes, apply_image
from detection.data.datasets import CocoImage, CocoIndex, UnreadableImageError, read_image


def enumerate_samples(index: CocoIndex, plan: AugmentationPlan) -> list[tuple[CocoImage, AugParams]]:
    """(image, geometry) of every sample of the training images, those with annotations: stage two, like
    `icd train` (detectron2's FILTER_EMPTY_ANNOTATIONS), never trains on the others, so caching them would
    spend teacher time and disk on samples nothing reads (`icd dump` says how many it leaves out)."""
    images = sorted(index.training_images(), key=lambda image: image.id)
    return [
        (image, plan.params(image.id, variant, image.height, image.width))
        for image in images
        for variant in range(plan.num_variants)
    ]


class DumpDataset(Dataset):
    """Sample index -> the augmented image and its instances in the sample's frame.

    An unreadable image is returned as an error record rather than raised: DataLoader workers would
    wrap the exception in a traceback, and stage one must name the file and decide (stop, or skip
    and record) in the main process.
    """

    def __init__(self, samples: list[tuple[CocoImage, AugParams]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, params = self.samples[index]
        record: dict[str, Any] = {"index": index, "params": params, "file_name": image.file_name}
        try:
            pixels = read_image(image)
        except UnreadableImageError as exc:
            record["error"] = exc
            return record
        instances = image.instances
        boxes = torch.tensor([a.bbox_xyxy for a in instances], dtype=torch.float32).reshape(-1, 4)
        record["image"] = apply_image(pixels, params)
        record["boxes"] = apply_boxes(boxes, params).numpy()
        # Classes are stored 0..K-1 (ICD's class index); the detector's labels are these + 1.
        record["classes"] = torch.tensor([a.label - 1 for a in instances], dtype=torch.int64).numpy()
        return record


def collate_records(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(batch)
