"""DistillTrainer: the baseline training loop plus ICD (ICD_METHOD.md sections 4 and 5).

Per iteration: the student's detection losses and FPN features, the teacher's features of the same
batch (from the cache via the batch, or from the live teacher in --online mode), and the ICD losses
(distillation, identification, localisation) on both. One backward pass; the engine's SGD steps the
student (its parameters only), `after_backward` steps the ICD module's own AdamW + cosine schedule
with gradient-norm clipping (its parameters only). For the first DISTILL.WARMUP_DETACH_ITERS
iterations the distillation loss sees detached student features: only the student-side projection
learns from it.

Checkpoints hold the student (the engine's `model`, loadable by `icd eval`), and as extra state the
ICD module and its optimizer + schedule. Fake-query randomness comes from a generator seeded by
(SEED, rank, iteration), so a resumed run draws exactly what the uninterrupted run would have.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from detection import distributed as comm
from detection.checkpoint import last_checkpoint
from detection.engine import EvaluateFn, LoaderFactory, Trainer
from detection.errors import UserError
from detection.zoo import DetectorAdapter
from stage2_student_distill.data import batch_padded_shape
from stage2_student_distill.icd import ICDModule, build_icd_optimizer
from stage2_student_distill.online import OnlineTeacher


class DistillTrainer(Trainer):
    """Trainer for a student distilled with ICD from cached (default) or live (`teacher=`) teacher features."""

    def __init__(
        self,
        cfg: Any,
        student: DetectorAdapter,
        build_loader: LoaderFactory,
        icd: ICDModule,
        levels: Sequence[str],
        *,
        teacher: OnlineTeacher | None = None,
        teacher_weights: Callable[[], Mapping[str, Any]] | None = None,
        evaluate: EvaluateFn | None = None,
        resume: bool = False,
    ) -> None:
        """`teacher_weights`: returns the teacher's FPN + head state (DISTILL.INIT_FROM_TEACHER), or None."""
        device = comm.device_for_process(cfg.MODEL.DEVICE)
        self.levels = list(levels)
        self.strides = {name: int(student.strides[name]) for name in self.levels}
        self.size_divisibility = int(student.size_divisibility)
        self.teacher = teacher
        self.warmup_detach_iters = int(cfg.DISTILL.WARMUP_DETACH_ITERS)
        self.icd = icd.to(device)
        self.icd_optimizer = build_icd_optimizer(self.icd, cfg)
        self._teacher_weights = teacher_weights
        self.skipped_teacher_keys: list[str] | None = None
        self._loss_scale = 1.0
        super().__init__(cfg, student, build_loader, evaluate=evaluate, resume=resume)
        self.icd.train()
        self.icd_model: nn.Module = self.icd
        if comm.get_world_size() > 1:
            self.icd_model = nn.parallel.DistributedDataParallel(
                self.icd, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # --- initialisation --------------------------------------------------------------------------
    def _resume_or_load(self, resume: bool) -> None:
        """The engine's resume / MODEL.WEIGHTS, then (new runs only) the teacher's FPN + head weights."""
        resuming = resume and last_checkpoint(self.output_dir) is not None
        super()._resume_or_load(resume)
        if resuming or self._teacher_weights is None:
            return
        state = {key: torch.as_tensor(np.asarray(value)) for key, value in self._teacher_weights().items()}
        self.skipped_teacher_keys = self.module.load_fpn_and_head(state)
        if comm.is_main_process():
            loaded = len(state) - len(self.skipped_teacher_keys)
            skipped = self.skipped_teacher_keys
            print(f"DISTILL.INIT_FROM_TEACHER: student FPN + head initialised from {loaded} teacher tensor(s); "
                  f"{len(skipped)} skipped (name or shape differs)" + (f": {', '.join(skipped)}" if skipped else ""),
                  flush=True)

    # --- the step --------------------------------------------------------------------------------
    def query_generator(self) -> torch.Generator:
        """The fake-query/jitter generator of this iteration and rank (CPU, as the ICD modules require)."""
        entropy = [int(self.cfg.SEED) % 2**63, comm.get_rank(), self.iteration]  # SeedSequence wants ints >= 0
        seed = np.random.SeedSequence(entropy).generate_state(1, np.uint64)
        return torch.Generator().manual_seed(int(seed[0]) & (2**63 - 1))

    def teacher_features(self, batch: Mapping[str, Any], images: list[Tensor]) -> dict[str, Tensor]:
        """{level: [N, C, H, W]} padded to the student's batch shape: from the batch, or the live teacher."""
        if self.teacher is not None:
            sizes = [tuple(image.shape[-2:]) for image in images]
            return self.teacher(images, batch_padded_shape(sizes, self.size_divisibility))
        features = batch.get("teacher_features")
        if features is None:
            raise UserError("the batch carries no teacher features and no online teacher is set",
                            "build the data with a cache that has features (DistillDataset(read_features=True)) "
                            "or pass --online")
        return {name: features[name].to(self.device, non_blocking=True) for name in self.levels}

    def compute_losses(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Detection losses of the student + loss_distill, loss_ident, loss_loc of the ICD module."""
        samples = batch["samples"]
        images = [sample["image"].to(self.device, non_blocking=True) for sample in samples]
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in sample["target"].items()} for sample in samples]
        detection_losses, student_features, _ = self.model(images, targets)
        teacher = self.teacher_features(batch, images)
        sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        if self.amp:
            self._loss_scale = float(self.scaler.get_scale())
        icd_losses = self.icd_model(
            teacher, {name: student_features[name] for name in self.levels}, sizes, targets, self.levels,
            self.strides, self.query_generator(), detach_student=self.iteration < self.warmup_detach_iters,
        )
        return {**detection_losses, **icd_losses}

    def step_metrics(self) -> dict[str, Tensor]:
        """`ident_prior_entropy`: the loss_ident of always predicting this batch's real/fake ratio."""
        return dict(self.icd.last_metrics)

    def after_backward(self) -> None:
        """Step the ICD module's AdamW (clip 0.01, cosine schedule) on the gradients of this backward."""
        if self.amp and not self._unscale_icd_gradients():
            # An overflow under mixed precision: skip the step, as GradScaler does for the student.
            self.icd_optimizer.scheduler.step()
            self.icd_optimizer.optimizer.zero_grad(set_to_none=True)
            return
        self.icd_optimizer.step()

    def _unscale_icd_gradients(self) -> bool:
        """Divide the ICD gradients by the loss scale of this iteration; False if any is not finite."""
        grads = [p.grad for p in self.icd_optimizer.parameters if p.grad is not None]
        for grad in grads:
            grad.mul_(1.0 / self._loss_scale)
        return all(bool(torch.isfinite(grad).all()) for grad in grads)

    # --- checkpoints ----------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"icd": self.icd.state_dict(), "icd_optimizer": self.icd_optimizer.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "icd" not in state or "icd_optimizer" not in state:
            raise UserError("the checkpoint being resumed holds no ICD module state: it was not written by "
                            "`icd distill`",
                            "resume distillation only in its own OUTPUT_DIR (or use a new OUTPUT_DIR; "
                            "MODEL.WEIGHTS loads student weights)")
        try:
            self.icd.load_state_dict(state["icd"])
            self.icd_optimizer.load_state_dict(state["icd_optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(f"the checkpoint's ICD module does not fit this config's: {str(exc).splitlines()[0]}",
                            "resume with the DISTILL settings the checkpoint was trained with") from None
