"""What a process knows of the others: rank, world size, gathers and the device it drives.

Thin wrappers over torch.distributed that also work when it is not initialised (one process), so the
data, model and engine code calls them unconditionally. Starting the processes is detection.engine.launch.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def get_local_rank() -> int:
    """This process's index on its machine (the GPU it drives)."""
    return int(os.environ.get("LOCAL_RANK", get_rank()))


def is_main_process() -> bool:
    return get_rank() == 0


def synchronize() -> None:
    """Barrier across all processes (no-op when single-process)."""
    if get_world_size() > 1:
        dist.barrier()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def device_for_process(device: str) -> torch.device:
    """The torch device this process uses: its own GPU under CUDA, else the CPU."""
    if device.startswith("cuda"):
        return torch.device("cuda", get_local_rank() if get_world_size() > 1 else torch.cuda.current_device())
    return torch.device(device)
