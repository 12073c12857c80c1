"""The training loop: one iteration in `Trainer.run_step`, everything around it in `Trainer.train`.

`run_step(batch)` is a whole iteration in one function (forward, losses, backward, clipping, optimizer
and schedule steps), as DETR's `train_one_epoch`; stage two's DistillTrainer replaces it with its own
whole step. `train()` owns the rest: the data stream, logs (metrics.json, TensorBoard, tqdm),
checkpoints and evaluation. Set-up is explicit, as detectron2's: build the trainer, then call
`trainer.resume_or_load(resume)`, then `trainer.train()`.

Exact resume: the checkpoint holds the model, optimizer, scheduler, iteration, every rank's RNG state
and the state of `checkpointables` (stage two: its ICD module, optimizer and schedule), and the data
comes from `build_loader(start_iter)`, which must yield from the same position the uninterrupted run
would be at (detection.data.loader's seeded stream does), so 3 + 3 resumed iterations equal 6 straight ones.
"""

from __future__ import annotations

import bisect
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm import tqdm

from detection import comm
from detection.data.augment import AugmentationPlan
from detection.data.datasets import DetectionDataset, check_image_files
from detection.data.loader import Batch, LoaderFactory, build_train_loader
from detection.engine import amp
from detection.engine.checkpoint import (
    capture_rng_state,
    last_checkpoint,
    load_weights,
    restore_rng_state,
    resume_from,
    save_checkpoint,
)
from detection.engine.commands import default_setup
from detection.engine.evaluation import evaluate
from detection.errors import UserError
from detection.modeling.detector import build_model

# evaluate(model) -> {task: {metric: value}} (computed on all ranks, results on every rank or rank 0).
EvaluateFn = Callable[[nn.Module], dict[str, dict[str, float]]]

# Normalisation layers, whose affine parameters get no weight decay.
_NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.GroupNorm,
    nn.LayerNorm,
)


def warmup_multistep(warmup_iters: int, warmup_factor: float, steps: list[int], gamma: float) -> Callable[[int], float]:
    """LR multiplier at an iteration: linear warm-up from `warmup_factor`, then x`gamma` at each step."""
    steps = sorted(int(s) for s in steps)

    def factor(iteration: int) -> float:
        decay = gamma ** bisect.bisect_right(steps, iteration)
        if iteration >= warmup_iters:
            return decay
        alpha = iteration / warmup_iters
        return decay * (warmup_factor * (1 - alpha) + alpha)

    return factor


def _check_solver(cfg: Any) -> None:
    s = cfg.SOLVER
    if s.MAX_ITER < 0:
        raise UserError(f"SOLVER.MAX_ITER {s.MAX_ITER} is negative.", "set SOLVER.MAX_ITER to 0 or more.")
    if s.BASE_LR <= 0:
        raise UserError(f"SOLVER.BASE_LR {s.BASE_LR} must be positive.", "use e.g. 0.01 (batch 16).")
    if s.CHECKPOINT_PERIOD <= 0 or s.LOG_PERIOD <= 0:
        raise UserError(
            "SOLVER.CHECKPOINT_PERIOD and SOLVER.LOG_PERIOD must be positive.",
            "set them to a number of iterations, e.g. 5000 and 20.",
        )
    if list(s.STEPS) != sorted(s.STEPS):
        raise UserError(f"SOLVER.STEPS {list(s.STEPS)} must be increasing.", "sort SOLVER.STEPS.")
    if s.CLIP_GRADIENTS.CLIP_TYPE not in ("value", "norm"):
        raise UserError(
            f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE '{s.CLIP_GRADIENTS.CLIP_TYPE}' is not supported.", "use value or norm."
        )


class Checkpointable(Protocol):
    """Anything with a state to save and restore: modules, optimizers, schedulers."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def build_sgd(model: nn.Module, solver: Any) -> torch.optim.SGD:
    """SGD with momentum; no weight decay on normalisation layers (as detectron2's default)."""
    decay, no_decay = [], []
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.requires_grad:
                (no_decay if isinstance(module, _NORM_TYPES) else decay).append(param)
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": solver.WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=solver.BASE_LR,
        momentum=solver.MOMENTUM,
    )


def clip_gradients(optimizer: torch.optim.Optimizer, clip: Any) -> None:
    """SOLVER.CLIP_GRADIENTS on the (unscaled) gradients of one optimizer's parameters."""
    if not clip.ENABLED:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if clip.CLIP_TYPE == "value":
        torch.nn.utils.clip_grad_value_(params, clip.CLIP_VALUE)
    else:
        torch.nn.utils.clip_grad_norm_(params, clip.CLIP_VALUE)


