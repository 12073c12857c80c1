"""Accuracy benchmark: the ICD paper's table, every family, in miniature on the synthetic benchmark.

    python -m bench.accuracy [--size full|quick|gpu] [--families NAME ...] [--seeds 3] [--jobs N] [--threads N]
                             [--online-families retinanet] [--budget SIZE | --budget-fraction F]
                             [--fresh] [--out bench/results/accuracy.json] [--work output/bench_accuracy]

The paper distils R-101 3x teachers into R-50 1x students of the same family. Here, for each family -
Faster R-CNN, RetinaNet, FCOS, Mask R-CNN, SOLOv2, CondInst - a same-family R-34 teacher
(configs/bench/accuracy_teacher_<family>_r34.yaml) is trained once on one synthetic dataset and dumped
by `icd dump` twice: to an fp32 cache (lossless) and to a budget cache (a `--budget` of F x the fp32
cache's feature bytes, default F = 0.35, CACHE.ENCODING auto, so the planner must pick a lossy encoding).
Its R-18 student (configs/bench/accuracy_<family>_r18.yaml, one config for every mode) then trains, per
seed, in these modes on the same schedule, batches and seed:

    baseline        icd train
    init_only       icd distill --cache <fp32> DISTILL.LAMBDA 0   (DISTILL.INIT_FROM_TEACHER: the student's
                    FPN and head start from the teacher's; the decoder trains, nothing is distilled)
    cached_fp32     icd distill --cache <fp32>
    cached_budget   icd distill --cache <budget>
    online          icd distill --online --cache <fp32>            (live teacher; --online-families only)

One more row reuses a cache across families, which is what a cache is for: the FCOS student distilled from
the RetinaNet teacher's cache (fcos_from_retinanet; init_only takes the FPN only, the heads differ), with
its baseline shared with the FCOS row. Every run is evaluated with COCO AP on the val split: box AP where
the model predicts boxes, mask AP for the instance-segmentation families. Reported per cell: mean and
sample std over seeds, the deltas paired by seed against the baseline and against init_only, and for
distill runs what the decoder learnt (loss_ident against the prior's entropy, real-vs-fake AUC,
decoder_signals.json).

Every finished step is reused, always: the table is built from every finished run under the work dir,
whichever invocation ran it, so it can be filled over several sessions (`--families` runs a subset,
in the order given; an interrupted run restarts from its beginning). `--fresh` deletes the work dir first.
A work dir does not outlive its machine, so the runs recorded in the results file (--carry, default the
--out file of the same size) stand in for the work dir's: a carried baseline is never rerun, and a carried
distill run is reused while the teacher it distilled from is the work dir's teacher (same weights sha256;
a results file that recorded no digest names its teacher by its COCO metrics to full precision). A row
the work dir has distilled with another teacher takes its distill runs from the work dir only, so every
distill cell of a row comes from one teacher.

Every step is the CLI a user runs (`python -m icd ...`), as a subprocess with its log in
<work>/<size>/logs/. On CPU up to --jobs runs go side by side (default: 2 on 2+ cores), each with one
torch thread. Sizes: full (200 train / 50 val images of 128 px, 500-iteration teachers, 150-iteration
students, 3 seeds): on 2 CPU cores about 25-40 minutes per family for the box families, more for the
mask families, so the whole table takes several hours. quick (64 / 16 images, 60 / 40 iterations, one
seed, RetinaNet only unless --families): minutes, a smoke test, not results. gpu (1000 / 200 images,
2000-iteration teachers, 600-iteration students, 3 seeds, one run at a time): for a GPU machine.
powered (issue 21: a regime with the power to tell ICD from teacher-init only; bench/README.md): a harder
synthetic task, 2000 / 500 images, 3000-iteration teachers, 1000-iteration students, 3 seeds, RetinaNet and
Faster R-CNN, modes baseline / init_only / cached_fp32 / no_init, AP curves, resumable runs; its table adds
the power check (headroom, paired-delta std and interval). powered_gpu: the same recipe scaled for a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "bench"


@dataclass(frozen=True)
class Family:
    """A detector family: its demo-size R-34 teacher and R-18 student configs, and what it is scored on."""

    label: str
    metrics: tuple[str, ...]  # "box" and/or "mask": the AP the paper reports for it

    def teacher_config(self, name: str) -> Path:
        return CONFIGS / f"accuracy_teacher_{name}_r34.yaml"

    def student_config(self, name: str) -> Path:
        return CONFIGS / f"accuracy_{name}_r18.yaml"


def _family(name: str) -> Family:
    """The family of configs/bench/accuracy_{name}_r18.yaml, named and scored as the architecture table says."""
    from detection.config import setup_cfg
    from detection.modeling.architectures import ARCHITECTURES

    entry = ARCHITECTURES.get(setup_cfg(str(CONFIGS / f"accuracy_{name}_r18.yaml"), []).MODEL.META_ARCHITECTURE)
    return Family(entry.title, ("box",) * entry.boxes + ("mask",) * entry.masks)


FAMILIES = {name: _family(name) for name in ("retinanet", "fcos", "faster_rcnn", "mask_rcnn", "condinst", "solov2")}
SAME_FAMILY_MODES = ("baseline", "init_only", "cached_fp32", "cached_budget", "online")
CROSS_MODES = ("baseline", "init_only", "cached_fp32")
# The ablation of a row (--ablate): cached fp32 ICD with one setting changed, to explain a delta.
ABLATIONS = {
    "lambda_2": ("DISTILL.LAMBDA", "2.0"),  # a quarter of the loss weight
    "detach_75": ("DISTILL.WARMUP_DETACH_ITERS", "75"),  # the student moves only in the second half
    "paper_decoder": ("DISTILL.SPATIAL_PRIOR", "", "DISTILL.KEY_NORM", ""),  # the decoder that does not learn
}
# the rows where the ICD loss costs AP over teacher-init only: the cross-family row and CondInst
DEFAULT_ABLATE = ("fcos_from_retinanet", "condinst")
# Modes a size may run for its same-family rows (Sizes.modes) beyond SAME_FAMILY_MODES: cached fp32 ICD
# without the teacher initialisation, which separates what the loss does from what the initialisation does.
EXTRA_MODES = {"no_init": ("DISTILL.INIT_FROM_TEACHER", "False")}


@dataclass(frozen=True)
class Row:
    """One row of the table: a student family distilled from a teacher family's caches."""

    name: str
    student: str  # family name
    teacher: str  # family name

    @property
    def label(self) -> str:
        s, t = FAMILIES[self.student].label, FAMILIES[self.teacher].label
        return f"{s} R-18 <- {t} R-34" + ("" if s == t else " (cross-family)")

    @property
    def modes(self) -> tuple[str, ...]:
        return SAME_FAMILY_MODES if self.student == self.teacher else CROSS_MODES


