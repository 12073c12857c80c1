"""`icd eval`: COCO-evaluate a trained detector on DATASETS.TEST.

icd eval --config-file CFG [--num-gpus N] MODEL.WEIGHTS PATH [KEY VALUE ...]
"""

from __future__ import annotations

import sys

from detection.config import setup_cfg
from detection.engine.commands import default_argument_parser, launch, run_command
from detection.engine.evaluation import evaluate_checkpoint, weights_to_evaluate


def main(argv: list[str] | None = None) -> int:
    parser = default_argument_parser(
        "icd eval",
        "Evaluate a detector with COCO AP on DATASETS.TEST; give the "
        "weights as the override MODEL.WEIGHTS PATH. Results go to OUTPUT_DIR/inference/.",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> None:
        cfg = setup_cfg(args.config_file, args.opts)
        weights_to_evaluate(cfg)  # refused here, before any process starts, when there are none
        launch(evaluate_checkpoint, args.num_gpus, (cfg,), device=cfg.MODEL.DEVICE)

    return run_command("eval", body)


if __name__ == "__main__":
    sys.exit(main())
