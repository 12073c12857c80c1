"""Stage-two benchmark: what does ICD cost per training step once the teacher is cached?

    python -m bench.stage2 [--quick] [--out bench/results/stage2.json] [--work DIR] [--rounds N] [--device D]

1. Step time of (a) the student alone (`icd train`'s Trainer and data path), (b) online ICD (the live
   teacher, `icd distill --online`), (c) cached ICD for each encoding (fp32, fp16, int8), all on the
   same batches (same seed, sampler, augmentation plan; checked) with the real engine loop. The modes run
   in their own threads and take turns (round-robin, a few steps each, only one runs at a time), so load
   from other processes on a shared machine hits every mode alike. Per step the loop's time splits into
   compute (from a batch's arrival to the next request) and data wait (inside the loader's `next`);
   the first turn of each mode is warm-up. Reported: median compute + mean steady-state data wait (the
   first steps of each turn are excluded from the wait: their batches were prefetched while the mode
   was paused), c/a, b/c, and the live teacher's forward time (its share of b).
   Targets: c/a <= 1.10; b/c >= 1 + teacher forward / c (online pays at least the teacher's forward).
   (d) When s3fs and moto[server] are installed: cached fp16 read from s3:// - the same fp16 cache
   uploaded to a local S3 endpoint (moto) and read through a proxy that adds --s3-latency-ms (20) per
   request - interleaved with the others. Target: its data wait below 10% of its step.
2. Peak RSS of cached training (this process and its DataLoader worker) with a small cache and a 10x
   larger one (10x the images), same number of steps, each in a fresh process. Must not grow.

Caches are written by the real stage one (`run_dump`) from the demo's teacher (RetinaNet R-34, randomly
initialised and seeded: throughput does not depend on training) for the demo's RetinaNet R-18 student
(configs/demo). Distillation runs with no detach warm-up so every measured step is the full ICD step.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.run_all import bench_parser, machine_info, now_iso, run_in_workdir
from cache_format.repack import repack
from detection.config import CfgNode, save_config, setup_cfg
from detection.data.datasets import train_index
from detection.data.synthetic import generate
from detection.engine.checkpoint import save_checkpoint
from detection.engine.trainer import Trainer, build_trainer
from detection.modeling.detector import build_detector
from stage1_teacher_dump.dump import run_dump
from stage2_student_distill.cli import build_distill_trainer
from stage2_student_distill.data import DistillBatch
from stage2_student_distill.online import OnlineTeacher

REPO = Path(__file__).resolve().parents[1]
TEACHER_CONFIG = REPO / "configs" / "demo" / "teacher_retinanet_r34.yaml"
STUDENT_CONFIG = REPO / "configs" / "demo" / "student_retinanet_r18.yaml"
DISTILL_CONFIG = REPO / "configs" / "demo" / "distill_retinanet_r18.yaml"
ENCODINGS = ("fp32", "fp16", "int8")
TARGET_CACHED_OVER_STUDENT = 1.10
S3_MODE = "cached_fp16_s3"  # the fp16 cache read from s3:// (local endpoint behind a latency proxy)
S3_LATENCY_MS = 20.0
TARGET_S3_DATA_WAIT = 0.10  # data wait below 10% of the step (issue 12)


@dataclass
class Sizes:
    """How big the benchmark runs."""

    images: int  # training images (x the demo's 2 variants = cached samples)
    batch: int
    rounds: int  # measured turns per mode (after one warm-up turn)
    steps_per_turn: int
    rss_steps: int


QUICK = Sizes(images=8, batch=2, rounds=3, steps_per_turn=4, rss_steps=4)
FULL = Sizes(images=64, batch=8, rounds=8, steps_per_turn=4, rss_steps=8)


# --- set-up ----------------------------------------------------------------------------------------
def dataset_overrides(work: Path, name: str, images: int) -> dict[str, Any]:
    data = generate(work / name, train=images, val=1, size=128, seed=0)
    return {
        "DATASETS": {
            "TRAIN": [f"{name}_train"],
            "TEST": [],
            "CATALOG": {f"{name}_train": [data["train_json"], data["train_images"]]},
        }
    }


def teacher_config(work: Path, data: dict[str, Any], device: str) -> CfgNode:
    """The demo teacher on the benchmark's data, randomly initialised (seeded) and saved as its weights."""
    cfg = setup_cfg(str(TEACHER_CONFIG), [])
    cfg.merge_from_dict(
        {"OUTPUT_DIR": str(work / "teacher"), "MODEL": {"DEVICE": device}, **data}, source="bench/stage2.py"
    )
    torch.manual_seed(0)
    teacher = build_detector(cfg, train_index(cfg).num_classes + 1)
    cfg.MODEL.WEIGHTS = str(save_checkpoint(work / "teacher" / "model_final.pth", teacher))
    return cfg


