"""Multi-process training: `--num-gpus N` spawns N local processes; torchrun is honoured as is.

On a CUDA machine each process drives one GPU and talks NCCL; on CPU, `--num-gpus N` means N CPU
processes talking gloo (the same code path, so 2-process training is testable without a GPU).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cache_format.errors import IcdError, environment_error
from detection.comm import get_local_rank, is_initialized
from detection.errors import UserError

_TIMEOUT = timedelta(minutes=30)


def _backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def _check_device(device: str, num_processes: int) -> None:
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(
                f"MODEL.DEVICE is '{device}' but CUDA is not available on this machine.",
                "set MODEL.DEVICE cpu, or run on a machine with a GPU.",
            )
        if num_processes > torch.cuda.device_count():
            raise UserError(
                f"--num-gpus {num_processes} asks for more GPUs than this machine has ({torch.cuda.device_count()}).",
                f"use --num-gpus {torch.cuda.device_count()} or fewer.",
            )
    elif not device.startswith("cpu"):
        raise UserError(f"MODEL.DEVICE '{device}' is not supported.", "use cpu or cuda.")


def _worker(
    local_rank: int,
    main_fn: Callable[..., Any],
    world_size: int,
    port: int,
    device: str,
    args: tuple,
    errors: Any,
) -> None:
    os.environ["LOCAL_RANK"] = str(local_rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        _backend(device),
        init_method=f"tcp://127.0.0.1:{port}",
        rank=local_rank,
        world_size=world_size,
        timeout=_TIMEOUT,
    )
    try:
        main_fn(*args)
    except (IcdError, OSError) as exc:
        # Carry the user's error itself to the parent so the CLI prints it and exits 2 (not a traceback);
        # a full or read-only disk is the user's to fix as well (cache_format.errors.environment_error).
        error = exc if isinstance(exc, IcdError) else environment_error(exc)
        if error is None:
            raise
        errors.put(error)
        raise SystemExit(2) from None
    finally:
        dist.destroy_process_group()


def launch(main_fn: Callable[..., Any], num_gpus: int, args: tuple = (), device: str = "cpu") -> None:
    """Run `main_fn(*args)` in `num_gpus` processes (one per GPU on CUDA, gloo CPU processes otherwise).

    Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in the environment) the
    process group comes from the environment and `num_gpus` is ignored: torchrun already started one
    process per GPU. A user's error (IcdError) raised in a spawned worker is re-raised here, itself.
    """
    if num_gpus < 1:
        raise UserError(f"--num-gpus {num_gpus} must be at least 1.", "use --num-gpus 1 or more.")
    if launched_by_torchrun():
        _check_device(device, 1)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_initialized():
            if device.startswith("cuda"):
                torch.cuda.set_device(get_local_rank())
            dist.init_process_group(_backend(device), init_method="env://", timeout=_TIMEOUT)
        try:
            main_fn(*args)
        finally:
            if is_initialized():
                dist.destroy_process_group()
        return
    _check_device(device, num_gpus)
    if num_gpus == 1:
        main_fn(*args)
        return
    errors = mp.get_context("spawn").SimpleQueue()
    try:
        mp.spawn(_worker, args=(main_fn, num_gpus, _free_port(), device, args, errors), nprocs=num_gpus, join=True)
    except mp.ProcessExitedException:
        if not errors.empty():
            raise errors.get() from None
        raise
