"""bench/mechanism.py: a finished run's curves, FPN distance to the teacher in and out of instances, and
the distillation / detection gradient ratio, measured without writing into the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import mechanism
from detection.config import save_config
from stage2_student_distill import cli


def finished_distill_run(cfg_tiny, teacher_cache, distill_cfg, out: Path, **overrides) -> tuple[str, Path]:
    url, _ = teacher_cache("fp32")
    cfg = distill_cfg(cfg_tiny, OUTPUT_DIR=str(out), SOLVER={"MAX_ITER": 3, "LOG_PERIOD": 1}, **overrides)
    config = str(save_config(cfg, out.parent / f"{out.name}.yaml"))
    assert cli.main(["--config-file", config, "--cache", url]) == 0
    return url, out


def test_mechanism_measures_a_distill_run_and_leaves_it_as_it_was(
    cfg_tiny, teacher_cache, distill_cfg, tmp_path, capsys
):
    url, run = finished_distill_run(
        cfg_tiny, teacher_cache, distill_cfg, tmp_path / "run", DISTILL={"WARMUP_DETACH_ITERS": 0}
    )
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert mechanism.main([str(run), "--cache", url, "--batches", "2", "--out", str(tmp_path / "m.json")]) == 0
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    result = json.loads((tmp_path / "m.json").read_text())
    assert [r["iteration"] for r in result["curves"]["train"]] == [1, 2, 3]
    assert all(r["loss_distill"] > 0 for r in result["curves"]["train"])
    assert result["curves"]["eval"][-1]["iteration"] == 3 and "box_AP" in result["curves"]["eval"][-1]
    levels = result["measured"]["levels"]
    assert set(levels) == {"p3", "p4", "p5", "p6", "p7"}
    assert levels["p3"]["distance_inside"] > 0 and levels["p3"]["distance_outside"] > 0
    for m in levels.values():  # (on these tiny images a box may cover all of a coarse level: nothing outside)
        assert m["grad_ratio"] > 0 and m["grad_ratio_per_lambda"] == pytest.approx(m["grad_ratio"] / 8.0, rel=1e-9)
    assert "| p3 |" in capsys.readouterr().out


def test_level_masks_split_the_valid_area_into_inside_and_outside_the_boxes() -> None:
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 16.0, 8.0]])}, {"boxes": torch.zeros(0, 4)}]
    inside, outside = mechanism._level_masks(targets, [(32, 24), (16, 16)], (4, 4), stride=8)
    assert inside[0].sum() == 2 and inside[0, 0, :2].all()  # 16 x 8 px at stride 8: two cells
    assert outside[0].sum() == 4 * 3 - 2  # the valid area of a 32 x 24 image is 4 x 3 cells
    assert inside[1].sum() == 0 and outside[1].sum() == 4


def test_a_dir_that_is_not_a_finished_run_is_refused(tmp_path, capsys) -> None:
    assert mechanism.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a finished run" in err and "Traceback" not in err


def test_teacher_init_only_reports_the_gradient_per_unit_of_lambda(cfg_tiny, teacher_cache, distill_cfg, tmp_path):
    url, run = finished_distill_run(
        cfg_tiny, teacher_cache, distill_cfg, tmp_path / "init_only", DISTILL={"LAMBDA": 0.0, "WARMUP_DETACH_ITERS": 0}
    )
    measured = mechanism.measure(run, url, batches=1)
    assert measured["lambda"] == 0.0 and measured["decoder"]
    assert all(m["grad_ratio"] == 0.0 and m["grad_ratio_per_lambda"] > 0 for m in measured["levels"].values())
