"""SOLVER.AMP, the one place it is decided: autocast and loss scaling for both trainers and the dump.

CUDA autocasts to float16, whose narrow range needs the GradScaler's loss scaling. CPU autocasts to
bfloat16, which has float32's range and needs no scaling; the scaler is enabled there all the same
(torch >= 2.3 has its CPU kernels) so that the very scale / unscale / clip / step / update sequence a
GPU runs is what every CPU test run executes. Scaling by a power of two is exact, so on CPU the unscaled
gradients are those of the unscaled loss (up to values that would underflow without it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor


def autocast_dtype(device: torch.device) -> torch.dtype:
    """float16 on CUDA (tensor cores, loss scaling), bfloat16 elsewhere (what CPU autocast supports)."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def autocast(device: torch.device, enabled: bool) -> AbstractContextManager:
    """Mixed precision on `device` when `enabled` (SOLVER.AMP); nothing otherwise."""
    return torch.autocast(device.type, dtype=autocast_dtype(device)) if enabled else nullcontext()


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """The loss scaler of a trainer on `device`: active under SOLVER.AMP, a pass-through otherwise."""
    return torch.amp.GradScaler(device.type, enabled=enabled)


def backward_and_step(
    scaler: torch.amp.GradScaler, loss: Tensor, steps: Sequence[tuple[torch.optim.Optimizer, Callable[[], object]]]
) -> None:
    """One backward pass, then every (optimizer, clip) pair stepped under one scaler (PyTorch's AMP recipe
    for several optimizers): unscale each optimizer's gradients, clip each on the true gradients, step
    each (a step is skipped on inf/nan gradients), then one update of the scale."""
    scaler.scale(loss).backward()
    for optimizer, _ in steps:
        scaler.unscale_(optimizer)
    for _, clip in steps:
        clip()
    for optimizer, _ in steps:
        scaler.step(optimizer)
    scaler.update()
