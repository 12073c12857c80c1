"""`make bench`'s summary: every benchmark gets a section, failures are shown with their stderr and fail the run.

No benchmark is executed here: run_all's runner is replaced by canned results.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import run_all
from bench.run_all import BenchResult, selected_benchmarks, write_summary

MACHINE = {
    "cpu": "Test CPU 9000",
    "cpu_cores": 2,
    "usable_cores": 2,
    "torch_threads": 1,
    "gpu": None,
    "torch": "2.x",
    "cuda": None,
    "python": "3.11",
    "platform": "Linux",
}


def test_summary_has_machine_date_and_each_benchmark_table(tmp_path: Path) -> None:
    results = [
        BenchResult(
            "stage1", True, 12.0, 0, data={"quick": True, "markdown": "| mode | ratio |\n|---|---|\n| dump | 0.95 |"}
        ),
        BenchResult(
            "cache_io",
            True,
            3.0,
            0,
            data={"rows": [{"name": "fp16@zstd", "bytes_per_value": 1.86}], "targets": {"int8 under 1 B/value": True}},
        ),
    ]
    text = write_summary(results, MACHINE, tmp_path / "SUMMARY.md", date="2026-01-02T03:04:05").read_text()
    assert "2/2 benchmarks ok" in text
    assert "Test CPU 9000" in text and "2026-01-02T03:04:05" in text and "| GPU | none |" in text
    assert "## stage1 - ok" in text and "| dump | 0.95 |" in text and "Quick mode" in text
    # A benchmark without its own markdown is still readable: its records and dicts become tables.
    assert "## cache_io - ok" in text
    assert "| fp16@zstd | 1.86 |" in text
    assert "| int8 under 1 B/value | True |" in text


def test_failed_benchmark_is_reported_with_its_stderr_tail(tmp_path: Path) -> None:
    results = [
        BenchResult(
            "stage2",
            False,
            5.0,
            1,
            error="exited with status 1",
            stderr_tail="Traceback (most recent call last):\nValueError: boom",
        )
    ]
    text = write_summary(results, MACHINE, tmp_path / "SUMMARY.md", skipped=["accuracy"]).read_text()
    assert "FAILED: stage2" in text
    assert "## stage2 - FAILED" in text and "exited with status 1" in text
    assert "ValueError: boom" in text
    assert "`accuracy`" in text and "--with-accuracy" in text


def test_accuracy_runs_only_when_asked() -> None:
    run, skipped = selected_benchmarks(None, with_accuracy=False)
    assert "accuracy" not in run and skipped == ["accuracy"]
    assert {"cache_io", "stage1", "stage2"} <= set(run)
    run, skipped = selected_benchmarks(None, with_accuracy=True)
    assert run[-1] == "accuracy" and not skipped
    assert selected_benchmarks(["stage1"], with_accuracy=False) == (["stage1"], [])


def test_main_exits_nonzero_when_a_benchmark_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[tuple[str, bool]] = []

    def fake_run(name: str, results_dir: Path, quick: bool) -> BenchResult:
        ran.append((name, quick))
        if name == "stage2":
            return BenchResult(name, False, 1.0, 1, error="exited with status 1", stderr_tail="boom")
        return BenchResult(name, True, 1.0, 0, data={"ratios": {"x/y": 1.0}})

    monkeypatch.setattr(run_all, "run_benchmark", fake_run)
    monkeypatch.setattr(run_all, "machine_info", lambda: MACHINE)
    assert run_all.main(["--quick", "--results", str(tmp_path)]) == 1
    assert ran == [("cache_io", True), ("stage1", True), ("stage2", True), ("d2_parity", True)]
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "## stage2 - FAILED" in text and "| x/y | 1 |" in text

    ran.clear()
    assert run_all.main(["--only", "stage1", "--results", str(tmp_path)]) == 0
    assert ran == [("stage1", False)]
