"""bench/accuracy.py's plan and arithmetic: which steps run, what is shared, paired deltas, the table."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import accuracy


def test_every_row_has_its_configs() -> None:
    for row in accuracy.ROWS.values():
        assert accuracy.FAMILIES[row.teacher].teacher_config(row.teacher).is_file()
        assert accuracy.FAMILIES[row.student].student_config(row.student).is_file()


def plan(tmp_path: Path, rows: list[str], online: tuple[str, ...] = ("retinanet",),
         ablate: tuple[str, ...] = ("fcos_from_retinanet",)) -> dict[str, accuracy.Task]:
    layout = accuracy.Layout(tmp_path)
    tasks = accuracy.build_tasks(layout, accuracy.SIZES["full"], [0, 1], [accuracy.ROWS[r] for r in rows], online,
                                 ["MODEL.DEVICE", "cpu"], budget=lambda family: 1, ablate=ablate)
    return {t.name: t for t in tasks}


def test_plan_shares_teachers_and_baselines_and_runs_online_only_where_asked(tmp_path: Path) -> None:
    tasks = plan(tmp_path, ["retinanet", "fcos", "fcos_from_retinanet"])
    assert [n for n in tasks if n.startswith("teacher_")] == ["teacher_retinanet", "teacher_fcos"]
    # the cross-family row reuses the FCOS baseline and the RetinaNet teacher's fp32 cache
    assert "fcos_from_retinanet_baseline_seed0" not in tasks and "fcos_baseline_seed0" in tasks
    assert tasks["fcos_from_retinanet_cached_fp32_seed1"].deps == ("dump_retinanet_fp32",)
    assert "fcos_from_retinanet_cached_budget_seed0" not in tasks
    assert "retinanet_online_seed0" in tasks and "fcos_online_seed0" not in tasks
    init_only = tasks["retinanet_init_only_seed0"].command()
    assert init_only[init_only.index("DISTILL.LAMBDA") + 1] == "0" and "--online" not in init_only
    paper = tasks["fcos_from_retinanet_paper_decoder_seed0"].command()
    assert paper[paper.index("DISTILL.SPATIAL_PRIOR") + 1] == "" and "retinanet_lambda_2_seed0" not in tasks
    # priority: a row's teacher comes before its students' distill runs
    order = list(tasks)
    assert order.index("teacher_fcos") < order.index("fcos_cached_fp32_seed0")


def run(row: str, mode: str, seed: int, **metrics: float) -> dict:
    return {"row": row, "mode": mode, "seed": seed, "status": "ok", **metrics}


def test_deltas_are_paired_by_seed_and_only_over_common_seeds() -> None:
    runs = [run("mask_rcnn", "baseline", 0, box_AP=10.0, mask_AP=8.0), run("mask_rcnn", "baseline", 1, box_AP=14.0,
                                                                               mask_AP=9.0),
            run("mask_rcnn", "init_only", 0, box_AP=11.0, mask_AP=8.5),
            run("mask_rcnn", "cached_fp32", 0, box_AP=12.0, mask_AP=9.0),
            run("mask_rcnn", "cached_fp32", 1, box_AP=17.0, mask_AP=9.5)]
    cells = accuracy.aggregate(runs)["mask_rcnn"]
    icd = cells["cached_fp32"]
    assert icd["box_AP_mean"] == pytest.approx(14.5) and icd["box_AP_std"] == pytest.approx(math.sqrt(12.5))
    assert icd["box_AP_vs_baseline"] == {"mean": pytest.approx(2.5), "std": pytest.approx(math.sqrt(0.5)), "n": 2}
    assert icd["box_AP_vs_init_only"] == {"mean": pytest.approx(1.0), "std": 0.0, "n": 1}  # seed 0 only
    assert icd["mask_AP_vs_baseline"]["mean"] == pytest.approx(0.75)
    assert "box_AP_vs_baseline" not in cells["baseline"]


def test_table_shows_box_and_mask_and_the_decoder(tmp_path: Path) -> None:
    runs = [run("condinst", "baseline", 0, box_AP=10.0, mask_AP=8.0),
            {**run("condinst", "cached_fp32", 0, box_AP=12.0, mask_AP=9.0),
             "decoder": {"loss_ident": 0.2, "prior_entropy": 0.45, "auc": 0.9}}]
    result = {"sizes": {"val_images": 50}, "cells": accuracy.aggregate(runs), "teachers": {},
              "caches": {}, "budget_fraction": 0.35, "failed": []}
    table = accuracy.markdown_table(result)
    line = next(row for row in table.splitlines() if "ICD cached fp32" in row)
    assert "12.00 ± 0.00 / 9.00 ± 0.00" in line and "+2.00 ± 0.00 / +1.00 ± 0.00" in line
    assert "0.200 / 0.450, AUC 0.90" in line
