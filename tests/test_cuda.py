"""The CUDA and mixed-precision paths, on a GPU (`make gpu-check` runs them; skipped without CUDA).

Per family (RetinaNet single-stage, Faster R-CNN two-stage) and AMP on/off: `icd train`, `icd dump`,
`icd distill` cached and `--online`, one iteration each through the CLI with `--num-gpus 1`; cached ==
online on CUDA; resume on CUDA continues with the uninterrupted run's next step; DDP over NCCL.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_distill_cfg, save_teacher

from cache_format import CacheReader
from detection.config import CfgNode, save_config
from icd.cli import main as icd
from stage1_teacher_dump.dump import run_dump
from stage2_student_distill.cli import build_distill_trainer

pytestmark = pytest.mark.cuda
REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["RetinaNet", "FasterRCNN"]


@pytest.fixture
def no_tf32():
    """fp32 comparisons on CUDA: TF32 convolutions/matmuls (on by default for cuDNN) round to ~1e-3."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def on_cuda(cfg: CfgNode, arch: str, amp: bool, output: Path, **more) -> CfgNode:
    cfg = cfg.clone()
    cfg.merge_from_dict(
        {
            "OUTPUT_DIR": str(output),
            "MODEL": {"DEVICE": "cuda", "META_ARCHITECTURE": arch},
            "SOLVER": {"AMP": amp},
            "DATALOADER": {"NUM_WORKERS": 1},
            **more,
        },
        source="tests/test_cuda.py",
    )
    return cfg


def logged(output_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines()]
    return [row for row in rows if "total_loss" in row]


