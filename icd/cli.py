"""The `icd` console script: one entry point, one subcommand per job.

Subcommands are imported lazily so that `icd cache ...` never imports torch models and `icd --help`
is instant.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help). Each module exposes `main(argv: list[str]) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("detection.engine.synth_cli", "generate the synthetic COCO-format dataset"),
    "train": ("detection.engine.train_cli", "train a baseline detector (teacher or student)"),
    "eval": ("detection.engine.eval_cli", "evaluate a detector with COCO AP"),
    "cache": ("cache_format.cli", "inspect / verify / plan / repack a teacher cache"),
    "dump": ("stage1_teacher_dump.cli", "stage one: dump the teacher's FPN features to a cache"),
    "fit-decoder": ("stage2_student_distill.fit_decoder", "fit ICD's decoder from a cache, once for all students"),
    "distill": ("stage2_student_distill.cli", "stage two: train a student with ICD from a cache"),
}


def _usage() -> str:
    lines = ["usage: icd <command> [args...]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `icd <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"icd: unknown command '{name}'.\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
