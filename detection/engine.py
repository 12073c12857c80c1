"""The training loop: SGD with warm-up + steps, clipping, checkpoints, exact resume, DDP, logs, evaluation.

One straight flow in `Trainer.train`; stage two subclasses it and overrides only the hooks
(`compute_losses`, `after_backward`, `extra_state` / `load_extra_state`, `build_optimizer`).

Exact resume: the checkpoint holds the model, optimizer, scheduler, iteration and every rank's RNG
state, and the data comes from `build_loader(start_iter)`, which must yield from the same position the
uninterrupted run would be at (e.g. an infinite seeded sampler whose position derives from the
iteration), so 3 + 3 resumed iterations equal 6 straight ones.
"""
from __future__ import annotations

import bisect
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from tqdm import tqdm

from detection import distributed as comm
from detection.checkpoint import (
    capture_rng_state, last_checkpoint, load_weights, restore_rng_state, resume_from, save_checkpoint,
)
from detection.errors import UserError

Batch = list[dict[str, Any]]
# build_loader(start_iter) -> an iterable of batches positioned at `start_iter`.
LoaderFactory = Callable[[int], Iterable[Batch]]
# evaluate(model) -> {task: {metric: value}} (computed on all ranks, results on every rank or rank 0).
EvaluateFn = Callable[[nn.Module], dict[str, dict[str, float]]]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


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
        raise UserError("SOLVER.CHECKPOINT_PERIOD and SOLVER.LOG_PERIOD must be positive.",
                        "set them to a number of iterations, e.g. 5000 and 20.")
    if list(s.STEPS) != sorted(s.STEPS):
        raise UserError(f"SOLVER.STEPS {list(s.STEPS)} must be increasing.", "sort SOLVER.STEPS.")
    if s.CLIP_GRADIENTS.CLIP_TYPE not in ("value", "norm"):
        raise UserError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE '{s.CLIP_GRADIENTS.CLIP_TYPE}' is not supported.",
                        "use value or norm.")


