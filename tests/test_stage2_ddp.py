"""Two-process (gloo) distillation from a cache: the student and the ICD module train under DDP."""

from __future__ import annotations

import json

import pytest
import torch

from detection.config import save_config
from detection.engine.checkpoint import load_checkpoint
from stage2_student_distill import cli


@pytest.mark.slow  # two spawned processes importing torch: ~50 s on 2 shared cores
def test_two_process_distillation_completes_and_checkpoints_both_ranks(cfg_tiny, teacher_cache, distill_cfg, tmp_path):
    url, _ = teacher_cache("fp16")
    out = tmp_path / "out"
    cfg = distill_cfg(cfg_tiny, OUTPUT_DIR=str(out), SOLVER={"MAX_ITER": 2, "IMS_PER_BATCH": 4}, DATASETS={"TEST": []})
    config = str(save_config(cfg, tmp_path / "cfg"))
    assert cli.main(["--config-file", config, "--cache", url, "--num-gpus", "2"]) == 0
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    logged = [row for row in records if "total_loss" in row]  # training records (not the decoder's signals)
    assert [row["iteration"] for row in logged] == [1, 2]
    assert all(row["ident_prior_entropy"] > 0 for row in logged)
    assert all(row["loss_distill"] > 0 and row["loss_ident"] > 0 and row["loss_loc"] > 0 for row in logged)
    final = load_checkpoint(out / "model_final.pth")
    assert final["iteration"] == 2 and len(final["rng"]) == 2  # both ranks' RNG, for an exact resume
    assert all(torch.isfinite(v).all() for v in final["extra"]["icd"].values())