def dump(tcfg: CfgNode, cache: Path, encoding: str) -> str:
    """Stage one (`run_dump`) into a new cache."""
    cfg = tcfg.clone()
    cfg.CACHE.ENCODING = encoding
    with contextlib.redirect_stderr(io.StringIO()):
        run_dump(cfg, str(cache))
    return str(cache)


def caches_per_encoding(tcfg: CfgNode, work: Path) -> dict[str, str]:
    """An fp32 dump, re-encoded to the other encodings by `icd cache repack` (one teacher pass, not three)."""
    fp32 = dump(tcfg, work / "cache_fp32.zarr", "fp32")
    out = {"fp32": fp32}
    for encoding in ENCODINGS:
        if encoding != "fp32":
            out[encoding] = repack(fp32, str(work / f"cache_{encoding}.zarr"), encoding).dst
    return out


def student_config(
    path: Path, work: Path, mode: str, data: dict[str, Any], device: str, batch: int, max_iter: int
) -> CfgNode:
    cfg = setup_cfg(str(path), [])
    cfg.merge_from_dict(
        {
            "OUTPUT_DIR": str(work / "runs" / mode),
            "MODEL": {"DEVICE": device},
            **data,
            "SOLVER": {"IMS_PER_BATCH": batch, "MAX_ITER": max_iter, "CHECKPOINT_PERIOD": 10**9, "LOG_PERIOD": 10**9},
            "DISTILL": {"WARMUP_DETACH_ITERS": 0},
        },
        source="bench/stage2.py",
    )
    return cfg


# --- interleaving ----------------------------------------------------------------------------------
class Turns:
    """Round-robin turns between threads: a mode runs `steps` steps, then passes the turn on."""

    def __init__(self, modes: Sequence[str], steps: int) -> None:
        self.order = list(modes)
        self.steps = steps
        self.current = 0
        self.count = 0
        self.finished: set[str] = set()
        self.cond = threading.Condition()

    def wait(self, mode: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.order[self.current] == mode)

    def step_done(self, mode: str) -> None:
        with self.cond:
            self.count += 1
            if self.count == self.steps:
                self._advance()

    def finish(self, mode: str) -> None:
        with self.cond:
            self.finished.add(mode)
            if self.order[self.current] == mode:
                self._advance()

    def _advance(self) -> None:
        self.count = 0
        for _ in range(len(self.order)):
            self.current = (self.current + 1) % len(self.order)
            if self.order[self.current] not in self.finished:
                break
        self.cond.notify_all()


@dataclass
class ModeLog:
    """Per step of one mode: data wait, compute, the batch's image ids; the live teacher's forward times."""

    data: list[float] = field(default_factory=list)
    compute: list[float] = field(default_factory=list)
    image_ids: list[list[int]] = field(default_factory=list)
    teacher: list[float] = field(default_factory=list)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_loader(
    factory: Callable[[int], Any], mode: str, turns: Turns, log: ModeLog, device: torch.device
) -> Callable[[int], Iterator[Any]]:
    """The trainer's loader factory, timing each `next` and waiting for the mode's turn before it."""

    def build(start_iter: int) -> Iterator[Any]:
        last = None
        turns.wait(mode)
        batches = iter(factory(start_iter))  # workers start while only this mode runs
        while True:
            if last is not None:
                sync(device)
                log.compute.append(time.perf_counter() - last)
                turns.step_done(mode)
            turns.wait(mode)
            start = time.perf_counter()
            batch = next(batches)
            last = time.perf_counter()
            log.data.append(last - start)
            samples = batch.samples if isinstance(batch, DistillBatch) else batch
            log.image_ids.append([int(s["image_id"]) for s in samples])
            yield batch

    return build


