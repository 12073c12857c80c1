"""Stage-one benchmark: does writing the cache slow the teacher down, and how big is a cached image?

    python -m bench.stage1 [--quick] [--out bench/results/stage1.json] [--work DIR] [--rounds N] [--images N]
                           [--threads N]

1. Throughput (images/s) of the real stage-one path, `run_dump` into a fresh cache, for the default
   encoding (the config's CACHE.ENCODING, fp16) and for fp32 and int8, next to pure teacher inference
   on the same batches with nothing written: the same dataset, augmentation plan, shard-aligned batches,
   DataLoader and `sample_features` forward, and the same set-up (index, teacher load), minus the
   cache. Repetitions are interleaved (the order rotates every round) so that load from other
   processes on a shared machine hits every mode alike; the ratio dump/inference is the median of the
   per-round ratios. Each pass is timed twice: end to end, and over its loop only (from the first
   teacher forward on), which leaves out the fixed set-up (index, teacher load, cache creation and
   teacher weights) that a dump of 100k images amortises but that weighs on a benchmark-sized one.
   Target: loop ratio >= 0.9 with the default encoding.
2. Bytes per image at the demo resolution (from those caches on disk, teacher weights and zarr
   metadata excluded) and at COCO resolution (800x1333 frame, R-50 FPN teacher, P3-P7 x 256 channels,
   measured by the budget planner, which writes the features through CacheWriter for every encoding).
3. Peak RSS (resource.getrusage) of this process and of its DataLoader workers.

Each pass also records its CPU time (this process + its finished DataLoader workers), so the extra
work of encoding and writing shows even when other processes make wall times noisy. On CPU, torch
runs with --threads threads (default 1): on a shared machine two OpenMP threads competing with other
processes spin and ran 7x slower than one in our measurements, which would swamp the comparison.

No teacher is trained: both teachers are randomly initialised (seeded) and saved with
detection.engine.checkpoint.save_checkpoint. That is faithful for throughput; for bytes it is indicative only,
since trained features are smoother/sparser and compress differently. MODEL.DEVICE is cuda when torch
sees a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.run_all import bench_parser, machine_info, now_iso, run_in_workdir
from cache_contract.geometry import level_size
from cache_contract.teacher import load_teacher, sample_features
from cache_format.budget import format_size
from cache_format.budget import plan as plan_budget
from cache_format.schema import LevelSpec
from cache_format.store import usage
from detection.config import CfgNode, setup_cfg
from detection.data.augment import AugmentationPlan
from detection.data.datasets import train_index
from detection.data.synthetic import generate, render_image
from detection.engine.checkpoint import save_checkpoint
from detection.modeling.detector import build_detector
from stage1_teacher_dump import dump as dump_module
from stage1_teacher_dump.dump import cache_levels, run_dump, to_numpy
from stage1_teacher_dump.samples import DumpDataset, enumerate_samples

REPO = Path(__file__).resolve().parents[1]
DEMO_TEACHER = REPO / "configs" / "demo" / "teacher_retinanet_r34.yaml"
COCO_TEACHER = REPO / "configs" / "COCO-Detection" / "retinanet_R_50_FPN_1x.yaml"
EXTRA_ENCODINGS = ("fp32", "int8")
TARGET_RATIO = 0.9
COCO_FRAME = (800, 1333)  # the resized frame of a landscape COCO image at the 1x test scale
COCO_TRAIN_IMAGES = 118287  # train2017, images without annotations included (stage one dumps them too)
COCO_CLASSES = 80
WEIGHTS_NOTE = (
    "randomly initialised teacher (seeded, not trained): throughput is representative; bytes are "
    "indicative only, trained features compress differently"
)


@dataclass
class Sizes:
    """How big the benchmark runs: demo images, interleaved rounds, COCO-size samples."""

    train_images: int
    rounds: int
    coco_samples: int


QUICK = Sizes(train_images=16, rounds=3, coco_samples=2)
FULL = Sizes(train_images=96, rounds=5, coco_samples=4)


# --- set-up --------------------------------------------------------------------------------------
def demo_config(work: Path, train_images: int, device: str) -> CfgNode:
    """The demo teacher's config on a freshly generated synthetic set, with a random-init checkpoint."""
    data = generate(work / "synth", train=train_images, val=1, size=128, seed=0)
    cfg = setup_cfg(str(DEMO_TEACHER), [])
    cfg.merge_from_dict(
        {
            "OUTPUT_DIR": str(work / "teacher"),
            "MODEL": {"DEVICE": device},
            "DATASETS": {
                "TRAIN": ["bench_synth_train"],
                "TEST": ["bench_synth_val"],
                "CATALOG": {
                    "bench_synth_train": [data["train_json"], data["train_images"]],
                    "bench_synth_val": [data["val_json"], data["val_images"]],
                },
            },
        },
        source="bench/stage1.py",
    )
    index = train_index(cfg)
    torch.manual_seed(0)
    teacher = build_detector(cfg, index.num_classes + 1)
    weights = save_checkpoint(work / "teacher" / "model_final.pth", teacher)
    cfg.MODEL.WEIGHTS = str(weights)
    return cfg


