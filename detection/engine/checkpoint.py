"""Checkpoints: atomic save, exact resume state, and MODEL.WEIGHTS loading with shape checks.

A checkpoint is one torch file holding {model, optimizer, scheduler, iteration, rng, extra}. It is
written to a temporary file and renamed into place, so a crash mid-write never leaves a truncated
checkpoint, and `last_checkpoint` (a one-line pointer file, as in detectron2) is only updated after
the rename. Everything stored is plain tensors / numbers / strings so files load with
`torch.load(weights_only=True)` and loading a checkpoint never runs pickled code.
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from detection.errors import UserError
from detection.interop import d2_checkpoint

LAST_CHECKPOINT = "last_checkpoint"


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return (
        model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model
    )


# --- RNG state ---------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states, in weights_only-loadable form."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- save / load -------------------------------------------------------------------------------
def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    iteration: int = 0,
    extra: dict[str, Any] | None = None,
    rng_per_rank: list[dict[str, Any]] | None = None,
) -> Path:
    """Write the checkpoint atomically (tmp file + os.replace) and point `last_checkpoint` at it.

    `rng_per_rank`: every process's capture_rng_state() (multi-process training); default: this one's.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "iteration": int(iteration),
        "rng": rng_per_rank if rng_per_rank is not None else [capture_rng_state()],
        "extra": extra or {},
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    pointer = path.parent / LAST_CHECKPOINT
    pointer_tmp = pointer.with_name(f".{LAST_CHECKPOINT}.tmp{os.getpid()}")
    pointer_tmp.write_text(path.name + "\n")
    os.replace(pointer_tmp, pointer)
    return path


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `last_checkpoint` in `output_dir` points at, or None if there is none."""
    pointer = Path(output_dir) / LAST_CHECKPOINT
    if not pointer.is_file():
        return None
    target = Path(output_dir) / pointer.read_text().strip()
    return target if target.is_file() else None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by save_checkpoint (or any torch file of tensors), on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file '{path}' does not exist.", "check the path (MODEL.WEIGHTS or OUTPUT_DIR).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, not a torch file, or holds arbitrary pickled objects
        raise UserError(
            f"cannot read checkpoint '{path}': {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            "point at a .pth file saved by `icd train` or a torchvision state dict (tensors only).",
        ) from None


def resume_from(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None
) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    """Restore model, optimizer and scheduler; return (iteration, extra, RNG states per rank).

    The RNG is returned rather than restored so the caller can restore it at the exact point of the
    training flow where it was captured (after building its data iterator).
    """
    state = load_checkpoint(path)
    if not isinstance(state, dict) or "iteration" not in state or "model" not in state:
        raise UserError(
            f"'{path}' is not a training checkpoint (no iteration / model).",
            "resume only from OUTPUT_DIR's own checkpoints; use MODEL.WEIGHTS for weights.",
        )
    _load_state(unwrap(model), state["model"], str(path), strict=True)
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return int(state["iteration"]), dict(state.get("extra") or {}), list(state.get("rng") or [])


# --- MODEL.WEIGHTS -----------------------------------------------------------------------------
def _map_keys(state: dict[str, torch.Tensor], own_keys: set[str]) -> dict[str, torch.Tensor]:
    """Map a foreign state dict's key names onto the model's.

    Accepted: our adapter's keys ('model.…'), a torchvision detector's keys ('backbone.…', 'head.…',
    'rpn.…', 'roi_heads.…'), an ImageNet ResNet's keys ('conv1.…', 'layer1.…'; 'fc.…' dropped), any
    of these saved from a DDP model ('module.…').
    """
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    if any(k in own_keys for k in state):
        return state
    prefixed = {f"model.{k}": v for k, v in state.items()}
    if any(k in own_keys for k in prefixed):
        return prefixed
    if "conv1.weight" in state:
        return {f"model.backbone.body.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    return state


def _load_state(model: nn.Module, state: dict[str, Any], source: str, strict: bool) -> None:
    own = model.state_dict()
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(
            f"'{source}' holds no state dict of tensors.",
            "point at a .pth file saved by `icd train` or a torchvision state dict.",
        )
    state = _map_keys(state, set(own))
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
        for key, value in state.items()
        if key in own and tuple(value.shape) != tuple(own[key].shape)
    ]
    if mismatched:
        raise UserError(
            f"'{source}' does not fit the model: {len(mismatched)} tensor(s) have other shapes:\n    "
            + "\n    ".join(mismatched),
            "use weights of the same architecture, depth, FPN channels and number of classes "
            "(MODEL.META_ARCHITECTURE, MODEL.BACKBONE.DEPTH, MODEL.FPN.OUT_CHANNELS, MODEL.NUM_CLASSES).",
        )
    # FrozenBN has no num_batches_tracked; a BN checkpoint's counters are meaningless to it.
    unexpected = sorted(k for k in state if k not in own and not k.endswith("num_batches_tracked"))
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    if not any(k in own for k in state):
        raise UserError(
            f"no tensor in '{source}' matches a model parameter name (e.g. '{next(iter(state), '')}').",
            "point at a checkpoint of this kind of detector (ours, torchvision's, or an ImageNet ResNet).",
        )
    if strict and (unexpected or missing):
        raise UserError(
            f"'{source}' does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}.",
            "resume with the config the checkpoint was trained with.",
        )
    if missing or unexpected:
        warnings.warn(
            f"loading '{source}': {len(missing)} model tensor(s) not in the file (kept as initialised), e.g. "
            f"{missing[:3]}; {len(unexpected)} file tensor(s) unused, e.g. {unexpected[:3]}.",
            stacklevel=3,
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load MODEL.WEIGHTS: our checkpoint ({'model': …}), a plain state dict (shapes must match), or a
    detectron2 / AdelaiDet checkpoint (.pkl or .pth; converted all or nothing by detection.interop.d2_checkpoint)."""
    if Path(path).suffix == ".pkl" and Path(path).is_file():
        state = d2_checkpoint.read_pickle(path)
    else:
        state = load_checkpoint(path)
    d2 = d2_checkpoint.from_payload(state, str(path))
    if d2 is not None:
        d2_checkpoint.load_into(unwrap(model), d2)
        return
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    _load_state(unwrap(model), state, str(path), strict=False)
