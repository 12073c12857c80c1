"""`icd eval`: COCO-evaluate a trained detector on DATASETS.TEST.

    icd eval --config-file CFG [--num-gpus N] MODEL.WEIGHTS PATH [KEY VALUE ...]
"""
from __future__ import annotations

import argparse
import sys

from detection import distributed as comm
from detection.checkpoint import load_weights
from detection.config import CfgNode, add_config_arguments, setup_cfg
from detection.errors import UserError, run_command
from detection.evaluation import evaluate
from detection.train import NUM_GPUS_HELP, build_model, resolve_num_classes, seed_all


def evaluate_weights(cfg: CfgNode) -> dict[str, dict[str, float]]:
    """Build the configured detector, load MODEL.WEIGHTS and evaluate it (in this process, one of several)."""
    if not cfg.MODEL.WEIGHTS:
        raise UserError("no weights to evaluate: MODEL.WEIGHTS is empty.",
                        "add `MODEL.WEIGHTS /path/to/model_final.pth` to the command line.")
    seed_all(int(cfg.SEED))
    cfg = cfg.clone()
    cfg.MODEL.NUM_CLASSES = resolve_num_classes(cfg)
    model = build_model(cfg, cfg.MODEL.NUM_CLASSES)
    load_weights(model, cfg.MODEL.WEIGHTS)
    return evaluate(cfg, model)


def _worker(cfg: CfgNode) -> None:
    evaluate_weights(cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icd eval", description="Evaluate a detector with COCO AP on DATASETS.TEST; give the weights as the "
        "override MODEL.WEIGHTS PATH. Results go to OUTPUT_DIR/inference/.")
    parser.add_argument("--num-gpus", type=int, default=1, metavar="N", help=NUM_GPUS_HELP)
    return add_config_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> None:
        cfg = setup_cfg(args.config_file, args.opts)
        if not cfg.MODEL.WEIGHTS:
            raise UserError("no weights to evaluate: MODEL.WEIGHTS is empty.",
                            "add `MODEL.WEIGHTS /path/to/model_final.pth` to the command line.")
        comm.launch(_worker, args.num_gpus, (cfg,), device=cfg.MODEL.DEVICE)

    return run_command("eval", body)


if __name__ == "__main__":
    sys.exit(main())
