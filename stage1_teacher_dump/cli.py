"""`icd dump`: stage one, the only place the teacher runs.

    icd dump --config-file CFG --cache PATH [--budget SIZE] [--dry-run] [--resume [--repair]] [--num-gpus N]
             [KEY VALUE ...]

`--resume --repair` is the repair procedure as one command: it reads every committed chunk (as `icd cache
verify` does), rewrites each damaged shard and the teacher weights if damaged, then finishes the cache.
It is part of `icd dump`, not `icd cache`, because only stage one can recompute what was lost: it needs
the teacher, the images and the config (`icd cache` is torch-free and knows no teacher).
"""

from __future__ import annotations

import sys
from typing import Any

from cache_format.budget import format_size, join_size_arguments, parse_size
from cache_format.state import check_apart
from detection import comm
from detection.config import save_config, setup_cfg
from detection.engine.commands import default_argument_parser, launch, run_command, seed_all
from stage1_teacher_dump.dump import DumpSummary, run_dump


def dump(cfg: Any, cache: str, budget: int | None, dry_run: bool, resume: bool, repair: bool = False) -> None:
    """One process's part of the dump (its shards), then the summary on rank 0."""
    seed_all(int(cfg.SEED))
    summary = run_dump(cfg, cache, budget=budget, dry_run=dry_run, resume=resume, repair=repair)
    if comm.is_main_process():
        print(format_summary(summary, budget, dry_run), flush=True)


def format_summary(summary: DumpSummary, budget: int | None, dry_run: bool) -> str:
    lines = []
    if summary.plan_table:
        lines.append(summary.plan_table)
    if dry_run and summary.existing:
        left = summary.num_samples - summary.committed
        lines.append(
            f"dry run: the cache at {summary.cache} exists ({summary.committed}/{summary.num_samples} samples "
            f"committed, encoding {summary.encoding}, {format_size(summary.bytes_on_disk)} on disk); "
            + (
                f"--resume would write the {left} remaining sample(s)"
                if left
                else "--resume would write no samples (it checks the cache and finishes it)"
            )
        )
        return "\n".join(lines)
    if dry_run:
        lines.append(
            f"dry run: would write {summary.num_samples} samples to {summary.cache} "
            f"with encoding {summary.encoding}" + (f" within {format_size(budget)}" if budget else "")
        )
        return "\n".join(lines)
    lines.append(
        f"cache {summary.cache}: {summary.committed}/{summary.num_samples} samples committed "
        f"({summary.written_now} written by this run) in {summary.seconds:.1f} s, encoding {summary.encoding}, "
        f"{format_size(summary.bytes_on_disk)} on disk"
        + (f" (budget {format_size(budget)})" if budget else "")
        + (
            "; already finished: its manifest is kept"
            if summary.manifest_kept
            else "; finished: manifest written"
            if summary.finished
            else ""
        )
    )
    if summary.resumed and not summary.deep_checked and summary.unread_shards:
        lines.append(
            f"not read: the chunks of the {summary.unread_shards} shard(s) committed before this run. The "
            f"resume checked the metadata, records and teacher weights and confirmed every object's size "
            f"({summary.sizes_from}), so a lost or truncated object would have been rewritten; a byte "
            "flipped inside a chunk is found only by reading it: `--resume --repair` (or `icd cache "
            "verify`) does"
        )
    if summary.skipped:
        lines.append(f"{len(summary.skipped)} unreadable image(s) skipped (CACHE.SKIP_UNREADABLE):")
        lines += [f"  {item}" for item in summary.skipped]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = default_argument_parser(
        "icd dump",
        "Run the frozen teacher once over every (image, augmentation variant) of DATASETS.TRAIN and "
        "write its FPN features and GT instances to a zarr cache that stage two streams.",
        resume="continue an interrupted dump from its committed samples (same config required)",
    )
    parser.add_argument(
        "--cache", required=True, metavar="PATH", help="cache location: a path, file:// or memory:// URL"
    )
    parser.add_argument(
        "--budget",
        default=None,
        metavar="SIZE",
        help="disk budget, e.g. 200GB, 1.5TiB, 500M: the planner measures every encoding on "
        "calibration samples and picks the most faithful that fits (CACHE.ENCODING auto), or "
        "checks the configured encoding fits; refuses before the full run if nothing fits",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (encoding, bytes/sample, projected total, fidelity) and exit",
    )
    parser.add_argument(
        "--repair",
        action="store_true",
        help="with --resume (implied): first read every committed chunk, as `icd cache verify` does, "
        "then rewrite the damaged shards and teacher weights and finish the cache",
    )
    args = parser.parse_args(join_size_arguments(sys.argv[1:] if argv is None else argv))

    def body() -> None:
        cfg = setup_cfg(args.config_file, args.opts)
        budget = parse_size(args.budget) if args.budget is not None else None
        # before config.yaml is written: OUTPUT_DIR's files must not land inside the cache
        check_apart(
            str(cfg.OUTPUT_DIR),
            "OUTPUT_DIR",
            {"cache": args.cache},
            "set OUTPUT_DIR to a directory outside the cache",
            allow=("contains",),
        )
        if not args.dry_run:
            save_config(cfg)
        launch(
            dump,
            args.num_gpus,
            (cfg, args.cache, budget, args.dry_run, args.resume, args.repair),
            device=cfg.MODEL.DEVICE,
        )

    return run_command("dump", body, interrupted="committed samples are kept - rerun with --resume")


if __name__ == "__main__":
    sys.exit(main())
