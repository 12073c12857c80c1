"""`make demo`: the whole product on the embedded synthetic dataset, as a user would run it.

    synthetic data -> teacher (icd train) -> student baselines (icd train)
    -> make stage1 (teacher dumped once into a budgeted cache) -> icd cache verify
    -> make stage2 for two different students from the SAME cache
    -> the same students initialised from the teacher without the ICD loss (DISTILL.LAMBDA 0), to show
       what the ICD loss adds beyond DISTILL.INIT_FROM_TEACHER
    -> the paper-style results table, what the ICD decoder learnt + PNG figures (loss curves, decoder
       signals, attention maps)

Every step is the command a user would type (subprocesses), so the demo exercises the CLIs and the
Makefile exactly as documented. A step whose output already exists is reused, so re-running the demo
after an interruption continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent
DATA = REPO / "datasets" / "synth"
OUT = REPO / "output" / "demo"
CACHE = OUT / "cache"
# The budget the demo asks stage one to respect; the planner picks the most faithful encoding under it.
BUDGET = "18MB"
SYNTH = dict(train=240, val=60, size=128, seed=0)
TEACHER = "configs/demo/teacher_retinanet_r34.yaml"
# (name, baseline config, stage-two config)
STUDENTS = [
    ("RetinaNet R-18", "configs/demo/student_retinanet_r18.yaml", "configs/demo/distill_retinanet_r18.yaml"),
    ("FCOS R-18", "configs/demo/student_fcos_r18.yaml", "configs/demo/distill_fcos_r18.yaml"),
]


def run(cmd: Sequence[str], what: str) -> None:
    """Run one user-facing command, streaming its output; stop the demo with its exit code on failure."""
    print(f"\n=== {what}\n$ {' '.join(cmd)}", flush=True)
    result = subprocess.run(list(cmd), cwd=REPO)
    if result.returncode != 0:
        print(
            f"demo: step '{what}' failed (exit {result.returncode}); fix the error above and rerun `make demo`"
            " (finished steps are reused)",
            file=sys.stderr,
        )
        raise SystemExit(result.returncode)


def output_dir(config: str) -> Path:
    sys.path.insert(0, str(REPO))
    from detection.config import setup_cfg

    return REPO / setup_cfg(config).OUTPUT_DIR


def icd(*args: str) -> list[str]:
    return [sys.executable, "-m", "icd", *args]


def bbox_ap(out_dir: Path) -> float:
    metrics = json.loads((out_dir / "inference" / "metrics.json").read_text())
    return float(metrics["bbox"]["AP"])


def seconds_per_iter(out_dir: Path) -> float:
    """Median training time per iteration from metrics.json, skipping the first (warm-up) record."""
    records = [json.loads(line) for line in (out_dir / "metrics.json").read_text().splitlines() if line.strip()]
    times = [r["time"] for r in records if "time" in r][1:] or [r["time"] for r in records if "time" in r]
    return statistics.median(times)


def train_if_missing(config: str, what: str) -> Path:
    out = output_dir(config)
    if (out / "model_final.pth").is_file() and (out / "inference" / "metrics.json").is_file():
        print(f"\n=== {what}: reusing {out.relative_to(REPO)}", flush=True)
    else:
        run(icd("train", "--config-file", config), what)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh", action="store_true", help="delete output/demo first and redo every step")
    args = parser.parse_args(argv)
    if args.fresh and OUT.exists():
        shutil.rmtree(OUT)
    start = time.perf_counter()

    if not (DATA / "annotations" / "instances_val.json").is_file():
        run(icd("synth", "--out", str(DATA), *[f"--{k}={v}" for k, v in SYNTH.items()]), "synthetic dataset")
    teacher_dir = train_if_missing(TEACHER, "teacher: RetinaNet R-34")
    baselines = {name: train_if_missing(base, f"student baseline: {name}") for name, base, _ in STUDENTS}

    weights = f"MODEL.WEIGHTS={teacher_dir / 'model_final.pth'}"
    if not (CACHE / "zarr.json").is_file() or not _cache_complete():
        resume = "--resume" if (CACHE / "zarr.json").is_file() else ""
        run(
            [
                "make",
                "--no-print-directory",
                "stage1",
                f"CONFIG={TEACHER}",
                f"CACHE={CACHE}",
                f"BUDGET={BUDGET}",
                f"OPTS={resume} {weights.replace('=', ' ', 1)} CACHE.ENCODING auto".strip(),
            ],
            f"stage one: dump the teacher once into a cache within {BUDGET}",
        )
    run(icd("cache", "verify", str(CACHE)), "verify the cache")
    run(icd("cache", "inspect", str(CACHE)), "inspect the cache")

    distilled = {}
    for name, _, distill_config in STUDENTS:
        out = output_dir(distill_config)
        if (out / "inference" / "metrics.json").is_file() and (out / "decoder_signals.json").is_file():
            print(f"\n=== stage two: {name}: reusing {out.relative_to(REPO)}", flush=True)
        else:
            run(
                ["make", "--no-print-directory", "stage2", f"CONFIG={distill_config}", f"CACHE={CACHE}"],
                f"stage two: distil {name} from the same cache",
            )
        distilled[name] = out

    init_only = {}
    for name, _, distill_config in STUDENTS:
        out = init_only_dir(distill_config)
        if (out / "inference" / "metrics.json").is_file():
            print(f"\n=== teacher-init only: {name}: reusing {out.relative_to(REPO)}", flush=True)
        else:
            # The distill run without the ICD loss: the student starts from the teacher's FPN (and head, same
            # family) exactly as in stage two, the decoder still trains, but nothing reaches the student.
            run(
                icd(
                    "distill",
                    "--config-file",
                    distill_config,
                    "--cache",
                    str(CACHE),
                    "DISTILL.LAMBDA",
                    "0",
                    "OUTPUT_DIR",
                    str(out),
                ),
                f"teacher-init only (DISTILL.LAMBDA 0): {name}",
            )
        init_only[name] = out

    figures = make_figures(baselines, distilled)
    print(results_table(teacher_dir, baselines, init_only, distilled))
    print(decoder_table(distilled))
    print("\nfigures:\n" + "\n".join(f"  {path.relative_to(REPO)}" for path in figures))
    print(f"\ndemo finished in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


def _cache_complete() -> bool:
    sys.path.insert(0, str(REPO))
    from cache_format import CacheError, CacheReader

    try:
        return CacheReader(str(CACHE)).finished  # its manifest is written: the dump finished (else --resume)
    except CacheError:
        return False


def init_only_dir(distill_config: str) -> Path:
    """Where the teacher-init-only run of a student goes: beside its distill run."""
    out = output_dir(distill_config)
    return out.parent / f"init_only_{out.name}"


def results_table(
    teacher_dir: Path, baselines: dict[str, Path], init_only: dict[str, Path], distilled: dict[str, Path]
) -> str:
    """The paper-style table: baseline, teacher-init only and + ICD (cached) AP with the deltas, plus the
    cache and timing. The ICD loss's own effect is the last delta (vs teacher-init only)."""
    from cache_format import CacheReader
    from cache_format.budget import format_size
    from cache_format.store import usage

    reader = CacheReader(str(CACHE))
    files, size = usage(str(CACHE))
    lines = [
        "",
        "## Results on the synthetic benchmark (COCO box AP, val split)",
        "",
        f"Teacher RetinaNet R-34: AP {bbox_ap(teacher_dir):.1f}",
        "",
        "| student | baseline AP | teacher-init only AP | + ICD (cached) AP | delta vs baseline "
        "| delta vs init only | s/iter baseline | s/iter ICD (cached) | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in baselines:
        base, init, dist = bbox_ap(baselines[name]), bbox_ap(init_only[name]), bbox_ap(distilled[name])
        t_base, t_dist = seconds_per_iter(baselines[name]), seconds_per_iter(distilled[name])
        lines.append(
            f"| {name} | {base:.1f} | {init:.1f} | {dist:.1f} | {dist - base:+.1f} | {dist - init:+.1f} "
            f"| {t_base:.3f} | {t_dist:.3f} | {t_dist / t_base:.2f}x |"
        )
    lines += [
        "",
        f"Cache: {int(reader.committed().sum())} samples, encoding {reader.encoding} ({reader.compressor}), "
        f"{format_size(size)} in {files} files (budget {BUDGET}); one teacher dump served both students.",
    ]
    return "\n".join(lines)


def decoder_table(distilled: dict[str, Path]) -> str:
    """What each student's ICD decoder learnt (signals.py), each number next to what no learning gives."""
    from stage2_student_distill.signals import read_signals

    lines = [
        "",
        "## What the ICD decoder learnt (end of stage two, cached samples with fresh fake queries)",
        "",
        "A decoder that learnt nothing: loss_ident = the prior's entropy, AUC 0.5, instances' maps alike (cosine ~1),",
        "in-box mass = a uniform map's.",
        "",
        "| student | loss_ident | prior's entropy | real-vs-fake AUC | map cosine | in-box mass | uniform |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, out in distilled.items():
        s = read_signals(out / "decoder_signals.json")
        lines.append(
            f"| {name} | {s['loss_ident']:.3f} | {s['prior_entropy']:.3f} | {_num(s['auc'])} "
            f"| {_num(s['map_cosine'])} | {_num(s['inbox_mass'])} | {_num(s['inbox_uniform'])} |"
        )
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def make_figures(baselines: dict[str, Path], distilled: dict[str, Path]) -> list[Path]:
    """Loss curves of every run, and the teacher decoder's instance-conditional attention maps."""
    from detection.config import setup_cfg
    from stage2_student_distill.figures import plot_attention_maps, plot_decoder_signals, plot_loss_curves

    figures = []
    for name in baselines:
        slug = name.lower().replace(" ", "_").replace("-", "")
        runs = {
            f"{name} baseline": baselines[name] / "metrics.json",
            f"{name} + ICD (cached)": distilled[name] / "metrics.json",
        }
        figures.append(plot_loss_curves(runs, OUT / "figures" / f"losses_{slug}.png"))
    figures.append(
        plot_decoder_signals(
            {name: out / "decoder_signals.json" for name, out in distilled.items()},
            OUT / "figures" / "decoder_signals.png",
        )
    )
    name, _, distill_config = STUDENTS[0]
    cfg = setup_cfg(distill_config)
    figures.append(
        plot_attention_maps(
            cfg, str(CACHE), distilled[name] / "model_final.pth", OUT / "figures" / "attention_maps.png"
        )
    )
    return figures


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