def with_encoding(cfg: CfgNode, encoding: str) -> CfgNode:
    out = cfg.clone()
    out.CACHE.ENCODING = encoding
    return out


# --- the two measured paths ------------------------------------------------------------------------
def cpu_seconds() -> float:
    """User + system CPU time so far of this process and of its finished children (DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Pass:
    """One measured pass: samples, seconds end to end, and seconds from the first forward on (the loop)."""

    samples: int
    seconds: float
    loop_seconds: float


def inference_pass(cfg: CfgNode) -> Pass:
    """Stage one with nothing written: run_dump's set-up, loader and forward only."""
    start = time.perf_counter()
    device = torch.device(cfg.MODEL.DEVICE)
    index = train_index(cfg)
    plan = AugmentationPlan.for_training(cfg)
    samples = enumerate_samples(index, plan)
    dataset = DumpDataset(samples)
    teacher = load_teacher(cfg, index.num_classes, device)
    names = [lv.name for lv in cache_levels(cfg, teacher, samples)]
    loader = dump_module.dump_loader(
        cfg, dataset, samples, list(range(len(samples))), teacher.size_divisibility, device
    )
    seen, first_forward = 0, None
    for records in loader:
        first_forward = first_forward or time.perf_counter()
        sample_features(teacher, [r["image"] for r in records], names, bool(cfg.SOLVER.AMP))
        seen += len(records)
    if device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    return Pass(seen, end - start, end - (first_forward or start))


def cache_bytes(cache: str, samples: int) -> dict[str, float]:
    """Bytes per sample on disk, without the fixed parts (teacher weights, zarr.json metadata)."""
    _, total = usage(cache)
    _, weights = usage(cache, "teacher_weights")
    _, features = usage(cache, "features")
    metadata = sum(p.stat().st_size for p in Path(cache).rglob("zarr.json"))
    return {
        "bytes_per_image": (total - weights - metadata) / samples,
        "feature_bytes_per_image": features / samples,
        "fixed_bytes": weights + metadata,
    }


@contextlib.contextmanager
def first_forward_clock() -> Iterator[list[float]]:
    """Note when run_dump's first teacher forward starts (its loop, after index/teacher/cache set-up).

    Instrumentation only: the dump module's `sample_features` is wrapped by a function that records a
    timestamp and calls the original, and restored afterwards.
    """
    original = dump_module.sample_features
    stamps: list[float] = []

    def timed(*args: Any, **kwargs: Any) -> Any:
        if not stamps:
            stamps.append(time.perf_counter())
        return original(*args, **kwargs)

    dump_module.sample_features = timed
    try:
        yield stamps
    finally:
        dump_module.sample_features = original


