"""Accuracy benchmark: the mini reproduction of the ICD paper's table on the synthetic benchmark.

    python -m bench.accuracy [--quick] [--seeds 3] [--out bench/results/accuracy.json]
                             [--work output/bench_accuracy] [--students retinanet_r18 fcos_r18]
                             [--jobs N] [--budget SIZE | --budget-fraction F] [--resume]

One synthetic dataset; one teacher (the demo's RetinaNet R-34, configs/bench/accuracy_teacher_*.yaml)
trained once and dumped twice by `icd dump`: to an fp32 cache (lossless) and to a budget cache (a
`--budget` of F x the fp32 cache's size, default F = 0.35, with CACHE.ENCODING auto, so the planner
must pick a lossy encoding; which one is reported). Then for each student (RetinaNet R-18, FCOS R-18)
and each seed, four runs on the same config, schedule and seed:

    baseline          icd train
    online ICD        icd distill --online --cache <fp32>   (live teacher, the cache's samples only)
    cached lossless   icd distill --cache <fp32>
    cached budget     icd distill --cache <budget>

all evaluated with COCO box AP on the val split. Reported per cell: mean and sample std over seeds,
the delta vs the baseline (of the means, and paired by seed), and the training step time (median of
metrics.json's per-window iteration times, first window skipped) with its ratio to the baseline's.

Every step is the CLI a user runs (`python -m detection.cli ...`), as a subprocess with its log in
<work>/<size>/logs/. On CPU up to --jobs runs go side by side (default: 2 on 2+ cores), each with one
torch thread: on 2 cores that uses both without OpenMP oversubscription. Step times are therefore
measured with a neighbour running; every mode has one alike, so their ratios hold, but use
bench/stage2.py for clean step times. Sizes: full (3 seeds, 2 students, 150-iteration students, 500-
iteration teacher, 200 train / 50 val images): about 30-40 minutes on 2 idle CPU cores, estimated from
measured per-iteration times (0.7-1 s per student iteration with one thread), longer when other
processes share the cores. --quick (1 seed, RetinaNet R-18 only, 60-iteration teacher, 40-iteration
students on 64 / 16 images): a few minutes. Quick numbers are a smoke test, not results.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "bench"
TEACHER_CONFIG = CONFIGS / "accuracy_teacher_retinanet_r34.yaml"
STUDENTS = {
    "retinanet_r18": ("RetinaNet R-18", CONFIGS / "accuracy_retinanet_r18.yaml"),
    "fcos_r18": ("FCOS R-18", CONFIGS / "accuracy_fcos_r18.yaml"),
}
MODES = ("baseline", "online", "cached_fp32", "cached_budget")
DEFAULT_BUDGET_FRACTION = 0.35
LOG_TAIL_LINES = 30
# With --jobs > 1, step times come from runs that had another run beside them at least this share of
# their wall time, so every mode is timed under the same conditions.
NEIGHBOUR_SHARE = 0.8


@dataclass(frozen=True)
class Sizes:
    """How big the benchmark is: data, schedules (None: the bench config's), seeds, students."""

    name: str
    train_images: int
    val_images: int
    seeds: int
    students: tuple[str, ...]
    teacher_opts: tuple[str, ...] = ()
    student_opts: tuple[str, ...] = ()


FULL = Sizes("full", train_images=200, val_images=50, seeds=3, students=("retinanet_r18", "fcos_r18"))
QUICK = Sizes(
    "quick", train_images=64, val_images=16, seeds=1, students=("retinanet_r18",),
    teacher_opts=("SOLVER.MAX_ITER", "60", "SOLVER.STEPS", "[48]", "SOLVER.CHECKPOINT_PERIOD", "60",
                  "SOLVER.WARMUP_ITERS", "15"),
    student_opts=("SOLVER.MAX_ITER", "40", "SOLVER.STEPS", "[32]", "SOLVER.CHECKPOINT_PERIOD", "40",
                  "SOLVER.WARMUP_ITERS", "10", "SOLVER.LOG_PERIOD", "10", "DISTILL.WARMUP_DETACH_ITERS", "6"),
)


# --- running CLIs side by side -------------------------------------------------------------------------
@dataclass
class Task:
    """One CLI run. `command` is built when the task starts (a dump's budget depends on an earlier dump)."""

    name: str
    command: Callable[[], list[str]]
    deps: tuple[str, ...] = ()
    done: Callable[[], bool] = lambda: False   # already finished (reused with --resume)
    status: str = "pending"                    # pending | running | ok | reused | failed | skipped
    seconds: float = 0.0
    error: str = ""
    proc: subprocess.Popen | None = field(default=None, repr=False)
    started: float = 0.0
    ended: float = 0.0


def _stamp() -> str:
    return time.strftime("%H:%M:%S")


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.is_file():
        return ""
    text = [line.rsplit("\r", 1)[-1] for line in path.read_text(errors="replace").splitlines()]
    return "\n".join(text[-lines:])


def run_tasks(tasks: list[Task], jobs: int, logs: Path, env: dict[str, str], resume: bool) -> None:
    """Run the tasks, at most `jobs` at a time, each once its deps succeeded, in list order of priority.

    A failed task marks every task depending on it as skipped; the others still run. Start and end
    times go to <logs>/timings.json, so a resumed benchmark still knows when reused steps ran.
    """
    by_name = {t.name: t for t in tasks}
    timings_path = logs / "timings.json"
    timings: dict[str, list[float]] = json.loads(timings_path.read_text()) if resume and timings_path.is_file() else {}
    logs.mkdir(parents=True, exist_ok=True)
    total = len(tasks)
    running: list[Task] = []
    try:
        while True:
            for task in tasks:
                if task.status != "pending":
                    continue
                states = [by_name[d].status for d in task.deps]
                if any(s in ("failed", "skipped") for s in states):
                    task.status, task.error = "skipped", "a step it needs failed"
                elif all(s in ("ok", "reused") for s in states) and resume and task.done():
                    task.status = "reused"
                    task.started, task.ended = timings.get(task.name, (0.0, 0.0))
                    task.seconds = task.ended - task.started
                    print(f"[{_stamp()}] reuse {task.name}", flush=True)
                elif all(s in ("ok", "reused") for s in states) and len(running) < jobs:
                    cmd = task.command()
                    log = open(logs / f"{task.name}.log", "w")
                    log.write("$ " + " ".join(cmd) + "\n")
                    log.flush()
                    task.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
                    log.close()  # the child holds its own descriptor
                    task.status, task.started = "running", time.time()
                    running.append(task)
                    print(f"[{_stamp()}] start {task.name}", flush=True)
            if not running:
                break
            time.sleep(0.5)
            for task in list(running):
                code = task.proc.poll()
                if code is None:
                    continue
                running.remove(task)
                task.ended = time.time()
                task.seconds = task.ended - task.started
                timings[task.name] = [task.started, task.ended]
                timings_path.write_text(json.dumps(timings))
                finished = sum(t.status in ("ok", "reused", "failed", "skipped") for t in tasks) + 1
                if code == 0:
                    task.status = "ok"
                    print(f"[{_stamp()}] done  {task.name} in {task.seconds:.0f} s ({finished}/{total})", flush=True)
                else:
                    task.status, task.error = "failed", f"exit status {code}; log {logs / (task.name + '.log')}"
                    print(f"[{_stamp()}] FAILED {task.name} (exit {code}); last lines of its log:\n"
                          + _tail(logs / f"{task.name}.log"), file=sys.stderr, flush=True)
    finally:
        for task in running:  # interrupted: stop the runs this benchmark started
            if task.proc is not None and task.proc.poll() is None:
                task.proc.terminate()
                task.proc.wait()


def overlap_share(task: Task, tasks: Sequence[Task]) -> float:
    """Share of `task`'s wall time during which at least one other task of this benchmark was running."""
    if task.ended <= task.started:
        return 0.0
    spans = sorted((max(t.started, task.started), min(t.ended, task.ended)) for t in tasks
                   if t is not task and t.ended > t.started and t.started < task.ended and t.ended > task.started)
    covered, reach = 0.0, task.started
    for lo, hi in spans:  # the union of the other tasks' intervals, clipped to this task's
        lo = max(lo, reach)
        if hi > lo:
            covered += hi - lo
            reach = hi
    return covered / (task.ended - task.started)


# --- reading what the runs wrote ---------------------------------------------------------------------------
def bbox_metrics(output_dir: Path) -> dict[str, float]:
    data = json.loads((output_dir / "inference" / "metrics.json").read_text())["bbox"]
    return {k: (float(data[k]) if data.get(k) is not None else math.nan) for k in ("AP", "AP50", "AP75")}


def step_times(output_dir: Path) -> dict[str, float]:
    """Median seconds per iteration (and waiting on data) over the logged windows, the first skipped."""
    records = [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines() if line.strip()]
    windows = [r for r in records if "time" in r]
    windows = windows[1:] or windows
    return {"step_s": statistics.median(r["time"] for r in windows),
            "data_s": statistics.median(r.get("data_time", 0.0) for r in windows)}


def finished_run(output_dir: Path) -> bool:
    return (output_dir / "inference" / "metrics.json").is_file() and (output_dir / "model_final.pth").is_file()


def complete_cache(url: Path) -> bool:
    from cache_format import CacheError, CacheReader

    try:
        return bool(CacheReader(str(url)).committed().all())
    except (CacheError, OSError):
        return False


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


# --- the benchmark ---------------------------------------------------------------------------------------
@dataclass
class Layout:
    """Where everything of one size lives under the work dir."""

    root: Path

    def __post_init__(self) -> None:
        self.synth = self.root / "synth"
        self.teacher = self.root / "teacher"
        self.caches = {"fp32": self.root / "cache_fp32", "budget": self.root / "cache_budget"}
        self.logs = self.root / "logs"

    def run_dir(self, student: str, mode: str, seed: int) -> Path:
        return self.root / "runs" / student / mode / f"seed{seed}"


def icd(*args: str) -> list[str]:
    return [sys.executable, "-m", "detection.cli", *args]


def dataset_opts(layout: Layout) -> list[str]:
    train = [str(layout.synth / "annotations" / "instances_train.json"), str(layout.synth / "train")]
    val = [str(layout.synth / "annotations" / "instances_val.json"), str(layout.synth / "val")]
    # The bench configs inherit the demo's dataset names; point them at this benchmark's own copy.
    return ["DATASETS.CATALOG.synth_train", json.dumps(train), "DATASETS.CATALOG.synth_val", json.dumps(val)]


def budget_for(layout: Layout, fraction: float, explicit: str | None) -> int:
    """The budget cache's --budget: explicit, or `fraction` of the fp32 cache's per-sample bytes plus the
    fixed part every cache holds (the teacher weights at their raw size, which stage one reserves, and
    the zarr metadata), so the fraction constrains the features alone."""
    from bench.stage1 import cache_bytes
    from cache_format import CacheReader
    from cache_format.budget import parse_size

    if explicit:
        return parse_size(explicit)
    url = str(layout.caches["fp32"])
    reader = CacheReader(url)
    measured = cache_bytes(url, reader.num_samples)
    weights = sum(int(value.nbytes) for value in reader.teacher_weights().values())
    metadata = sum(p.stat().st_size for p in Path(url).rglob("zarr.json"))
    return int(fraction * measured["bytes_per_image"] * reader.num_samples + weights + metadata)


def build_tasks(layout: Layout, sizes: Sizes, seeds: Sequence[int], students: Sequence[str], device_opts: list[str],
                budget: Callable[[], int]) -> list[Task]:
    data = dataset_opts(layout)
    weights = str(layout.teacher / "model_final.pth")
    tasks = [Task("teacher", lambda: icd("train", "--config-file", str(TEACHER_CONFIG), "OUTPUT_DIR", str(layout.teacher),
                                         *data, *device_opts, *sizes.teacher_opts),
                  done=lambda: finished_run(layout.teacher))]
    def dump(kind: str, flags: list[str], opts: list[str]) -> list[str]:
        return icd("dump", "--config-file", str(TEACHER_CONFIG), "--cache", str(layout.caches[kind]), *flags,
                   "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(layout.root / f"dump_{kind}"), *data, *device_opts, *opts)

    tasks += [
        Task("dump_fp32", lambda: dump("fp32", [], ["CACHE.ENCODING", "fp32"]), deps=("teacher",),
             done=lambda: complete_cache(layout.caches["fp32"])),
        # The budget is a fraction of the fp32 cache's measured size, hence built when the task starts.
        Task("dump_budget", lambda: dump("budget", ["--budget", str(budget())], ["CACHE.ENCODING", "auto"]),
             deps=("teacher", "dump_fp32"), done=lambda: complete_cache(layout.caches["budget"])),
    ]
    # Baselines first (they need no teacher, so they fill the second slot while the teacher trains).
    for mode in MODES:
        for student in students:
            config = str(STUDENTS[student][1])
            for seed in seeds:
                out = layout.run_dir(student, mode, seed)
                common = ["--config-file", config, "OUTPUT_DIR", str(out), "SEED", str(seed), *data, *device_opts,
                          *sizes.student_opts]
                if mode == "baseline":
                    cmd, deps = icd("train", *common), ()
                elif mode == "online":
                    cmd, deps = icd("distill", "--online", "--cache", str(layout.caches["fp32"]), *common), ("dump_fp32",)
                elif mode == "cached_fp32":
                    cmd, deps = icd("distill", "--cache", str(layout.caches["fp32"]), *common), ("dump_fp32",)
                else:
                    cmd, deps = icd("distill", "--cache", str(layout.caches["budget"]), *common), ("dump_budget",)
                tasks.append(Task(f"{student}_{mode}_seed{seed}", lambda cmd=cmd: cmd, deps=deps,
                                  done=lambda out=out: finished_run(out)))
    return tasks


def collect(layout: Layout, students: Sequence[str], seeds: Sequence[int], tasks: dict[str, Task]) -> list[dict[str, Any]]:
    runs = []
    for student in students:
        for mode in MODES:
            for seed in seeds:
                task = tasks[f"{student}_{mode}_seed{seed}"]
                out = layout.run_dir(student, mode, seed)
                row: dict[str, Any] = {"student": student, "mode": mode, "seed": seed, "status": task.status,
                                       "wall_s": task.seconds or None,
                                       "overlap": overlap_share(task, list(tasks.values())) if task.seconds else None}
                if task.status in ("ok", "reused"):
                    row.update(bbox_metrics(out))
                    row.update(step_times(out))
                else:
                    row["error"] = task.error
                runs.append(row)
    return runs


def timing_rows(rows: list[dict[str, Any]], jobs: int) -> tuple[list[dict[str, Any]], bool]:
    """The runs whose step times are comparable: with --jobs > 1, those that had a neighbour for most
    of their time (a run alone at the end of the queue is faster). (rows, False), or (all, True) if none."""
    if jobs <= 1:
        return rows, False
    shared = [r for r in rows if (r.get("overlap") or 0.0) >= NEIGHBOUR_SHARE]
    return (shared, False) if shared else (rows, bool(rows))


def aggregate(runs: list[dict[str, Any]], students: Sequence[str], jobs: int) -> dict[str, dict[str, dict[str, Any]]]:
    """Per student and mode: AP mean/std over seeds, deltas vs the baseline, step time and its ratio."""
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for student in students:
        mine = [r for r in runs if r["student"] == student and "AP" in r]
        base = {r["seed"]: r for r in mine if r["mode"] == "baseline"}
        base_ap, _ = mean_std([r["AP"] for r in base.values()])
        base_step, _ = mean_std([r["step_s"] for r in timing_rows(list(base.values()), jobs)[0]])
        cells[student] = {}
        for mode in MODES:
            rows = [r for r in mine if r["mode"] == mode]
            ap, ap_std = mean_std([r["AP"] for r in rows])
            ap50, ap50_std = mean_std([r["AP50"] for r in rows])
            timed, timed_alone = timing_rows(rows, jobs)
            step, _ = mean_std([r["step_s"] for r in timed])
            data_wait, _ = mean_std([r["data_s"] for r in timed])
            paired = [r["AP"] - base[r["seed"]]["AP"] for r in rows if r["seed"] in base]
            pd_mean, pd_std = mean_std(paired)
            cells[student][mode] = {
                "n": len(rows), "AP_mean": ap, "AP_std": ap_std, "AP50_mean": ap50, "AP50_std": ap50_std,
                "AP_per_seed": {r["seed"]: r["AP"] for r in rows},
                "delta_AP_vs_baseline": ap - base_ap, "paired_delta_mean": pd_mean, "paired_delta_std": pd_std,
                "step_s": step, "data_s": data_wait, "step_ratio_vs_baseline": step / base_step if base_step else math.nan,
                "step_runs": len(timed), "step_time_without_neighbour": timed_alone,
            }
    return cells


def json_safe(value: Any) -> Any:
    """NaN (a cell with no finished run) -> null, so the JSON is strict; keys -> str."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _pm(mean: float, std: float) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.2f} ± {std:.2f}"


def markdown_table(result: dict[str, Any]) -> str:
    from cache_format.budget import format_size

    caches = result["caches"]
    labels = {"baseline": "baseline (icd train)", "online": "+ ICD online (live teacher)",
              "cached_fp32": "+ ICD cached fp32 (lossless)",
              "cached_budget": f"+ ICD cached {caches['budget'].get('encoding', '?')} (budget)"}
    teacher = result["teacher"]
    lines = [
        f"COCO box AP on the synthetic val split ({result['sizes']['val_images']} images), mean ± sample std over "
        f"{len(result['seeds'])} seed(s); teacher {teacher['label']}: AP {teacher.get('AP', math.nan):.2f}. "
        f"Step times: median s/iter, {result['jobs']} run(s) side by side"
        + (f" (from runs that had a neighbour >= {NEIGHBOUR_SHARE:.0%} of their time)" if result["jobs"] > 1 else "")
        + f", {result['threads_per_job']} torch thread(s) each, device {result['device']}.",
        "",
        "| student | mode | AP | AP50 | Δ AP vs baseline | Δ AP paired by seed | s/iter | × baseline |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for student, cells in result["cells"].items():
        for mode in MODES:
            c = cells[mode]
            delta = "" if mode == "baseline" or math.isnan(c["delta_AP_vs_baseline"]) else f"{c['delta_AP_vs_baseline']:+.2f}"
            paired = "" if mode == "baseline" else _pm(c["paired_delta_mean"], c["paired_delta_std"])
            step = "n/a" if math.isnan(c["step_s"]) else f"{c['step_s']:.3f}" + ("*" if c["step_time_without_neighbour"] else "")
            ratio = "n/a" if math.isnan(c["step_ratio_vs_baseline"]) else f"{c['step_ratio_vs_baseline']:.2f}"
            lines.append(f"| {STUDENTS[student][0]} | {labels[mode]} | {_pm(c['AP_mean'], c['AP_std'])} | "
                         f"{_pm(c['AP50_mean'], c['AP50_std'])} | {delta} | {paired} | {step} | {ratio} |")
    fp32, budget = caches["fp32"], caches["budget"]
    if "bytes_per_image" in fp32:
        how = "explicit --budget" if result["budget_explicit"] else f"{result['budget_fraction']} x the fp32 cache"
        asked = f"budget {format_size(budget['budget_bytes'])} ({how})" if budget.get("budget_bytes") else "budget"
        chose = (f"the planner chose {budget['encoding']}@{budget['compressor']}, "
                 f"{format_size(budget['bytes_per_image'])}/image" if "encoding" in budget
                 else "not written (its dump failed, see FAILED below)")
        lines += ["", f"Caches ({fp32['samples']} samples): fp32 {format_size(fp32['bytes_per_image'])}/image; "
                  f"{asked}: {chose}."]
    if any(c[m]["step_time_without_neighbour"] for c in result["cells"].values() for m in MODES):
        lines += ["", "\\* timed on runs that had no neighbour for most of their time (or whose timing is unknown, e.g. "
                  "reused by --resume): not comparable with unstarred cells; bench/stage2.py gives clean step times."]
    if result["failed"]:
        lines += ["", "FAILED steps: " + ", ".join(result["failed"]) + " (cells with fewer seeds or n/a)."]
    return "\n".join(lines)


def describe_caches(layout: Layout, tasks: dict[str, Task], budget_bytes: int | None) -> dict[str, Any]:
    from bench.stage1 import cache_bytes
    from cache_format import CacheReader

    out: dict[str, Any] = {}
    for kind, url in layout.caches.items():
        info: dict[str, Any] = {"path": str(url), "status": tasks[f"dump_{kind}"].status}
        if info["status"] in ("ok", "reused"):
            reader = CacheReader(str(url))
            info.update(encoding=reader.encoding, compressor=reader.compressor, samples=reader.num_samples,
                        **cache_bytes(str(url), reader.num_samples), dump_seconds=tasks[f"dump_{kind}"].seconds)
        out[kind] = info
    out["budget"]["budget_bytes"] = budget_bytes
    log = layout.logs / "dump_budget.log"
    if log.is_file():  # the planner's measured table, as the dump printed it
        text = log.read_text(errors="replace")
        start = text.find("plan:")
        out["budget"]["plan_table"] = text[start:text.find("\ncache ", start)].strip() if start >= 0 else ""
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, RetinaNet R-18 only, short schedules on a smaller set (minutes on 2 cores)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 3; 1 with --quick)")
    parser.add_argument("--students", nargs="+", choices=sorted(STUDENTS), default=None,
                        help="students to train (default both; RetinaNet R-18 with --quick)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "accuracy.json", help="JSON result")
    parser.add_argument("--work", type=Path, default=REPO / "output" / "bench_accuracy",
                        help="work dir for the dataset, teacher, caches and runs (a full/ or quick/ subfolder)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs side by side (default: 1 on a GPU, else min(2, usable cores))")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--budget", default=None, metavar="SIZE", help="explicit --budget of the budget cache")
    group.add_argument("--budget-fraction", type=float, default=DEFAULT_BUDGET_FRACTION, metavar="F",
                       help=f"budget = F x the fp32 cache's bytes (default {DEFAULT_BUDGET_FRACTION}: below fp16's "
                       "0.5, so the planner must choose a lossy encoding)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the finished steps in the work dir (after an interruption); default: start afresh")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    sizes = QUICK if args.quick else FULL
    n_seeds = args.seeds if args.seeds is not None else sizes.seeds
    if n_seeds < 1:
        parser.error("--seeds must be at least 1")
    if not 0 < args.budget_fraction < 1:
        parser.error("--budget-fraction must be between 0 and 1 (a fraction of the fp32 cache's size)")
    seeds = list(range(n_seeds))
    students = list(args.students or sizes.students)

    import torch

    from bench.run_all import machine_info, now_iso
    from detection.synthetic import generate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = args.jobs or (1 if device == "cuda" else max(1, min(2, usable)))
    threads = max(1, usable // jobs)
    layout = Layout(args.work.resolve() / sizes.name)
    if layout.root.exists() and not args.resume:
        shutil.rmtree(layout.root)
    layout.root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    print(f"accuracy benchmark ({sizes.name}): students {', '.join(students)}, seeds {seeds}, device {device}, "
          f"{jobs} job(s) x {threads} thread(s); work dir {layout.root}", flush=True)
    if not (layout.synth / "annotations" / "instances_val.json").is_file():
        generate(layout.synth, train=sizes.train_images, val=sizes.val_images, size=128, seed=0)

    budget_used: dict[str, int] = {}

    def budget() -> int:
        budget_used["bytes"] = budget_for(layout, args.budget_fraction, args.budget)
        return budget_used["bytes"]

    tasks = build_tasks(layout, sizes, seeds, students, ["MODEL.DEVICE", device], budget)
    run_tasks(tasks, jobs, layout.logs, env, args.resume)
    by_name = {t.name: t for t in tasks}
    if "bytes" not in budget_used and by_name["dump_fp32"].status in ("ok", "reused"):
        budget()  # reused budget cache: report the budget it would have had

    teacher: dict[str, Any] = {"label": "RetinaNet R-34", "status": by_name["teacher"].status,
                               "seconds": by_name["teacher"].seconds}
    if teacher["status"] in ("ok", "reused"):
        teacher.update(bbox_metrics(layout.teacher))
        teacher.update(step_times(layout.teacher))
    runs = collect(layout, students, seeds, by_name)
    failed = [t.name for t in tasks if t.status in ("failed", "skipped")]
    result: dict[str, Any] = {
        "benchmark": "accuracy",
        "quick": bool(args.quick),
        "date": now_iso(),
        "machine": machine_info(),
        "device": device,
        "jobs": jobs,
        "threads_per_job": threads,
        "work": str(layout.root),
        "sizes": {"name": sizes.name, "train_images": sizes.train_images, "val_images": sizes.val_images,
                  "teacher_opts": list(sizes.teacher_opts), "student_opts": list(sizes.student_opts)},
        "configs": {"teacher": str(TEACHER_CONFIG.relative_to(REPO)),
                    **{s: str(STUDENTS[s][1].relative_to(REPO)) for s in students}},
        "seeds": seeds,
        "students": students,
        "budget_fraction": args.budget_fraction,
        "budget_explicit": args.budget,
        "teacher": teacher,
        "caches": describe_caches(layout, by_name, budget_used.get("bytes")),
        "runs": runs,
        "cells": aggregate(runs, students, jobs),
        "failed": failed,
        "seconds": time.perf_counter() - start,
    }
    result["markdown"] = markdown_table(result)
    print(result["markdown"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(json_safe(result), indent=2, allow_nan=False))
    print(f"wrote {args.out} ({result['seconds'] / 60:.1f} min)")
    if failed:
        print(f"bench.accuracy: {len(failed)} step(s) failed or were skipped: {', '.join(failed)} "
              f"(logs in {layout.logs})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
