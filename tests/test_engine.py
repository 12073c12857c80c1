"""The training loop and checkpoints: schedule, clipping, the step, logs, atomic saves, exact resume, weight loading."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from detection import comm
from detection.engine import checkpoint as ckpt
from detection.engine.trainer import Trainer, build_trainer, warmup_multistep
from detection.errors import UserError
from detection.modeling.detector import build_model


def test_warmup_then_steps():
    f = warmup_multistep(warmup_iters=10, warmup_factor=0.001, steps=[20, 30], gamma=0.1)
    assert f(0) == pytest.approx(0.001)
    assert f(5) == pytest.approx(0.001 * 0.5 + 0.5)
    assert f(10) == f(19) == pytest.approx(1.0)
    assert f(20) == pytest.approx(0.1) and f(30) == pytest.approx(0.01)


class _Toy(nn.Module):
    """A detector-shaped toy: model(images, targets) -> (losses, features, images) as DetectorAdapter."""

    def __init__(self, loss_value: float | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 1)
        self.loss_value = loss_value

    def forward(self, images, targets):
        x, y = torch.stack(images), torch.stack([t["y"] for t in targets])
        loss = ((self.linear(x) - y) ** 2).mean()
        if self.loss_value is not None:
            loss = loss * 0 + self.loss_value
        return {"mse": loss}, {}, None


class _StepCounter:
    """A checkpointable: its state goes into every checkpoint and comes back on resume."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self):
        return {"count": torch.tensor(self.count)}

    def load_state_dict(self, state) -> None:
        self.count = int(state["count"])