def images_and_targets(
    samples: Sequence[Mapping[str, Any]], device: torch.device
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Dataset items -> (images [3, h, w], detection targets) on the training device."""
    images = [sample["image"].to(device, non_blocking=True) for sample in samples]
    targets = [{k: v.to(device, non_blocking=True) for k, v in sample["target"].items()} for sample in samples]
    return images, targets


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `module` when several processes train, else the module itself."""
    if comm.get_world_size() == 1:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


class Trainer:
    """Owns the optimisation of one model. Rank 0 writes checkpoints, logs and the progress bar.

    A subclass with another step replaces `run_step` (and `build_optimizer` when its model has its own
    optimizer); `max_iter` and `checkpoint_period` default to SOLVER.MAX_ITER and SOLVER.CHECKPOINT_PERIOD.
    """

    # Checkpoints are f"{checkpoint_prefix}_{iteration:07d}.pth" and f"{checkpoint_prefix}_final.pth".
    checkpoint_prefix = "model"
    progress_label = "train"

    def __init__(
        self,
        cfg: Any,
        model: nn.Module,
        build_loader: LoaderFactory,
        evaluate: EvaluateFn | None = None,
        *,
        max_iter: int | None = None,
        checkpoint_period: int | None = None,
    ) -> None:
        _check_solver(cfg)
        self.cfg = cfg
        self.output_dir = Path(cfg.OUTPUT_DIR)
        self.device = comm.device_for_process(cfg.MODEL.DEVICE)
        self.max_iter = int(cfg.SOLVER.MAX_ITER if max_iter is None else max_iter)
        self.checkpoint_period = int(cfg.SOLVER.CHECKPOINT_PERIOD if checkpoint_period is None else checkpoint_period)
        self.build_loader = build_loader
        self.evaluate_fn = evaluate
        self.module = model.to(self.device)  # the bare model: checkpoints, evaluation
        self.model = wrap_ddp(self.module, self.device)  # what the step calls
        self.optimizer, self.scheduler = self.build_optimizer()
        self.amp = bool(cfg.SOLVER.AMP)  # fp16 on CUDA, bf16 on CPU (detection.engine.amp)
        self.scaler = amp.grad_scaler(self.device, self.amp)
        # Saved with every checkpoint and restored on resume, next to model/optimizer/scheduler; under AMP
        # the loss scale too, so a resumed run scales (and skips steps) as the uninterrupted one.
        self.checkpointables: dict[str, Checkpointable] = {"grad_scaler": self.scaler} if self.amp else {}
        self.iteration = 0
        self._rng_to_restore: dict[str, Any] | None = None
        self.model.train()

    # --- set-up ---------------------------------------------------------------------------------
    def resume_or_load(self, resume: bool) -> bool:
        """With `resume` and a checkpoint in OUTPUT_DIR: continue it exactly; else load MODEL.WEIGHTS.

        Returns whether a checkpoint was resumed.
        """
        checkpoint = last_checkpoint(self.output_dir) if resume else None
        if checkpoint is None:
            if resume and comm.is_main_process():
                # As detectron2's resume_or_load: --resume without a checkpoint starts a new run (so one job
                # script serves the first start and every restart), and says so rather than silently.
                start = f"MODEL.WEIGHTS {self.cfg.MODEL.WEIGHTS}" if self.cfg.MODEL.WEIGHTS else "scratch"
                print(
                    f"--resume: no checkpoint to resume in {self.output_dir} (no last_checkpoint naming an existing "
                    f"file); starting a new run at iteration 0 from {start}",
                    flush=True,
                )
            if self.cfg.MODEL.WEIGHTS:
                load_weights(self.module, self.cfg.MODEL.WEIGHTS)
            return False
        self.iteration, extra, rng = resume_from(checkpoint, self.module, self.optimizer, self.scheduler)
        for name, obj in self.checkpointables.items():
            if name not in extra:
                raise UserError(
                    f"the checkpoint {checkpoint} being resumed holds no '{name}' state: it was "
                    "written by another command",
                    "resume a run only in its own OUTPUT_DIR (MODEL.WEIGHTS loads weights into a new run)",
                )
            try:
                obj.load_state_dict(extra[name])
            except (RuntimeError, ValueError, KeyError) as exc:
                raise UserError(
                    f"the checkpoint's '{name}' state does not fit this run's: {str(exc).splitlines()[0]}",
                    "resume with the config the checkpoint was trained with",
                ) from None
        # Restore the RNG only when the loop starts (after the data iterator is built), where it was saved.
        rank = comm.get_rank()
        self._rng_to_restore = rng[rank] if rank < len(rng) else (rng[0] if rng else None)
        if comm.is_main_process():
            print(f"Resuming from {checkpoint} at iteration {self.iteration}.", flush=True)
        return True

    def build_optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """SGD on `self.module` (build_sgd) with SOLVER's warm-up + multi-step schedule."""
        s = self.cfg.SOLVER
        optimizer = build_sgd(self.module, s)
        lr_factor = warmup_multistep(int(s.WARMUP_ITERS), float(s.WARMUP_FACTOR), list(s.STEPS), float(s.GAMMA))
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    # --- one iteration ----------------------------------------------------------------------------
    def run_step(self, batch: Batch) -> dict[str, Tensor]:
        """One iteration of the detector alone: losses, backward, clipping, SGD step, LR schedule."""
        images, targets = images_and_targets(batch, self.device)
        with self.autocast():
            losses, _features, _images = self.model(images, targets)
        total = self.total_loss(losses)
        self.optimizer.zero_grad(set_to_none=True)
        # scale, backward, unscale, clip (SOLVER.CLIP_GRADIENTS), step (skipped on inf/nan), update
        amp.backward_and_step(
            self.scaler,
            total,
            [(self.optimizer, lambda: clip_gradients(self.optimizer, self.cfg.SOLVER.CLIP_GRADIENTS))],
        )
        self.scheduler.step()
        return losses

    def autocast(self) -> AbstractContextManager:
        """Mixed precision under SOLVER.AMP (fp16 on CUDA, bf16 on CPU); nothing otherwise."""
        return amp.autocast(self.device, self.amp)

    def total_loss(self, losses: dict[str, Tensor]) -> Tensor:
        """The sum of the losses; a non-finite one stops training with the losses named."""
        total = sum(losses.values())
        if not torch.isfinite(total):
            shown = {k: float(v.detach()) for k, v in losses.items()}
            raise UserError(
                f"training diverged: the loss is not finite at iteration {self.iteration}: {shown}",
                "lower SOLVER.BASE_LR, lengthen SOLVER.WARMUP_ITERS, or enable SOLVER.CLIP_GRADIENTS.",
            )
        return total

    def step_metrics(self) -> dict[str, Tensor]:
        """Values of the last step logged next to its losses but not part of the loss (stage two: the
        entropy of the identification task's real/fake prior, the level loss_ident must get below)."""
        return {}

    # --- the loop ---------------------------------------------------------------------------------
    def train(self) -> dict[str, dict[str, float]]:
        """Run from the current iteration to SOLVER.MAX_ITER; return the final evaluation (if any)."""
        cfg, main = self.cfg, comm.is_main_process()
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        data: Iterator[Batch] = iter(self.build_loader(self.iteration))
        if self._rng_to_restore is not None:
            restore_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        log = MetricsLog(self.output_dir, enabled=main)
        bar = tqdm(
            total=self.max_iter,
            initial=self.iteration,
            desc=self.progress_label,
            unit="it",
            disable=not main,
            dynamic_ncols=True,
            mininterval=1.0,
        )
        window = _Window()
        period_log, period_ckpt = int(cfg.SOLVER.LOG_PERIOD), self.checkpoint_period
        period_eval = int(cfg.TEST.EVAL_PERIOD)
        try:
            while self.iteration < self.max_iter:
                start = time.perf_counter()
                batch = next(data)
                data_time = time.perf_counter() - start
                lr = self.optimizer.param_groups[0]["lr"]  # the rate this iteration uses
                losses = self.run_step(batch)
                self.iteration += 1

                window.add(losses, time.perf_counter() - start, data_time, metrics=self.step_metrics())
                bar.update(1)
                last = self.iteration == self.max_iter
                if self.iteration % period_log == 0 or last:
                    metrics = window.reduce()
                    metrics["lr"] = lr
                    metrics["eta_seconds"] = metrics["time"] * (self.max_iter - self.iteration)
                    log.write(self.iteration, metrics)
                    bar.set_postfix(loss=f"{metrics['total_loss']:.3f}", lr=f"{lr:.2g}", refresh=False)
                if self.iteration % period_ckpt == 0 and not last:
                    self.save(f"{self.checkpoint_prefix}_{self.iteration:07d}.pth")
                if period_eval > 0 and self.iteration % period_eval == 0 and not last:
                    log.write_eval(self.iteration, self.run_evaluation())
        finally:
            bar.close()
        self._sync_buffers()
        self.save(f"{self.checkpoint_prefix}_final.pth")
        results = self.run_evaluation()
        log.write_eval(self.iteration, results)
        log.close()
        return results

    def save(self, name: str) -> None:
        rng = comm.all_gather(capture_rng_state())  # every rank's generators: exact multi-process resume
        if comm.is_main_process():
            extra = {key: obj.state_dict() for key, obj in self.checkpointables.items()}
            save_checkpoint(
                self.output_dir / name,
                self.module,
                self.optimizer,
                self.scheduler,
                self.iteration,
                extra,
                rng_per_rank=rng,
            )
        comm.synchronize()

    def _sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BN running statistics drift apart after the last forward)."""
        if comm.get_world_size() > 1:
            for buffer in self.module.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def run_evaluation(self) -> dict[str, dict[str, float]]:
        self._sync_buffers()
        if self.evaluate_fn is None:
            return {}
        self.module.eval()
        try:
            with torch.no_grad():
                results = self.evaluate_fn(self.module)
        finally:
            self.module.train()
        comm.synchronize()
        return results


def build_trainer(cfg: Any, resume: bool = False) -> Trainer:
    """`icd train`'s trainer for this process: set-up, detector, data, COCO evaluation; resumed or loaded."""
    cfg, index = default_setup(cfg, need_train_index=True)
    empty = len(index.images) - len(index.training_images())
    if empty and comm.is_main_process():  # said as `icd dump` says it: one line, not a silent drop
        print(
            f"icd train: {empty} of {len(index.images)} training image(s) have no (non-crowd) annotations and "
            "are skipped for training (detectron2's filter_empty_annotations; `icd dump` does not cache them)",
            flush=True,
        )
    plan = AugmentationPlan.for_training(cfg)
    dataset = DetectionDataset(
        index, plan, training=True, variant_sampler=plan.sample_variant, with_masks=bool(cfg.MODEL.MASK_ON)
    )
    check_image_files(dataset.images)
    trainer = Trainer(
        cfg,
        build_model(cfg, cfg.MODEL.NUM_CLASSES),
        build_train_loader(cfg, dataset),
        evaluate=lambda model: evaluate(cfg, model),
    )
    trainer.resume_or_load(resume)
    return trainer


