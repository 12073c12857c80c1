"""SOLVER.AMP on CPU (bfloat16 autocast, an enabled GradScaler): both trainers' step and the dump's
teacher forward run the CUDA path's sequence (scale, backward, unscale every optimizer, clip, step,
update) on every CI run, and the loss scale is checkpointed for an exact resume."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import save_teacher

from cache_contract.teacher import load_teacher, sample_features
from detection.data.datasets import train_index
from detection.engine import amp
from detection.engine import trainer as trainer_module
from detection.engine.checkpoint import load_checkpoint
from detection.engine.trainer import build_trainer
from stage2_student_distill import trainer as distill_trainer_module
from stage2_student_distill.cli import build_distill_trainer

CLIP = 1e-3  # far below the first step's gradient norm, so clipping always acts


class Spy:
    """Records the order of the scaler's and the clips' calls while forwarding them."""

    def __init__(self, monkeypatch, trainer) -> None:
        self.calls: list[str] = []
        self.names = {id(trainer.optimizer): "student"}
        if hasattr(trainer, "icd_optimizer"):
            self.names[id(trainer.icd_optimizer)] = "icd"
        scaler = trainer.scaler
        for method in ("scale", "unscale_", "step", "update"):
            original = getattr(scaler, method)
            monkeypatch.setattr(scaler, method, self._wrap(method, original))
        for module in (trainer_module, distill_trainer_module):  # each imported clip_gradients by name
            monkeypatch.setattr(module, "clip_gradients", self._wrap("clip_gradients", module.clip_gradients))
        if hasattr(trainer, "clip_icd_gradients"):
            monkeypatch.setattr(trainer, "clip_icd_gradients", self._wrap("clip_icd", trainer.clip_icd_gradients))

    def _wrap(self, name, fn):
        def call(*args, **kwargs):
            target = self.names.get(id(args[0])) if args else None
            self.calls.append(f"{name}({target})" if target else name)
            return fn(*args, **kwargs)

        return call


def grad_norm(params) -> float:
    grads = [p.grad.detach().double() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def amp_cfg(cfg, tmp_path, **solver):
    cfg = cfg.clone()
    cfg.merge_from_dict(
        {"OUTPUT_DIR": str(tmp_path), "SOLVER": {"AMP": True, "MAX_ITER": 1, **solver}, "DATASETS": {"TEST": []}},
        source="test_amp_cpu",
    )
    return cfg


def bf16_features(model) -> list[torch.dtype]:
    """Hooks the FPN: the dtypes its outputs had in the last forward (bfloat16 under CPU autocast)."""
    seen: list[torch.dtype] = []
    model.model.backbone.register_forward_hook(lambda m, i, out: seen.extend(v.dtype for v in out.values()))
    return seen


def test_the_helpers_choose_bfloat16_and_an_active_scaler_on_cpu():
    cpu = torch.device("cpu")
    assert amp.autocast_dtype(cpu) == torch.bfloat16 and amp.autocast_dtype(torch.device("cuda")) == torch.float16
    with amp.autocast(cpu, True):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with amp.autocast(cpu, False):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert amp.grad_scaler(cpu, True).is_enabled() and not amp.grad_scaler(cpu, False).is_enabled()


def test_the_detector_step_under_cpu_amp_unscales_then_clips_then_steps(cfg_tiny, tmp_path, monkeypatch):
    cfg = amp_cfg(cfg_tiny, tmp_path, CLIP_GRADIENTS={"ENABLED": True, "CLIP_TYPE": "norm", "CLIP_VALUE": CLIP})
    trainer = build_trainer(cfg)
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 2.0**16
    dtypes = bf16_features(trainer.module)
    spy = Spy(monkeypatch, trainer)
    before = [p.detach().clone() for p in trainer.module.parameters()]
    batch = next(iter(trainer.build_loader(0)))
    losses = trainer.run_step(batch)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert all(torch.isfinite(v) for v in losses.values())
    assert spy.calls == ["scale", "unscale_(student)", "clip_gradients(student)", "step(student)", "update"]
    # unscale_ ran before the clip: the gradients the step used are the true ones clipped to CLIP (a clip
    # of the scaled gradients followed by unscaling would leave them at CLIP / 65536)
    assert grad_norm(trainer.module.parameters()) == pytest.approx(CLIP, rel=1e-3)
    assert trainer.scaler.get_scale() == 2.0**16  # no inf/nan: the step was taken
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.module.parameters()))


def test_the_distill_step_under_cpu_amp_steps_both_optimizers_in_the_amp_recipes_order(
    cfg_tiny, teacher_cache, distill_cfg, tmp_path, monkeypatch
):
    url, _ = teacher_cache("fp16")
    cfg = distill_cfg(
        amp_cfg(cfg_tiny, tmp_path, CLIP_GRADIENTS={"ENABLED": True, "CLIP_TYPE": "norm", "CLIP_VALUE": CLIP}),
        SOLVER={"AMP": True, "MAX_ITER": 1},
        DISTILL={"WARMUP_DETACH_ITERS": 0, "OPTIMIZER": {"CLIP_NORM": CLIP}},
    )
    trainer = build_distill_trainer(cfg, url, with_evaluation=False)
    assert trainer.scaler.is_enabled()
    dtypes = bf16_features(trainer.module)
    spy = Spy(monkeypatch, trainer)
    losses = trainer.run_step(next(iter(trainer.build_loader(0))))
    assert set(dtypes) == {torch.bfloat16} and all(torch.isfinite(v) for v in losses.values())
    assert spy.calls == [
        "scale",
        "unscale_(student)",
        "unscale_(icd)",
        "clip_gradients(student)",
        "clip_icd",
        "step(student)",
        "step(icd)",
        "update",
    ]
    assert grad_norm(trainer.module.parameters()) == pytest.approx(CLIP, rel=1e-3)
    assert grad_norm(trainer.icd.parameters()) == pytest.approx(CLIP, rel=1e-3)


def test_the_scaled_cpu_step_equals_the_unscaled_one(cfg_tiny, tmp_path):
    """Under bf16 autocast, the active scaler (2^16) changes nothing: unscaling restores the gradients."""
    params = {}
    for scaled in (True, False):
        torch.manual_seed(0)
        trainer = build_trainer(
            amp_cfg(
                cfg_tiny,
                tmp_path / str(scaled),
                CLIP_GRADIENTS={"ENABLED": True, "CLIP_TYPE": "norm", "CLIP_VALUE": 0.5},
            )
        )
        if not scaled:
            trainer.scaler = amp.grad_scaler(trainer.device, False)
        trainer.run_step(next(iter(trainer.build_loader(0))))
        params[scaled] = [p.detach().double() for p in trainer.module.parameters()]
    for a, b in zip(params[True], params[False]):
        assert (a - b).norm() <= 1e-6 * b.norm() + 1e-12


def test_resume_under_amp_restores_the_loss_scale_state(cfg_tiny, tmp_path):
    cfg = amp_cfg(cfg_tiny, tmp_path / "straight", MAX_ITER=3, CHECKPOINT_PERIOD=2)
    straight = build_trainer(cfg)
    straight.train()
    saved = load_checkpoint(tmp_path / "straight" / "model_0000002.pth")["extra"]["grad_scaler"]
    assert saved["scale"] == 2.0**16 and saved["_growth_tracker"] == 2  # two unskipped steps so far
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(tmp_path / "straight" / "model_0000002.pth", resumed_dir)
    (resumed_dir / "last_checkpoint").write_text("model_0000002.pth\n")
    rcfg = cfg.clone()
    rcfg.OUTPUT_DIR = str(resumed_dir)
    resumed = build_trainer(rcfg, resume=True)
    assert resumed.iteration == 2 and resumed.scaler.state_dict() == saved
    resumed.train()
    assert resumed.scaler.state_dict() == straight.scaler.state_dict()
    for a, b in zip(straight.module.parameters(), resumed.module.parameters()):
        assert torch.equal(a, b)


def test_the_dump_teacher_forward_runs_under_cpu_autocast(cfg_tiny, tmp_path):
    cfg = cfg_tiny.clone()
    cfg.MODEL.WEIGHTS = save_teacher(cfg_tiny, tmp_path / "teacher.pth")
    teacher = load_teacher(cfg, train_index(cfg).num_classes, torch.device("cpu"))
    dtypes = bf16_features(teacher)
    images = [torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(0)) * 255]
    (exact,) = sample_features(teacher, images, teacher.levels, amp=False)
    assert set(dtypes) == {torch.float32}
    dtypes.clear()
    (mixed,) = sample_features(teacher, images, teacher.levels, amp=True)
    assert set(dtypes) == {torch.bfloat16}
    for level, value in exact.items():
        assert mixed[level].dtype == torch.float32  # what the cache encodes
        error = float((mixed[level] - value).abs().max())
        assert 0 < error <= 0.05 * float(value.abs().max()), level  # bfloat16: 8 bits of mantissa
