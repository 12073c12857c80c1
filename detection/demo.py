"""`python -m detection.demo`: the synthetic demo's baseline half, as a sequence of steps.

    synthetic dataset (datasets/synth) -> teacher RetinaNet R-34 -> student baseline RetinaNet R-18
    -> AP tables and a summary

Each step is a small function over a shared DemoState, so later stages (teacher cache dump, ICD
students) are added as more steps. A training step whose final checkpoint and evaluation already
exist is reused (its AP table is printed again), so an interrupted demo continues where it stopped;
`--fresh` redoes everything. Run from the repository root: the demo configs name `datasets/synth`
and `output/demo/...` relative to it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cache_format.errors import CacheError
from detection.config import setup_cfg
from detection.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = Path("configs") / "demo"
DATA = Path("datasets") / "synth"
OUTPUT = Path("output") / "demo"
# The demo dataset: 128-pixel images, enough of them that the val AP means something.
SYNTH = {"train": 240, "val": 60, "size": 128, "seed": 0}


@dataclass
class RunRecord:
    """One trained model: where it lives and what it scored."""

    name: str
    config: str
    output_dir: Path
    iterations: int
    results: dict[str, dict[str, float]]
    train_seconds: float | None  # None when reused from an earlier demo run


@dataclass
class DemoState:
    fresh: bool = False
    runs: list[RunRecord] = field(default_factory=list)


@dataclass
class Step:
    name: str
    run: Callable[[DemoState], None]


def make_dataset(state: DemoState) -> None:
    """Generate the synthetic COCO-format dataset unless it is there already."""
    from detection.synthetic import generate

    if (DATA / "annotations" / "instances_val.json").is_file() and not state.fresh:
        print(f"reusing {DATA}")
        return
    paths = generate(DATA, **SYNTH)
    print(f"wrote {SYNTH['train']} train + {SYNTH['val']} val images ({SYNTH['size']} px) to {paths['root']}")


def train_step(name: str, config_file: str) -> Step:
    """A step that trains (or reuses) the model of `config_file` and records its evaluation."""

    def run(state: DemoState) -> None:
        from detection.evaluation import format_table
        from detection.train import train_detector

        config = str(CONFIGS / config_file)
        cfg = setup_cfg(config)
        out = Path(cfg.OUTPUT_DIR)
        metrics_file = out / "inference" / "metrics.json"
        if not state.fresh and (out / "model_final.pth").is_file() and metrics_file.is_file():
            results = {task: {k: (float("nan") if v is None else v) for k, v in values.items()}
                       for task, values in json.loads(metrics_file.read_text()).items()}
            print(f"reusing {out}\n" + "\n".join(format_table(task, m) for task, m in results.items()))
            seconds = None
        else:
            print(f"$ icd train --config-file {config}", flush=True)
            start = time.perf_counter()
            results = train_detector(cfg)
            seconds = time.perf_counter() - start
        state.runs.append(RunRecord(name, config, out, int(cfg.SOLVER.MAX_ITER), results, seconds))

    return Step(name, run)


def print_summary(state: DemoState) -> None:
    """One line per trained model: box AP and training time."""
    header = f"| {'model':<34} | {'iters':>5} | {'AP':>5} | {'AP50':>5} | {'AP75':>5} | {'train':>7} |"
    lines = [header, "|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|"]
    for r in state.runs:
        box = r.results.get("bbox", {})
        minutes = "reused" if r.train_seconds is None else f"{r.train_seconds / 60:.1f} min"
        lines.append(f"| {r.name:<34} | {r.iterations:>5} | {box.get('AP', float('nan')):5.1f} | "
                     f"{box.get('AP50', float('nan')):5.1f} | {box.get('AP75', float('nan')):5.1f} | {minutes:>7} |")
    print("\n".join(lines))


def demo_steps() -> list[Step]:
    return [
        Step("synthetic dataset", make_dataset),
        train_step("teacher: RetinaNet R-34", "teacher_retinanet_r34.yaml"),
        train_step("student baseline: RetinaNet R-18", "student_retinanet_r18.yaml"),
        Step("summary", print_summary),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detection.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fresh", action="store_true", help=f"delete {OUTPUT} and retrain everything")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    os.chdir(REPO)  # the demo configs' paths are relative to the repository root
    state = DemoState(fresh=args.fresh)
    if args.fresh and OUTPUT.exists():
        shutil.rmtree(OUTPUT)
    start = time.perf_counter()
    try:
        for number, step in enumerate(demo_steps(), 1):
            print(f"\n=== step {number}: {step.name}", flush=True)
            step.run(state)
    except (UserError, CacheError) as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    print(f"\ndemo finished in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