class TimedTeacher:
    """Wraps the online teacher to time its forward pass (what caching removes)."""

    def __init__(self, teacher: Any, log: ModeLog, device: torch.device) -> None:
        self.teacher, self.log, self.device = teacher, log, device

    def __call__(self, *args: Any) -> Any:
        sync(self.device)
        start = time.perf_counter()
        out = self.teacher(*args)
        sync(self.device)
        self.log.teacher.append(time.perf_counter() - start)
        return out


def interleaved(trainers: dict[str, Trainer], steps_per_turn: int) -> dict[str, ModeLog]:
    """Train every mode to its MAX_ITER in turns; returns the per-step logs."""
    turns = Turns(list(trainers), steps_per_turn)
    logs = {mode: ModeLog() for mode in trainers}
    errors: list[BaseException] = []
    for mode, trainer in trainers.items():
        trainer.build_loader = timed_loader(trainer.build_loader, mode, turns, logs[mode], trainer.device)
        if isinstance(trainer.teacher_features, OnlineTeacher):
            trainer.teacher_features = TimedTeacher(trainer.teacher_features, logs[mode], trainer.device)

    def work(mode: str, trainer: Trainer) -> None:
        try:
            trainer.train()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            turns.finish(mode)

    threads = [threading.Thread(target=work, args=item, name=f"bench-{item[0]}") for item in trainers.items()]
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars still draw (a real cost), unseen
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return logs


def summarise(log: ModeLog, sizes: Sizes, prefetched: int) -> dict[str, Any]:
    """Step statistics over the measured turns (the first turn is warm-up)."""
    k, measured = sizes.steps_per_turn, range(sizes.steps_per_turn, sizes.steps_per_turn * (sizes.rounds + 1))
    compute = [log.compute[i] for i in measured]
    steady = [log.data[i] for i in measured if i % k >= prefetched] or [log.data[i] for i in measured]
    out = {
        "steps_measured": len(compute),
        "compute_s": statistics.median(compute),
        "data_wait_s": statistics.fmean(steady),
        "data_wait_all_s": statistics.fmean(log.data[i] for i in measured),
    }
    out["step_s"] = out["compute_s"] + out["data_wait_s"]
    out["compute_per_round_s"] = [
        statistics.median(log.compute[r * k : (r + 1) * k]) for r in range(1, sizes.rounds + 1)
    ]
    if log.teacher:
        out["teacher_forward_s"] = statistics.median(log.teacher[k : k * (sizes.rounds + 1)] or log.teacher)
    return out


# --- memory ----------------------------------------------------------------------------------------
def peak_rss_mb() -> dict[str, float]:
    """Peak RSS so far: this process, and the largest finished child (the DataLoader worker).

    This process's own peak is VmHWM (Linux): getrusage's ru_maxrss survives exec, so a probe started
    from the (much larger) benchmark process would report the benchmark's peak instead of its own.
    """
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                own = int(line.split()[1]) / 1024
    return {"self": own, "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale}


def rss_probe(config: str, cache: str) -> dict[str, float]:
    """(In a fresh process) cached training for SOLVER.MAX_ITER steps; the peak RSS it reached."""
    trainer = build_distill_trainer(setup_cfg(config), cache, with_evaluation=False)
    with contextlib.redirect_stderr(io.StringIO()):
        trainer.train()
    del trainer
    gc.collect()  # the DataLoader worker exits (and is reaped) with its iterator
    return peak_rss_mb()


def measure_rss(runs: dict[str, tuple[CfgNode, str]], work: Path) -> dict[str, dict[str, float]]:
    """Peak RSS of cached training per {name: (config, cache)}, each in its own fresh process.

    Separate processes because a process's peak never falls and its DataLoader worker is forked from
    it: a second run in the same process would inherit the first one's memory. They run concurrently,
    since peak memory does not depend on the CPU time other processes take.
    """
    procs = {}
    for name, (cfg, cache) in runs.items():
        config = save_config(cfg, work / "rss" / name)
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "bench.stage2", "--rss-probe", str(config), cache],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"RSS probe '{name}' failed:\n{stderr[-3000:]}")
        out[name] = json.loads(stdout.strip().splitlines()[-1])
    return out


def cache_samples(cache: str) -> int:
    from cache_format import CacheReader

    return int(CacheReader(cache).committed().sum())


