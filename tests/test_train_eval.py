"""End to end: a tiny detector learns, COCO evaluation maps predictions back correctly, multi-process
training keeps ranks identical, and the `icd train` / `icd eval` CLIs report user errors with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detection import comm
from detection.data.augment import AugmentationPlan
from detection.data.datasets import DetectionDataset, load_dataset
from detection.engine import eval_cli, train_cli
from detection.engine.evaluation import coco_ground_truth, coco_metrics, detections_to_coco
from detection.engine.launch import launch
from detection.engine.trainer import build_trainer


def _write_cfg(cfg, path: Path) -> str:
    path.write_text(cfg.dump())
    return str(path)


# --- learning -------------------------------------------------------------------------------------
def test_a_tiny_detector_learns(cfg_tiny, tmp_path):
    """~100 iterations on the 16 training images take box AP (on those images) far above untrained."""
    cfg_tiny.merge_from_dict(
        {
            "MODEL": {"META_ARCHITECTURE": "RetinaNet", "RETINANET": {"NORM": "GN"}},
            "DATASETS": {"TEST": ["synth_train"]},
            "SOLVER": {
                "IMS_PER_BATCH": 4,
                "BASE_LR": 0.01,
                "WARMUP_ITERS": 5,
                "STEPS": [],
                "MAX_ITER": 0,
                "CHECKPOINT_PERIOD": 1000,
                "LOG_PERIOD": 20,
            },
        }
    )
    untrained = build_trainer(cfg_tiny).train()["bbox"]
    cfg_tiny.SOLVER.MAX_ITER = 100
    trained = build_trainer(cfg_tiny).train()["bbox"]
    assert untrained["AP50"] < 1.0
    assert trained["AP50"] > untrained["AP50"] + 15, (untrained, trained)
    assert trained["AP"] > untrained["AP"] + 5, (untrained, trained)


# --- evaluation mapping ---------------------------------------------------------------------------
@pytest.mark.parametrize("flip", [False, True])
def test_ground_truth_as_predictions_scores_full_ap(cfg_tiny, flip):
    """Sample-frame detections (resized x1.5, optionally flipped) map back to the original frame and category
    ids so that the ground truth predicted back gets AP 100 (boxes) and ~100 (masks)."""
    index = load_dataset(cfg_tiny, "synth_val")
    plan = AugmentationPlan(seed=0, num_variants=2 if flip else 1, min_sizes=[96], max_size=200, flip=flip)
    dataset = DetectionDataset(index, plan, training=False, with_masks=True)
    records = []
    for i in range(len(dataset)):
        item = dataset[i]
        if flip and not item["aug"].flip:
            continue
        target = item["target"]
        n = len(target["labels"])
        assert min(item["aug"].resized_h, item["aug"].resized_w) == 96  # really resized from 64
        detections = {
            "boxes": target["boxes"],
            "labels": target["labels"],
            "scores": torch.ones(n),
            "masks": target["masks"][:, None].float(),
        }
        records += detections_to_coco(detections, item["aug"], index.label_to_cat_id)
    gt = coco_ground_truth(index)
    names = {c["id"]: c["name"] for c in index.categories}
    bbox = coco_metrics(gt, records, "bbox", names)
    assert bbox["AP"] == pytest.approx(100.0, abs=0.01) and bbox["AP-triangle"] == pytest.approx(100.0, abs=0.01)
    assert coco_metrics(gt, records, "segm", names)["AP"] > 85


def test_no_detection_gives_zero_ap(cfg_tiny):
    index = load_dataset(cfg_tiny, "synth_val")
    metrics = coco_metrics(coco_ground_truth(index), [], "bbox", {c["id"]: c["name"] for c in index.categories})
    assert metrics["AP"] == metrics["AP50"] == metrics["AP-cross"] == 0.0


# --- multi-process --------------------------------------------------------------------------------
def _two_rank_worker(cfg, report: str) -> None:
    trainer = build_trainer(cfg)
    trainer.train()
    params = {name: p.detach().clone() for name, p in trainer.module.named_parameters()}
    gathered = comm.all_gather(params)
    if comm.is_main_process():
        diff = max((gathered[0][k] - gathered[1][k]).abs().max().item() for k in params)
        Path(report).write_text(
            json.dumps({"world": comm.get_world_size(), "max_diff": diff, "iteration": trainer.iteration})
        )


def test_two_process_gloo_training_keeps_ranks_identical(cfg_tiny, tmp_path):
    """`--num-gpus 2` on CPU: two gloo processes, each half the batch; DDP keeps their parameters equal."""
    cfg_tiny.merge_from_dict(
        {"DATASETS": {"TEST": []}, "SOLVER": {"MAX_ITER": 3, "WARMUP_ITERS": 1, "STEPS": [], "CHECKPOINT_PERIOD": 100}}
    )
    report = tmp_path / "report.json"
    launch(_two_rank_worker, 2, (cfg_tiny, str(report)), device="cpu")
    result = json.loads(report.read_text())
    assert result == {"world": 2, "max_diff": 0.0, "iteration": 3}


def test_two_process_cli_reports_a_workers_user_error(cfg_tiny, tmp_path, capsys):
    cfg_tiny.SOLVER.IMS_PER_BATCH = 3
    code = train_cli.main(["--config-file", _write_cfg(cfg_tiny, tmp_path / "c.yaml"), "--num-gpus", "2"])
    assert code == 2
    assert "icd train: error: SOLVER.IMS_PER_BATCH 3 is not divisible by the 2 processes" in capsys.readouterr().err


# --- CLIs -----------------------------------------------------------------------------------------
def test_train_then_eval_cli(cfg_tiny, tmp_path, capsys):
    cfg_tiny.merge_from_dict({"SOLVER": {"MAX_ITER": 2, "WARMUP_ITERS": 1, "STEPS": [], "CHECKPOINT_PERIOD": 100}})
    config = _write_cfg(cfg_tiny, tmp_path / "c.yaml")
    out = Path(cfg_tiny.OUTPUT_DIR)
    assert train_cli.main(["--config-file", config]) == 0
    saved = (out / "config.yaml").read_text()
    assert "NUM_CLASSES: 4" in saved  # the merged config, with what was taken from the dataset
    weights = str(out / "model_final.pth")
    trained = json.loads((out / "inference" / "metrics.json").read_text())

    assert eval_cli.main(["--config-file", config, "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "inference" / "metrics.json").read_text()) == trained
    assert "Evaluation results for bbox" in capsys.readouterr().out

    # nothing above the threshold: AP 0, an empty result file, and a word about it
    assert (
        eval_cli.main(
            [
                "--config-file",
                config,
                "MODEL.WEIGHTS",
                weights,
                "OUTPUT_DIR",
                str(tmp_path / "z"),
                "MODEL.SCORE_THRESH_TEST",
                "1.01",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "z" / "inference" / "coco_results.json").read_text()) == []
    assert json.loads((tmp_path / "z" / "inference" / "metrics.json").read_text())["bbox"]["AP"] == 0.0
    assert "no detection" in capsys.readouterr().out

    # --eval-only --resume evaluates the last checkpoint of OUTPUT_DIR
    assert train_cli.main(["--config-file", config, "--eval-only", "--resume"]) == 0


def test_the_same_seed_trains_the_same_weights_and_another_seed_does_not(cfg_tiny, tmp_path):
    """On one machine `icd train` is a function of its config and SEED (bench/accuracy.py relies on it to
    reuse a finished teacher): two runs of one config give bit-identical weights."""
    cfg_tiny.merge_from_dict(
        {"SOLVER": {"MAX_ITER": 3, "WARMUP_ITERS": 1, "STEPS": [], "CHECKPOINT_PERIOD": 100}, "DATASETS": {"TEST": []}}
    )
    config = _write_cfg(cfg_tiny, tmp_path / "c.yaml")
    weights = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert train_cli.main(["--config-file", config, "OUTPUT_DIR", str(tmp_path / name), "SEED", str(seed)]) == 0
        weights[name] = torch.load(tmp_path / name / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert weights["a"].keys() == weights["b"].keys()
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert not all(torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])


@pytest.mark.parametrize(
    "command, args, message",
    [
        (train_cli, ["--config-file", "missing.yaml"], "icd train: error: config file not found"),
        (train_cli, ["SOLVER.MAX_ITR", "5"], "icd train: error: unknown config key 'SOLVER.MAX_ITR'"),
        (train_cli, ["--num-gpus", "0"], "icd train: error: --num-gpus 0 must be at least 1"),
        (train_cli, ["--eval-only"], "icd train: error: no weights to evaluate: MODEL.WEIGHTS is empty"),
        (train_cli, ["DATASETS.TRAIN", "[nope]"], "icd train: error: unknown dataset 'nope'"),
        (train_cli, ["MODEL.NUM_CLASSES", "7"], "icd train: error: MODEL.NUM_CLASSES is 7 but the training dataset"),
        (eval_cli, [], "icd eval: error: no weights to evaluate: MODEL.WEIGHTS is empty"),
        (
            eval_cli,
            ["MODEL.WEIGHTS", "/nonexistent/model.pth"],
            "icd eval: error: checkpoint file '/nonexistent/model.pth'",
        ),
    ],
)
def test_cli_user_errors_exit_2(cfg_tiny, tmp_path, capsys, command, args, message):
    config = _write_cfg(cfg_tiny, tmp_path / "c.yaml")
    argv = args if args[:1] == ["--config-file"] else ["--config-file", config, *args]
    assert command.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "fix:" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for machines without CUDA")
def test_cuda_device_without_cuda_is_a_user_error(cfg_tiny, tmp_path, capsys):
    config = _write_cfg(cfg_tiny, tmp_path / "c.yaml")
    assert train_cli.main(["--config-file", config, "MODEL.DEVICE", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_help_explains_num_gpus_on_cpu(capsys):
    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    assert "on CPU, N gloo processes" in " ".join(capsys.readouterr().out.split())
