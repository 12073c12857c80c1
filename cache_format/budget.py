"""Budget planning: which encoding gives the most faithful cache that fits a byte budget?

Sizes and fidelity are measured, not modelled: every candidate encodes the calibration samples for
real into an in-memory cache with the target's layout (same levels, shard size, tile, codecs), so the
bytes include compression, shard indexes and per-sample records. Fidelity is the relative RMSE
(||decoded - x|| / ||x||) and the max abs error per level over all calibration samples.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import fsspec
import numpy as np

from cache_format.compressors import DEFAULT_COMPRESSOR
from cache_format.errors import CacheError
from cache_format.reader import CacheReader
from cache_format.schema import LevelSpec, SampleMeta
from cache_format.store import usage
from cache_format.writer import CacheWriter

DEFAULT_CANDIDATES = ("fp32", "fp16", "fp16+bitround7", "bf16", "fp16+bitround5", "int8")

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "p": 10**15,
    "pb": 10**15,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "pib": 2**50,
}
_SIZE = re.compile(r"^\s*(-?(?:\d+(?:\.\d*)?|\.\d+))\s*([a-zA-Z]*)\s*$")
SIZE_HELP = (
    "a number with an optional unit: B, K/KB, M/MB, G/GB, T/TB, P/PB (powers of 1000) or "
    "KiB, MiB, GiB, TiB, PiB (powers of 1024), e.g. '200GB', '1.5TiB', '500M'"
)


def parse_size(text: str | int) -> int:
    """'200GB' -> 200_000_000_000, '1.5TiB' -> 1_649_267_441_664; bad strings raise CacheError."""
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = _SIZE.match(str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise CacheError(f"cannot parse size {text!r}", f"write {SIZE_HELP}")
        value, unit = float(m.group(1)), m.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise CacheError(
            f"size {text!r} is not positive: a budget is a number of bytes above zero", f"write {SIZE_HELP}"
        )
    return size


def join_size_arguments(argv: Sequence[str], options: Sequence[str] = ("--budget",)) -> list[str]:
    """argv with `--budget -5GB` written as `--budget=-5GB`, so that a negative size reaches parse_size and
    its one-line message instead of argparse's "expected one argument" (argparse takes '-5GB' for an
    option; it only accepts values that look like plain negative numbers)."""
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        if args[i] in options and i + 1 < len(args) and re.match(r"^-[\d.]", args[i + 1]):
            out.append(f"{args[i]}={args[i + 1]}")
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out


def format_size(n: float, round_up: bool = False) -> str:
    """'1.23 MB'; with round_up the shown value is never below n (for 'a budget of at least ...')."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            if unit == "B":
                return f"{math.ceil(n) if round_up else int(n)} B"
            return f"{(math.ceil(n * 100) / 100) if round_up else n:.2f} {unit}"
        n /= 1000.0
    return f"{n:.2f} PB"


@dataclass
class Candidate:
    """One measured encoding + compressor."""

    encoding: str
    compressor: str
    bytes_per_sample: float
    fixed_bytes: int
    values_per_sample: float
    rel_rmse: dict[str, float]
    max_abs: dict[str, float]
    projected_bytes: int = 0
    fits: bool = False

    @property
    def label(self) -> str:
        return f"{self.encoding}@{self.compressor}"

    @property
    def bytes_per_value(self) -> float:
        return self.bytes_per_sample / self.values_per_sample

    @property
    def worst_rel_rmse(self) -> float:
        return max(self.rel_rmse.values()) if self.rel_rmse else 0.0