class Trainer:
    """Owns the optimisation loop of one detector. Rank 0 writes checkpoints, logs and the progress bar."""

    def __init__(
        self,
        cfg: Any,
        model: nn.Module,
        build_loader: LoaderFactory,
        evaluate: EvaluateFn | None = None,
        resume: bool = False,
    ) -> None:
        _check_solver(cfg)
        self.cfg = cfg
        self.output_dir = Path(cfg.OUTPUT_DIR)
        self.device = comm.device_for_process(cfg.MODEL.DEVICE)
        self.max_iter = int(cfg.SOLVER.MAX_ITER)
        self.build_loader = build_loader
        self.evaluate_fn = evaluate
        self.module = model.to(self.device)  # the bare model: checkpoints, evaluation, hooks
        self.optimizer = self.build_optimizer()
        self.scheduler = self.build_scheduler()
        self.amp = bool(cfg.SOLVER.AMP) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.iteration = 0
        self._rng_to_restore: dict[str, Any] | None = None
        self._resume_or_load(resume)
        self.model: nn.Module = self.module
        if comm.get_world_size() > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.ddp_find_unused_parameters,
            )
        self.model.train()

    # --- hooks for subclasses ----------------------------------------------------------------
    ddp_find_unused_parameters = False

    def build_optimizer(self) -> torch.optim.Optimizer:
        """SGD with momentum; no weight decay on normalisation layers (as detectron2's default)."""
        decay, no_decay = [], []
        for module in self.module.modules():
            for param in module.parameters(recurse=False):
                if param.requires_grad:
                    (no_decay if isinstance(module, _NORM_TYPES) else decay).append(param)
        s = self.cfg.SOLVER
        return torch.optim.SGD(
            [{"params": decay, "weight_decay": s.WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
            lr=s.BASE_LR, momentum=s.MOMENTUM,
        )

    def build_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        s = self.cfg.SOLVER
        return torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_multistep(int(s.WARMUP_ITERS), float(s.WARMUP_FACTOR), list(s.STEPS), float(s.GAMMA))
        )

    def compute_losses(self, batch: Batch) -> dict[str, Tensor]:
        """The detector's own losses for a batch (list of dataset items); stage two adds distillation."""
        images = [sample["image"].to(self.device, non_blocking=True) for sample in batch]
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in sample["target"].items()} for sample in batch]
        losses, _features, _images = self.model(images, targets)
        return losses

    def after_backward(self) -> None:
        """Called after the backward pass and the model's optimizer step (stage two steps its own optimizer)."""

    def step_metrics(self) -> dict[str, Tensor]:
        """Values of the last step logged next to its losses but not part of the loss (stage two: the
        entropy of the identification task's real/fake prior, the level loss_ident must get below)."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Extra state saved in every checkpoint (stage two: its decoder and optimizer)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what extra_state() returned."""

    # --- checkpoints ---------------------------------------------------------------------------
    def _resume_or_load(self, resume: bool) -> None:
        checkpoint = last_checkpoint(self.output_dir) if resume else None
        if checkpoint is not None:
            self.iteration, extra, rng = resume_from(checkpoint, self.module, self.optimizer, self.scheduler)
            self.load_extra_state(extra)
            # Restore the RNG only when the loop starts (after the data iterator is built), where it was saved.
            rank = comm.get_rank()
            self._rng_to_restore = rng[rank] if rank < len(rng) else (rng[0] if rng else None)
            if comm.is_main_process():
                print(f"Resuming from {checkpoint} at iteration {self.iteration}.", flush=True)
        elif self.cfg.MODEL.WEIGHTS:
            load_weights(self.module, self.cfg.MODEL.WEIGHTS)

    def save(self, name: str) -> None:
        rng = comm.all_gather(capture_rng_state())  # every rank's generators: exact multi-process resume
        if comm.is_main_process():
            save_checkpoint(self.output_dir / name, self.module, self.optimizer, self.scheduler, self.iteration,
                            self.extra_state(), rng_per_rank=rng)
        comm.synchronize()

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
        log = _MetricsLog(self.output_dir, enabled=main)
        bar = tqdm(total=self.max_iter, initial=self.iteration, desc="train", unit="it", disable=not main,
                   dynamic_ncols=True, mininterval=1.0)
        window = _Window()
        period_log, period_ckpt = int(cfg.SOLVER.LOG_PERIOD), int(cfg.SOLVER.CHECKPOINT_PERIOD)
        period_eval = int(cfg.TEST.EVAL_PERIOD)
        try:
            while self.iteration < self.max_iter:
                start = time.perf_counter()
                batch = next(data)
                data_time = time.perf_counter() - start

                with torch.autocast(self.device.type, enabled=self.amp) if self.amp else nullcontext():
                    losses = self.compute_losses(batch)
                total = sum(losses.values())
                self._check_finite(total, losses)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(total).backward()
                self.scaler.unscale_(self.optimizer)
                self._clip_gradients()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.after_backward()
                lr = self.optimizer.param_groups[0]["lr"]
                self.scheduler.step()
                self.iteration += 1

                window.add({**losses, **self.step_metrics()}, total, time.perf_counter() - start, data_time)
                bar.update(1)
                last = self.iteration == self.max_iter
                if self.iteration % period_log == 0 or last:
                    metrics = window.reduce()
                    metrics["lr"] = lr
                    metrics["eta_seconds"] = metrics["time"] * (self.max_iter - self.iteration)
                    log.write(self.iteration, metrics)
                    bar.set_postfix(loss=f"{metrics['total_loss']:.3f}", lr=f"{lr:.2g}", refresh=False)
                if self.iteration % period_ckpt == 0 and not last:
                    self.save(f"model_{self.iteration:07d}.pth")
                if period_eval > 0 and self.iteration % period_eval == 0 and not last:
                    log.write_eval(self.iteration, self.run_evaluation())
        finally:
            bar.close()
        self._sync_buffers()
        self.save("model_final.pth")
        results = self.run_evaluation()
        log.write_eval(self.iteration, results)
        log.close()
        return results

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

    def _clip_gradients(self) -> None:
        clip = self.cfg.SOLVER.CLIP_GRADIENTS
        if not clip.ENABLED:
            return
        params = [p for p in self.module.parameters() if p.grad is not None]
        if clip.CLIP_TYPE == "value":
            torch.nn.utils.clip_grad_value_(params, clip.CLIP_VALUE)
        else:
            torch.nn.utils.clip_grad_norm_(params, clip.CLIP_VALUE)

    def _check_finite(self, total: Tensor, losses: dict[str, Tensor]) -> None:
        if not torch.isfinite(total):
            shown = {k: float(v.detach()) for k, v in losses.items()}
            raise UserError(
                f"training diverged: the loss is not finite at iteration {self.iteration}: {shown}",
                "lower SOLVER.BASE_LR, lengthen SOLVER.WARMUP_ITERS, or enable SOLVER.CLIP_GRADIENTS.",
            )


class _Window:
    """Loss and timing sums since the last log line, averaged over iterations and ranks when logged."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, losses: dict[str, Tensor], total: Tensor, seconds: float, data_seconds: float) -> None:
        values = {k: float(v.detach()) for k, v in losses.items()}
        values.update(total_loss=float(total.detach()), time=seconds, data_time=data_seconds)
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


class _MetricsLog:
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
        flat = {f"{task}/{metric}": _finite_or_none(v) for task, values in results.items() for metric, v in values.items()}
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