def dump_pass(cfg: CfgNode, cache: Path) -> tuple[Pass, dict[str, float]]:
    """The real `run_dump` into a fresh cache (deleted afterwards), and the cache's bytes per image."""
    start = time.perf_counter()
    with first_forward_clock() as stamps, contextlib.redirect_stderr(io.StringIO()):
        summary = run_dump(cfg, str(cache))  # the progress bar still draws (a real cost), unseen
    end = time.perf_counter()
    sizes = cache_bytes(str(cache), summary.committed)
    shutil.rmtree(cache, ignore_errors=True)
    return Pass(summary.written_now, end - start, end - (stamps[0] if stamps else start)), sizes


def peak_rss_mb() -> dict[str, float]:
    """Peak resident set size so far: this process, and the largest finished child (DataLoader worker)."""
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20  # ru_maxrss: KiB on Linux, bytes on macOS
    return {
        "self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
        "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale,
    }


def throughput_rounds(cfg: CfgNode, work: Path, rounds: int) -> dict[str, Any]:
    """Interleaved rounds of inference and dumps; every mode once per round, in rotating order."""
    default = str(cfg.CACHE.ENCODING)
    modes = ["inference", default, *[e for e in EXTRA_ENCODINGS if e != default]]
    passes: dict[str, list[Pass]] = {mode: [] for mode in modes}
    cpu_per_image: dict[str, list[float]] = {mode: [] for mode in modes}
    sizes: dict[str, dict[str, float]] = {}
    # Warm-up (not measured): page cache, allocator, first worker fork. Inference first, so the RSS
    # peak after it is inference's own.
    samples = inference_pass(cfg).samples
    rss_inference = peak_rss_mb()
    dump_pass(with_encoding(cfg, default), work / "warmup.zarr")
    for r in range(rounds):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        for mode in order:
            cpu_start = cpu_seconds()
            if mode == "inference":
                measured = inference_pass(cfg)
            else:
                measured, sizes[mode] = dump_pass(with_encoding(cfg, mode), work / f"cache_{mode}_{r}.zarr")
            if measured.samples != samples:
                raise RuntimeError(f"{mode} processed {measured.samples} samples, expected {samples}")
            passes[mode].append(measured)
            cpu_per_image[mode].append((cpu_seconds() - cpu_start) / samples)
            print(
                f"  round {r + 1}/{rounds} {mode:>9}: {samples / measured.loop_seconds:7.2f} img/s in the loop, "
                f"{samples / measured.seconds:7.2f} end to end, {1000 * cpu_per_image[mode][-1]:6.1f} CPU ms/img",
                flush=True,
            )

    def rates(mode: str, loop: bool) -> list[float]:
        return [p.samples / (p.loop_seconds if loop else p.seconds) for p in passes[mode]]

    def paired_ratios(loop: bool) -> dict[str, float]:
        base = rates("inference", loop)
        return {mode: statistics.median(d / i for d, i in zip(rates(mode, loop), base)) for mode in modes[1:]}

    return {
        "samples_per_pass": samples,
        "default_encoding": default,
        "images_per_s": {
            kind: {
                mode: {
                    "median": statistics.median(rates(mode, loop)),
                    "min": min(rates(mode, loop)),
                    "max": max(rates(mode, loop)),
                    "runs": rates(mode, loop),
                }
                for mode in modes
            }
            for kind, loop in (("loop", True), ("end_to_end", False))
        },
        "ratio_dump_over_inference": {"loop": paired_ratios(True), "end_to_end": paired_ratios(False)},
        "setup_seconds": {mode: statistics.median(p.seconds - p.loop_seconds for p in passes[mode]) for mode in modes},
        "cpu_ms_per_image": {mode: 1000 * statistics.median(v) for mode, v in cpu_per_image.items()},
        "demo_bytes": sizes,
        "peak_rss_mb": {"after_inference_only": rss_inference, "after_all_dumps": peak_rss_mb()},
    }


