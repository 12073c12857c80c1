"""The student-side compatibility check: may this student distil from this cache?"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from cache_format.errors import CacheError


def _normalise(value: Any) -> Any:
    # Attributes went through JSON: tuples became lists, so compare JSON forms.
    return json.loads(json.dumps(value, sort_keys=True, default=str))


DEFAULT_FIX = (
    "train the student with the teacher's preprocessing and levels (or add adapters for channel "
    "differences), or dump a cache for this configuration"
)
# Normalisation is each model's own business: teacher and student read the same raw pixels and each
# normalises them itself, so a BGR detectron2 teacher serves an RGB torchvision student. Caches written
# before this rule carry these keys under "preprocessing"; they are not compared.
PER_MODEL_KEYS = ("pixel_mean", "pixel_std", "input_format")


def check_compatibility(
    cache_attributes: Mapping[str, Any], student: Mapping[str, Any], *, source: str = "cache", fix: str = DEFAULT_FIX
) -> None:
    """Raise CacheError naming every differing field (with the cache's and the student's value).

    `student` = {"levels": [(name, stride, channels), ...], "preprocessing": {...}}. Every student
    level must exist in the cache with the same stride and channel count (the cache may hold more
    levels); every preprocessing key present on either side must have the same value (resize, padding
    grid, flip plan), except the per-model normalisation keys (PER_MODEL_KEYS). `source` names what
    offers the features in the message ("cache", or "online teacher" for the same check on a live
    teacher's identity).
    """
    diffs: list[str] = []
    cache_levels = {d["name"]: d for d in cache_attributes.get("levels", [])}
    for entry in student.get("levels", []):
        name, stride, channels = (
            (entry["name"], entry["stride"], entry["channels"]) if isinstance(entry, Mapping) else tuple(entry)
        )
        have = cache_levels.get(name)
        if have is None:
            diffs.append(f"level {name}: the student needs it, the {source} has only {sorted(cache_levels)}")
            continue
        if int(have["stride"]) != int(stride):
            diffs.append(f"level {name} stride: {source} {have['stride']}, student {stride}")
        if int(have["channels"]) != int(channels):
            diffs.append(f"level {name} channels: {source} {have['channels']}, student {channels}")
    cache_pre = _normalise(cache_attributes.get("preprocessing", {}) or {})
    student_pre = _normalise(student.get("preprocessing", {}) or {})
    for key in sorted((set(cache_pre) | set(student_pre)) - set(PER_MODEL_KEYS)):
        a, b = cache_pre.get(key, "<missing>"), student_pre.get(key, "<missing>")
        if a != b:
            diffs.append(f"preprocessing.{key}: {source} {a!r}, student {b!r}")
    if diffs:
        raise CacheError(f"the {source} does not match the student:\n    " + "\n    ".join(diffs), fix)
