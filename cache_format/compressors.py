"""Compressor names -> zarr v3 bytes-to-bytes codecs, always ending in a crc32c checksum.

Names: ``none``; ``zstd`` or ``zstd:LEVEL`` (1-22, default 1: on feature data level 3 compresses
under 1% smaller and up to 5x slower); ``blosc-CNAME[-SHUFFLE][:LEVEL]`` with CNAME in lz4, lz4hc,
zstd, zlib, blosclz, SHUFFLE in shuffle, bitshuffle, noshuffle (default: byte shuffle for 2/4-byte
values, bitshuffle for 1-byte values) and LEVEL 0-9 (default 5).
"""

from __future__ import annotations

import re

import numpy as np
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from cache_format.errors import CacheError

DEFAULT_COMPRESSOR = "zstd"
COMPRESSOR_HELP = (
    "none, zstd, zstd:LEVEL, blosc-CNAME[-SHUFFLE][:LEVEL] with CNAME lz4|lz4hc|zstd|zlib|blosclz "
    "and SHUFFLE shuffle|bitshuffle|noshuffle, e.g. 'blosc-lz4-bitshuffle'"
)
_ZSTD = re.compile(r"^zstd(?::(-?\d+))?$")
_BLOSC = re.compile(r"^blosc-(lz4|lz4hc|zstd|zlib|blosclz)(?:-(shuffle|bitshuffle|noshuffle))?(?::(\d+))?$")


def compressor_codecs(name: str, dtype: np.dtype) -> list[BytesBytesCodec]:
    """The codecs for values of `dtype`: the compressor (if any), then Crc32cCodec."""
    text = str(name).strip().lower()
    codecs: list[BytesBytesCodec] = []
    if text == "none":
        pass
    elif m := _ZSTD.match(text):
        level = int(m.group(1)) if m.group(1) else 1
        if not -7 <= level <= 22:
            raise CacheError(f"compressor {name!r}: zstd level {level} out of range", "use a level in 1..22")
        codecs.append(ZstdCodec(level=level))
    elif m := _BLOSC.match(text):
        itemsize = int(np.dtype(dtype).itemsize)
        shuffle = m.group(2) or ("bitshuffle" if itemsize == 1 else "shuffle")
        level = int(m.group(3)) if m.group(3) else 5
        if not 0 <= level <= 9:
            raise CacheError(f"compressor {name!r}: blosc level {level} out of range", "use a level in 0..9")
        codecs.append(BloscCodec(typesize=itemsize, cname=m.group(1), clevel=level, shuffle=shuffle))
    else:
        raise CacheError(f"unknown compressor {name!r}", f"use one of: {COMPRESSOR_HELP}")
    codecs.append(Crc32cCodec())
    return codecs


def validate_compressor(name: str) -> str:
    """Parse once for the error message; returns the normalised name."""
    compressor_codecs(name, np.dtype(np.float32))
    return str(name).strip().lower()
