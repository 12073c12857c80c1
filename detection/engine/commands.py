"""What every `icd` command shares: its argument parser, the per-process set-up, the launcher, the error policy.

detectron2's `engine/defaults.py` is the model (`default_argument_parser`, `default_setup`, `launch`):
`icd train`, `eval`, `dump` and `distill` build their parsers here, set each process up here, and run
their body through `run_command`, so they share flags, seeding and exit codes and never import one
another's helpers.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from cache_format.errors import IcdError, environment_error
from detection import comm
from detection.config import CfgNode, save_config
from detection.data.datasets import CocoIndex, resolve_num_classes, train_index
from detection.engine.launch import launch

__all__ = ["NUM_GPUS_HELP", "default_argument_parser", "default_setup", "launch", "run_command", "seed_all"]

NUM_GPUS_HELP = (
    "number of processes: one per GPU with MODEL.DEVICE cuda (NCCL); on CPU, N gloo processes. "
    "Ignored under torchrun, which starts the processes itself."
)
RESUME_FROM_CHECKPOINT = "continue from OUTPUT_DIR/last_checkpoint (iteration, optimizer, RNG, data order)"


def default_argument_parser(
    prog: str, description: str, *, resume: str | None = None, eval_only: bool = False
) -> argparse.ArgumentParser:
    """`--config-file FILE`, `--num-gpus N` and trailing `KEY VALUE` overrides, plus `--resume` (with the
    given help text) and `--eval-only` where the command has them. Commands add their own flags."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to a YAML config file")
    if resume is not None:
        parser.add_argument("--resume", action="store_true", help=resume)
    if eval_only:
        parser.add_argument(
            "--eval-only",
            action="store_true",
            help="only evaluate MODEL.WEIGHTS (or, with --resume, the last checkpoint)",
        )
    parser.add_argument("--num-gpus", type=int, default=1, metavar="N", help=NUM_GPUS_HELP)
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides as KEY VALUE pairs, e.g. SOLVER.MAX_ITER 100",
    )
    return parser


def seed_all(seed: int) -> None:
    """Seed Python, numpy and torch in this process."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_setup(cfg: CfgNode, *, need_train_index: bool) -> tuple[CfgNode, CocoIndex | None]:
    """Per process: seed it (SEED + rank), set cuDNN, resolve MODEL.NUM_CLASSES, save config.yaml (rank 0).

    Returns the resolved copy of the config and the training dataset's index (loaded when
    `need_train_index`, or when the class count must be read from it).
    """
    seed_all(int(cfg.SEED) + comm.get_rank())
    torch.backends.cudnn.benchmark = bool(cfg.CUDNN_BENCHMARK)
    cfg = cfg.clone()
    index = train_index(cfg) if need_train_index or not cfg.MODEL.NUM_CLASSES else None
    cfg.MODEL.NUM_CLASSES = resolve_num_classes(cfg, index)
    if comm.is_main_process():
        save_config(cfg)
    return cfg, index


def run_command(command: str, body: Callable[[], Any], interrupted: str = "") -> int:
    """Run one `icd <command>`: a user's error prints `icd <command>: error: ...` and returns 2.

    Every error the project raises for bad input derives from IcdError, whichever process raised it
    (spawned ranks re-raise it here, see detection.engine.launch.launch; DataLoader workers hand it to
    the main process, see detection.data.loader). An OSError the machine caused (a full or read-only disk,
    permissions, a file where a directory must be) is the user's to fix too and is reported the same
    way. Ctrl-C returns 130 with `interrupted` as the advice.
    """
    try:
        body()
    except IcdError as exc:
        print(f"icd {command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        error = environment_error(exc)
        if error is None:
            raise
        print(f"icd {command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"icd {command}: interrupted" + (f"; {interrupted}" if interrupted else ""), file=sys.stderr)
        return 130
    return 0
