"""bench/gpu_check.py on CPU: the refusal, the budgets, the part runner, the summary, and the measured
parts themselves at tiny sizes (the code a GPU runs first, exercised before one is lent)."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from bench.gpu_check import PARTS, SLACK_S, TINY, TOTAL_BUDGET_S, Part


def test_without_cuda_it_refuses_in_one_line_and_writes_nothing(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "gpu"), "--work", str(tmp_path / "work")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA device is visible to torch ")
    assert "make gpu-check" in lines[0] and "GPU" in lines[0]
    assert not (tmp_path / "gpu").exists() and not (tmp_path / "work").exists()


def test_make_gpu_check_refuses_with_exit_2_when_torch_sees_no_gpu(tmp_path):
    import subprocess

    if torch.cuda.is_available():
        pytest.skip("checks the refusal on machines without CUDA")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path / "gpu")],
        cwd=gpu_check.REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr


def test_the_parts_budgets_fit_the_eight_minutes_and_are_printed():
    assert TOTAL_BUDGET_S == 8 * 60
    assert sum(p.budget_s for p in PARTS) + SLACK_S == TOTAL_BUDGET_S and SLACK_S >= 30
    assert [p.name for p in PARTS] == ["tests", "stage1", "stage2", "accuracy"]
    lines = gpu_check.budget_lines(PARTS)
    for part in PARTS:
        assert any(line.split()[:2] == [part.name, str(part.budget_s)] for line in lines[1:]), part.name
    assert f"start-up and summary {SLACK_S} s" in lines[0]


def test_a_part_past_its_budget_is_killed_with_its_children(tmp_path):
    child_pid = tmp_path / "child.pid"
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(child_pid)!r}, "w").write(str(child.pid))
        print("started", flush=True)
        time.sleep(60)
    """)
    start = time.perf_counter()
    entry = gpu_check.run_part(
        Part("slow", 2, "sleeps"), [sys.executable, "-c", script], tmp_path, tmp_path / "logs" / "slow.log"
    )
    assert entry["status"] == "over budget" and 2 <= entry["seconds"] < 20
    assert time.perf_counter() - start < 20
    assert "started" in entry["log_tail"] and "result" not in entry
    pid = int(child_pid.read_text())
    deadline = time.time() + 10
    while time.time() < deadline:  # the grandchild was in the part's session: killed too (gone or a zombie)
        status = Path(f"/proc/{pid}/status")
        if not status.exists() or "\nState:\tZ" in status.read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail("the part's child process outlived the part")


def test_a_failing_part_is_reported_with_its_log_and_a_stale_result_is_not_taken(tmp_path):
    (tmp_path / "broken.json").write_text(json.dumps({"from": "an earlier check"}))
    entry = gpu_check.run_part(
        Part("broken", 30, "fails"),
        [sys.executable, "-c", "print('the reason'); raise SystemExit(3)"],
        tmp_path,
        tmp_path / "broken.log",
    )
    assert entry["status"] == "failed (exit 3)" and "the reason" in entry["log_tail"]
    assert "result" not in entry and not (tmp_path / "broken.json").exists()
    script = f"import json; open({str(tmp_path / 'fine.json')!r}, 'w').write(json.dumps({{'x': 1}}))"
    entry = gpu_check.run_part(
        Part("fine", 30, "works"), [sys.executable, "-c", script], tmp_path, tmp_path / "fine.log"
    )
    assert entry["status"] == "ok" and entry["result"] == {"x": 1} and "log_tail" not in entry


def test_junit_counts_reads_passes_failures_and_skips(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text("""<?xml version="1.0"?><testsuites><testsuite>
        <testcase classname="tests.test_cuda" name="test_a"/>
        <testcase classname="tests.test_cuda" name="test_b"><failure message="assert 1 == 2&#10;more">x</failure></testcase>
        <testcase classname="tests.test_cuda" name="test_c"><skipped message="needs 2 GPUs"/></testcase>
        <testcase classname="tests.test_cuda" name="test_d"><error message="fixture broke">y</error></testcase>
        </testsuite></testsuites>""")
    counts = gpu_check.junit_counts(xml)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 2, 1)
    assert counts["failures"][0] == {"test": "tests.test_cuda::test_b", "message": ["assert 1 == 2"]}


def _steps(student: float, cached: float, online: float) -> dict:
    out = {}
    for kind, amp_s in (("student", student), ("cached", cached), ("online", online)):
        out[f"{kind}_amp"] = {"step_s": amp_s, "data_wait_share": 0.05}
        out[f"{kind}_fp32"] = {"step_s": 2 * amp_s, "data_wait_share": 0.02}
    return out


