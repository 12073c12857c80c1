"""Shared fixtures: one tiny synthetic COCO dataset per session and a config pointing at it."""
from __future__ import annotations

import pytest
import torch

from detection.config import CfgNode, get_cfg
from detection.synthetic import generate

# The test machines are shared: keep torch to one thread everywhere.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """16 train + 8 val synthetic images of height 64: {root, train_json, train_images, val_json, val_images}."""
    return generate(tmp_path_factory.mktemp("tiny_coco"), train=16, val=8, size=64, seed=0)


@pytest.fixture
def cfg_tiny(tiny_coco: dict[str, str], tmp_path) -> CfgNode:
    """A fresh, unfrozen config for tiny CPU runs on `tiny_coco` (datasets synth_train / synth_val)."""
    return tiny_cfg(tiny_coco, tmp_path / "output")


def tiny_cfg(tiny_coco: dict[str, str], output_dir) -> CfgNode:
    """cfg_tiny's config, for fixtures of a wider scope than a test."""
    cfg = get_cfg()
    cfg.merge_from_dict({
        "OUTPUT_DIR": str(output_dir),
        "MODEL": {
            "DEVICE": "cpu",
            "BACKBONE": {"DEPTH": 18},
            "FPN": {"OUT_CHANNELS": 32},
            "ANCHOR_GENERATOR": {"SIZES": [8, 16, 32, 64, 128]},
        },
        "INPUT": {"MIN_SIZE_TRAIN": [64], "MAX_SIZE_TRAIN": 96, "MIN_SIZE_TEST": 64, "MAX_SIZE_TEST": 96},
        "DATASETS": {
            "TRAIN": ["synth_train"],
            "TEST": ["synth_val"],
            "CATALOG": {
                "synth_train": [tiny_coco["train_json"], tiny_coco["train_images"]],
                "synth_val": [tiny_coco["val_json"], tiny_coco["val_images"]],
            },
        },
        "DATALOADER": {"NUM_WORKERS": 0},
        "SOLVER": {"IMS_PER_BATCH": 2},
    }, source="tests/conftest.py")
    return cfg


@pytest.fixture(scope="session")
def local_s3():
    """A real S3-protocol endpoint for the session: moto's server on 127.0.0.1:<free port> in a child
    process (bench/local_s3.py), stopped at the end. Skips only if it cannot start."""
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[test]' installs it)")
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[test]')")
    from bench.local_s3 import LocalS3

    server = LocalS3()
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - any failure to start is a reason to skip, named
        pytest.skip(f"the local S3 endpoint (moto server) could not start: {exc}")
    yield server
    server.stop()