# --- the benchmark ---------------------------------------------------------------------------------
def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    sizes = dataclasses.replace(QUICK if args.quick else FULL, **({"rounds": args.rounds} if args.rounds else {}))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        # One thread: on a shared CPU a multi-threaded step stalls whenever any core is taken by another
        # process, which makes step times far noisier; the DataLoader worker has the other core.
        torch.set_num_threads(1)
    phases: dict[str, float] = {}
    started = clock = time.perf_counter()
    data = dataset_overrides(work, "bench_small", sizes.images)
    tcfg = teacher_config(work, data, device)
    caches = caches_per_encoding(tcfg, work)
    phases["caches"], clock = time.perf_counter() - clock, time.perf_counter()
    print(
        f"stage2 benchmark on {device}: {sizes.images} images x {tcfg.CACHE.NUM_VARIANTS} variants, batch "
        f"{sizes.batch}, {sizes.rounds} rounds of {sizes.steps_per_turn} steps per mode",
        flush=True,
    )

    max_iter = sizes.steps_per_turn * (sizes.rounds + 1) + 1
    modes = ["student", "online", *[f"cached_{enc}" for enc in ENCODINGS]]
    s3 = None if args.no_s3 else start_object_store(caches["fp16"], args.s3_latency_ms)
    if s3 is not None:
        caches[S3_MODE.removeprefix("cached_")] = s3["url"]
        modes.append(S3_MODE)
    trainers: dict[str, Trainer] = {}
    for mode in modes:
        if mode == "student":
            trainers[mode] = build_trainer(
                student_config(STUDENT_CONFIG, work, mode, data, device, sizes.batch, max_iter)
            )
        else:
            cfg = student_config(DISTILL_CONFIG, work, mode, data, device, sizes.batch, max_iter)
            cache = caches["fp32"] if mode == "online" else caches[mode.removeprefix("cached_")]
            trainers[mode] = build_distill_trainer(cfg, cache, online=mode == "online", with_evaluation=False)
    workers = int(trainers["student"].cfg.DATALOADER.NUM_WORKERS)
    phases["build"], clock = time.perf_counter() - clock, time.perf_counter()
    endpoint_cpu0 = s3["cpu_seconds"]() if s3 else 0.0
    try:
        logs = interleaved(trainers, sizes.steps_per_turn)
        endpoint_cpu = (s3["cpu_seconds"]() - endpoint_cpu0) if s3 else 0.0
    finally:
        if s3 is not None:
            s3["stop"]()
    phases["interleaved_steps"], clock = time.perf_counter() - clock, time.perf_counter()
    same_batches = all(logs[m].image_ids[: max_iter - 1] == logs["student"].image_ids[: max_iter - 1] for m in modes)
    steps = {mode: summarise(logs[mode], sizes, prefetched=2 * workers) for mode in modes}
    a, b = steps["student"]["step_s"], steps["online"]["step_s"]
    ratios: dict[str, float] = {}
    for enc in ENCODINGS:
        c = steps[f"cached_{enc}"]["step_s"]
        ratios[f"cached_{enc}/student"] = c / a
        ratios[f"online/cached_{enc}"] = b / c
    teacher_s = steps["online"]["teacher_forward_s"]
    ratios["teacher_share_of_online"] = teacher_s / b
    # The same ratios of compute time round by round (each round runs every mode once, close in time):
    # their spread shows how much load from other processes moved the numbers.
    per_round = {mode: steps[mode]["compute_per_round_s"] for mode in modes}
    spread = {
        f"cached_{enc}/student": [c / s for c, s in zip(per_round[f"cached_{enc}"], per_round["student"])]
        for enc in ENCODINGS
    }
    spread["online/cached_fp16"] = [o / c for o, c in zip(per_round["online"], per_round["cached_fp16"])]
    del trainers

    print("peak RSS: small and 10x caches ...", flush=True)
    big = dataset_overrides(work, "bench_big", 10 * sizes.images)
    big_tcfg = teacher_config(work / "big", big, device)
    big_cache = dump(big_tcfg, work / "cache_big_fp16.zarr", "fp16")
    small_cache = caches["fp16"]
    phases["big_cache"], clock = time.perf_counter() - clock, time.perf_counter()
    probes = {
        name: (student_config(DISTILL_CONFIG, work, f"rss_{name}", d, device, sizes.batch, sizes.rss_steps), cache)
        for name, cache, d in (("small", small_cache, data), ("10x", big_cache, big))
    }
    rss = {
        name: {"cache_samples": cache_samples(probes[name][1]), **peak}
        for name, peak in measure_rss(probes, work).items()
    }
    phases["rss"] = time.perf_counter() - clock

    c16 = steps["cached_fp16"]["step_s"]
    result = {
        "benchmark": "stage2",
        "quick": bool(args.quick),
        "date": now_iso(),
        "machine": machine_info(),
        "device": device,
        "configs": {
            "teacher": str(TEACHER_CONFIG.relative_to(REPO)),
            "student": str(STUDENT_CONFIG.relative_to(REPO)),
            "distill": str(DISTILL_CONFIG.relative_to(REPO)),
        },
        "sizes": sizes.__dict__,
        "dataloader_workers": workers,
        "same_batches": same_batches,
        "steps": steps,
        "ratios": ratios,
        "compute_ratios_per_round": spread,
        "targets": {
            "cached_fp16/student <= 1.10": c16 / a <= TARGET_CACHED_OVER_STUDENT,
            "online/cached_fp16 >= 1 + teacher/cached_fp16": b / c16 >= 1 + teacher_s / c16,
            "peak RSS does not grow with a 10x cache (<= +5%)": (
                rss["10x"]["self"] <= 1.05 * rss["small"]["self"]
                and rss["10x"]["children"] <= 1.05 * rss["small"]["children"]
            ),
        },
        "peak_rss_mb": rss,
        "object_storage": object_storage_result(steps, s3, endpoint_cpu, args.s3_latency_ms, workers, sizes),
        "torch_threads": torch.get_num_threads(),
        "phase_seconds": phases,
        "seconds": time.perf_counter() - started,
    }
    if s3 is not None:
        result["targets"][f"{S3_MODE}: data wait < {TARGET_S3_DATA_WAIT:.0%} of the step"] = (
            result["object_storage"]["data_wait_share"] < TARGET_S3_DATA_WAIT
        )
    result["markdown"] = markdown(result)
    return result


