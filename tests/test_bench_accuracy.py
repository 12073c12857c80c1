"""bench/accuracy.py's plan and arithmetic: which steps run, what is shared, paired deltas, the table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import accuracy


def test_every_row_has_its_configs() -> None:
    for row in accuracy.ROWS.values():
        assert accuracy.FAMILIES[row.teacher].teacher_config(row.teacher).is_file()
        assert accuracy.FAMILIES[row.student].student_config(row.student).is_file()


def plan(
    tmp_path: Path,
    rows: list[str],
    online: tuple[str, ...] = ("retinanet",),
    ablate: tuple[str, ...] = ("fcos_from_retinanet",),
) -> dict[str, accuracy.Task]:
    layout = accuracy.Layout(tmp_path)
    tasks = accuracy.build_tasks(
        layout,
        accuracy.SIZES["full"],
        [0, 1],
        [accuracy.ROWS[r] for r in rows],
        online,
        ["MODEL.DEVICE", "cpu"],
        budget=lambda family: 1,
        ablate=ablate,
    )
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
    runs = [
        run("mask_rcnn", "baseline", 0, box_AP=10.0, mask_AP=8.0),
        run("mask_rcnn", "baseline", 1, box_AP=14.0, mask_AP=9.0),
        run("mask_rcnn", "init_only", 0, box_AP=11.0, mask_AP=8.5),
        run("mask_rcnn", "cached_fp32", 0, box_AP=12.0, mask_AP=9.0),
        run("mask_rcnn", "cached_fp32", 1, box_AP=17.0, mask_AP=9.5),
    ]
    cells = accuracy.aggregate(runs)["mask_rcnn"]
    icd = cells["cached_fp32"]
    assert icd["box_AP_mean"] == pytest.approx(14.5) and icd["box_AP_std"] == pytest.approx(math.sqrt(12.5))
    assert icd["box_AP_vs_baseline"] == {"mean": pytest.approx(2.5), "std": pytest.approx(math.sqrt(0.5)), "n": 2}
    assert icd["box_AP_vs_init_only"] == {"mean": pytest.approx(1.0), "std": 0.0, "n": 1}  # seed 0 only
    assert icd["mask_AP_vs_baseline"]["mean"] == pytest.approx(0.75)
    assert "box_AP_vs_baseline" not in cells["baseline"]


def test_table_shows_box_and_mask_and_the_decoder(tmp_path: Path) -> None:
    runs = [
        run("condinst", "baseline", 0, box_AP=10.0, mask_AP=8.0),
        {
            **run("condinst", "cached_fp32", 0, box_AP=12.0, mask_AP=9.0),
            "decoder": {"loss_ident": 0.2, "prior_entropy": 0.45, "auc": 0.9},
        },
    ]
    result = {
        "sizes": {"val_images": 50},
        "cells": accuracy.aggregate(runs),
        "teachers": {},
        "caches": {},
        "budget_fraction": 0.35,
        "failed": [],
    }
    table = accuracy.markdown_table(result)
    line = next(row for row in table.splitlines() if "ICD cached fp32" in row)
    assert "12.00 ± 0.00 / 9.00 ± 0.00" in line and "+2.00 ± 0.00 / +1.00 ± 0.00" in line
    assert "0.200 / 0.450, AUC 0.90" in line


# --- carrying runs from an earlier results file (the work dir does not outlive its machine) ---------------
def finish(out: Path, box_ap: float, weights: bytes = b"student") -> None:
    """What a finished `icd train` / `icd distill` leaves: COCO metrics, final weights, logged windows."""
    (out / "inference").mkdir(parents=True)
    (out / "inference" / "metrics.json").write_text(json.dumps({"bbox": {"AP": box_ap, "AP50": 2 * box_ap}}))
    (out / "model_final.pth").write_bytes(weights)
    (out / "metrics.json").write_text(json.dumps({"time": 1.0, "data_time": 0.1}) + "\n")


def results_file(path: Path, runs: list[dict], teacher: dict, size: str = "full") -> Path:
    sizes = accuracy.SIZES[size]
    path.write_text(
        json.dumps(
            {
                "benchmark": "accuracy",
                "date": "2026-11-25",
                "runs": runs,
                "teachers": {"faster_rcnn": teacher},
                "caches": {},
                "sizes": {
                    "name": sizes.name,
                    "train_images": sizes.train_images,
                    "val_images": sizes.val_images,
                    "teacher_opts": list(sizes.teacher_opts),
                    "student_opts": list(sizes.student_opts),
                },
            }
        )
    )
    return path


OLD_TEACHER = {"box_AP": 12.1, "box_AP50": 25.3}  # recorded before digests were: named by its metrics


def carried_faster_rcnn(tmp_path: Path) -> accuracy.Carried:
    runs = [
        run("faster_rcnn", mode, 0, box_AP=ap)
        for mode, ap in (("baseline", 3.0), ("init_only", 11.0), ("cached_fp32", 10.0))
    ]
    path = results_file(tmp_path / "old.json", runs, OLD_TEACHER)
    carried, said = accuracy.load_carried(path, accuracy.SIZES["full"], dataset_sha256="")
    assert "3 finished run(s)" in said
    return carried


def test_same_teacher_by_digest_else_by_every_common_metric() -> None:
    assert accuracy.same_teacher({"weights_sha256": "a", "box_AP": 1.0}, {"weights_sha256": "a", "box_AP": 2.0})
    assert not accuracy.same_teacher({"weights_sha256": "a", "box_AP": 1.0}, {"weights_sha256": "b", "box_AP": 1.0})
    assert accuracy.same_teacher(OLD_TEACHER, {**OLD_TEACHER, "weights_sha256": "x"})
    assert not accuracy.same_teacher(OLD_TEACHER, {"box_AP": 12.1, "box_AP50": 25.300001, "weights_sha256": "x"})
    assert not accuracy.same_teacher({}, {"weights_sha256": "x"})  # nothing to compare is not a match


def test_a_carried_run_stands_for_a_run_only_with_the_same_teacher(tmp_path: Path) -> None:
    carried = carried_faster_rcnn(tmp_path)
    row = accuracy.ROWS["faster_rcnn"]
    other = {"box_AP": 11.7, "box_AP50": 25.0, "weights_sha256": "new"}
    # deciding whether to run (strict): a baseline needs no teacher; a distill run needs the same one
    assert accuracy.carried_run(carried, row, "baseline", 0, None, strict=True) is not None
    assert accuracy.carried_run(carried, row, "init_only", 0, None, strict=True) is None
    assert accuracy.carried_run(carried, row, "init_only", 0, other, strict=True) is None
    assert (
        accuracy.carried_run(carried, row, "init_only", 0, {**OLD_TEACHER, "weights_sha256": "x"}, strict=True)[
            "box_AP"
        ]
        == 11.0
    )
    assert accuracy.carried_run(carried, row, "init_only", 1, {**OLD_TEACHER}, strict=True) is None  # no record
    # the plan skips exactly those
    tasks = accuracy.build_tasks(
        accuracy.Layout(tmp_path / "work"),
        accuracy.SIZES["full"],
        [0, 1],
        [row],
        (),
        ["MODEL.DEVICE", "cpu"],
        budget=lambda family: 1,
        carried=lambda r, m, s: accuracy.carried_run(carried, r, m, s, other, True) is not None,
    )
    by_name = {t.name: t for t in tasks}
    assert by_name["faster_rcnn_baseline_seed0"].done() and not by_name["faster_rcnn_baseline_seed1"].done()
    assert not by_name["faster_rcnn_init_only_seed0"].done()


def test_the_table_keeps_carried_runs_unless_the_work_dir_distilled_the_row_with_another_teacher(
    tmp_path: Path,
) -> None:
    carried = carried_faster_rcnn(tmp_path)
    layout = accuracy.Layout(tmp_path / "work")
    row = accuracy.ROWS["faster_rcnn"]
    # nothing in the work dir: every carried run enters the table, with the teacher it recorded
    runs, row_teachers = accuracy.collect(layout, [0], {}, carried, {})
    assert sorted((r["mode"], r["status"]) for r in runs) == [
        ("baseline", "carried"),
        ("cached_fp32", "carried"),
        ("init_only", "carried"),
    ]
    assert row_teachers["faster_rcnn"]["box_AP"] == 12.1 and "old.json" in row_teachers["faster_rcnn"]["carried_from"]
    # a retrained teacher that is not the recorded one, no run of the row with it yet: carried runs stay
    finish(layout.teacher("faster_rcnn"), 11.7, weights=b"retrained")
    teachers = accuracy.describe_teachers(layout)
    runs, row_teachers = accuracy.collect(layout, [0, 1], {}, carried, teachers)
    assert len(runs) == 3 and row_teachers["faster_rcnn"]["box_AP"] == 12.1
    assert accuracy.listed_teachers(carried, teachers, row_teachers)["faster_rcnn"]["box_AP"] == 12.1  # its row's
    # once the work dir distilled the row with it, the old teacher's distill runs leave the row; baselines stay
    finish(layout.run_dir(row, "init_only", 1), 9.0)
    runs, row_teachers = accuracy.collect(layout, [0, 1], {}, carried, teachers)
    assert sorted((r["mode"], r["seed"], r["status"]) for r in runs) == [
        ("baseline", 0, "carried"),
        ("init_only", 1, "reused"),
    ]
    assert runs[-1]["teacher_sha256"] == teachers["faster_rcnn"]["weights_sha256"]
    assert row_teachers["faster_rcnn"] is teachers["faster_rcnn"]
    assert accuracy.listed_teachers(carried, teachers, row_teachers)["faster_rcnn"]["box_AP"] == 11.7
    cell = accuracy.aggregate(runs)["faster_rcnn"]
    assert cell["init_only"]["n"] == 1 and cell["init_only"]["box_AP_vs_baseline"]["n"] == 0  # no seed-1 baseline


def test_the_table_joins_carried_and_new_seeds_of_the_same_teacher(tmp_path: Path) -> None:
    carried = carried_faster_rcnn(tmp_path)
    layout = accuracy.Layout(tmp_path / "work")
    row = accuracy.ROWS["faster_rcnn"]
    teacher_dir = layout.teacher("faster_rcnn")
    (teacher_dir / "inference").mkdir(parents=True)
    (teacher_dir / "inference" / "metrics.json").write_text(json.dumps({"bbox": {"AP": 12.1, "AP50": 25.3}}))
    (teacher_dir / "model_final.pth").write_bytes(b"teacher")
    (teacher_dir / "metrics.json").write_text(json.dumps({"time": 1.0}) + "\n")
    teachers = accuracy.describe_teachers(layout)
    for seed, ap in ((1, 4.0), (2, 5.0)):
        finish(layout.run_dir(row, "baseline", seed), ap)
        finish(layout.run_dir(row, "init_only", seed), ap + 8)
    runs, _ = accuracy.collect(layout, [0, 1, 2], {}, carried, teachers)
    cell = accuracy.aggregate(runs)["faster_rcnn"]["init_only"]
    assert cell["seeds"] == [0, 1, 2] and cell["box_AP_vs_baseline"]["mean"] == pytest.approx(8.0)


def test_results_of_another_size_or_dataset_are_not_carried(tmp_path: Path) -> None:
    runs = [run("faster_rcnn", "baseline", 0, box_AP=3.0)]
    quick = results_file(tmp_path / "quick.json", runs, OLD_TEACHER, size="quick")
    carried, said = accuracy.load_carried(quick, accuracy.SIZES["full"], dataset_sha256="")
    assert not carried.runs and "another size" in said
    path = results_file(tmp_path / "full.json", runs, OLD_TEACHER)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "dataset_sha256": "a:b"}))
    carried, said = accuracy.load_carried(path, accuracy.SIZES["full"], dataset_sha256="c:d")
    assert not carried.runs and "another synthetic dataset" in said
    assert accuracy.load_carried(tmp_path / "missing.json", accuracy.SIZES["full"], "")[0].runs == {}


def test_table_names_a_row_distilled_from_an_earlier_teacher(tmp_path: Path) -> None:
    runs = [run("retinanet", "baseline", 0, box_AP=3.0), run("retinanet", "cached_fp32", 0, box_AP=6.0)]
    result = {
        "sizes": {"val_images": 50},
        "cells": accuracy.aggregate(runs),
        "failed": [],
        "caches": {},
        "budget_fraction": 0.35,
        "teachers": {"retinanet": {"box_AP": 8.6, "weights_sha256": "new"}},
        "row_teachers": {
            "retinanet": {"box_AP": 8.4, "carried_from": "old.json (2026-11-25)"},
            "fcos_from_retinanet": {"box_AP": 8.6, "weights_sha256": "new"},
        },
    }
    table = accuracy.markdown_table(result)
    assert "Teachers (R-34, AP): RetinaNet 8.6." in table
    notes = [line for line in table.splitlines() if "another" in line]
    assert notes == [
        "RetinaNet R-18 <- RetinaNet R-34: distilled from another RetinaNet R-34 teacher than the one "
        "listed (AP 8.4, recorded in old.json (2026-11-25))."
    ]


def test_caches_merge_per_kind_the_work_dir_first() -> None:
    recorded = {"retinanet": {"fp32": {"samples": 1}, "budget": {"encoding": "int8"}}, "fcos": {"fp32": {}}}
    here = {"retinanet": {"fp32": {"samples": 2}}}
    assert accuracy.merge_caches(recorded, here) == {
        "retinanet": {"fp32": {"samples": 2}, "budget": {"encoding": "int8"}},
        "fcos": {"fp32": {}},
    }


# --- the powered size (issue 21): a harder task, 3x teachers, the criteria the table checks ------------------
def test_powered_size_plans_a_3x_teacher_the_no_init_mode_and_its_own_dataset(tmp_path: Path) -> None:
    sizes = accuracy.SIZES["powered"]
    tasks = {
        t.name: t
        for t in accuracy.build_tasks(
            accuracy.Layout(tmp_path),
            sizes,
            [0, 1, 2],
            [accuracy.ROWS[r] for r in sizes.rows],
            (),
            ["MODEL.DEVICE", "cpu"],
            budget=lambda family: 1,
        )
    }

    def opt(cmd: list[str], key: str) -> str:
        return cmd[len(cmd) - 1 - cmd[::-1].index(key) + 1]  # the last occurrence wins, as in the config

    teacher, student = tasks["teacher_retinanet"].command(), tasks["retinanet_baseline_seed0"].command()
    assert int(opt(teacher, "SOLVER.MAX_ITER")) == 3 * int(opt(student, "SOLVER.MAX_ITER"))
    assert opt(teacher, "MODEL.ANCHOR_GENERATOR.SIZES") == opt(student, "MODEL.ANCHOR_GENERATOR.SIZES")
    no_init = tasks["faster_rcnn_no_init_seed2"].command()
    assert opt(no_init, "DISTILL.INIT_FROM_TEACHER") == "False" and "DISTILL.LAMBDA" not in no_init
    assert {"retinanet_online_seed0", "retinanet_lambda_2_seed0"}.isdisjoint(tasks)  # not asked for
    assert sizes.val_images >= sizes.power.min_val_images and sizes.seeds >= sizes.power.min_seeds
    # the full size is as it was: no extra mode, a record without the task's options (older files carry)
    full = {
        t.name
        for t in accuracy.build_tasks(
            accuracy.Layout(tmp_path),
            accuracy.SIZES["full"],
            [0],
            [accuracy.ROWS["retinanet"]],
            (),
            [],
            budget=lambda family: 1,
        )
    }
    assert not any("no_init" in name for name in full)
    assert "synth" not in accuracy.SIZES["full"].record() and sizes.record()["synth"]["classes"] == 12
    # it checkpoints every quarter, and a run an interruption left with a checkpoint continues from it
    assert int(opt(student, "SOLVER.CHECKPOINT_PERIOD")) == int(opt(student, "SOLVER.MAX_ITER")) // 4
    assert "--resume" not in teacher
    (tmp_path / "teachers" / "retinanet").mkdir(parents=True)
    (tmp_path / "teachers" / "retinanet" / "last_checkpoint").write_text("model_0000750.pth")
    assert tasks["teacher_retinanet"].command()[3:5] == ["train", "--resume"]
    gpu = accuracy.SIZES["powered_gpu"]  # the same recipe, scaled
    assert gpu.synth == sizes.synth and gpu.train_images > sizes.train_images and gpu.jobs == 1


def test_power_summary_reports_headroom_and_the_paired_delta_with_its_interval() -> None:
    runs = [
        run("retinanet", mode, seed, box_AP=ap)
        for mode, aps in (
            ("baseline", (5.0, 6.0, 7.0)),
            ("init_only", (10.0, 11.0, 12.0)),
            ("cached_fp32", (10.5, 11.0, 12.7)),
        )
        for seed, ap in enumerate(aps)
    ]
    result = {
        "sizes": {"val_images": 500},
        "cells": accuracy.aggregate(runs),
        "failed": [],
        "caches": {},
        "budget_fraction": 0.35,
        "teachers": {"retinanet": {"box_AP": 17.5}},
    }
    power = accuracy.power_summary(result, accuracy.Power())
    m = power["rows"]["retinanet"]["box_AP"]
    assert m["headroom"] == pytest.approx(6.5) and m["n"] == 3
    assert m["delta_mean"] == pytest.approx(0.4) and m["delta_std"] == pytest.approx(math.sqrt(0.13))
    half = 4.303 * math.sqrt(0.13) / math.sqrt(3)
    assert m["interval_95"] == [pytest.approx(0.4 - half), pytest.approx(0.4 + half)]
    assert all(m["meets"].values())

    def line(power: dict) -> str:
        table = accuracy.markdown_table({**result, "power": power})
        return next(row for row in table.splitlines() if row.startswith("| RetinaNet") and "+6.50" in row)

    assert "| +0.40 | 0.36 | 3 | [-0.50, +1.30] | met |" in line(power)
    strict = accuracy.power_summary(result, accuracy.Power(max_delta_std=0.3, min_val_images=1000))
    assert line(strict).endswith("| not met: delta_std, val_images |")
    assert accuracy.t_975(2) == 4.303 and accuracy.t_975(40) == 1.96
