"""`icd synth`: write the synthetic COCO-format dataset (detection.data.synthetic) to a directory."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from detection.data.synthetic import generate
from detection.engine.commands import run_command


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="icd synth", description="`icd synth`: a deterministic synthetic COCO-format detection dataset.")
    parser.add_argument("--out", required=True, help="output directory (annotations/ and train/, val/ images)")
    parser.add_argument("--train", type=int, default=200, help="number of training images")
    parser.add_argument("--val", type=int, default=50, help="number of validation images")
    parser.add_argument("--size", type=int, default=128, help="image height; widths vary 0.75-1.25x")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    paths: dict[str, str] = {}

    def body() -> None:
        paths.update(generate(args.out, args.train, args.val, args.size, args.seed))

    code = run_command("synth", body)
    if code:
        return code
    print(f"wrote {args.train} train + {args.val} val images to {paths['root']}\n"
          f"  register with: DATASETS.CATALOG.synth_train \"[{paths['train_json']}, {paths['train_images']}]\" "
          f"DATASETS.CATALOG.synth_val \"[{paths['val_json']}, {paths['val_images']}]\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