class _Window:
    """Loss and timing sums since the last log line, averaged over iterations and ranks when logged."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(
        self, losses: dict[str, Tensor], seconds: float, data_seconds: float, metrics: dict[str, Tensor] | None = None
    ) -> None:
        """One iteration's losses (summed into total_loss), times, and metrics (logged, not summed)."""
        values = {k: float(v.detach()) for k, v in losses.items()}
        values.update(total_loss=float(sum(v.detach() for v in losses.values())), time=seconds, data_time=data_seconds)
        values.update({k: float(v) for k, v in (metrics or {}).items()})
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def reduce(self) -> dict[str, float]:
        keys = sorted(self.sums)
        local = torch.tensor([self.sums[k] / self.count for k in keys], dtype=torch.float64)
        if comm.get_world_size() > 1:
            gathered = comm.all_gather(local)
            local = torch.stack(gathered).mean(0)
        self.sums, self.count = {}, 0
        return dict(zip(keys, local.tolist()))


class MetricsLog:
    """OUTPUT_DIR/metrics.json (one JSON object per line, as detectron2) and TensorBoard scalars."""

    def __init__(self, output_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = output_dir / "metrics.json"
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: tensorboard is slow to import

            self.writer = SummaryWriter(log_dir=str(output_dir))

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False, default=str) + "\n")

    def write(self, iteration: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._append({"iteration": iteration, **{k: _finite_or_none(v) for k, v in metrics.items()}})
        for key, value in metrics.items():
            self.writer.add_scalar(f"train/{key}", value, iteration)
        self.writer.flush()

    def write_eval(self, iteration: int, results: dict[str, dict[str, float]]) -> None:
        if not self.enabled or not results:
            return
        flat = {
            f"{task}/{metric}": _finite_or_none(v) for task, values in results.items() for metric, v in values.items()
        }
        self._append({"iteration": iteration, **flat})
        for key, value in flat.items():
            if value is not None:
                self.writer.add_scalar(key, value, iteration)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(float(value)) else None