# --- COCO resolution ---------------------------------------------------------------------------------
def coco_bytes(samples: int, device: str) -> dict[str, Any]:
    """Bytes/image at 800x1333 for every encoding the planner knows, from an R-50 FPN teacher's P3-P7."""
    cfg = setup_cfg(str(COCO_TEACHER), ["MODEL.DEVICE", device])
    torch.manual_seed(0)
    teacher = build_detector(cfg, COCO_CLASSES + 1).eval().requires_grad_(False).to(device)
    h, w = COCO_FRAME
    levels = [
        LevelSpec(name, teacher.strides[name], teacher.out_channels, *level_size(h, w, teacher.strides[name]))
        for name in teacher.levels
    ]
    calibration = []
    for i in range(samples):
        # Synthetic shapes rendered at COCO height and stretched to the 800x1333 frame: image-like
        # statistics (edges, flat regions, textures) rather than noise.
        pixels, _ = render_image(seed=0, split="train", index=i, size=h)
        image = torch.from_numpy(pixels).permute(2, 0, 1).float()[None]
        image = torch.nn.functional.interpolate(image, size=(h, w), mode="bilinear", align_corners=False)[0]
        (features,) = sample_features(teacher, [image.clamp(0, 255)], [lv.name for lv in levels])
        calibration.append({name: to_numpy(feature) for name, feature in features.items()})
    result = plan_budget(
        calibration,
        num_samples=COCO_TRAIN_IMAGES,
        budget_bytes=2**62,
        levels=levels,
        compressor=str(cfg.CACHE.COMPRESSOR),
        shard_samples=int(cfg.CACHE.SHARD_SAMPLES),
        tile=int(cfg.CACHE.TILE),
    )
    values = sum(lv_values.size for lv_values in calibration[0].values())
    return {
        "frame": list(COCO_FRAME),
        "teacher": "RetinaNet R-50 FPN (random init)",
        "levels": teacher.levels,
        "channels": teacher.out_channels,
        "values_per_image": values,
        "samples_measured": samples,
        "projected_for_train2017_images": COCO_TRAIN_IMAGES,
        "encodings": {
            c.label: {
                "bytes_per_image": c.bytes_per_sample,
                "bytes_per_value": c.bytes_per_value,
                "projected_train2017_bytes": c.projected_bytes,
                "worst_rel_rmse": c.worst_rel_rmse,
            }
            for c in result.candidates
        },
    }