def test_stage2_ratios_compare_the_modes_per_precision():
    ratios = gpu_check.stage2_ratios(_steps(0.1, 0.11, 0.2))
    assert ratios["cached/student (amp)"] == pytest.approx(1.1)
    assert ratios["online/cached (fp32)"] == pytest.approx(0.4 / 0.22)
    assert ratios["fp32/amp (online)"] == pytest.approx(2.0)
    assert [m for m, _, _ in gpu_check.stage2_modes()] == [
        "student_amp",
        "student_fp32",
        "cached_amp",
        "cached_fp32",
        "online_amp",
        "online_fp32",
    ]


def test_the_summary_shows_every_part_its_budget_and_its_numbers():
    steps = _steps(0.1, 0.11, 0.2)
    for mode in steps:
        steps[mode]["data_wait_s"] = 0.0
    entries = [
        {
            "part": "tests",
            "budget_s": 150,
            "seconds": 80.0,
            "status": "ok",
            "log": "l",
            "result": {
                "passed": 9,
                "failed": 1,
                "skipped": 1,
                "failures": [{"test": "tests/test_cuda.py::test_x", "message": ["boom"]}],
            },
        },
        {
            "part": "stage1",
            "budget_s": 60,
            "seconds": 41.0,
            "status": "ok",
            "log": "l",
            "result": {
                "images_per_s": {"inference_amp": {"median": 250.0}, "dump_fp16_amp": {"median": 240.0}},
                "peak_gpu_mb": {"inference_amp": 512.0, "dump_fp16_amp": 530.0},
                "ratio_dump_over_inference_amp": {"median": 0.96},
                "amp_speedup_inference": {"median": 1.7},
            },
        },
        {
            "part": "stage2",
            "budget_s": 100,
            "seconds": 70.0,
            "status": "ok",
            "log": "l",
            "result": {
                "steps": steps,
                "ratios": gpu_check.stage2_ratios(steps),
                "same_batches": True,
                "peak_gpu_mb": {m: 900.0 for m in steps},
            },
        },
        {
            "part": "accuracy",
            "budget_s": 130,
            "seconds": 130.2,
            "status": "over budget",
            "log": "acc.log",
            "log_tail": "training student 3 of 4",
        },
    ]
    text = gpu_check.summary_markdown({"gpu": "NVIDIA H100", "torch": "2.15.0", "cuda": "13.2"}, entries, 330.0)
    assert "NVIDIA H100" in text and "330 s of the 480 s budget" in text
    assert "| accuracy | 130 | 130 | over budget |" in text and "training student 3 of 4" in text
    assert "9 passed, 1 failed, 1 skipped" in text and "FAILED tests/test_cuda.py::test_x: boom" in text
    assert "| dump_fp16_amp | 240.0 | 530 |" in text and "0.96" in text
    assert "| cached_amp | 0.1100 | 5.0% | 900 |" in text and "cached/student (amp) 1.10" in text


def test_the_stage_one_part_runs_end_to_end_on_cpu_at_tiny_sizes(tmp_path):
    """What a GPU runs first: the real stage-one part (dump and inference, AMP on and off), here on CPU."""
    out = tmp_path / "gpu"
    assert gpu_check.run_one_part("stage1", out, tmp_path / "w1", "cpu", TINY) == 0
    s1 = json.loads((out / "stage1.json").read_text())
    assert set(s1["images_per_s"]) == {"inference_fp32", "inference_amp", "dump_fp16_amp"}
    assert all(v["median"] > 0 for v in s1["images_per_s"].values()) and s1["device"] == "cpu"
    assert s1["peak_gpu_mb"] == {m: None for m in s1["images_per_s"]}


@pytest.mark.slow  # six trainers (student, cached, online x AMP on/off) and a dump: ~1 min on 2 cores
def test_the_stage_two_part_runs_end_to_end_on_cpu_at_tiny_sizes(tmp_path):
    """The real stage-two part on CPU: every mode trains in turns on the same batches."""
    out = tmp_path / "gpu"
    assert gpu_check.run_one_part("stage2", out, tmp_path / "w2", "cpu", TINY) == 0
    s2 = json.loads((out / "stage2.json").read_text())
    assert set(s2["steps"]) == {m for m, _, _ in gpu_check.stage2_modes()} and s2["same_batches"]
    assert all(0 <= v["data_wait_share"] < 1 and v["step_s"] > 0 for v in s2["steps"].values())
    assert s2["peak_gpu_mb"] == {m: None for m in s2["steps"]}  # no GPU memory on CPU