class _ToyTrainer(Trainer):
    """A subclass extending the step and registering extra state, the way stage two does."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps = _StepCounter()
        self.checkpointables["steps"] = self.steps

    def run_step(self, batch):
        losses = super().run_step(batch)
        self.steps.count += 1
        return losses


def _toy_loader(start_iter: int):
    g = torch.Generator().manual_seed(start_iter)
    while True:
        x = torch.randn(4, 3, generator=g)
        yield [{"image": row, "target": {"y": row.sum(0, keepdim=True) * 10}} for row in x]


def _toy_cfg(cfg, **solver):
    cfg.merge_from_dict(
        {
            "SOLVER": {
                "MAX_ITER": 5,
                "CHECKPOINT_PERIOD": 2,
                "LOG_PERIOD": 2,
                "WARMUP_ITERS": 0,
                "STEPS": [4],
                "BASE_LR": 0.1,
                **solver,
            }
        }
    )
    return cfg


def test_loop_steps_checkpoints_and_logs(cfg_tiny):
    cfg = _toy_cfg(cfg_tiny)
    trainer = _ToyTrainer(cfg, _Toy(), _toy_loader)
    assert trainer.train() == {}
    out = Path(cfg.OUTPUT_DIR)
    assert trainer.iteration == 5 and trainer.steps.count == 5
    assert {p.name for p in out.glob("*.pth")} == {"model_0000002.pth", "model_0000004.pth", "model_final.pth"}
    assert ckpt.last_checkpoint(out) == out / "model_final.pth"
    assert not [p for p in out.iterdir() if "tmp" in p.name]
    state = torch.load(out / "model_final.pth", weights_only=True)
    assert state["iteration"] == 5 and int(state["extra"]["steps"]["count"]) == 5
    again = _ToyTrainer(cfg, _Toy(), _toy_loader)
    assert again.resume_or_load(resume=True) and again.iteration == 5 and again.steps.count == 5
    assert not _ToyTrainer(cfg, _Toy(), _toy_loader).resume_or_load(resume=False)
    lines = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [2, 4, 5]
    # the lr logged is the one used at that iteration: base lr, then x0.1 from iteration 4 (index 4 = 5th)
    assert lines[0]["lr"] == pytest.approx(0.1) and lines[2]["lr"] == pytest.approx(0.01)
    assert {"mse", "total_loss", "time", "data_time", "eta_seconds"} <= set(lines[0])
    assert list(out.glob("events.out.tfevents.*"))


def test_value_clipping_bounds_the_first_step(cfg_tiny):
    cfg = _toy_cfg(cfg_tiny, MAX_ITER=1, MOMENTUM=0.0, WEIGHT_DECAY=0.0)
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.01
    model = _Toy()
    before = [p.detach().clone() for p in model.parameters()]
    _ToyTrainer(cfg, model, _toy_loader).train()
    steps = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    # the toy's gradients are large, so every component is clipped to exactly lr * clip value
    torch.testing.assert_close(steps.abs(), torch.full_like(steps, 0.1 * 0.01))


def test_diverging_loss_is_a_user_error(cfg_tiny):
    trainer = _ToyTrainer(_toy_cfg(cfg_tiny), _Toy(loss_value=float("nan")), _toy_loader)
    with pytest.raises(UserError, match="diverged.*iteration 0") as info:
        trainer.train()
    assert "BASE_LR" in info.value.fix


def test_resume_continues_exactly(cfg_tiny, tmp_path):
    """6 iterations straight == 3 iterations, stop, resume, 3 more (model, optimizer, RNG and data order)."""

    def cfg_for(name: str, max_iter: int):
        cfg = cfg_tiny.clone()
        cfg.merge_from_dict(
            {
                "OUTPUT_DIR": str(tmp_path / name),
                # Faster R-CNN samples proposals with the global RNG: the strictest check of RNG restoring.
                "MODEL": {"META_ARCHITECTURE": "FasterRCNN"},
                "DATASETS": {"TEST": []},
                "SOLVER": {
                    "MAX_ITER": max_iter,
                    "CHECKPOINT_PERIOD": 100,
                    "WARMUP_ITERS": 2,
                    "STEPS": [4],
                    "BASE_LR": 0.02,
                },
            }
        )
        return cfg

    build_trainer(cfg_for("straight", 6)).train()
    build_trainer(cfg_for("resumed", 3)).train()
    build_trainer(cfg_for("resumed", 6), resume=True).train()
    straight = torch.load(tmp_path / "straight" / "model_final.pth", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "model_final.pth", weights_only=True)
    assert resumed["iteration"] == straight["iteration"] == 6
    assert straight["model"].keys() == resumed["model"].keys()
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    lines = (tmp_path / "resumed" / "metrics.json").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [3, 6]


def test_atomic_save_leaves_previous_checkpoint_on_crash(tmp_path, monkeypatch):
    model = _Toy()
    ckpt.save_checkpoint(tmp_path / "model_0000001.pth", model, iteration=1)

    def crash(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path / "model_0000002.pth", model, iteration=2)
    assert not (tmp_path / "model_0000002.pth").exists()
    assert ckpt.last_checkpoint(tmp_path) == tmp_path / "model_0000001.pth"


def test_rng_state_round_trip(tmp_path):
    torch.save(ckpt.capture_rng_state(), tmp_path / "rng.pth")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))  # survives weights_only
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all() and expected[2] == again[2]


# --- MODEL.WEIGHTS ------------------------------------------------------------------------------
def test_load_weights_accepts_ours_and_torchvision_state_dicts(cfg_tiny, tmp_path):
    torch.manual_seed(0)
    source = build_model(cfg_tiny, 4)
    ckpt.save_checkpoint(tmp_path / "ours.pth", source)
    plain = {k[len("model.") :]: v for k, v in source.state_dict().items()}  # torchvision's key names
    torch.save(plain, tmp_path / "torchvision.pth")
    for name in ("ours.pth", "torchvision.pth"):
        torch.manual_seed(1)
        target = build_model(cfg_tiny, 4)
        ckpt.load_weights(target, tmp_path / name)
        for key, value in source.state_dict().items():
            assert torch.equal(value, target.state_dict()[key]), (name, key)


def test_load_weights_accepts_an_imagenet_resnet(cfg_tiny, tmp_path):
    import torchvision

    resnet = torchvision.models.resnet18(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    model = build_model(cfg_tiny, 4)
    with pytest.warns(UserWarning, match="not in the file"):  # the FPN and head stay initialised
        ckpt.load_weights(model, tmp_path / "resnet18.pth")
    assert torch.equal(model.model.backbone.body.layer3[0].conv1.weight, resnet.layer3[0].conv1.weight)


def test_load_weights_missing_file(cfg_tiny, tmp_path):
    with pytest.raises(UserError, match="does not exist") as info:
        ckpt.load_weights(build_model(cfg_tiny, 4), tmp_path / "nope.pth")
    assert "nope.pth" in str(info.value)


def test_load_weights_lists_mismatched_shapes(cfg_tiny, tmp_path):
    ckpt.save_checkpoint(tmp_path / "k4.pth", build_model(cfg_tiny, 4))
    with pytest.raises(UserError) as info:
        ckpt.load_weights(build_model(cfg_tiny, 2), tmp_path / "k4.pth")
    message = str(info.value)
    # RetinaNet: cls_logits has (K + 1) x 9 anchors outputs: 45 in the file, 27 in the model
    assert (
        "model.head.classification_head.cls_logits.weight: checkpoint (45, 32, 3, 3) vs model (27, 32, 3, 3)" in message
    )
    assert "model.head.classification_head.cls_logits.bias: checkpoint (45,) vs model (27,)" in message
    assert "2 tensor(s)" in message
    assert "NUM_CLASSES" in info.value.fix


def test_load_weights_rejects_garbage(cfg_tiny, tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        ckpt.load_weights(build_model(cfg_tiny, 4), tmp_path / "junk.pth")
    torch.save({"unrelated.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="matches a model parameter"):
        ckpt.load_weights(build_model(cfg_tiny, 4), tmp_path / "other.pth")


def test_single_process_helpers():
    assert comm.get_rank() == 0 and comm.get_world_size() == 1 and comm.is_main_process()
    assert comm.all_gather({"a": 1}) == [{"a": 1}]
    assert comm.broadcast_object(3) == 3