ROWS = {
    **{name: Row(name, name, name) for name in FAMILIES},
    "fcos_from_retinanet": Row("fcos_from_retinanet", "fcos", "retinanet"),
}
DEFAULT_BUDGET_FRACTION = 0.35
DEFAULT_ONLINE = ("retinanet",)
LOG_TAIL_LINES = 30
# a run's status when its numbers enter the table: run now, found finished in the work dir, or carried
# from an earlier results file
FINISHED = ("ok", "reused", "carried")
# With --jobs > 1, step times come from runs that had another run beside them at least this share of
# their wall time, so every mode is timed under the same conditions.
NEIGHBOUR_SHARE = 0.8


@dataclass(frozen=True)
class Power:
    """What a size built to answer "does the ICD loss beat teacher-init only?" must show (issue 21); the
    table checks each criterion against its measured value."""

    min_headroom: float = 5.0  # teacher AP - init_only AP: what ICD could win at most
    max_delta_std: float = 0.5  # sample std over seeds of (cached fp32 - init_only), paired by seed
    min_seeds: int = 3
    min_val_images: int = 500


@dataclass(frozen=True)
class Sizes:
    """How big the benchmark is: data, schedules (None: the bench config's), seeds, default rows."""

    name: str
    train_images: int
    val_images: int
    seeds: int
    rows: tuple[str, ...]
    teacher_opts: tuple[str, ...] = ()
    student_opts: tuple[str, ...] = ()
    jobs: int | None = None  # None: min(2, usable cores) on CPU
    synth: tuple[tuple[str, Any], ...] = ()  # detection.data.synthetic.Difficulty fields; () the default task
    modes: tuple[str, ...] | None = None  # same-family rows' modes (None: SAME_FAMILY_MODES)
    power: Power | None = None  # the criteria its table checks

    def record(self) -> dict[str, Any]:
        """What a results file records of its size; a file is carried only into the same record."""
        out = {
            "name": self.name,
            "train_images": self.train_images,
            "val_images": self.val_images,
            "teacher_opts": list(self.teacher_opts),
            "student_opts": list(self.student_opts),
        }
        return {**out, "synth": dict(self.synth)} if self.synth else out


def _schedule(
    max_iter: int, step: int, warmup: int, log: int, detach: int | None = None, checkpoint: int | None = None
) -> tuple[str, ...]:
    checkpoint = checkpoint or max_iter  # a run that checkpoints before its end continues after an interruption
    opts = (
        "SOLVER.MAX_ITER",
        str(max_iter),
        "SOLVER.STEPS",
        f"[{step}]",
        "SOLVER.CHECKPOINT_PERIOD",
        str(checkpoint),
        "SOLVER.WARMUP_ITERS",
        str(warmup),
        "SOLVER.LOG_PERIOD",
        str(log),
    )
    return opts + (("DISTILL.WARMUP_DETACH_ITERS", str(detach)) if detach is not None else ())


# The powered regime (issue 21; design and pilot in bench/README.md): a harder task where capacity
# matters - 12 classes, up to 12 instances per image of 8-40 px, more occlusion, unannotated clutter -
# anchors a half of the demo's for the smaller instances, a teacher trained 3x the student's schedule
# (the paper's 3x vs 1x), 500 val images, one run at a time. POWERED_GPU is the same recipe scaled.
POWERED_SYNTH = (
    ("classes", 12),
    ("max_objects", 12),
    ("min_extent", 0.08),
    ("max_extent", 0.3),
    ("max_hidden", 0.6),
    ("clutter", 6),
)
POWERED_MODEL = ("MODEL.ANCHOR_GENERATOR.SIZES", "[8, 16, 32, 64, 128]")
POWERED_STUDENT_ITERS = 1000
# The question's modes; cached_budget (the cache's lossy encodings) is left to --modes: the full size shows
# it within the seed spread of fp32 in every family.
POWERED_MODES = ("baseline", "init_only", "cached_fp32", "no_init")


