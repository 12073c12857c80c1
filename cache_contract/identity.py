"""The identity records a cache carries: which teacher, which data, which preprocessing, which plan.

A cache is only reusable if every one of these matches; stage one writes them (`identity_attributes`)
and compares them on `--resume`; stage two compares preprocessing, dataset and levels before training
a student and replays the recorded augmentation plan (`recorded_plan`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

from cache_format.errors import CacheError
from detection.data.augment import AugmentationPlan
from detection.data.datasets import CocoIndex
from detection.interop import d2_conventions as d2_arch

# The root attributes that say what a cache was made from (besides the format's own keys).
IDENTITY_FIELDS = ("teacher", "preprocessing", "dataset", "augmentation")


def file_sha256(path: str, block: int = 1 << 20) -> str:
    """sha256 of a file's bytes ('' for no file), streamed so multi-GB checkpoints do not load into RAM."""
    if not path:
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def teacher_identity(cfg: Any) -> dict[str, Any]:
    """The teacher's architecture config, how it normalises its input, and the sha256 of its weights file.

    Normalisation (input format, pixel mean/std) belongs to the teacher, not to the cache's
    preprocessing: each model normalises the same raw pixels itself (docs/D2_INTEROP.md), so a BGR
    detectron2 teacher serves an RGB torchvision student. It is recorded so that `--resume` refuses a
    changed teacher and `--online` rebuilds the teacher as it was.
    """
    weights = cfg.MODEL.WEIGHTS
    options = d2_arch.describe(cfg)
    d2_config = str(cfg.MODEL.D2_CONFIG) if cfg.MODEL.BACKEND == "detectron2" else ""
    return {
        "architecture": cfg.MODEL.META_ARCHITECTURE,
        "depth": int(cfg.MODEL.BACKBONE.DEPTH),
        "norm": cfg.MODEL.BACKBONE.NORM,
        "fpn_channels": int(cfg.MODEL.FPN.OUT_CHANNELS),
        "weights": os.path.abspath(weights) if weights else "",
        "weights_sha256": file_sha256(weights) if weights and os.path.isfile(weights) else "",
        "backend": str(cfg.MODEL.BACKEND),
        "d2_config": d2_config,
        "d2_config_sha256": file_sha256(d2_config) if d2_config and os.path.isfile(d2_config) else "",
        **options,
    }


# teacher identity field -> config key, for rebuilding a recorded teacher (stage two's --online)
TEACHER_MODEL_KEYS = {
    "backend": "MODEL.BACKEND",
    "d2_config": "MODEL.D2_CONFIG",
    "conventions": "MODEL.CONVENTIONS",
    "input_format": "MODEL.INPUT_FORMAT",
    "pixel_mean": "MODEL.PIXEL_MEAN",
    "pixel_std": "MODEL.PIXEL_STD",
    "stride_in_1x1": "MODEL.RESNETS.STRIDE_IN_1X1",
    "top_block_in": "MODEL.FPN.TOP_BLOCK_IN",
}


def apply_teacher_model_options(tcfg: Any, recorded: dict[str, Any]) -> None:
    """Set the model options a teacher identity records (input format, normalisation, conventions) on tcfg."""
    for field_name, key in TEACHER_MODEL_KEYS.items():
        if field_name not in recorded:
            continue
        value = recorded[field_name]
        if field_name == "top_block_in" and value not in ("p5", "res5"):
            value = ""  # R-CNNs record how P6 is made ("p5-maxpool"); it is not configurable
        *parents, leaf = key.split(".")
        node = tcfg
        for name in parents:
            node = node[name]
        node[leaf] = list(value) if isinstance(value, (list, tuple)) else value


def preprocessing_identity(cfg: Any) -> dict[str, Any]:
    """What a student must share with the teacher to see the same pixels at the same positions.

    Not the normalisation: every model normalises the shared raw pixels with its own mean/std and
    channel order (recorded in the teacher identity), so it need not match between teacher and student.
    """
    return {
        "size_divisibility": int(cfg.MODEL.SIZE_DIVISIBILITY),
        "min_size_train": [int(v) for v in cfg.INPUT.MIN_SIZE_TRAIN],
        "max_size_train": int(cfg.INPUT.MAX_SIZE_TRAIN),
        "random_flip": cfg.INPUT.RANDOM_FLIP,
    }


def dataset_identity(name: str, json_path: str, num_images: int) -> dict[str, Any]:
    """The training set by content (annotation sha256), not by path, so a moved dataset still matches."""
    return {
        "name": name,
        "annotation_file": os.path.abspath(json_path),
        "annotation_sha256": file_sha256(json_path),
        "num_images": int(num_images),
    }


def identity_differences(stored: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two identity records (nested dicts), one line per field.

    Paths are informational (a dataset may move); they never count as a difference.
    """
    diffs: list[str] = []
    for key in sorted(set(stored) | set(wanted)):
        if key in ("annotation_file", "weights"):
            continue
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += identity_differences(a, b, f"{prefix}{key}.")
        elif _normalise(a) != _normalise(b):
            diffs.append(f"{prefix}{key}: cache has {a!r}, this run has {b!r}")
    return diffs


def _normalise(value: Any) -> Any:
    # JSON round-trips tuples to lists; compare structurally.
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def identity_attributes(cfg: Any, index: CocoIndex, plan: AugmentationPlan) -> dict[str, Any]:
    """Everything stage one records at a cache's root about what it was made from."""
    return {
        "teacher": teacher_identity(cfg),
        "preprocessing": preprocessing_identity(cfg),
        "dataset": dataset_identity(cfg.DATASETS.TRAIN[0], index.json_path, len(index.images)),
        "augmentation": plan.to_dict(),
        "num_classes": int(index.num_classes),
        "class_names": index.class_names,
    }


def recorded_plan(attributes: Mapping[str, Any], url: str) -> AugmentationPlan:
    """The augmentation plan a cache was dumped with, which stage two replays."""
    if "augmentation" not in attributes:
        raise CacheError(
            f"cache {url} records no augmentation plan ('augmentation' attribute)",
            "re-create the cache with `icd dump`, which stores the plan it used",
        )
    return AugmentationPlan.from_dict(attributes["augmentation"], source=f"cache {url}")


def dataset_mismatch(attributes: Mapping[str, Any], url: str, index: CocoIndex) -> str | None:
    """Why a cache was not dumped from `index`'s annotation file (sha256 of its content), or None if it was."""
    recorded = attributes.get("dataset", {}) or {}
    sha = recorded.get("annotation_sha256", "")
    if not sha or sha == index.json_sha256:
        return None
    return (
        f"the cache {url} was dumped from annotation file {recorded.get('annotation_file', '?')}, "
        f"but DATASETS.TRAIN is {index.json_path}, whose content differs (sha256 {index.json_sha256[:12]}... "
        f"vs {sha[:12]}...)"
    )
