"""`make bench`: run every benchmark in bench/ as its own process, then write bench/results/SUMMARY.md.

    python -m bench.run_all [--quick] [--with-accuracy] [--only NAME ...] [--results DIR]

Each benchmark runs as `python -m bench.<name> [--quick] --out <results>/<name>.json` in a fresh
process (so one benchmark's peak RSS, threads or a crash never leak into another's numbers), with its
stdout and stderr kept in <results>/<name>.log and <name>.err.log. The summary has one section per
benchmark: the markdown tables the benchmark put under "markdown" in its JSON (or, lacking it, tables
rendered from the JSON's fields), plus the machine (CPU model, cores, GPU, torch version) and the date. A benchmark
that fails (non-zero exit, or no JSON) is reported as failed with the tail of its stderr, and run_all
exits 1. The accuracy benchmark trains ~100 detectors (hours on 2 CPU cores), so it runs only
with --with-accuracy.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO / "bench" / "results"
# In the order they run: the cache format alone, then stage one, stage two, detectron2 parity (records
# "skipped" where detectron2 is not importable), then the end-to-end accuracy.
BENCHMARKS = ("cache_io", "stage1", "stage2", "d2_parity", "accuracy")
SLOW_BENCHMARKS = ("accuracy",)
STDERR_TAIL_LINES = 40


@dataclass
class BenchResult:
    """What running one benchmark gave: its JSON (when it succeeded) or why it failed."""

    name: str
    ok: bool
    seconds: float
    returncode: int | None
    data: dict[str, Any] | None = None
    error: str = ""
    stderr_tail: str = ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench_parser(name: str, doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The options of a benchmark that works in a scratch directory: --quick, --out and --work."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS / f"{name}.json", help="JSON result")
    parser.add_argument(
        "--work", type=Path, default=None, help="scratch directory (default: a temporary one, deleted at the end)"
    )
    return parser


def run_in_workdir(run: Callable[[Any, Path], dict[str, Any]], args: Any, prefix: str) -> int:
    """Run a benchmark in args.work (kept) or a temporary directory, print its markdown, write args.out."""
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        result = run(args, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            result = run(args, Path(tmp))
    print(result["markdown"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")
    return 0


def machine_info() -> dict[str, Any]:
    """The machine a benchmark ran on: CPU model, cores (total and usable), GPU, torch and python versions."""
    import torch  # imported here: run_all itself needs no torch until it describes the machine

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = None
    if torch.cuda.is_available():
        gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if gpu else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def now_iso() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    if not path.is_file():
        return ""
    # tqdm redraws with carriage returns: keep only the last state of each line.
    text = [line.rsplit("\r", 1)[-1] for line in path.read_text(errors="replace").splitlines()]
    return "\n".join(text[-lines:])


def run_benchmark(name: str, results_dir: Path, quick: bool, extra_args: Sequence[str] = ()) -> BenchResult:
    """Run bench/<name>.py in a subprocess; its JSON goes to <results_dir>/<name>.json."""
    out = results_dir / f"{name}.json"
    log, err = results_dir / f"{name}.log", results_dir / f"{name}.err.log"
    if not (REPO / "bench" / f"{name}.py").is_file():
        return BenchResult(name, False, 0.0, None, error=f"bench/{name}.py does not exist")
    out.unlink(missing_ok=True)  # never report a stale result as this run's
    cmd = [sys.executable, "-m", f"bench.{name}", "--out", str(out), *(["--quick"] if quick else []), *extra_args]
    print(
        f"[bench] {name}: {' '.join(cmd[1:])}  (log: {log.relative_to(REPO) if log.is_relative_to(REPO) else log})",
        flush=True,
    )
    start = time.perf_counter()
    with open(log, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.run(cmd, cwd=REPO, stdout=stdout, stderr=stderr, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return BenchResult(
            name, False, seconds, proc.returncode, error=f"exited with status {proc.returncode}", stderr_tail=_tail(err)
        )
    try:
        data = json.loads(out.read_text())
    except FileNotFoundError:
        return BenchResult(name, False, seconds, 0, error=f"exited 0 but wrote no {out.name}", stderr_tail=_tail(err))
    except json.JSONDecodeError as exc:
        return BenchResult(
            name, False, seconds, 0, error=f"{out.name} is not valid JSON: {exc}", stderr_tail=_tail(err)
        )
    return BenchResult(name, True, seconds, 0, data=data)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "/")


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (int, float, str, bool))


def _key_value_table(mapping: dict[str, Any]) -> str:
    rows = ["| key | value |", "|---|---|"]
    return "\n".join(rows + [f"| {k} | {_format_value(v)} |" for k, v in mapping.items()])


def _rows_table(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k, v in row.items() if _is_scalar(v) and k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format_value(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _render(key: str, value: Any, depth: int = 0) -> list[str]:
    """Markdown for one JSON field: tables for dicts of scalars and lists of records, recursing once."""
    if isinstance(value, dict) and value and all(_is_scalar(v) for v in value.values()):
        return [f"**{key}**", "", _key_value_table(value), ""]
    if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
        return [f"**{key}**", "", _rows_table(value), ""]
    if isinstance(value, list) and value and all(_is_scalar(v) for v in value):
        return [f"**{key}**: " + ", ".join(_format_value(v) for v in value), ""]
    if isinstance(value, dict) and value and depth == 0:
        scalars = {k: v for k, v in value.items() if _is_scalar(v)}
        lines = [f"**{key}**", "", _key_value_table(scalars), ""] if scalars else []
        return lines + [
            line for sub, v in value.items() if not _is_scalar(v) for line in _render(f"{key} / {sub}", v, depth + 1)
        ]
    return []


def generic_markdown(data: dict[str, Any]) -> str:
    """A readable rendering of a benchmark JSON that brings no "markdown" of its own."""
    scalars = {k: v for k, v in data.items() if _is_scalar(v) and k != "markdown"}
    lines = [_key_value_table(scalars), ""] if scalars else []
    for key, value in data.items():
        if key not in ("markdown", "machine") and not _is_scalar(value):
            lines += _render(key, value)
    return "\n".join(lines).strip()


def benchmark_section(result: BenchResult) -> str:
    """The markdown section of one benchmark in SUMMARY.md."""
    head = f"## {result.name}"
    if not result.ok:
        lines = [
            f"{head} - FAILED",
            "",
            f"`python -m bench.{result.name}` {result.error}"
            + (f" after {result.seconds:.0f} s" if result.seconds else "")
            + ".",
        ]
        if result.stderr_tail:
            lines += ["", "stderr (tail):", "", "```", result.stderr_tail, "```"]
        return "\n".join(lines)
    data = result.data or {}
    lines = [f"{head} - ok ({result.seconds:.0f} s)", ""]
    if data.get("quick") or (data.get("config") or {}).get("quick"):
        lines += ["Quick mode (--quick): fewer samples/iterations, for a smoke check more than for numbers.", ""]
    markdown = data.get("markdown")
    lines.append(markdown.strip() if isinstance(markdown, str) and markdown.strip() else generic_markdown(data))
    lines += ["", f"Full results: `{result.name}.json`."]
    return "\n".join(lines)


def machine_section(machine: dict[str, Any], date: str) -> str:
    gpu = machine.get("gpu") or "none"
    return "\n".join(
        [
            f"Date: {date}",
            "",
            "| machine | |",
            "|---|---|",
            f"| CPU | {machine.get('cpu')} |",
            f"| cores | {machine.get('cpu_cores')} ({machine.get('usable_cores')} usable, "
            f"torch default threads {machine.get('torch_threads')}) |",
            f"| GPU | {gpu}" + (f" (CUDA {machine['cuda']})" if machine.get("cuda") else "") + " |",
            f"| torch | {machine.get('torch')} |",
            f"| python | {machine.get('python')} on {machine.get('platform')} |",
        ]
    )


def write_summary(
    results: Sequence[BenchResult],
    machine: dict[str, Any],
    path: Path,
    date: str | None = None,
    skipped: Sequence[str] = (),
) -> Path:
    """Write SUMMARY.md: the machine and date, then one section per benchmark (failed ones included)."""
    failed = [r.name for r in results if not r.ok]
    status = f"{len(results) - len(failed)}/{len(results)} benchmarks ok" + (
        f"; FAILED: {', '.join(failed)}" if failed else ""
    )
    parts = ["# Benchmark summary", "", status + ".", "", machine_section(machine, date or now_iso())]
    if skipped:
        parts += [
            "",
            "Not run: "
            + ", ".join(f"`{name}`" for name in skipped)
            + (" (pass --with-accuracy; it takes hours on 2 CPU cores)" if set(skipped) & set(SLOW_BENCHMARKS) else "")
            + ".",
        ]
    for result in results:
        parts += ["", benchmark_section(result)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark (minutes, not hours)")
    parser.add_argument(
        "--with-accuracy",
        action="store_true",
        help="also run bench/accuracy.py (trains ~100 detectors: hours on 2 CPU cores, ~8 minutes with --quick)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        choices=BENCHMARKS,
        help=f"run only these benchmarks (of {', '.join(BENCHMARKS)})",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=DEFAULT_RESULTS,
        metavar="DIR",
        help="where the JSON results, logs and SUMMARY.md go (default bench/results)",
    )
    return parser


def selected_benchmarks(only: Sequence[str] | None, with_accuracy: bool) -> tuple[list[str], list[str]]:
    """(to run, not run): --only wins; otherwise all but the slow ones unless --with-accuracy."""
    if only:
        return [name for name in BENCHMARKS if name in only], []
    run = [name for name in BENCHMARKS if with_accuracy or name not in SLOW_BENCHMARKS]
    return run, [name for name in BENCHMARKS if name not in run]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    to_run, skipped = selected_benchmarks(args.only, args.with_accuracy)
    results_dir = args.results.resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in to_run:
        result = run_benchmark(name, results_dir, args.quick)
        print(
            f"[bench] {name}: " + (f"ok in {result.seconds:.0f} s" if result.ok else f"FAILED ({result.error})"),
            flush=True,
        )
        results.append(result)
    summary = write_summary(results, machine_info(), results_dir / "SUMMARY.md", skipped=skipped)
    print(f"[bench] summary: {summary}")
    failed = [r.name for r in results if not r.ok]
    if failed:
        print(f"[bench] failed: {', '.join(failed)} (see the .err.log files in {results_dir})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
