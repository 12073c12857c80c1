"""The demo's figures are produced from real run outputs (metrics.json, a cache, an ICD checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from detection.config import CfgNode
from detection.data.datasets import class_statistics, load_dataset
from detection.engine.checkpoint import save_checkpoint
from detection.errors import UserError
from detection.modeling.detector import build_detector
from stage1_teacher_dump.dump import run_dump
from stage2_student_distill.figures import plot_attention_maps, plot_decoder_signals, plot_loss_curves
from stage2_student_distill.method.module import ICDModule


def _metrics(path: Path, losses: dict[str, float]) -> Path:
    records = [{"iteration": i, "time": 0.1, "lr": 0.01, **{k: v / i for k, v in losses.items()}} for i in (1, 2, 3)]
    records.append({"iteration": 3, "bbox/AP": 12.0})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path


def test_loss_curves_have_one_panel_per_loss(tmp_path: Path) -> None:
    runs = {
        "baseline": _metrics(tmp_path / "a" / "metrics.json", {"classification": 1.0, "bbox_regression": 0.5}),
        "icd": _metrics(tmp_path / "b" / "metrics.json", {"classification": 1.0, "loss_distill": 3.0}),
    }
    out = plot_loss_curves(runs, tmp_path / "fig" / "losses.png")
    with Image.open(out) as image:
        assert image.size[0] > 3 * image.size[1] > 0  # three loss panels in one row
    with pytest.raises(UserError, match="no training log"):
        plot_loss_curves({"missing": tmp_path / "nope.json"}, tmp_path / "x.png")


def test_attention_maps_from_cache_and_icd_checkpoint(cfg_tiny: CfgNode, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = cfg_tiny.clone()
    index = load_dataset(cfg, "synth_train")
    teacher = build_detector(cfg, index.num_classes + 1)
    cfg.merge_from_list(
        [
            "MODEL.WEIGHTS",
            str(save_checkpoint(tmp_path / "t.pth", teacher)),
            "CACHE.ENCODING",
            "fp16",
            "DISTILL.HIDDEN_DIM",
            "32",
        ]
    )
    run_dump(cfg, str(tmp_path / "cache"))
    prior, mean, std = class_statistics(index)
    icd = ICDModule.from_config(
        cfg,
        index.num_classes,
        32,
        levels=["p3"],
        strides={"p3": 8},
        class_prior=prior,
        size_prior_mean=mean,
        size_prior_std=std,
    )
    checkpoint = save_checkpoint(tmp_path / "student" / "model_final.pth", teacher, extra={"icd": icd.state_dict()})
    out = plot_attention_maps(cfg, str(tmp_path / "cache"), checkpoint, tmp_path / "attention.png", num_samples=2)
    with Image.open(out) as image:
        assert image.size[1] > 100
    with pytest.raises(UserError, match="holds no ICD module"):
        plot_attention_maps(cfg, str(tmp_path / "cache"), tmp_path / "t.pth", tmp_path / "x.png")


def test_prior_entropy_joins_the_loss_ident_panel_and_signals_plot(tmp_path: Path) -> None:
    run = _metrics(tmp_path / "a" / "metrics.json", {"loss_ident": 0.4, "ident_prior_entropy": 0.45})
    with Image.open(plot_loss_curves({"icd": run}, tmp_path / "one.png")) as image:
        assert image.size[0] < 1.5 * image.size[1]  # one panel: the prior's entropy is not a loss of its own
    signals = {
        "loss_ident": 0.3,
        "prior_entropy": 0.45,
        "auc": 0.9,
        "map_cosine": 0.1,
        "inbox_mass": 0.6,
        "inbox_uniform": 0.09,
    }
    paths = {}
    for name, values in {"learnt": signals, "not": {**signals, "auc": None}}.items():
        paths[name] = tmp_path / name / "decoder_signals.json"
        paths[name].parent.mkdir()
        paths[name].write_text(json.dumps(values))
    with Image.open(plot_decoder_signals(paths, tmp_path / "signals.png")) as image:
        assert image.size[0] > 3 * image.size[1] > 0  # four panels in a row
    with pytest.raises(UserError, match="no decoder signals"):
        plot_decoder_signals({"missing": tmp_path / "nope.json"}, tmp_path / "x.png")
