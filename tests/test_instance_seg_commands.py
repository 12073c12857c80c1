"""CondInst and SOLOv2 through every command: icd train, icd eval, icd dump, icd distill (cached and --online).

Tiny runs (2 iterations, R-18, 32-channel FPN, 64 px synthetic images with polygon masks): they check the
wiring (masks in the targets, segm AP - and box AP for CondInst only -, the cache's default levels,
same-family teacher init), not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cache_format import CacheReader
from detection.config import CfgNode, save_config
from detection.modeling.architectures import ARCHITECTURES
from icd.cli import main as icd


def _config(cfg_tiny: CfgNode, arch: str, tmp_path: Path) -> str:
    cfg = cfg_tiny.clone()
    cfg.merge_from_dict(
        {
            "SEED": 1,
            "MODEL": {
                "META_ARCHITECTURE": arch,
                "MASK_ON": True,
                "CONDINST": {"MASK_BRANCH": {"CHANNELS": 32}},
                "SOLOV2": {"INSTANCE_CHANNELS": 32, "NUM_MASKS": 32, "MASK_CHANNELS": 32},
            },
            "SOLVER": {"MAX_ITER": 2, "WARMUP_ITERS": 1, "STEPS": [], "CHECKPOINT_PERIOD": 100, "LOG_PERIOD": 1},
            "CACHE": {"ENCODING": "fp16", "SHARD_SAMPLES": 4, "BATCH_SIZE": 2},
            "DISTILL": {
                "HIDDEN_DIM": 32,
                "NUM_HEADS": 8,
                "FFN_DIM": 64,
                "MAX_QUERIES": 12,
                "WARMUP_DETACH_ITERS": 1,
                "OPTIMIZER": {"WARMUP_ITERS": 1},
            },
        },
        source="test_instance_seg_commands",
    )
    return str(save_config(cfg, tmp_path / "config"))


def _metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "inference" / "metrics.json").read_text())


@pytest.mark.parametrize("arch", ["CondInst", "SOLOv2"])
def test_every_command(cfg_tiny, tmp_path, capsys, arch):
    config = _config(cfg_tiny, arch, tmp_path)
    tasks = {"CondInst": ["bbox", "segm"], "SOLOv2": ["segm"]}[arch]

    assert icd(["train", "--config-file", config, "OUTPUT_DIR", str(tmp_path / "train")]) == 0
    out = capsys.readouterr().out
    assert "Evaluation results for segm" in out and ("Evaluation results for bbox" in out) == ("bbox" in tasks)
    trained = _metrics(tmp_path / "train")
    assert sorted(trained) == sorted(tasks)
    weights = str(tmp_path / "train" / "model_final.pth")

    assert icd(["eval", "--config-file", config, "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(tmp_path / "eval")]) == 0
    assert _metrics(tmp_path / "eval") == trained

    cache = str(tmp_path / "cache")
    assert (
        icd(
            [
                "dump",
                "--config-file",
                config,
                "--cache",
                cache,
                "MODEL.WEIGHTS",
                weights,
                "OUTPUT_DIR",
                str(tmp_path / "dump"),
            ]
        )
        == 0
    )
    reader = CacheReader(cache)
    assert [level.name for level in reader.levels] == list(ARCHITECTURES.get(arch).levels)
    assert reader.attributes["teacher"]["architecture"] == arch
    capsys.readouterr()

    for mode, extra in (("cached", []), ("online", ["--online"])):
        assert (
            icd(["distill", "--config-file", config, "--cache", cache, *extra, "OUTPUT_DIR", str(tmp_path / mode)]) == 0
        ), mode
        out = capsys.readouterr().out
        assert f"{arch} student initialised from the {arch} teacher: FPN (" in out and "+ head (" in out, mode
        assert "Evaluation results for segm" in out
        assert sorted(_metrics(tmp_path / mode)) == sorted(tasks)
        log = [json.loads(line) for line in (tmp_path / mode / "metrics.json").read_text().splitlines()]
        assert any("loss_distill" in record for record in log)