# --- object storage ----------------------------------------------------------------------------------
def start_object_store(fp16_cache: str, latency_ms: float) -> dict[str, Any] | None:
    """The fp16 cache uploaded (byte for byte) to a local S3 endpoint (moto, bench/local_s3.py), read
    through a proxy adding `latency_ms` per request; AWS_* variables of this process (and so of its
    DataLoader workers) point at it. None when s3fs / moto are not installed."""
    import os

    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError:
        print("stage2 benchmark: s3fs / moto[server] not installed, no object-storage mode", flush=True)
        return None
    from bench.local_s3 import LocalS3

    server = LocalS3().start()
    proxy = server.latency_proxy(latency_ms).start() if latency_ms > 0 else None
    server.make_bucket("icd-bench")
    server.filesystem().put(fp16_cache, "icd-bench/cache_fp16", recursive=True)
    os.environ.update((proxy or server).env())

    def stop() -> None:
        if proxy is not None:
            proxy.stop()
        server.stop()

    return {
        "url": "s3://icd-bench/cache_fp16",
        "endpoint": (proxy or server).endpoint,
        "stop": stop,
        "cpu_seconds": lambda: server.cpu_seconds() + (proxy.cpu_seconds() if proxy else 0.0),
    }


def object_storage_result(
    steps: dict[str, Any], s3: dict[str, Any] | None, endpoint_cpu: float, latency_ms: float, workers: int, sizes: Sizes
) -> dict[str, Any]:
    """The S3 mode's data wait against its step and against the same cache on local disk."""
    if s3 is None:
        return {"skipped": "--no-s3 or s3fs/moto[server] not installed"}
    remote, local = steps[S3_MODE], steps["cached_fp16"]
    s3_steps = sizes.steps_per_turn * (sizes.rounds + 1)  # the endpoint serves only this mode's turns
    return {
        "latency_ms_per_request": latency_ms,
        "dataloader_workers": workers,
        "data_wait_s": remote["data_wait_s"],
        "step_s": remote["step_s"],
        "data_wait_share": remote["data_wait_s"] / remote["step_s"],
        "local_fp16_data_wait_s": local["data_wait_s"],
        "step_vs_local_fp16": remote["step_s"] / local["step_s"],
        "endpoint_cpu_s": endpoint_cpu,
        "endpoint_cpu_s_per_s3_step": endpoint_cpu / max(1, s3_steps),
    }


