"""DistillTrainer: the student's training loop with ICD; one stage-two iteration is `run_step`.

Per iteration (docs/METHOD.md, sections 4 and 5): the student's detection losses and FPN features,
the teacher's features of the same batch (from the cache via the batch, or from the live teacher in
--online mode), the ICD losses (distillation, identification, localisation) on both, one backward
pass, and two optimizers stepped under one GradScaler: the engine's SGD on the student's parameters
and the ICD module's AdamW (cosine schedule, gradient-norm clipping) on its own. For the first
DISTILL.WARMUP_DETACH_ITERS iterations the distillation loss sees detached student features: only
the student-side projection learns from it.

Checkpoints hold the student (the engine's `model`, loadable by `icd eval`), and as checkpointables
the ICD module, its optimizer and its schedule. Fake-query randomness comes from a generator seeded
by (SEED, rank, iteration), so a resumed run draws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cache_contract.teacher import TeacherInit, init_from_teacher
from detection import comm
from detection.engine import amp
from detection.engine.trainer import EvaluateFn, LoaderFactory, Trainer, clip_gradients, images_and_targets, wrap_ddp
from detection.errors import UserError
from detection.modeling.detector import DetectorAdapter
from stage2_student_distill.data import DistillBatch
from stage2_student_distill.method.module import ICDModule, build_icd_optimizer
from stage2_student_distill.method.queries import query_generator

# (batch, its images on the device) -> the teacher's {level: [N, C, H, W]}, padded to the batch
TeacherFeatures = Callable[[DistillBatch, list[Tensor]], dict[str, Tensor]]


class DistillTrainer(Trainer):
    """Trainer for a student distilled with ICD from cached (default) or live (`teacher=`) teacher features.

    The distilled levels are the ICD module's (bound when it was built, with the student's strides)."""

    def __init__(
        self,
        cfg: Any,
        student: DetectorAdapter,
        build_loader: LoaderFactory,
        icd: ICDModule,
        teacher_features: TeacherFeatures,
        *,
        teacher_weights: Callable[[], Mapping[str, Any]] | None = None,
        teacher_architecture: str = "",
        evaluate: EvaluateFn | None = None,
    ) -> None:
        """`teacher_features(batch, images)`: the teacher's {level: [N, C, H, W]} for a batch, padded to it
        (`CachedTeacherFeatures` from the cache, `OnlineTeacher` live); `teacher_weights`: returns the teacher's FPN + head state (DISTILL.INIT_FROM_TEACHER), or None;
        `teacher_architecture` (its MODEL.META_ARCHITECTURE, "" if unknown) decides whether the head is shared."""
        super().__init__(cfg, student, build_loader, evaluate=evaluate)
        self.levels, self.strides = list(icd.levels), dict(icd.strides)  # bound into the ICD module when built
        wrong = {
            name: (stride, student.strides.get(name))
            for name, stride in self.strides.items()
            if student.strides.get(name) != stride
        }
        if wrong:
            raise UserError(
                f"the ICD module's levels and strides {wrong} (module, student) are not the student's",
                f"build the ICD module with the student's strides (choose levels from {student.levels})",
            )
        self.size_divisibility = int(student.size_divisibility)
        self.teacher_features = teacher_features
        self.teacher_weights = teacher_weights
        self.teacher_architecture = teacher_architecture
        self.warmup_detach_iters = int(cfg.DISTILL.WARMUP_DETACH_ITERS)
        self.icd = icd.to(self.device)
        self.icd.train()
        self.icd_model = wrap_ddp(self.icd, self.device)  # what the step calls
        self.icd_optimizer, self.icd_scheduler = build_icd_optimizer(self.icd, cfg)
        self.icd_clip_norm = float(cfg.DISTILL.OPTIMIZER.CLIP_NORM)
        self.checkpointables.update(icd=self.icd, icd_optimizer=self.icd_optimizer, icd_scheduler=self.icd_scheduler)
        self.teacher_init: TeacherInit | None = None
        self.skipped_teacher_keys: list[str] | None = None

    def resume_or_load(self, resume: bool) -> bool:
        """The engine's resume / MODEL.WEIGHTS, then (new runs only) the teacher's FPN (+ head, same family only)."""
        resumed = super().resume_or_load(resume)
        if resumed or self.teacher_weights is None:
            return resumed
        state = {key: torch.as_tensor(np.asarray(value)) for key, value in self.teacher_weights().items()}
        self.teacher_init = init_from_teacher(self.module, state, self.teacher_architecture)
        self.skipped_teacher_keys = self.teacher_init.skipped
        if comm.is_main_process():
            print(
                f"DISTILL.INIT_FROM_TEACHER: {self.module.architecture} student {self.teacher_init.summary()}",
                flush=True,
            )
        return resumed

    def query_generator(self) -> torch.Generator:
        """The fake-query/jitter generator of this iteration and rank (CPU, as the ICD modules require)."""
        return query_generator(int(self.cfg.SEED), comm.get_rank(), self.iteration)

    def run_step(self, batch: DistillBatch) -> dict[str, Tensor]:
        """One stage-two iteration: student, teacher features, ICD losses, one backward, both optimizers."""
        images, targets = images_and_targets(batch.samples, self.device)
        sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]  # resized, before padding
        with self.autocast():
            detection_losses, student_features, _ = self.model(images, targets)  # {level: [N, C, H, W]}
            teacher_features = self.teacher_features(batch, images)  # {level: [N, C, H, W]}, padded as the batch
            icd_losses = self.icd_model(
                teacher_features,
                {name: student_features[name] for name in self.levels},
                sizes,
                targets,
                self.query_generator(),
                detach_student=self.iteration < self.warmup_detach_iters,
            )
        losses = {**detection_losses, **icd_losses}
        total = self.total_loss(losses)

        self.optimizer.zero_grad(set_to_none=True)
        self.icd_optimizer.zero_grad(set_to_none=True)
        # Two optimizers under one GradScaler (PyTorch's AMP recipe): scale, backward, unscale each, clip
        # each, step each (a step is skipped on inf/nan gradients), then one update of the scale.
        amp.backward_and_step(
            self.scaler,
            total,
            [
                (self.optimizer, lambda: clip_gradients(self.optimizer, self.cfg.SOLVER.CLIP_GRADIENTS)),
                (self.icd_optimizer, self.clip_icd_gradients),  # DISTILL.OPTIMIZER.CLIP_NORM
            ],
        )
        self.scheduler.step()
        self.icd_scheduler.step()
        return losses

    def clip_icd_gradients(self) -> None:
        """ICD's total-norm clip (DISTILL.OPTIMIZER.CLIP_NORM; 0: none) on its unscaled gradients."""
        if self.icd_clip_norm > 0:
            nn.utils.clip_grad_norm_(self.icd.parameters(), self.icd_clip_norm)

    def step_metrics(self) -> dict[str, Tensor]:
        """`ident_prior_entropy`: the loss_ident of always predicting this batch's real/fake ratio."""
        return dict(self.icd.last_metrics)
