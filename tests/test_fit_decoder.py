"""`icd fit-decoder`: fits from the cache alone, resumes exactly, and `icd distill` loads what it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_distill_cfg

from detection.config import save_config
from detection.engine.checkpoint import load_checkpoint, save_checkpoint
from detection.errors import UserError
from stage2_student_distill import fit_decoder
from stage2_student_distill.cli import build_distill_trainer
from stage2_student_distill.fit_decoder import FINAL
from stage2_student_distill.method.module import ICDModule


def fit_config(cfg_tiny, out: Path, **distill) -> str:
    cfg = make_distill_cfg(
        cfg_tiny,
        OUTPUT_DIR=str(out),
        DISTILL={
            "SPATIAL_PRIOR": "gaussian",
            "FIT": {"MAX_ITER": 4, "IMS_PER_BATCH": 4, "CHECKPOINT_PERIOD": 2, "HELD_OUT_FRACTION": 0.25},
            **distill,
        },
    )
    return str(save_config(cfg, out.parent / f"{out.name}_cfg"))


def loss_records(out: Path) -> list[dict[str, float]]:
    """Per logged iteration of metrics.json: its losses and the prior's entropy (not its times)."""
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if k == "iteration" or k.startswith("loss") or k == "ident_prior_entropy"}
        for r in records
        if "loss_ident" in r
    ]


def test_fit_writes_the_decoder_its_signals_and_its_log(cfg_tiny, teacher_cache, tmp_path, capsys):
    url, _ = teacher_cache("fp16")
    out = tmp_path / "fit"
    assert fit_decoder.main(["--config-file", fit_config(cfg_tiny, out), "--cache", url]) == 0
    assert "real-vs-fake AUC" in capsys.readouterr().out
    state = load_checkpoint(out / FINAL)
    assert state["iteration"] == 4 and state["extra"]["fit"]["levels"] == ["p3", "p4", "p5", "p6", "p7"]
    assert not any(key.startswith("student_value") for key in state["model"])  # only what the aux task trains
    signals = json.loads((out / "decoder_signals.json").read_text())
    assert signals["split"] == "held-out images" and 0 < signals["num_real"] and signals["iteration"] == 4
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert all(r["ident_prior_entropy"] > 0 for r in records if "loss_ident" in r)
    assert any("decoder/auc" in r for r in records)


def test_an_interrupted_fit_resumes_to_the_same_decoder(cfg_tiny, teacher_cache, tmp_path, monkeypatch):
    url, _ = teacher_cache("fp16")
    assert fit_decoder.main(["--config-file", fit_config(cfg_tiny, tmp_path / "straight"), "--cache", url]) == 0
    config = fit_config(cfg_tiny, tmp_path / "resumed")
    calls = {"n": 0}
    original = ICDModule.auxiliary_losses

    def interrupt_third_step(batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(batch)

    monkeypatch.setattr(ICDModule, "auxiliary_losses", staticmethod(interrupt_third_step))
    assert fit_decoder.main(["--config-file", config, "--cache", url]) == 130
    assert not (tmp_path / "resumed" / FINAL).exists()  # nothing half-written under the final name
    monkeypatch.setattr(ICDModule, "auxiliary_losses", staticmethod(original))
    assert fit_decoder.main(["--config-file", config, "--cache", url, "--resume"]) == 0
    straight = load_checkpoint(tmp_path / "straight" / FINAL)["model"]
    resumed = load_checkpoint(tmp_path / "resumed" / FINAL)["model"]
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    # each step after the resume is the uninterrupted run's step: the same batch, queries and losses
    straight_steps, resumed_steps = (loss_records(tmp_path / name) for name in ("straight", "resumed"))
    assert [r["iteration"] for r in resumed_steps] == [1, 2, 3, 4]  # interrupted in 3, resumed from 2
    assert resumed_steps == straight_steps
    # another config's fit (or another command's checkpoint) in OUTPUT_DIR is not resumed
    assert fit_decoder.main(["--config-file", config, "--cache", url, "--resume", "DISTILL.FFN_DIM", "16"]) == 2


def test_distill_starts_from_the_fitted_decoder_and_refuses_another_setup(cfg_tiny, teacher_cache, tmp_path):
    url, _ = teacher_cache("fp16")
    out = tmp_path / "fit"
    assert fit_decoder.main(["--config-file", fit_config(cfg_tiny, out), "--cache", url]) == 0
    fitted = load_checkpoint(out / FINAL)["model"]
    student = make_distill_cfg(
        cfg_tiny,
        OUTPUT_DIR=str(tmp_path / "student"),
        SOLVER={"MAX_ITER": 1},
        DISTILL={"SPATIAL_PRIOR": "gaussian", "DECODER_WEIGHTS": str(out / FINAL)},
    )
    trainer = build_distill_trainer(student, url, with_evaluation=False)
    state = trainer.icd.state_dict()
    for key, value in fitted.items():
        assert torch.equal(state[key], value), key
    with pytest.raises(UserError, match="fitted for another setup: DISTILL.SPATIAL_PRIOR"):
        build_distill_trainer(make_distill_cfg(student, DISTILL={"SPATIAL_PRIOR": ""}), url, with_evaluation=False)
    with pytest.raises(UserError, match="levels"):
        build_distill_trainer(make_distill_cfg(student, CACHE={"LEVELS": ["p3", "p4"]}), url, with_evaluation=False)
    not_fitted = save_checkpoint(tmp_path / "other.pth", torch.nn.Linear(2, 2))
    with pytest.raises(UserError, match="not a decoder written by `icd fit-decoder`"):
        build_distill_trainer(
            make_distill_cfg(student, DISTILL={"DECODER_WEIGHTS": str(not_fitted)}), url, with_evaluation=False
        )


def test_bad_fit_settings_exit_2(cfg_tiny, teacher_cache, tmp_path, capsys):
    url, _ = teacher_cache("fp16")
    config = fit_config(cfg_tiny, tmp_path / "fit")
    assert fit_decoder.main(["--config-file", config, "--cache", url, "DISTILL.FIT.HELD_OUT_FRACTION", "1.0"]) == 2
    assert capsys.readouterr().err.startswith("icd fit-decoder: error: held-out fraction 1.0")
    assert fit_decoder.main(["--config-file", config, "--cache", str(tmp_path / "nowhere")]) == 2