def markdown(result: dict[str, Any]) -> str:
    steps, ratios, s = result["steps"], result["ratios"], result["sizes"]
    a = steps["student"]["step_s"]
    lines = [
        f"Device: {result['device']}; demo RetinaNet R-18 student, RetinaNet R-34 teacher (random init), 128 px, "
        f"batch {s['batch']}, {result['dataloader_workers']} DataLoader worker(s); {s['rounds']} interleaved turns "
        f"of {s['steps_per_turn']} steps per mode after a warm-up turn; same batches in every mode: "
        f"{'yes' if result['same_batches'] else 'NO'}.",
        "",
        "| mode | step (s) | compute (s) | data wait (s) | x student |",
        "|---|---|---|---|---|",
    ]
    for mode, st in steps.items():
        lines.append(
            f"| {mode} | {st['step_s']:.3f} | {st['compute_s']:.3f} | {st['data_wait_s']:.4f} | "
            f"{st['step_s'] / a:.3f} |"
        )
    teacher = steps["online"]["teacher_forward_s"]
    lines += [
        "",
        f"Live teacher forward: {teacher:.3f} s/step ({ratios['teacher_share_of_online']:.0%} of the online step).",
        "",
        "| ratio | value | target |",
        "|---|---|---|",
    ]
    for enc in ENCODINGS:
        c = steps[f"cached_{enc}"]["step_s"]
        lines.append(
            f"| c/a cached {enc} / student | {ratios[f'cached_{enc}/student']:.3f} | <= {TARGET_CACHED_OVER_STUDENT} |"
        )
        lines.append(
            f"| b/c online / cached {enc} | {ratios[f'online/cached_{enc}']:.3f} | "
            f">= {1 + teacher / c:.3f} (1 + teacher / c) |"
        )
    rss = result["peak_rss_mb"]
    lines += [
        "",
        "Compute-time ratios round by round (min - max): "
        + "; ".join(f"{k} {min(v):.2f} - {max(v):.2f}" for k, v in result["compute_ratios_per_round"].items())
        + ".",
    ]
    lines += ["", "| peak RSS (MB) | cache samples | training process | DataLoader worker |", "|---|---|---|---|"]
    for name, r in rss.items():
        lines.append(f"| {name} cache | {r['cache_samples']} | {r['self']:.0f} | {r['children']:.0f} |")
    s3 = result.get("object_storage", {})
    if "data_wait_share" in s3:
        lines += [
            "",
            f"Object storage ({S3_MODE}): the fp16 cache on a local S3 endpoint (moto) read through a proxy "
            f"adding {s3['latency_ms_per_request']:g} ms per request, {s3['dataloader_workers']} DataLoader "
            f"worker(s): data wait {s3['data_wait_s']:.4f} s of a {s3['step_s']:.3f} s step "
            f"({s3['data_wait_share']:.1%}; local disk fp16: {s3['local_fp16_data_wait_s']:.4f} s); step "
            f"{s3['step_vs_local_fp16']:.3f}x the local fp16 step: the endpoint (moto + proxy, Python, on "
            f"the same cores as the training) used {s3['endpoint_cpu_s']:.1f} CPU-s, "
            f"{s3['endpoint_cpu_s_per_s3_step']:.2f} s per step of this mode, and the worker's S3 client "
            "costs more CPU per sample than a local read (bench/cache_io); a real endpoint's CPU is not "
            "the trainer's.",
        ]
    lines += [
        "",
        "Targets: " + "; ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in result["targets"].items()) + ".",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("stage2", __doc__, "fewer images and steps (about 2 minutes on 2 cores)")
    parser.add_argument("--rounds", type=int, default=None, help="measured turns per mode (default 3 quick, 6 full)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-s3", action="store_true", help="skip the object-storage mode (local S3 endpoint)")
    parser.add_argument(
        "--s3-latency-ms",
        type=float,
        default=S3_LATENCY_MS,
        help="latency the proxy adds to every S3 request (default %(default)s; 0: moto directly)",
    )
    parser.add_argument("--rss-probe", nargs=2, metavar=("CONFIG", "CACHE"), help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.rss_probe:
        print(json.dumps(rss_probe(*args.rss_probe)))
        return 0
    if args.rounds is not None and args.rounds < 1:
        raise SystemExit("bench.stage2: --rounds must be at least 1")
    return run_in_workdir(run, args, "icd-bench-stage2-")


if __name__ == "__main__":
    sys.exit(main())
