"""`icd synth`: write the synthetic COCO-format dataset (detection.data.synthetic) to a directory."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from detection.data.synthetic import ALL_CATEGORIES, CATEGORIES, MAX_HIDDEN, Difficulty, generate
from detection.engine.commands import run_command


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="icd synth", description="`icd synth`: a deterministic synthetic COCO-format detection dataset."
    )
    parser.add_argument("--out", required=True, help="output directory (annotations/ and train/, val/ images)")
    parser.add_argument("--train", type=int, default=200, help="number of training images")
    parser.add_argument("--val", type=int, default=50, help="number of validation images")
    parser.add_argument("--size", type=int, default=128, help="image height; widths vary 0.75-1.25x")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    hard = parser.add_argument_group("difficulty (defaults: the original dataset)")
    hard.add_argument(
        "--classes",
        type=int,
        default=len(CATEGORIES),
        help=f"shape classes, 1-{len(ALL_CATEGORIES)}: " + ", ".join(c["name"] for c in ALL_CATEGORIES),
    )
    hard.add_argument(
        "--max-objects", type=int, default=None, help="shapes tried per image (default max(3, size // 24))"
    )
    hard.add_argument(
        "--extent",
        type=float,
        nargs=2,
        default=(0.18, 0.5),
        metavar=("LO", "HI"),
        help="shape diameters, fractions of the shorter image side (default 0.18 0.5)",
    )
    hard.add_argument(
        "--max-hidden",
        type=float,
        default=MAX_HIDDEN,
        help=f"largest hidden share of a shape: occlusion (default {MAX_HIDDEN})",
    )
    hard.add_argument(
        "--clutter", type=int, default=0, help="unannotated distractor blobs per image, up to this many (default 0)"
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    paths: dict[str, str] = {}

    def body() -> None:
        difficulty = Difficulty(
            args.classes, args.max_objects, args.extent[0], args.extent[1], args.max_hidden, args.clutter
        )
        paths.update(generate(args.out, args.train, args.val, args.size, args.seed, difficulty))

    code = run_command("synth", body)
    if code:
        return code
    print(
        f"wrote {args.train} train + {args.val} val images to {paths['root']}\n"
        f'  register with: DATASETS.CATALOG.synth_train "[{paths["train_json"]}, {paths["train_images"]}]" '
        f'DATASETS.CATALOG.synth_val "[{paths["val_json"]}, {paths["val_images"]}]"'
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
