"""`icd train`: train a baseline detector (teacher or student) with COCO evaluation, as detectron2's train_net.

icd train --config-file CFG [--resume] [--eval-only] [--num-gpus N] [KEY VALUE ...]
"""

from __future__ import annotations

import sys

from detection.config import CfgNode, setup_cfg
from detection.engine.commands import RESUME_FROM_CHECKPOINT, default_argument_parser, launch, run_command
from detection.engine.evaluation import evaluate_checkpoint
from detection.engine.trainer import build_trainer


def train_or_evaluate(cfg: CfgNode, resume: bool, eval_only: bool) -> dict[str, dict[str, float]]:
    """One process's run: train (resumed or from MODEL.WEIGHTS) then evaluate, or only evaluate."""
    if eval_only:
        return evaluate_checkpoint(cfg, resume=resume)
    return build_trainer(cfg, resume=resume).train()


def main(argv: list[str] | None = None) -> int:
    parser = default_argument_parser(
        "icd train",
        "Train a baseline detector (teacher or student) and evaluate it with COCO AP.",
        resume=RESUME_FROM_CHECKPOINT,
        eval_only=True,
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> None:
        cfg = setup_cfg(args.config_file, args.opts)
        launch(train_or_evaluate, args.num_gpus, (cfg, args.resume, args.eval_only), device=cfg.MODEL.DEVICE)

    return run_command("train", body, interrupted="continue with --resume from the last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
