"""Feature encodings: how a float32 level [C, h, w] becomes stored values and back, with error bounds.

Names: ``fp32``, ``fp16``, ``bf16``, ``int8``, and for the float ones an optional mantissa
bit-rounding suffix ``+bitroundK`` (K mantissa bits kept, numcodecs.BitRound) that makes the values
more compressible. Decoding never needs more than the stored array and, for int8, the per-channel
(scale, offset) pair. The error bounds below are the ones SPEC.md documents and the tests assert.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numcodecs
import numpy as np

from cache_format.errors import CacheError

_BASES = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16, "int8": np.int8}
_MAX_KEEPBITS = {"fp32": 22, "fp16": 9, "bf16": 6}  # below the type's own mantissa width
_PATTERN = re.compile(r"^(fp32|fp16|bf16|int8)(?:\+bitround(\d+))?$")
FP16_MAX = float(np.finfo(np.float16).max)

ENCODING_HELP = (
    "fp32, fp16, bf16, int8, or fp32/fp16/bf16 with '+bitroundK' "
    "(K mantissa bits kept: fp32 1-22, fp16 1-9, bf16 1-6), e.g. 'fp16+bitround7'"
)


@dataclass(frozen=True)
class Encoding:
    """A parsed encoding name; encode/decode one level and state its error bound."""

    name: str
    base: str
    keepbits: int | None = None

    @property
    def stored_dtype(self) -> np.dtype:
        return np.dtype(_BASES[self.base])

    @property
    def quantized(self) -> bool:
        """True when each sample also stores per-channel (scale, offset) in samples/quant."""
        return self.base == "int8"

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """float32 [C, h, w] -> (stored array, quant [2, C] float32 (scale; offset) or None).

        Raises CacheError on non-finite input or values outside the encoding's range, because
        either would decode to something other than what the teacher produced.
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise CacheError(
                "teacher features contain NaN or inf",
                "check the teacher's weights and inputs; a cache must hold finite values",
            )
        if self.base == "int8":
            return _int8_encode(x)
        if self.base == "fp32":
            out = _bitround(x, self.keepbits) if self.keepbits is not None else x
        elif self.base == "fp16":
            peak = float(np.abs(x).max()) if x.size else 0.0
            if peak > FP16_MAX:
                raise CacheError(
                    f"teacher features reach {peak:.4g}, beyond fp16's range ({FP16_MAX:g})",
                    "use encoding 'bf16' or 'fp32' for this teacher",
                )
            out = x.astype(np.float16)
            if self.keepbits is not None:
                out = _bitround(out, self.keepbits)
        else:  # bf16
            src = _bitround(x, self.keepbits) if self.keepbits is not None else x
            out = _to_bf16(src)
        return np.ascontiguousarray(out), None

    def decode(self, stored: np.ndarray, quant: np.ndarray | None = None) -> np.ndarray:
        """Stored array [C, h, w] (+ quant [2, C] for int8) -> float32 [C, h, w]."""
        if self.base == "int8":
            if quant is None:
                raise CacheError(
                    "int8 features decoded without their scale/offset",
                    "read samples through CacheReader, which loads samples/quant",
                )
            out = stored.astype(np.float32)
            out *= quant[0][:, None, None]
            out += quant[1][:, None, None]
            return out
        if self.base == "bf16":
            return (stored.astype(np.uint32) << 16).view(np.float32)
        return stored.astype(np.float32, copy=stored.dtype != np.float32)

    def error_bound(self, x: np.ndarray, quant: np.ndarray | None = None) -> np.ndarray:
        """Per-element bound on |decode(encode(x)) - x| (float64), as documented in SPEC.md."""
        ax = np.abs(x.astype(np.float64))
        if self.base == "int8":
            assert quant is not None
            scale = quant[0].astype(np.float64)[:, None, None]
            peak = np.abs(x.astype(np.float64)).reshape(x.shape[0], -1).max(axis=1)[:, None, None] if x.size else 0.0
            return np.broadcast_to(scale / 2 + 2.0**-21 * peak, x.shape)
        k = self.keepbits
        if self.base == "fp32":
            return np.zeros_like(ax) if k is None else 2.0 ** -(k + 1) * ax + 2.0**-126
        if self.base == "fp16":
            return 2.0**-11 * ax + 2.0**-25 if k is None else 2.0**-k * ax + 2.0 ** -(14 + k)
        return 2.0 ** -(8 if k is None else k + 1) * ax + 2.0**-126


def parse_encoding(name: str) -> Encoding:
    """'fp16+bitround7' -> Encoding; a bad name raises CacheError listing the accepted forms."""
    m = _PATTERN.match(str(name).strip().lower())
    if not m:
        raise CacheError(f"unknown encoding {name!r}", f"use one of: {ENCODING_HELP}")
    base, bits = m.group(1), m.group(2)
    if bits is None:
        return Encoding(base, base)
    if base == "int8":
        raise CacheError(f"encoding {name!r}: int8 has no mantissa to bit-round", "use plain 'int8'")
    keep = int(bits)
    if not 1 <= keep <= _MAX_KEEPBITS[base]:
        raise CacheError(
            f"encoding {name!r}: keepbits {keep} out of range for {base}",
            f"use {base}+bitroundK with 1 <= K <= {_MAX_KEEPBITS[base]}",
        )
    return Encoding(f"{base}+bitround{keep}", base, keep)


def _bitround(x: np.ndarray, keepbits: int) -> np.ndarray:
    # numcodecs.BitRound rounds the mantissa to nearest (ties to even) and returns the integer view.
    out = numcodecs.BitRound(keepbits).encode(x).view(x.dtype)
    if not np.isfinite(out).all():
        raise CacheError(
            "bit-rounding pushed a feature value past the float range", "use more keepbits or encoding 'fp32'"
        )
    return out


def _to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even. numpy has no bfloat16 dtype, so the
    upper 16 bits of the float32 pattern are rounded by hand."""
    u = x.view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    out = rounded.astype(np.uint16)
    if not np.isfinite((out.astype(np.uint32) << 16).view(np.float32)).all():
        raise CacheError("a feature value rounds past bf16's range", "use encoding 'fp32'")
    return out


def _int8_encode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel affine: q in [-128, 127], x ~ q * scale + offset with scale = (max - min) / 255
    and offset = min + 128 * scale, so q = -128 maps to the channel's min and q = 127 to its max."""
    c = x.shape[0]
    flat = x.reshape(c, -1)
    if flat.shape[1] == 0:
        return np.zeros(x.shape, np.int8), np.zeros((2, c), np.float32)
    lo = flat.min(axis=1).astype(np.float64)
    hi = flat.max(axis=1).astype(np.float64)
    scale = ((hi - lo) / 255.0).astype(np.float32)
    offset = (lo + 128.0 * scale.astype(np.float64)).astype(np.float32)
    s64 = scale.astype(np.float64)
    safe = np.where(s64 > 0, s64, 1.0)[:, None]
    q = np.rint((flat - offset.astype(np.float64)[:, None]) / safe)
    q[s64 == 0] = 0.0
    q = np.clip(q, -128, 127).astype(np.int8).reshape(x.shape)
    return q, np.stack([scale, offset])
