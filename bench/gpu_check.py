"""`make gpu-check`: the project's CUDA and mixed-precision paths on one GPU, in at most 8 minutes.

    python -m bench.gpu_check [--out bench/results/gpu] [--work DIR] [--parts tests stage1 stage2 accuracy]

Without a CUDA device it says so in one line and exits 2. On a GPU it runs four parts, each in its own
process group with its own time budget (killed when it runs past it, and reported so), and writes
OUT/<part>.json for each part plus OUT/summary.json and OUT/SUMMARY.md:

1. tests     the tests marked `cuda` (`pytest -m cuda`): one train / dump / distill (cached and online)
             iteration per family with AMP on and off, cached == online, resume, NCCL DDP.
2. stage1    stage one's dump (fp16 cache, teacher under AMP) against the teacher's inference alone on the
             same batches, with and without AMP (bench/stage1.py's passes, interleaved rounds): images/s,
             the dump/inference ratio, peak GPU memory per mode.
3. stage2    stage-two steps of the student alone, cached ICD (fp16 cache) and online ICD, each with AMP on
             and off, on the same batches in interleaved turns (bench/stage2.py): s/step, the data-wait
             share, cached/student and online/cached per AMP setting, fp32/AMP per mode; then per mode,
             alone, the peak GPU memory of a few steps.
4. accuracy  bench/accuracy.py --size quick on RetinaNet (teacher, fp32 + budget caches, baseline,
             init-only and cached students, COCO AP): a smoke run that the whole pipeline trains and
             evaluates on the GPU, seconds long; its APs are not a result.

The synthetic data and demo-sized models make every part short: the numbers show that the paths run and
how their costs compare on this GPU, not COCO-scale throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "gpu"
TOTAL_BUDGET_S = 480  # the 8 minutes on one GPU, every part and the summary included


@dataclass(frozen=True)
class Part:
    name: str
    budget_s: int
    what: str


PARTS = (
    Part("tests", 150, "pytest -m cuda"),
    Part("stage1", 60, "dump (fp16, AMP) vs teacher inference"),
    Part("stage2", 100, "student / cached / online steps, AMP on and off"),
    Part("accuracy", 130, "accuracy smoke run (bench.accuracy --size quick, RetinaNet)"),
)
# Process start-up (torch import, CUDA context) of each part and the summary come out of what is left.
SLACK_S = TOTAL_BUDGET_S - sum(p.budget_s for p in PARTS)
assert SLACK_S >= 30, "the parts' budgets leave too little of the 8 minutes for start-up and the summary"


@dataclass(frozen=True)
class Sizes:
    """How big the measured parts are (GPU: fits their budgets; TINY: the CPU tests of this module)."""

    stage1_images: int
    stage1_rounds: int
    stage2_images: int
    stage2_batch: int
    stage2_rounds: int
    stage2_steps_per_turn: int
    memory_steps: int


GPU = Sizes(
    stage1_images=64,
    stage1_rounds=2,
    stage2_images=32,
    stage2_batch=8,
    stage2_rounds=3,
    stage2_steps_per_turn=4,
    memory_steps=3,
)
TINY = Sizes(
    stage1_images=2,
    stage1_rounds=1,
    stage2_images=2,
    stage2_batch=2,
    stage2_rounds=1,
    stage2_steps_per_turn=1,
    memory_steps=1,
)


# --- the refusal -----------------------------------------------------------------------------------
def cuda_refusal() -> str | None:
    """None where torch sees a CUDA device; else the one line that says why the check cannot run."""
    import torch

    if torch.cuda.is_available():
        return None
    build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
    return (
        f"gpu-check: no CUDA device is visible to torch {torch.__version__} ({build}{shown}); "
        "run `make gpu-check` on a machine with an NVIDIA GPU"
    )


# --- budgets and the part runner ---------------------------------------------------------------------
def budget_lines(parts: Sequence[Part]) -> list[str]:
    lines = [
        f"gpu-check: {TOTAL_BUDGET_S} s in all: "
        + ", ".join(f"{p.name} {p.budget_s} s" for p in parts)
        + f", start-up and summary {TOTAL_BUDGET_S - sum(p.budget_s for p in parts)} s"
    ]
    lines += [f"  {p.name:<9} {p.budget_s:>4} s  {p.what}" for p in parts]
    return lines


def part_command(part: Part, out: Path, work: Path, device: str, sizes: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.gpu_check",
        "--part",
        part.name,
        "--out",
        str(out),
        "--work",
        str(work / part.name),
        "--device",
        device,
        "--sizes",
        sizes,
    ]


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_part(part: Part, cmd: Sequence[str], out: Path, log: Path) -> dict[str, Any]:
    """Run one part's command within its budget; its status, seconds and (if it wrote one) its result.

    The part runs in a session of its own, so a part killed at its budget takes its children (DataLoader
    workers, pytest's subprocesses) with it.
    """
    result_file = out / f"{part.name}.json"
    result_file.unlink(missing_ok=True)  # a result from an earlier check must not pass for this one's
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as sink:
        proc = subprocess.Popen(list(cmd), cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=part.budget_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    seconds = time.perf_counter() - start
    status = "over budget" if code is None else ("ok" if code == 0 else f"failed (exit {code})")
    entry: dict[str, Any] = {
        "part": part.name,
        "budget_s": part.budget_s,
        "seconds": round(seconds, 1),
        "status": status,
        "log": str(log),
    }
    if result_file.is_file():
        entry["result"] = json.loads(result_file.read_text())
    if status != "ok":
        entry["log_tail"] = tail(log)
    return entry


# --- part 1: the cuda tests ----------------------------------------------------------------------------
def junit_counts(xml_path: Path) -> dict[str, Any]:
    """passed / failed / skipped counts and the failing tests' first message lines from pytest's JUnit XML."""
    root = ET.parse(xml_path).getroot()
    cases = root.iter("testcase")
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures = []
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            counts["failed"] += 1
            failures.append({"test": name, "message": (problem.get("message") or "").splitlines()[:1]})
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures}


def part_tests(work: Path, device: str, sizes: Sizes) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    xml = work / "cuda_tests.xml"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rfEs", f"--junitxml={xml}"], cwd=REPO)
    counts = junit_counts(xml) if xml.is_file() else {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
    return {
        "exit_code": proc.returncode,
        "seconds": time.perf_counter() - start,
        **counts,
        "ok": proc.returncode == 0 and counts["failed"] == 0 and counts["passed"] > 0,
    }


# --- part 2: stage one ---------------------------------------------------------------------------------
def gpu_memory(device: str) -> Callable[[], float | None]:
    """Reset the peak-memory counter now; the returned function reads the peak since then (MB), on CUDA."""
    import torch

    if not device.startswith("cuda"):
        return lambda: None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return lambda: torch.cuda.max_memory_allocated() / 2**20


def part_stage1(work: Path, device: str, sizes: Sizes) -> dict[str, Any]:
    from bench import stage1

    base = stage1.demo_config(work, sizes.stage1_images, device)
    base.CACHE.ENCODING = "fp16"

    def amp(on: bool) -> Any:
        cfg = base.clone()
        cfg.SOLVER.AMP = on
        return cfg

    modes: dict[str, Callable[[int], Any]] = {
        "inference_fp32": lambda r: stage1.inference_pass(amp(False)),
        "inference_amp": lambda r: stage1.inference_pass(amp(True)),
        "dump_fp16_amp": lambda r: stage1.dump_pass(amp(True), work / f"cache_{r}.zarr")[0],
    }
    stage1.inference_pass(amp(True))  # warm-up: cuDNN autotuning, page cache, first worker fork
    rates: dict[str, list[float]] = {m: [] for m in modes}
    peaks: dict[str, float | None] = {}
    names = list(modes)
    for r in range(sizes.stage1_rounds):
        for mode in names[r % len(names) :] + names[: r % len(names)]:
            peak = gpu_memory(device)
            measured = modes[mode](r)
            peaks[mode] = max(peaks.get(mode) or 0.0, peak() or 0.0) if device.startswith("cuda") else None
            rates[mode].append(measured.samples / measured.loop_seconds)
            print(f"  stage1 round {r + 1} {mode:>15}: {rates[mode][-1]:8.1f} img/s", flush=True)
    ratio = [d / i for d, i in zip(rates["dump_fp16_amp"], rates["inference_amp"])]
    speedup = [a / f for a, f in zip(rates["inference_amp"], rates["inference_fp32"])]
    return {
        "samples_per_pass": sizes.stage1_images * int(base.CACHE.NUM_VARIANTS),
        "rounds": sizes.stage1_rounds,
        "images_per_s": {m: {"median": statistics.median(v), "runs": v} for m, v in rates.items()},
        "ratio_dump_over_inference_amp": {"median": statistics.median(ratio), "runs": ratio},
        "amp_speedup_inference": {"median": statistics.median(speedup), "runs": speedup},
        "peak_gpu_mb": peaks,
    }


# --- part 3: stage two ---------------------------------------------------------------------------------
STAGE2_KINDS = ("student", "cached", "online")


def stage2_modes() -> list[tuple[str, str, bool]]:
    """(mode, kind, amp) for every kind with AMP on and off."""
    return [(f"{kind}_{'amp' if amp else 'fp32'}", kind, amp) for kind in STAGE2_KINDS for amp in (True, False)]


def build_stage2_trainer(
    kind: str,
    amp: bool,
    mode: str,
    work: Path,
    data: dict[str, Any],
    device: str,
    batch: int,
    max_iter: int,
    cache: str,
) -> Any:
    from bench import stage2
    from detection.engine.trainer import build_trainer
    from stage2_student_distill.cli import build_distill_trainer

    config = stage2.STUDENT_CONFIG if kind == "student" else stage2.DISTILL_CONFIG
    cfg = stage2.student_config(config, work, mode, data, device, batch, max_iter)
    cfg.SOLVER.AMP = amp
    if kind == "student":
        return build_trainer(cfg)
    return build_distill_trainer(cfg, cache, online=kind == "online", with_evaluation=False)


def stage2_ratios(steps: dict[str, dict[str, Any]]) -> dict[str, float]:
    """cached/student and online/cached per AMP setting, and fp32/AMP (the AMP speed-up) per kind."""
    out = {}
    for precision in ("amp", "fp32"):
        s, c, o = (steps[f"{k}_{precision}"]["step_s"] for k in STAGE2_KINDS)
        out[f"cached/student ({precision})"] = c / s
        out[f"online/cached ({precision})"] = o / c
    for kind in STAGE2_KINDS:
        out[f"fp32/amp ({kind})"] = steps[f"{kind}_fp32"]["step_s"] / steps[f"{kind}_amp"]["step_s"]
    return out


def part_stage2(work: Path, device: str, sizes: Sizes) -> dict[str, Any]:
    import torch

    from bench import stage2

    s2 = stage2.Sizes(
        images=sizes.stage2_images,
        batch=sizes.stage2_batch,
        rounds=sizes.stage2_rounds,
        steps_per_turn=sizes.stage2_steps_per_turn,
        rss_steps=sizes.memory_steps,
    )
    data = stage2.dataset_overrides(work, "gpu_check", s2.images)
    tcfg = stage2.teacher_config(work, data, device)
    cache = stage2.dump(tcfg, work / "cache_fp16.zarr", "fp16")
    max_iter = s2.steps_per_turn * (s2.rounds + 1) + 1
    trainers = {
        mode: build_stage2_trainer(kind, amp, mode, work / "timed", data, device, s2.batch, max_iter, cache)
        for mode, kind, amp in stage2_modes()
    }
    workers = int(trainers["student_amp"].cfg.DATALOADER.NUM_WORKERS)
    logs = stage2.interleaved(trainers, s2.steps_per_turn)
    del trainers
    steps = {mode: stage2.summarise(log, s2, prefetched=2 * workers) for mode, log in logs.items()}
    for entry in steps.values():
        entry["data_wait_share"] = entry["data_wait_s"] / entry["step_s"]
    same_batches = all(
        log.image_ids[: max_iter - 1] == logs["student_amp"].image_ids[: max_iter - 1] for log in logs.values()
    )

    # Peak GPU memory per mode, each alone (interleaved modes share one process's allocator).
    peaks: dict[str, float | None] = {mode: None for mode, _, _ in stage2_modes()}
    for mode, kind, amp in stage2_modes() if device.startswith("cuda") else ():
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        peak = gpu_memory(device)
        trainer = build_stage2_trainer(kind, amp, mode, work / "memory", data, device, s2.batch, s2.rss_steps, cache)
        with contextlib.redirect_stderr(io.StringIO()):
            trainer.train()
        peaks[mode] = peak()
        del trainer
    return {
        "sizes": s2.__dict__,
        "dataloader_workers": workers,
        "same_batches": same_batches,
        "steps": steps,
        "ratios": stage2_ratios(steps),
        "peak_gpu_mb": peaks,
    }


# --- part 4: the accuracy smoke run ----------------------------------------------------------------------
def part_accuracy(work: Path, device: str, sizes: Sizes) -> dict[str, Any]:
    out = work / "accuracy_quick.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.accuracy",
        "--size",
        "quick",
        "--families",
        "retinanet",
        "--seeds",
        "1",
        "--online-families",
        "--ablate",
        "--no-carry",
        "--fresh",
        "--work",
        str(work),
        "--out",
        str(out),
    ]
    start = time.perf_counter()
    code = subprocess.run(cmd, cwd=REPO).returncode
    result = json.loads(out.read_text()) if out.is_file() else {}
    box_ap = {run["mode"]: run.get("box_AP") for run in result.get("runs", []) if run.get("row") == "retinanet"}
    return {
        "exit_code": code,
        "seconds": time.perf_counter() - start,
        "failed_steps": result.get("failed"),
        "box_ap_smoke": box_ap,
        "markdown": result.get("markdown", ""),
        "note": "a smoke run: not a result",
    }


PART_FUNCTIONS: dict[str, Callable[[Path, str, Sizes], dict[str, Any]]] = {
    "tests": part_tests,
    "stage1": part_stage1,
    "stage2": part_stage2,
    "accuracy": part_accuracy,
}


def run_one_part(name: str, out: Path, work: Path, device: str, sizes: Sizes) -> int:
    """(In the part's own process) run it and write OUT/<name>.json; exit 0 only when it went through."""
    import torch

    from bench.run_all import machine_info, now_iso

    if device == "cpu":
        torch.set_num_threads(1)
    start = time.perf_counter()
    result = PART_FUNCTIONS[name](work, device, sizes)
    result = {
        "part": name,
        "date": now_iso(),
        "device": device,
        "machine": machine_info(),
        **result,
        "part_seconds": time.perf_counter() - start,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    return 0 if result.get("ok", True) and result.get("exit_code", 0) == 0 else 1


# --- the summary ---------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 2) -> str:
    return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def summary_markdown(machine: dict[str, Any], entries: Sequence[dict[str, Any]], total_s: float) -> str:
    lines = [
        f"# gpu-check: {machine.get('gpu')} (torch {machine.get('torch')}, CUDA {machine.get('cuda')})",
        "",
        f"{total_s:.0f} s of the {TOTAL_BUDGET_S} s budget.",
        "",
        "| part | budget s | used s | status |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| {e['part']} | {e['budget_s']} | {e['seconds']:.0f} | {e['status']} |" for e in entries]
    by_part = {e["part"]: e.get("result") or {} for e in entries}
    tests = by_part.get("tests")
    if tests:
        lines += [
            "",
            f"**cuda tests**: {tests.get('passed')} passed, {tests.get('failed')} failed, "
            f"{tests.get('skipped')} skipped",
        ]
        lines += [f"- FAILED {f['test']}: {' '.join(f['message'])}" for f in tests.get("failures", [])]
    s1 = by_part.get("stage1")
    if s1:
        lines += [
            "",
            "**stage one** (images/s, median of rounds; peak GPU MB)",
            "",
            "| mode | img/s | peak GPU MB |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| {m} | {v['median']:.1f} | {_fmt(s1['peak_gpu_mb'].get(m), 0)} |" for m, v in s1["images_per_s"].items()
        ]
        lines += [
            "",
            f"dump fp16 (AMP) / inference (AMP): {s1['ratio_dump_over_inference_amp']['median']:.2f}; "
            f"inference AMP / fp32: {s1['amp_speedup_inference']['median']:.2f}x",
        ]
    s2 = by_part.get("stage2")
    if s2:
        lines += [
            "",
            "**stage two** (s/step = median compute + mean data wait)",
            "",
            "| mode | s/step | data wait share | peak GPU MB |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {m} | {v['step_s']:.4f} | {v['data_wait_share']:.1%} | {_fmt(s2['peak_gpu_mb'].get(m), 0)} |"
            for m, v in s2["steps"].items()
        ]
        lines += [
            "",
            "ratios: "
            + "; ".join(f"{k} {v:.2f}" for k, v in s2["ratios"].items())
            + f"; same batches in every mode: {s2['same_batches']}",
        ]
    acc = by_part.get("accuracy")
    if acc:
        lines += [
            "",
            "**accuracy smoke run** (not a result): box AP "
            + ", ".join(f"{m} {_fmt(ap, 1)}" for m, ap in acc.get("box_ap_smoke", {}).items()),
        ]
    for e in entries:
        if e["status"] != "ok":
            lines += ["", f"**{e['part']}: {e['status']}** (log {e['log']}):", "```", e.get("log_tail", ""), "```"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default bench/results/gpu)")
    parser.add_argument(
        "--work",
        type=Path,
        default=REPO / "output" / "gpu_check",
        help="scratch directory: data, caches, runs, part logs (default output/gpu_check)",
    )
    parser.add_argument("--parts", nargs="+", choices=[p.name for p in PARTS], default=[p.name for p in PARTS])
    parser.add_argument("--part", choices=list(PART_FUNCTIONS), help=argparse.SUPPRESS)  # one part, in its process
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: this module's own tests
    parser.add_argument("--sizes", choices=("gpu", "tiny"), default="gpu", help=argparse.SUPPRESS)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    sizes = GPU if args.sizes == "gpu" else TINY
    if args.part:
        return run_one_part(args.part, args.out, args.work, args.device, sizes)

    refusal = cuda_refusal() if args.device.startswith("cuda") else None
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    from bench.run_all import machine_info, now_iso

    parts = [p for p in PARTS if p.name in args.parts]
    for line in budget_lines(parts):
        print(line, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    entries = []
    for part in parts:
        print(f"gpu-check: {part.name} (budget {part.budget_s} s) ...", flush=True)
        entry = run_part(
            part,
            part_command(part, args.out, args.work, args.device, args.sizes),
            args.out,
            args.work / "logs" / f"{part.name}.log",
        )
        print(f"gpu-check: {part.name}: {entry['status']} in {entry['seconds']:.0f} s of {part.budget_s} s", flush=True)
        if entry["status"] != "ok":
            print(entry.get("log_tail", ""), flush=True)
        entries.append(entry)
    total = time.perf_counter() - start
    machine = machine_info()
    summary = {
        "date": now_iso(),
        "machine": machine,
        "total_budget_s": TOTAL_BUDGET_S,
        "seconds": round(total, 1),
        "parts": [{k: v for k, v in e.items() if k != "result"} for e in entries],
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    markdown = summary_markdown(machine, entries, total)
    (args.out / "SUMMARY.md").write_text(markdown)
    print(markdown)
    print(
        f"gpu-check: wrote {args.out}/{{{','.join(p.name for p in parts)},summary}}.json and SUMMARY.md ({total:.0f} s)"
    )
    return 0 if all(e["status"] == "ok" for e in entries) else 1


if __name__ == "__main__":
    sys.exit(main())