@pytest.mark.parametrize("amp", [True, False], ids=["amp", "fp32"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_train_dump_distill_cached_and_online_one_iteration_each(cfg_tiny, tmp_path, arch, amp):
    train_cfg = on_cuda(cfg_tiny, arch, amp, tmp_path / "teacher", SOLVER={"AMP": amp, "MAX_ITER": 1})
    config = str(save_config(train_cfg, tmp_path / "cfg_train"))
    assert icd(["train", "--config-file", config, "--num-gpus", "1"]) == 0
    (row,) = logged(tmp_path / "teacher")
    assert np.isfinite(row["total_loss"]) and (tmp_path / "teacher" / "model_final.pth").is_file()

    dump_cfg = train_cfg.clone()
    dump_cfg.merge_from_dict(
        {
            "MODEL": {"WEIGHTS": str(tmp_path / "teacher" / "model_final.pth")},
            "CACHE": {"ENCODING": "fp16", "SHARD_SAMPLES": 4, "BATCH_SIZE": 2},
        },
        source="test",
    )
    config = str(save_config(dump_cfg, tmp_path / "cfg_dump"))
    cache = str(tmp_path / "cache.zarr")
    assert icd(["dump", "--config-file", config, "--cache", cache, "--num-gpus", "1"]) == 0
    reader = CacheReader(cache)
    assert reader.finished and reader.committed().all() and reader.encoding == "fp16"
    sample = reader.read_sample(0)
    assert all(np.isfinite(f).all() and np.abs(f).max() > 0 for f in sample.features.values())

    for mode in ("cached", "online"):
        out = tmp_path / mode
        distill = make_distill_cfg(
            on_cuda(cfg_tiny, arch, amp, out), SOLVER={"AMP": amp, "MAX_ITER": 1}, DISTILL={"WARMUP_DETACH_ITERS": 0}
        )
        config = str(save_config(distill, tmp_path / f"cfg_{mode}"))
        extra = ["--online"] if mode == "online" else []
        assert icd(["distill", "--config-file", config, "--cache", cache, "--num-gpus", "1", *extra]) == 0, mode
        (row,) = logged(out)
        for key in ("total_loss", "loss_distill", "loss_ident", "loss_loc"):
            assert np.isfinite(row[key]) and row[key] > 0, (mode, key)


def test_the_dump_on_cuda_writes_the_cpu_teachers_features(cfg_tiny, tmp_path, no_tf32):
    """fp32 dump on CUDA (AMP off) == the same teacher's features on CPU, to fp32 rounding; under AMP the
    fp16 forward stays within half precision of them."""
    weights = save_teacher(cfg_tiny, tmp_path / "teacher.pth")
    caches = {}
    for name, device, amp in (("cpu", "cpu", False), ("cuda", "cuda", False), ("cuda_amp", "cuda", True)):
        cfg = cfg_tiny.clone()
        cfg.merge_from_dict(
            {
                "MODEL": {"WEIGHTS": weights, "DEVICE": device},
                "SOLVER": {"AMP": amp},
                "CACHE": {"ENCODING": "fp32", "SHARD_SAMPLES": 4, "BATCH_SIZE": 2},
                "OUTPUT_DIR": str(tmp_path / name),
            },
            source="test",
        )
        run_dump(cfg, str(tmp_path / f"{name}.zarr"))
        caches[name] = CacheReader(str(tmp_path / f"{name}.zarr"))
    for i in range(caches["cpu"].num_samples):
        ref = caches["cpu"].read_sample(i).features
        for name, rtol in (("cuda", 1e-4), ("cuda_amp", 2e-2)):
            got = caches[name].read_sample(i).features
            for level, value in ref.items():
                scale = float(np.abs(value).max())
                assert np.abs(got[level] - value).max() <= rtol * scale, (name, i, level)


def test_cached_and_online_distillation_agree_on_cuda(cfg_tiny, tmp_path, no_tf32):
    """The cache dumped on CUDA replays what the live teacher computes on CUDA (fp32, no TF32)."""
    weights = save_teacher(cfg_tiny, tmp_path / "teacher.pth")
    tcfg = on_cuda(
        cfg_tiny,
        "RetinaNet",
        False,
        tmp_path / "dump",
        MODEL={"DEVICE": "cuda", "WEIGHTS": weights},
        CACHE={"ENCODING": "fp32", "SHARD_SAMPLES": 4, "BATCH_SIZE": 2},
    )
    cache = str(tmp_path / "cache.zarr")
    run_dump(tcfg, cache)
    runs = {}
    for mode in ("cached", "online"):
        cfg = make_distill_cfg(
            on_cuda(cfg_tiny, "RetinaNet", False, tmp_path / mode),
            SOLVER={"MAX_ITER": 3},
            DISTILL={"WARMUP_DETACH_ITERS": 2},
        )
        trainer = build_distill_trainer(cfg, cache, online=mode == "online", with_evaluation=False)
        trainer.train()
        runs[mode] = logged(tmp_path / mode)
    assert len(runs["cached"]) == len(runs["online"]) == 3
    for a, b in zip(runs["cached"], runs["online"]):
        for key in ("classification", "bbox_regression", "loss_distill", "loss_ident", "loss_loc", "total_loss"):
            # batched (online) vs per-sample (cache) teacher forwards: fp32 rounding, ~1e-6 relative
            assert abs(a[key] - b[key]) <= 1e-4 * abs(b[key]) + 1e-7, key


def test_resume_on_cuda_continues_with_the_uninterrupted_runs_next_step(cfg_tiny, teacher_cache, tmp_path):
    url, _ = teacher_cache("fp32")
    straight_cfg = make_distill_cfg(
        on_cuda(cfg_tiny, "RetinaNet", True, tmp_path / "straight"),
        SOLVER={"AMP": True, "MAX_ITER": 4, "CHECKPOINT_PERIOD": 2},
        DISTILL={"WARMUP_DETACH_ITERS": 1},
    )
    straight = build_distill_trainer(straight_cfg, url, with_evaluation=False)
    straight.train()
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(tmp_path / "straight" / "model_0000002.pth", resumed_dir)
    (resumed_dir / "last_checkpoint").write_text("model_0000002.pth\n")
    resumed_cfg = straight_cfg.clone()
    resumed_cfg.OUTPUT_DIR = str(resumed_dir)
    resumed = build_distill_trainer(resumed_cfg, url, resume=True, with_evaluation=False)
    assert resumed.iteration == 2
    resumed.train()
    straight_rows, resumed_rows = logged(tmp_path / "straight"), logged(resumed_dir)
    assert [r["iteration"] for r in resumed_rows] == [3, 4]
    # Same weights, optimizer, GradScaler scale, batch and fake queries: step 3 equals the straight run's
    # up to CUDA's non-deterministic reductions (a wrong batch or state moves the losses by far more).
    for key in ("total_loss", "loss_distill", "loss_ident", "loss_loc"):
        assert resumed_rows[0][key] == pytest.approx(straight_rows[2][key], rel=1e-3, abs=1e-6), key
    # the loss scale came back with the checkpoint: fp16 steps skipped or taken alike, the same scale after
    assert resumed.scaler.is_enabled() and resumed.scaler.get_scale() == straight.scaler.get_scale()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


NCCL_STEP = """
import sys, torch, torch.distributed as dist
from detection.config import setup_cfg
from detection.data.datasets import train_index
from detection.modeling.detector import build_detector
config, port = sys.argv[1], sys.argv[2]
dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
torch.cuda.set_device(0)
cfg = setup_cfg(config)
torch.manual_seed(0)
model = build_detector(cfg, train_index(cfg).num_classes + 1).cuda().train()
plain = build_detector(cfg, train_index(cfg).num_classes + 1).cuda().train()
plain.load_state_dict(model.state_dict())
ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0])
g = torch.Generator().manual_seed(1)
images = [torch.rand(3, 64, 80, generator=g).cuda() * 255 for _ in range(2)]
targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]).cuda(), "labels": torch.tensor([1]).cuda()}] * 2
for net in (ddp, plain):
    losses, _, _ = net(images, targets)
    sum(losses.values()).backward()
worst = max(float((a.grad - b.grad).abs().max() / (b.grad.abs().max() + 1e-12))
            for a, b in zip(model.parameters(), plain.parameters()) if b.grad is not None)
dist.destroy_process_group()
print(worst)
"""


def test_ddp_over_nccl_gives_the_plain_models_gradients(cfg_tiny, tmp_path):
    """One NCCL rank: DistributedDataParallel's all-reduced gradients are the model's own (world size 1)."""
    cfg = on_cuda(cfg_tiny, "RetinaNet", False, tmp_path / "out")
    config = str(save_config(cfg, tmp_path / "cfg"))
    proc = subprocess.run(
        [sys.executable, "-c", NCCL_STEP, config, str(_free_port())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split()[-1]) <= 1e-3


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_nccl_distillation(cfg_tiny, teacher_cache, tmp_path):
    url, _ = teacher_cache("fp16")
    cfg = make_distill_cfg(
        on_cuda(cfg_tiny, "RetinaNet", True, tmp_path / "out"),
        SOLVER={"AMP": True, "MAX_ITER": 2, "IMS_PER_BATCH": 4},
        DATASETS={"TEST": []},
    )
    config = str(save_config(cfg, tmp_path / "cfg"))
    assert icd(["distill", "--config-file", config, "--cache", url, "--num-gpus", "2"]) == 0
    assert [r["iteration"] for r in logged(tmp_path / "out")] == [1, 2]