@dataclass
class Plan:
    """The measured table and the choice (the most faithful candidate that fits, or None)."""

    num_samples: int
    budget_bytes: int
    calibration_samples: int
    candidates: list[Candidate] = field(default_factory=list)
    choice: Candidate | None = None

    def table(self) -> str:
        levels = list(self.candidates[0].rel_rmse) if self.candidates else []
        head = (
            f"{'candidate':<28}{'bytes/sample':>14}{'projected':>12}{'bytes/value':>12}"
            + "".join(f"{'rRMSE ' + n:>12}" for n in levels)
            + "".join(f"{'maxabs ' + n:>12}" for n in levels)
            + "  fits"
        )
        lines = [
            f"plan: {self.num_samples} samples, budget {format_size(self.budget_bytes)}, "
            f"measured on {self.calibration_samples} calibration samples",
            head,
        ]
        for c in self.candidates:
            mark = " <- chosen" if c is self.choice else ""
            lines.append(
                f"{c.label:<28}{format_size(c.bytes_per_sample):>14}{format_size(c.projected_bytes):>12}"
                f"{c.bytes_per_value:>12.3f}"
                + "".join(f"{c.rel_rmse[n]:>12.2e}" for n in levels)
                + "".join(f"{c.max_abs[n]:>12.2e}" for n in levels)
                + f"  {'yes' if c.fits else 'no'}{mark}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict:
        return {
            "num_samples": self.num_samples,
            "budget_bytes": self.budget_bytes,
            "calibration_samples": self.calibration_samples,
            "choice": self.choice.label if self.choice else None,
            "candidates": [
                {
                    "encoding": c.encoding,
                    "compressor": c.compressor,
                    "bytes_per_sample": c.bytes_per_sample,
                    "projected_bytes": c.projected_bytes,
                    "bytes_per_value": c.bytes_per_value,
                    "rel_rmse": c.rel_rmse,
                    "max_abs": c.max_abs,
                    "fits": c.fits,
                }
                for c in self.candidates
            ],
        }


def _split_candidate(spec: str | tuple[str, str], compressor: str) -> tuple[str, str]:
    if isinstance(spec, tuple):
        return spec
    enc, _, comp = str(spec).partition("@")
    return enc.strip(), (comp.strip() or compressor)


def infer_meta(sample: Mapping[str, np.ndarray], levels: Sequence[LevelSpec], image_id: int) -> SampleMeta:
    """A resized size consistent with every level's valid size (ceil(size / stride) == h_l)."""
    bounds = []
    for axis in (1, 2):
        lo, hi = 1, 10**9
        for lv in levels:
            n = int(np.asarray(sample[lv.name]).shape[axis])
            lo, hi = max(lo, (n - 1) * lv.stride + 1), min(hi, n * lv.stride)
        if lo > hi:
            raise CacheError(
                f"calibration sample {image_id}: level sizes "
                f"{ {lv.name: np.asarray(sample[lv.name]).shape[1:] for lv in levels} } are not "
                "those of one image at the levels' strides",
                "pass metas=[SampleMeta(...)] or crop each level to ceil(resized size / stride)",
            )
        bounds.append(hi)
    return SampleMeta(image_id, 0, 1.0, False, bounds[0], bounds[1])


def measure(
    calibration: Sequence[Mapping[str, np.ndarray]],
    levels: Sequence[LevelSpec],
    encoding: str,
    compressor: str,
    metas: Sequence[SampleMeta],
    shard_samples: int,
    tile: int,
) -> Candidate:
    """Encode the calibration samples into an in-memory cache; measure bytes and fidelity."""
    url = f"memory://icd-plan-{uuid.uuid4().hex}"
    try:
        writer = CacheWriter.create(
            url,
            num_samples=len(calibration),
            levels=list(levels),
            encoding=encoding,
            compressor=compressor,
            attributes={},
            shard_samples=shard_samples,
            tile=tile,
        )
        for i, (sample, meta) in enumerate(zip(calibration, metas)):
            writer.write_sample(i, {lv.name: sample[lv.name] for lv in levels}, meta)
        writer.close()
        files, total = usage(url)
        fixed = sum(
            len(fsspec.filesystem("memory").cat_file(p))
            for p in fsspec.filesystem("memory").find(url)
            if p.endswith("zarr.json")
        )
        reader = CacheReader(url)
        err2 = {lv.name: 0.0 for lv in levels}
        ref2 = {lv.name: 0.0 for lv in levels}
        maxabs = {lv.name: 0.0 for lv in levels}
        for i, sample in enumerate(calibration):
            got = reader.read_sample(i).features
            for lv in levels:
                x = np.asarray(sample[lv.name], dtype=np.float64)
                d = got[lv.name].astype(np.float64) - x
                err2[lv.name] += float((d * d).sum())
                ref2[lv.name] += float((x * x).sum())
                maxabs[lv.name] = max(maxabs[lv.name], float(np.abs(d).max()) if d.size else 0.0)
    finally:
        fs = fsspec.filesystem("memory")
        if fs.exists(url):
            fs.rm(url, recursive=True)
    values = sum(np.asarray(s[lv.name]).size for s in calibration for lv in levels) / len(calibration)
    rel = {n: (math.sqrt(err2[n] / ref2[n]) if ref2[n] > 0 else math.sqrt(err2[n])) for n in err2}
    return Candidate(
        writer.encoding.name, writer.compressor, (total - fixed) / len(calibration), fixed, values, rel, maxabs
    )


def plan(
    calibration: Sequence[Mapping[str, np.ndarray]],
    num_samples: int,
    budget_bytes: int | str,
    candidates: Sequence[str | tuple[str, str]] | None = None,
    *,
    levels: Sequence[LevelSpec],
    metas: Sequence[SampleMeta] | None = None,
    compressor: str = DEFAULT_COMPRESSOR,
    shard_samples: int = 16,
    tile: int = 64,
    reserved_bytes: int = 0,
) -> Plan:
    """Measure each candidate ('fp16', 'int8@blosc-lz4', ...) on the calibration samples (dicts level ->
    float32 [C, h, w]) and choose the most faithful (lowest worst-level relative RMSE, then smallest)
    whose projected size for `num_samples` fits `budget_bytes`. Raises CacheError, with the measured
    table and the total budget that would fit, when none fits; `reserved_bytes` (e.g. the teacher
    weights, already taken off `budget_bytes`) are added to that total."""
    budget = parse_size(budget_bytes)
    if not calibration:
        raise CacheError("no calibration samples", "pass a few dozen real teacher outputs (dicts level -> [C,h,w])")
    if num_samples < 1:
        raise CacheError(f"num_samples must be >= 1, got {num_samples}", "count the samples to cache")
    levels = list(levels)
    metas = list(metas) if metas is not None else [infer_meta(s, levels, i) for i, s in enumerate(calibration)]
    result = Plan(int(num_samples), budget, len(calibration))
    for spec in candidates or DEFAULT_CANDIDATES:
        enc, comp = _split_candidate(spec, compressor)
        c = measure(calibration, levels, enc, comp, metas, min(shard_samples, len(calibration)), tile)
        c.projected_bytes = int(math.ceil(c.fixed_bytes + c.bytes_per_sample * num_samples))
        c.fits = c.projected_bytes <= budget
        result.candidates.append(c)
    fitting = [c for c in result.candidates if c.fits]
    if not fitting:
        smallest = min(result.candidates, key=lambda c: c.projected_bytes)
        total = smallest.projected_bytes + int(reserved_bytes)
        extra = f" + {format_size(reserved_bytes)} teacher weights" if reserved_bytes else ""
        raise CacheError(
            f"no encoding fits the budget: {num_samples} samples in {format_size(budget)} allow "
            f"{format_size(budget / num_samples)} per sample; the smallest candidate, {smallest.label}, needs "
            f"{format_size(smallest.bytes_per_sample)} per sample ({format_size(smallest.projected_bytes)} in "
            f"all{extra})\n{result.table()}",
            f"raise the budget to a total of at least {format_size(total, round_up=True)} (for {smallest.label}), cache "
            "fewer samples "
            "(fewer images or augmentation variants), or add a smaller candidate encoding",
        )
    result.choice = min(fitting, key=lambda c: (c.worst_rel_rmse, c.projected_bytes))
    return result