def _powered(name: str, train: int, val: int, seeds: int, rows: tuple[str, ...], student_iters: int, log: int) -> Sizes:
    """A powered size: the teacher trains 3x the student; LR step at 80%, warm-up 10% and detach 15% of the
    student's schedule (the full size's bench configs: 40 and 22 of 150). Every run also evaluates at each
    quarter of its schedule (TEST.EVAL_PERIOD; its metrics.json holds the AP curve), in every mode alike, and
    checkpoints there, so an interrupted run continues from its last quarter (build_tasks adds --resume)."""
    s, t = student_iters, 3 * student_iters
    return Sizes(
        name,
        train_images=train,
        val_images=val,
        seeds=seeds,
        rows=rows,
        jobs=1,
        teacher_opts=_schedule(t, int(0.8 * t), 100, log, checkpoint=t // 4)
        + ("TEST.EVAL_PERIOD", str(t // 4))
        + POWERED_MODEL,
        student_opts=_schedule(s, int(0.8 * s), s // 10, log, detach=int(0.15 * s), checkpoint=s // 4)
        + ("TEST.EVAL_PERIOD", str(s // 4))
        + POWERED_MODEL,
        synth=POWERED_SYNTH,
        modes=POWERED_MODES,
        power=Power(),
    )


SIZES = {
    "full": Sizes("full", train_images=200, val_images=50, seeds=3, rows=tuple(ROWS)),
    "quick": Sizes(
        "quick",
        train_images=64,
        val_images=16,
        seeds=1,
        rows=("retinanet",),
        teacher_opts=_schedule(60, 48, 15, 20),
        student_opts=_schedule(40, 32, 10, 10, detach=6),
    ),
    "gpu": Sizes(
        "gpu",
        train_images=1000,
        val_images=200,
        seeds=3,
        rows=tuple(ROWS),
        jobs=1,
        teacher_opts=_schedule(2000, 1600, 100, 50),
        student_opts=_schedule(600, 480, 100, 50, detach=90),
    ),
    "powered": _powered(
        "powered", 2000, 500, 3, ("retinanet", "faster_rcnn"), student_iters=POWERED_STUDENT_ITERS, log=50
    ),
    "powered_gpu": _powered(
        "powered_gpu",
        8000,
        2000,
        5,
        tuple(r for r in ROWS if r != "fcos_from_retinanet"),
        student_iters=4 * POWERED_STUDENT_ITERS,
        log=100,
    ),
}


# --- running CLIs side by side -------------------------------------------------------------------------
@dataclass
class Task:
    """One CLI run. `command` is built when the task starts (a dump's budget depends on an earlier dump)."""

    name: str
    command: Callable[[], list[str]]
    deps: tuple[str, ...] = ()
    done: Callable[[], bool] = lambda: False  # already finished (reused with --resume)
    status: str = "pending"  # pending | running | ok | reused | failed | skipped
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
                # another invocation may share the work dir (other rows): keep what it wrote
                on_disk = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
                timings_path.write_text(json.dumps({**on_disk, task.name: timings[task.name]}))
                finished = sum(t.status in ("ok", "reused", "failed", "skipped") for t in tasks) + 1
                if code == 0:
                    task.status = "ok"
                    print(f"[{_stamp()}] done  {task.name} in {task.seconds:.0f} s ({finished}/{total})", flush=True)
                else:
                    task.status, task.error = "failed", f"exit status {code}; log {logs / (task.name + '.log')}"
                    print(
                        f"[{_stamp()}] FAILED {task.name} (exit {code}); last lines of its log:\n"
                        + _tail(logs / f"{task.name}.log"),
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        for task in running:  # interrupted: stop the runs this benchmark started
            if task.proc is not None and task.proc.poll() is None:
                task.proc.terminate()
                task.proc.wait()


def overlap_share(task: Task, tasks: Sequence[Task]) -> float:
    """Share of `task`'s wall time during which at least one other task of this benchmark was running."""
    if task.ended <= task.started:
        return 0.0
    spans = sorted(
        (max(t.started, task.started), min(t.ended, task.ended))
        for t in tasks
        if t is not task and t.ended > t.started and t.started < task.ended and t.ended > task.started
    )
    covered, reach = 0.0, task.started
    for lo, hi in spans:  # the union of the other tasks' intervals, clipped to this task's
        lo = max(lo, reach)
        if hi > lo:
            covered += hi - lo
            reach = hi
    return covered / (task.ended - task.started)


# --- reading what the runs wrote ---------------------------------------------------------------------------
def coco_metrics(output_dir: Path) -> dict[str, float]:
    """{'box_AP', 'box_AP50', 'mask_AP', 'mask_AP50'} of a finished run, for the tasks its model evaluated."""
    data = json.loads((output_dir / "inference" / "metrics.json").read_text())
    out: dict[str, float] = {}
    for task, prefix in (("bbox", "box"), ("segm", "mask")):
        for key in ("AP", "AP50"):
            value = (data.get(task) or {}).get(key)
            if value is not None:
                out[f"{prefix}_{key}"] = float(value)
    return out


def decoder_signals(output_dir: Path) -> dict[str, float]:
    """What the run's ICD decoder learnt (stage2_student_distill/signals.py), where the run measured it."""
    path = output_dir / "decoder_signals.json"
    if not path.is_file():
        return {}
    from stage2_student_distill.signals import read_signals

    data = read_signals(path)
    return {
        k: data[k]
        for k in ("loss_ident", "prior_entropy", "auc", "map_cosine", "inbox_mass", "inbox_uniform")
        if isinstance(data.get(k), (int, float))
    }


def step_times(output_dir: Path) -> dict[str, float]:
    """Median seconds per iteration (and waiting on data) over the logged windows, the first skipped."""
    records = [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines() if line.strip()]
    windows = [r for r in records if "time" in r]
    windows = windows[1:] or windows
    return {
        "step_s": statistics.median(r["time"] for r in windows),
        "data_s": statistics.median(r.get("data_time", 0.0) for r in windows),
    }


def finished_run(output_dir: Path) -> bool:
    return (output_dir / "inference" / "metrics.json").is_file() and (output_dir / "model_final.pth").is_file()


def complete_cache(url: Path) -> bool:
    from cache_format import CacheError, CacheReader

    try:
        return CacheReader(str(url)).finished  # its manifest is written: the dump finished
    except (CacheError, OSError):
        return False


TEACHER_METRICS = ("box_AP", "box_AP50", "mask_AP", "mask_AP50")


def same_teacher(recorded: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether two teacher descriptions name the same weights: by sha256 where both have one, else (a results
    file written before digests were recorded) by every COCO metric both have, compared exactly."""
    if recorded.get("weights_sha256") and current.get("weights_sha256"):
        return recorded["weights_sha256"] == current["weights_sha256"]
    keys = [k for k in TEACHER_METRICS if k in recorded and k in current]
    return bool(keys) and all(recorded[k] == current[k] for k in keys)


@dataclass
class Carried:
    """The runs, teachers and caches an earlier results file recorded (its work dir may be gone)."""

    source: str = ""
    runs: dict[tuple[str, str, int], dict[str, Any]] = field(default_factory=dict)
    teachers: dict[str, dict[str, Any]] = field(default_factory=dict)
    caches: dict[str, dict[str, Any]] = field(default_factory=dict)
    cpu: str = ""  # the machine that file's runs were measured on: CPU kernels differ across machines


def load_carried(path: Path | None, sizes: Sizes, dataset_sha256: str) -> tuple[Carried, str]:
    """The finished runs of a results file of the same size and dataset, and a line saying what was carried."""
    if path is None or not path.is_file():
        return Carried(), ""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return Carried(), f"carry: {path} is not readable JSON ({exc}); nothing carried"
    recorded_sizes = data.get("sizes") or {}
    if data.get("benchmark") != "accuracy" or {k: recorded_sizes.get(k) for k in sizes.record()} != sizes.record():
        return Carried(), f"carry: {path} holds another size than {sizes.name}; nothing carried"
    if data.get("dataset_sha256") and dataset_sha256 and data["dataset_sha256"] != dataset_sha256:
        return Carried(), f"carry: {path} was measured on another synthetic dataset; nothing carried"
    runs = {
        (r["row"], r["mode"], int(r["seed"])): r
        for r in data.get("runs", [])
        if r.get("row") in ROWS and r.get("status") in FINISHED and any(k.endswith("_AP") for k in r)
    }
    carried = Carried(
        f"{path.name} ({data.get('date', 'undated')})",
        runs,
        dict(data.get("teachers") or {}),
        dict(data.get("caches") or {}),
        str((data.get("machine") or {}).get("cpu", "")),
    )
    return carried, f"carry: {len(runs)} finished run(s) from {carried.source}"


def dataset_digest(layout: Layout) -> str:
    """sha256 of the benchmark dataset's annotation files ('' before it is generated): carried runs must
    come from the same images."""
    from cache_contract.identity import file_sha256

    files = [layout.synth / "annotations" / f"instances_{split}.json" for split in ("train", "val")]
    return ":".join(file_sha256(str(f)) for f in files) if all(f.is_file() for f in files) else ""


def carried_run(
    carried: Carried, row: Row, mode: str, seed: int, teacher: dict[str, Any] | None, strict: bool
) -> dict[str, Any] | None:
    """The carried record of (row, mode, seed) if it may stand for a run with the work dir's `teacher`.

    A baseline has no teacher: always. A distill run: when it distilled from `teacher` (same_teacher), or,
    unless `strict`, when the work dir has no teacher of that family or nothing of the row distilled by it.
    `strict` is for deciding whether to run: a run about to distil from `teacher` is only skipped for a
    record of the same teacher. Unstrict is for the table, where the caller has checked the row."""
    record = carried.runs.get((row.name, mode, seed))
    if record is None and mode == "baseline":  # a cross-family row shares its student family's baseline
        record = carried.runs.get((row.student, mode, seed))
    if record is None or mode == "baseline" or not strict:
        return record
    if teacher is None:
        return None
    return record if same_teacher(carried.teachers.get(row.teacher, {}), teacher) else None


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
        self.logs = self.root / "logs"

    def teacher(self, family: str) -> Path:
        return self.root / "teachers" / family

    def cache(self, family: str, kind: str) -> Path:
        return self.root / "caches" / f"{family}_{kind}"

    def run_dir(self, row: Row, mode: str, seed: int) -> Path:
        # a student's baseline does not depend on the teacher: the cross-family row shares its family's
        owner = row.student if mode == "baseline" else row.name
        return self.root / "runs" / owner / mode / f"seed{seed}"


def task_name(row: Row, mode: str, seed: int) -> str:
    return f"{row.student if mode == 'baseline' else row.name}_{mode}_seed{seed}"


def icd(*args: str) -> list[str]:
    return [sys.executable, "-m", "icd", *args]


def resumed(cmd: list[str], output_dir: Path) -> list[str]:
    """`cmd` (an `icd train` / `icd distill`), with --resume where an earlier attempt left a checkpoint in
    `output_dir` (sizes that checkpoint before the end): it continues exactly from there."""
    from detection.engine.checkpoint import LAST_CHECKPOINT

    if not (output_dir / LAST_CHECKPOINT).is_file():
        return cmd
    return cmd[:4] + ["--resume"] + cmd[4:]  # [python, -m, icd, <command>, --resume, ...]


def dataset_opts(layout: Layout) -> list[str]:
    train = [str(layout.synth / "annotations" / "instances_train.json"), str(layout.synth / "train")]
    val = [str(layout.synth / "annotations" / "instances_val.json"), str(layout.synth / "val")]
    # The bench configs inherit the demo's dataset names; point them at this benchmark's own copy.
    return ["DATASETS.CATALOG.synth_train", json.dumps(train), "DATASETS.CATALOG.synth_val", json.dumps(val)]


def budget_for(layout: Layout, family: str, fraction: float, explicit: str | None) -> int:
    """A budget cache's --budget: explicit, or `fraction` of the fp32 cache's per-sample bytes plus the
    fixed part every cache holds (the teacher weights at their raw size, which stage one reserves, and
    the zarr metadata), so the fraction constrains the features alone."""
    from bench.stage1 import cache_bytes
    from cache_format import CacheReader
    from cache_format.budget import parse_size

    if explicit:
        return parse_size(explicit)
    url = str(layout.cache(family, "fp32"))
    reader = CacheReader(url)
    measured = cache_bytes(url, reader.num_samples)
    weights = sum(int(value.nbytes) for value in reader.teacher_weights().values())
    metadata = sum(p.stat().st_size for p in Path(url).rglob("zarr.json"))
    return int(fraction * measured["bytes_per_image"] * reader.num_samples + weights + metadata)


def every_mode(row: Row) -> tuple[str, ...]:
    """Every mode any invocation may have run for the row (online, extra modes and ablation included)."""
    return row.modes + (tuple(EXTRA_MODES) if row.student == row.teacher else ()) + tuple(ABLATIONS)


def modes_of(
    row: Row, online: Sequence[str], ablate: Sequence[str] = (), same_family: Sequence[str] | None = None
) -> tuple[str, ...]:
    """The row's modes (a same-family row's: `same_family` where a size sets them): online only for the
    --online-families, the ablation for the --ablate rows."""
    base = tuple(same_family) if same_family is not None and row.student == row.teacher else row.modes
    modes = tuple(m for m in base if m != "online" or row.student in online)
    return modes + (tuple(ABLATIONS) if row.name in ablate else ())


def build_tasks(
    layout: Layout,
    sizes: Sizes,
    seeds: Sequence[int],
    rows: Sequence[Row],
    online: Sequence[str],
    device_opts: list[str],
    budget: Callable[[str], int],
    ablate: Sequence[str] = (),
    carried: Callable[[Row, str, int], bool] = lambda row, mode, seed: False,
) -> list[Task]:
    """Every step of the selected rows, in priority order: row by row, each teacher before its students.

    A student run is done when its output dir holds a finished run or `carried(row, mode, seed)` says an
    earlier results file holds one that may stand for it (asked once the run's teacher has finished)."""
    data = dataset_opts(layout)
    tasks: list[Task] = []
    names: set[str] = set()

    def add(task: Task) -> None:
        if task.name not in names:  # shared steps (a teacher, a baseline) appear once
            names.add(task.name)
            tasks.append(task)

    for row in rows:
        teacher = row.teacher
        config = str(FAMILIES[teacher].teacher_config(teacher))
        weights = str(layout.teacher(teacher) / "model_final.pth")
        add(
            Task(
                f"teacher_{teacher}",
                lambda config=config, teacher=teacher: resumed(
                    icd(
                        "train",
                        "--config-file",
                        config,
                        "OUTPUT_DIR",
                        str(layout.teacher(teacher)),
                        *data,
                        *device_opts,
                        *sizes.teacher_opts,
                    ),
                    layout.teacher(teacher),
                ),
                done=lambda teacher=teacher: finished_run(layout.teacher(teacher)),
            )
        )

        def dump(
            kind: str,
            flags: Callable[[], list[str]],
            opts: list[str],
            teacher: str = teacher,
            config: str = config,
            weights: str = weights,
        ) -> Callable[[], list[str]]:
            # an interrupted dump continues (--resume); the cache's manifest says when it is finished
            return lambda: icd(
                "dump",
                "--config-file",
                config,
                "--cache",
                str(layout.cache(teacher, kind)),
                *flags(),
                *(["--resume"] if (layout.cache(teacher, kind) / "zarr.json").is_file() else []),
                "MODEL.WEIGHTS",
                weights,
                "OUTPUT_DIR",
                str(layout.root / "dumps" / f"{teacher}_{kind}"),
                *data,
                *device_opts,
                *opts,
            )

        add(
            Task(
                f"dump_{teacher}_fp32",
                dump("fp32", lambda: [], ["CACHE.ENCODING", "fp32"]),
                deps=(f"teacher_{teacher}",),
                done=lambda t=teacher: complete_cache(layout.cache(t, "fp32")),
            )
        )
        modes = modes_of(row, online, ablate, sizes.modes)
        if "cached_budget" in modes:
            # the budget is a fraction of the fp32 cache's measured size, hence built when the task starts
            add(
                Task(
                    f"dump_{teacher}_budget",
                    dump("budget", lambda t=teacher: ["--budget", str(budget(t))], ["CACHE.ENCODING", "auto"]),
                    deps=(f"teacher_{teacher}", f"dump_{teacher}_fp32"),
                    done=lambda t=teacher: complete_cache(layout.cache(t, "budget")),
                )
            )
        student_config = str(FAMILIES[row.student].student_config(row.student))
        fp32, budget_cache = str(layout.cache(teacher, "fp32")), str(layout.cache(teacher, "budget"))
        for seed in seeds:
            for mode in modes:
                out = layout.run_dir(row, mode, seed)
                common = [
                    "--config-file",
                    student_config,
                    "OUTPUT_DIR",
                    str(out),
                    "SEED",
                    str(seed),
                    *data,
                    *device_opts,
                    *sizes.student_opts,
                ]
                cmd, deps = {
                    **{
                        name: (icd("distill", "--cache", fp32, *common, *opts), (f"dump_{teacher}_fp32",))
                        for name, opts in {**ABLATIONS, **EXTRA_MODES}.items()
                    },
                    "baseline": (icd("train", *common), ()),
                    "init_only": (
                        icd("distill", "--cache", fp32, *common, "DISTILL.LAMBDA", "0"),
                        (f"dump_{teacher}_fp32",),
                    ),
                    "cached_fp32": (icd("distill", "--cache", fp32, *common), (f"dump_{teacher}_fp32",)),
                    "cached_budget": (icd("distill", "--cache", budget_cache, *common), (f"dump_{teacher}_budget",)),
                    "online": (icd("distill", "--online", "--cache", fp32, *common), (f"dump_{teacher}_fp32",)),
                }[mode]
                add(
                    Task(
                        task_name(row, mode, seed),
                        lambda cmd=cmd, out=out: resumed(cmd, out),
                        deps=deps,
                        done=lambda out=out, row=row, mode=mode, seed=seed: (
                            finished_run(out) or carried(row, mode, seed)
                        ),
                    )
                )
    return tasks


def collect(
    layout: Layout,
    seeds: Sequence[int],
    tasks: dict[str, Task],
    carried: Carried | None = None,
    teachers: dict[str, dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every run of every row, finished (by this invocation, an earlier one, or carried) or not, and per row
    the teacher its distill runs used.

    `teachers` describes the work dir's teachers. A row whose distill runs in the work dir used its teacher
    takes carried distill runs only of that teacher; a row with none in the work dir keeps every carried
    run, with the teacher the results file recorded."""
    carried = carried or Carried()
    teachers = teachers or {}
    all_seeds = sorted(set(seeds) | {seed for _, _, seed in carried.runs})
    runs: list[dict[str, Any]] = []
    row_teachers: dict[str, Any] = {}
    for row in ROWS.values():
        here = teachers.get(row.teacher)
        worked = any(
            finished_run(layout.run_dir(row, mode, seed))
            for mode in every_mode(row)
            if mode != "baseline"
            for seed in all_seeds
        )
        from_carry = False
        for mode in every_mode(row):
            for seed in all_seeds:
                out = layout.run_dir(row, mode, seed)
                task = tasks.get(task_name(row, mode, seed))
                record: dict[str, Any] = {"row": row.name, "mode": mode, "seed": seed}
                recorded = carried_run(carried, row, mode, seed, here, strict=worked)
                if finished_run(out):
                    record["status"] = task.status if task is not None else "reused"
                    record.update(coco_metrics(out))
                    record.update(step_times(out))
                    signals = decoder_signals(out)
                    if signals:
                        record["decoder"] = signals
                    if mode != "baseline" and here is not None:
                        record["teacher_sha256"] = here.get("weights_sha256", "")
                    if task is not None and task.seconds:
                        record["wall_s"] = task.seconds
                        record["overlap"] = overlap_share(task, list(tasks.values()))
                elif recorded is not None:
                    record.update({k: v for k, v in recorded.items() if k not in ("row", "mode", "seed")})
                    record["status"] = "carried"
                    record.setdefault("carried_from", carried.source)
                    record.setdefault("cpu", carried.cpu)
                    from_carry = from_carry or mode != "baseline"
                elif task is not None and seed in seeds:
                    record["status"] = task.status
                    if task.error:
                        record["error"] = task.error
                else:
                    continue  # a row this invocation did not run and no earlier one finished
                runs.append(record)
        recorded_teacher = carried.teachers.get(row.teacher)
        if worked and here is not None:
            row_teachers[row.name] = here
        elif from_carry and recorded_teacher is not None:
            row_teachers[row.name] = {**recorded_teacher, "carried_from": carried.source}
    return runs, row_teachers


def paired(rows: list[dict[str, Any]], reference: list[dict[str, Any]], key: str) -> tuple[float, float, int]:
    """Mean and sample std of the per-seed differences row - reference on `key`, and how many seeds paired."""
    ref = {r["seed"]: r[key] for r in reference if key in r}
    diffs = [r[key] - ref[r["seed"]] for r in rows if key in r and r["seed"] in ref]
    mean, std = mean_std(diffs)
    return mean, std, len(diffs)


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per row and mode: AP mean/std over seeds, paired deltas vs baseline and init_only, decoder signals."""
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for row in ROWS.values():
        done = [r for r in runs if r["row"] == row.name and r.get("status") in FINISHED]
        done = [r for r in done if any(k.endswith("_AP") for k in r)]
        if not done:
            continue
        by_mode = {m: [r for r in done if r["mode"] == m] for m in every_mode(row)}
        by_mode = {m: rows for m, rows in by_mode.items() if rows}
        cells[row.name] = {}
        for mode, rows in by_mode.items():
            cell: dict[str, Any] = {"n": len(rows), "seeds": sorted(r["seed"] for r in rows)}
            for metric in FAMILIES[row.student].metrics:
                key = f"{metric}_AP"
                mean, std = mean_std([r[key] for r in rows if key in r])
                cell[f"{key}_mean"], cell[f"{key}_std"] = mean, std
                cell[f"{key}_per_seed"] = {r["seed"]: r[key] for r in rows if key in r}
                for ref in ("baseline", "init_only"):
                    if mode not in (ref, "baseline") and ref in by_mode:  # the baseline is every delta's origin
                        d_mean, d_std, n = paired(rows, by_mode[ref], key)
                        cell[f"{key}_vs_{ref}"] = {"mean": d_mean, "std": d_std, "n": n}
            step, _ = mean_std([r["step_s"] for r in rows if "step_s" in r])
            cell["step_s"] = step
            signals = [r["decoder"] for r in rows if "decoder" in r]
            if signals:
                cell["decoder"] = {k: mean_std([s[k] for s in signals if k in s])[0] for k in signals[0]}
            cells[row.name][mode] = cell
    return cells


# Student's t, two-sided 95% (0.975 quantile) by degrees of freedom; a table because the project has no scipy.
T_975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
    13: 2.160,
    14: 2.145,
    15: 2.131,
    20: 2.086,
    25: 2.060,
    30: 2.042,
}


def t_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (the nearest tabulated df below; 1.96
    past 30)."""
    if df < 1:
        return math.nan
    return 1.96 if df > 30 else T_975[max(k for k in T_975 if k <= df)]


def power_summary(result: dict[str, Any], power: Power) -> dict[str, Any]:
    """Per same-family row and metric: headroom (teacher - init_only), the paired delta cached fp32 -
    init_only with its std and 95% t interval, and which of `power`'s criteria the measurements meet."""
    val_images = int(result["sizes"]["val_images"])
    out: dict[str, Any] = {
        "criteria": {
            "min_headroom": power.min_headroom,
            "max_delta_std": power.max_delta_std,
            "min_seeds": power.min_seeds,
            "min_val_images": power.min_val_images,
        },
        "val_images": val_images,
        "rows": {},
    }
    for name, cells in result["cells"].items():
        row = ROWS[name]
        if row.student != row.teacher or "init_only" not in cells:
            continue
        teacher = result.get("row_teachers", {}).get(name) or result["teachers"].get(row.teacher, {})
        per_metric = {}
        for metric in FAMILIES[row.student].metrics:
            key = f"{metric}_AP"
            init = cells["init_only"].get(f"{key}_mean", math.nan)
            headroom = teacher.get(key, math.nan) - init
            delta = (cells.get("cached_fp32") or {}).get(f"{key}_vs_init_only") or {}
            mean, std, n = delta.get("mean", math.nan), delta.get("std", math.nan), int(delta.get("n", 0))
            half = t_975(n - 1) * std / math.sqrt(n) if n > 1 else math.nan
            per_metric[key] = {
                "teacher": teacher.get(key, math.nan),
                "init_only": init,
                "headroom": headroom,
                "baseline": (cells.get("baseline") or {}).get(f"{key}_mean", math.nan),
                "delta_mean": mean,
                "delta_std": std,
                "n": n,
                "interval_95": [mean - half, mean + half],
                "meets": {
                    "headroom": headroom >= power.min_headroom,
                    "delta_std": n > 1 and std <= power.max_delta_std,
                    "seeds": n >= power.min_seeds,
                    "val_images": val_images >= power.min_val_images,
                },
            }
        out["rows"][name] = per_metric
    return out


def power_markdown(power: dict[str, Any]) -> str:
    c = power["criteria"]
    lines = [
        f"Power (the design criteria: headroom = teacher - teacher-init only >= {c['min_headroom']:g} AP; the "
        f"paired delta ICD cached fp32 - teacher-init only with std <= {c['max_delta_std']:g} AP over >= "
        f"{c['min_seeds']} seeds; >= {c['min_val_images']} val images, here {power['val_images']}). The "
        f"interval is the paired delta's 95% t interval.",
        "",
        "| student <- teacher | AP | teacher | teacher-init only | headroom | Δ ICD fp32 vs init only | "
        "std | n | 95% interval | criteria |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, metrics in power["rows"].items():
        for key, m in metrics.items():
            unmet = [k for k, ok in m["meets"].items() if not ok]
            lo, hi = m["interval_95"]
            interval = "n/a" if math.isnan(lo) else f"[{lo:+.2f}, {hi:+.2f}]"
            lines.append(
                f"| {ROWS[name].label} | {key.split('_')[0]} | {m['teacher']:.2f} | {m['init_only']:.2f} "
                f"| {m['headroom']:+.2f} | {m['delta_mean']:+.2f} "
                f"| {m['delta_std']:.2f} | {m['n']} | {interval} | "
                + ("met" if not unmet else "not met: " + ", ".join(unmet))
                + " |"
            )
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    """NaN (a cell with no finished run) -> null, so the JSON is strict; keys -> str."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _pm(mean: float, std: float, sign: bool = False) -> str:
    if math.isnan(mean):
        return "n/a"
    return (f"{mean:+.2f}" if sign else f"{mean:.2f}") + f" ± {std:.2f}"


MODE_LABELS = {
    "baseline": "baseline (icd train)",
    "init_only": "teacher-init only (LAMBDA 0)",
    "cached_fp32": "ICD cached fp32",
    "cached_budget": "ICD cached, budget",
    "online": "ICD online",
    "lambda_2": "ablation: ICD cached fp32, LAMBDA 2",
    "detach_75": "ablation: ICD, student detached 75 it",
    "paper_decoder": "ablation: ICD, paper's decoder (no prior, raw keys)",
    "no_init": "ICD cached fp32, no teacher init",
}


def markdown_table(result: dict[str, Any]) -> str:
    """The table: one line per (row, mode); APs mean ± std over seeds, deltas paired by seed."""
    lines = [
        f"COCO AP on the synthetic val split ({result['sizes']['val_images']} images), mean ± sample std over "
        f"the seeds in column n; deltas are paired by seed (mean ± std of per-seed differences). Box AP for "
        f"box families, box / mask AP where the family predicts masks (mask only for SOLOv2). Decoder: "
        f"loss_ident / the prior's entropy, real-vs-fake AUC, at the end of the run (cached modes).",
        "",
        "| student <- teacher | mode | n | AP | Δ vs baseline | Δ vs teacher-init only | decoder |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, cells in result["cells"].items():
        row = ROWS[name]
        metrics = FAMILIES[row.student].metrics
        for mode in every_mode(row):
            cell = cells.get(mode)
            if cell is None:
                continue

            def join(part: Callable[[str], str]) -> str:
                return " / ".join(part(f"{m}_AP") for m in metrics)

            ap = join(lambda k: _pm(cell.get(f"{k}_mean", math.nan), cell.get(f"{k}_std", math.nan)))
            vs = {
                ref: join(
                    lambda k: (
                        _pm(cell[f"{k}_vs_{ref}"]["mean"], cell[f"{k}_vs_{ref}"]["std"], sign=True)
                        if f"{k}_vs_{ref}" in cell
                        else ""
                    )
                )
                for ref in ("baseline", "init_only")
            }
            decoder = cell.get("decoder") or {}
            signal = (
                f"{decoder['loss_ident']:.3f} / {decoder['prior_entropy']:.3f}, AUC {decoder['auc']:.2f}"
                if {"loss_ident", "prior_entropy", "auc"} <= set(decoder)
                and decoder["auc"] is not None
                and not math.isnan(decoder["auc"])
                else ""
            )
            lines.append(
                f"| {row.label} | {MODE_LABELS[mode]} | {cell['n']} | {ap} | {vs['baseline'].strip(' /')} "
                f"| {vs['init_only'].strip(' /')} | {signal} |"
            )
    teachers = ", ".join(
        f"{FAMILIES[f].label} " + " / ".join(f"{t[f'{m}_AP']:.1f}" for m in FAMILIES[f].metrics if f"{m}_AP" in t)
        for f, t in result["teachers"].items()
        if any(k.endswith("_AP") for k in t)
    )
    if teachers:
        lines += ["", f"Teachers (R-34, AP): {teachers}."]
    for name, teacher in result.get("row_teachers", {}).items():
        family = ROWS[name].teacher
        listed = result["teachers"].get(family)
        if listed is not None and not same_teacher(teacher, listed):
            ap = " / ".join(f"{teacher[f'{m}_AP']:.1f}" for m in FAMILIES[family].metrics if f"{m}_AP" in teacher)
            where = (
                f"recorded in {teacher['carried_from']}" if "carried_from" in teacher else "trained in this work dir"
            )
            lines += [
                "",
                f"{ROWS[name].label}: distilled from another {FAMILIES[family].label} R-34 teacher than "
                f"the one listed (AP {ap}, {where}).",
            ]
    budgets = [
        f"{FAMILIES[f].label} {c['budget']['encoding']}"
        for f, c in result["caches"].items()
        if "encoding" in c.get("budget", {})
    ]
    if budgets:
        lines += [
            "",
            f"Budget caches ({result['budget_fraction']} x fp32 feature bytes), the planner's choice: "
            + ", ".join(budgets)
            + ".",
        ]
    if result["failed"]:
        lines += ["", "FAILED steps: " + ", ".join(result["failed"]) + " (cells with fewer seeds or missing)."]
    if result.get("power"):
        lines += ["", power_markdown(result["power"])]
    return "\n".join(lines)


def describe_teacher(layout: Layout, family: str) -> dict[str, Any]:
    """A finished teacher: its COCO metrics, step time and the sha256 of its weights (its identity)."""
    from cache_contract.identity import file_sha256

    root = layout.teacher(family)
    return {**coco_metrics(root), **step_times(root), "weights_sha256": file_sha256(str(root / "model_final.pth"))}


def describe_teachers(layout: Layout, known: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Every finished teacher; `known` keeps the descriptions made so far (a description hashes the whole
    weights file), so each teacher is hashed once per invocation."""
    known = {} if known is None else known
    for family in FAMILIES:
        if family not in known and finished_run(layout.teacher(family)):
            known[family] = describe_teacher(layout, family)
    return dict(known)


def listed_teachers(
    carried: Carried, here: dict[str, dict[str, Any]], row_teachers: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The teacher the table lists per family: its same-family row's, else the work dir's, else the carried one."""
    listed = {f: t for f, t in carried.teachers.items() if f in FAMILIES}
    listed.update(here)
    listed.update({name: t for name, t in row_teachers.items() if name in FAMILIES})
    return listed


def merge_caches(recorded: dict[str, dict[str, Any]], here: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per family and kind (fp32, budget): the work dir's cache where it has one, else the recorded one."""
    return {f: {**recorded.get(f, {}), **here.get(f, {})} for f in FAMILIES if f in recorded or f in here}


def describe_caches(layout: Layout, budgets: dict[str, int]) -> dict[str, Any]:
    from bench.stage1 import cache_bytes
    from cache_format import CacheReader

    out: dict[str, Any] = {}
    for family in FAMILIES:
        info: dict[str, Any] = {}
        for kind in ("fp32", "budget"):
            url = layout.cache(family, kind)
            if complete_cache(url):
                reader = CacheReader(str(url))
                info[kind] = {
                    "encoding": reader.encoding,
                    "compressor": reader.compressor,
                    "samples": reader.num_samples,
                    **cache_bytes(str(url), reader.num_samples),
                }
        if family in budgets and "budget" in info:
            info["budget"]["budget_bytes"] = budgets[family]
        if info:
            out[family] = info
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="full",
        help="full (CPU, the reported table), quick (a smoke test in minutes), gpu (larger, 1 job)",
    )
    parser.add_argument("--quick", action="store_true", help="the same as --size quick")
    parser.add_argument(
        "--families",
        nargs="+",
        choices=list(ROWS),
        default=None,
        help="rows to run, in this order (default: every row of the size); finished runs of "
        "other rows still enter the table",
    )
    parser.add_argument(
        "--online-families",
        nargs="*",
        choices=list(FAMILIES),
        default=list(DEFAULT_ONLINE),
        help="families that also run ICD online (a live teacher): default retinanet",
    )
    parser.add_argument(
        "--ablate",
        nargs="*",
        choices=list(ROWS),
        default=list(DEFAULT_ABLATE),
        help="rows that also run the ablation (" + ", ".join(ABLATIONS) + "): default "
        "fcos_from_retinanet and condinst, the rows where the ICD loss costs AP",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=list(SAME_FAMILY_MODES) + list(EXTRA_MODES),
        default=None,
        help="same-family rows' modes (default: the size's; powered: "
        + " ".join(POWERED_MODES)
        + "; else "
        + " ".join(SAME_FAMILY_MODES)
        + ")",
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell (default: the size's, 3 for full)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON result (default: bench/results/accuracy.json for the full size, "
        "accuracy_<size>.json for the others, so no size overwrites another's table)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=REPO / "output" / "bench_accuracy",
        help="work dir for the dataset, teachers, caches and runs (a subfolder per size)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs side by side (default: the size's; full/quick: min(2, usable cores) on CPU)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per run (default: usable cores / jobs); set it when another invocation shares the cores",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--budget", default=None, metavar="SIZE", help="explicit --budget of every budget cache")
    group.add_argument(
        "--budget-fraction",
        type=float,
        default=DEFAULT_BUDGET_FRACTION,
        metavar="F",
        help=f"budget = F x the fp32 cache's feature bytes (default {DEFAULT_BUDGET_FRACTION}: below "
        "fp16's 0.5, so the planner must choose a lossy encoding)",
    )
    parser.add_argument(
        "--carry",
        type=Path,
        default=None,
        metavar="JSON",
        help="an earlier results file whose finished runs enter the table where the work dir has "
        "none (default: the --out file, when it is of this size)",
    )
    parser.add_argument("--no-carry", action="store_true", help="use the work dir's runs only")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: rebuild the table and the JSON from the finished runs in the work dir",
    )
    parser.add_argument(
        "--fresh", action="store_true", help="delete this size's work dir first (default: reuse every finished step)"
    )
    parser.add_argument(
        "--resume", action="store_true", help=argparse.SUPPRESS
    )  # accepted: finished steps are always reused
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    sizes = SIZES["quick" if args.quick else args.size]
    if args.modes is not None:
        sizes = dataclasses.replace(sizes, modes=tuple(args.modes))
    if args.out is None:
        name = "accuracy.json" if sizes.name == "full" else f"accuracy_{sizes.name}.json"
        args.out = REPO / "bench" / "results" / name
    n_seeds = args.seeds if args.seeds is not None else sizes.seeds
    if n_seeds < 1:
        parser.error("--seeds must be at least 1")
    if (args.jobs is not None and args.jobs < 1) or (args.threads is not None and args.threads < 1):
        parser.error("--jobs and --threads must be at least 1")
    if args.report_only and args.fresh:
        parser.error("--report-only reads the work dir that --fresh would delete")
    if not 0 < args.budget_fraction < 1:
        parser.error("--budget-fraction must be between 0 and 1 (a fraction of the fp32 cache's size)")
    seeds = list(range(n_seeds))
    rows = [ROWS[name] for name in (args.families or sizes.rows)]
    missing = [
        str(p.relative_to(REPO))
        for row in rows
        for p in (FAMILIES[row.teacher].teacher_config(row.teacher), FAMILIES[row.student].student_config(row.student))
        if not p.is_file()
    ]
    if missing:
        parser.error(f"missing bench config(s) {', '.join(sorted(set(missing)))}")

    import torch

    from bench.run_all import machine_info, now_iso
    from detection.data.synthetic import Difficulty, generate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = args.jobs or sizes.jobs or (1 if device == "cuda" else max(1, min(2, usable)))
    threads = args.threads or max(1, usable // jobs)
    layout = Layout(args.work.resolve() / sizes.name)
    if args.fresh and layout.root.exists():
        shutil.rmtree(layout.root)
    layout.root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    print(
        f"accuracy benchmark ({sizes.name}): rows {', '.join(r.name for r in rows)}, seeds {seeds}, device "
        f"{device}, {jobs} job(s) x {threads} thread(s); work dir {layout.root}",
        flush=True,
    )
    if not args.report_only and not (layout.synth / "annotations" / "instances_val.json").is_file():
        generate(
            layout.synth,
            train=sizes.train_images,
            val=sizes.val_images,
            size=128,
            seed=0,
            difficulty=Difficulty(**dict(sizes.synth)),
        )
    dataset_sha256 = dataset_digest(layout)
    carry_from = None if args.no_carry or args.fresh else (args.carry or args.out)
    carried, said = load_carried(carry_from, sizes, dataset_sha256)
    if said:
        print(said, flush=True)
    teachers_known: dict[str, dict[str, Any]] = {}

    def carried_done(row: Row, mode: str, seed: int) -> bool:
        # asked when the run is about to start, so its teacher has finished
        teacher = describe_teachers(layout, teachers_known).get(row.teacher)
        return carried_run(carried, row, mode, seed, teacher, strict=True) is not None

    budgets: dict[str, int] = {}

    def budget(family: str) -> int:
        budgets[family] = budget_for(layout, family, args.budget_fraction, args.budget)
        return budgets[family]

    tasks = build_tasks(
        layout, sizes, seeds, rows, args.online_families, ["MODEL.DEVICE", device], budget, args.ablate, carried_done
    )
    if args.report_only:
        tasks = []
    run_tasks(tasks, jobs, layout.logs, env, resume=True)
    by_name = {t.name: t for t in tasks}
    teachers = describe_teachers(layout, teachers_known)
    runs, row_teachers = collect(layout, seeds, by_name, carried, teachers)
    failed = [t.name for t in tasks if t.status in ("failed", "skipped")]
    result: dict[str, Any] = {
        "benchmark": "accuracy",
        "size": sizes.name,
        "quick": sizes.name == "quick",
        "date": now_iso(),
        "machine": machine_info(),
        "device": device,
        "jobs": jobs,
        "threads_per_job": threads,
        "work": str(layout.root),
        "sizes": sizes.record(),
        "configs": {
            f: {
                "teacher": str(fam.teacher_config(f).relative_to(REPO)),
                "student": str(fam.student_config(f).relative_to(REPO)),
            }
            for f, fam in FAMILIES.items()
        },
        "seeds": seeds,
        "rows_run": [r.name for r in rows],
        "online_families": list(args.online_families),
        "budget_fraction": args.budget_fraction,
        "budget_explicit": args.budget,
        "dataset_sha256": dataset_sha256,
        "carried_from": carried.source,
        "teachers": listed_teachers(carried, teachers, row_teachers),
        "row_teachers": row_teachers,
        "caches": merge_caches(carried.caches, describe_caches(layout, budgets)),
        "runs": runs,
        "ablate": list(args.ablate),
        "cells": aggregate(runs),
        "failed": failed,
        "seconds": time.perf_counter() - start,
    }
    if sizes.power is not None:
        result["power"] = power_summary(result, sizes.power)
    result["markdown"] = markdown_table(result)
    print(result["markdown"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(json_safe(result), indent=2, allow_nan=False))
    print(f"wrote {args.out} ({result['seconds'] / 60:.1f} min)")
    if failed:
        print(
            f"bench.accuracy: {len(failed)} step(s) failed or were skipped: {', '.join(failed)} "
            f"(logs in {layout.logs})",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
