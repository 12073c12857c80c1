"""Content checksums stored in each sample record (crc32c, hardware-accelerated by the crc32c package).

zarr's Crc32cCodec already guards every chunk's bytes; these guard what a chunk checksum cannot see:
a shard object that is missing or replaced reads back as fill values without any chunk error.
"""

from __future__ import annotations

import crc32c
import numpy as np


def level_crc(stored: np.ndarray, quant: np.ndarray | None) -> int:
    """crc32c of a level's stored values (C order), continued over its int8 (scale; offset) [2, C]."""
    crc = crc32c.crc32c(np.ascontiguousarray(stored))
    if quant is not None:
        crc = crc32c.crc32c(np.ascontiguousarray(quant, dtype=np.float32), crc)
    return int(crc)


def instances_crc(boxes: np.ndarray, classes: np.ndarray) -> int:
    """crc32c of a sample's boxes (float32 [n, 4]) continued over its classes (int64 [n])."""
    crc = crc32c.crc32c(np.ascontiguousarray(boxes, dtype=np.float32))
    return int(crc32c.crc32c(np.ascontiguousarray(classes, dtype=np.int64), crc))