# --- report ------------------------------------------------------------------------------------------
def markdown_tables(result: dict[str, Any]) -> str:
    tp = result["throughput"]
    default = tp["default_encoding"]
    lines = [
        f"Device: {result['device']} (torch threads {result['torch_threads']}); {tp['samples_per_pass']} samples per pass "
        f"({result['train_images']} images x {result['variants']} variants, demo resolution), "
        f"{result['rounds']} interleaved rounds; teacher: {result['teacher_note']}.",
        "",
        "Loop: from the first teacher forward to the end (the rate of a long dump); end to end: the whole call, "
        "with set-up (index, teacher load, cache creation, teacher weights) that a long dump amortises.",
        "",
        "| mode | images/s loop | ratio loop | target (loop) | images/s end to end | ratio end to end | "
        "set-up s | CPU ms/image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ips, ratio = tp["images_per_s"], tp["ratio_dump_over_inference"]
    for mode in ips["loop"]:
        if mode == "inference":
            label, r_loop, r_e2e, target = "teacher inference only", "1.00", "1.00", ""
        else:
            r = ratio["loop"][mode]
            label = f"dump {mode}" + (" (default)" if mode == default else "")
            r_loop, r_e2e = f"{r:.3f}", f"{ratio['end_to_end'][mode]:.3f}"
            target = f">= {TARGET_RATIO} ({'met' if r >= TARGET_RATIO else 'MISSED'})" if mode == default else ""
        lines.append(
            f"| {label} | {ips['loop'][mode]['median']:.2f} | {r_loop} | {target} | "
            f"{ips['end_to_end'][mode]['median']:.2f} | {r_e2e} | {tp['setup_seconds'][mode]:.2f} | "
            f"{tp['cpu_ms_per_image'][mode]:.1f} |"
        )
    lines += [
        "",
        "| bytes/image | " + " | ".join(tp["demo_bytes"]) + " |",
        "|---|" + "---|" * len(tp["demo_bytes"]),
        "| demo (128 px, P3-P7 x {} ch) | ".format(result["demo_channels"])
        + " | ".join(format_size(v["bytes_per_image"]) for v in tp["demo_bytes"].values())
        + " |",
    ]
    coco = result["coco"]
    encs = coco["encodings"]
    lines += [
        "",
        f"COCO resolution ({coco['frame'][0]}x{coco['frame'][1]}, {coco['teacher']}, "
        f"P3-P7 x {coco['channels']} ch = {coco['values_per_image']:,} values/image; "
        f"measured on {coco['samples_measured']} images):",
        "",
        "| encoding | bytes/image | bytes/value | rel. RMSE | projected, train2017 x 1 variant |",
        "|---|---|---|---|---|",
    ]
    for label, e in encs.items():
        lines.append(
            f"| {label} | {format_size(e['bytes_per_image'])} | {e['bytes_per_value']:.3f} | "
            f"{e['worst_rel_rmse']:.2e} | {format_size(e['projected_train2017_bytes'])} |"
        )
    rss = tp["peak_rss_mb"]
    lines += [
        "",
        f"Peak RSS: {rss['after_inference_only']['self']:.0f} MB after inference only, "
        f"{rss['after_all_dumps']['self']:.0f} MB after all dumps (this process); DataLoader worker "
        f"{rss['after_all_dumps']['children']:.0f} MB; {result['peak_rss_mb_total']['self']:.0f} MB "
        "at the end (COCO-size forward included).",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("stage1", __doc__, "fewer images and rounds (about 2 minutes on 2 cores)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3 quick, 5 full)")
    parser.add_argument("--images", type=int, default=None, help="synthetic training images (default 16 / 96)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads on CPU (default 1, stable on a shared machine; 0: torch's default)",
    )
    return parser


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    sizes = QUICK if args.quick else FULL
    rounds = args.rounds or sizes.rounds
    images = args.images or sizes.train_images
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cfg = demo_config(work, images, device)
    print(
        f"stage1 benchmark on {device}: {images} images x {cfg.CACHE.NUM_VARIANTS} variants, {rounds} rounds",
        flush=True,
    )
    throughput = throughput_rounds(cfg, work, rounds)
    print("COCO-resolution bytes/image ...", flush=True)
    coco = coco_bytes(sizes.coco_samples, device)
    result = {
        "benchmark": "stage1",
        "quick": bool(args.quick),
        "date": now_iso(),
        "machine": machine_info(),
        "device": device,
        "teacher_config": str(DEMO_TEACHER.relative_to(REPO)),
        "teacher_note": WEIGHTS_NOTE,
        "demo_channels": int(cfg.MODEL.FPN.OUT_CHANNELS),
        "train_images": images,
        "variants": int(cfg.CACHE.NUM_VARIANTS),
        "rounds": rounds,
        "torch_threads": torch.get_num_threads(),
        "target_ratio_default_encoding": TARGET_RATIO,
        "throughput": throughput,
        "ratios": {
            f"dump_{mode}/inference ({kind})": r
            for kind, per_mode in throughput["ratio_dump_over_inference"].items()
            for mode, r in per_mode.items()
        },
        "meets_target": throughput["ratio_dump_over_inference"]["loop"][throughput["default_encoding"]] >= TARGET_RATIO,
        "coco": coco,
        "peak_rss_mb_total": peak_rss_mb(),
        "seconds": time.perf_counter() - started,
    }
    result["markdown"] = markdown_tables(result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if (args.rounds is not None and args.rounds < 1) or (args.images is not None and args.images < 1):
        parser.error("--rounds and --images must be at least 1")
    return run_in_workdir(run, args, "icd-bench-stage1-")


if __name__ == "__main__":
    sys.exit(main())
