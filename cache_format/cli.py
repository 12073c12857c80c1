"""`icd cache {inspect,verify,plan,repack}`: look at, check, size and re-encode a teacher cache.

Exit codes: 0 success; 1 `verify` found damage or an unfinished cache; 2 bad input (not a cache, newer version,
truncated store, bad budget, budget too small, ...), with a message naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from cache_format.budget import DEFAULT_CANDIDATES, SIZE_HELP, format_size, join_size_arguments, parse_size, plan
from cache_format.compressors import COMPRESSOR_HELP
from cache_format.encodings import ENCODING_HELP
from cache_format.errors import CacheError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="icd cache", description="Inspect, verify, plan and repack a teacher cache.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{inspect,verify,plan,repack}")

    s = sub.add_parser("inspect", help="identity, levels, encoding, samples, bytes on disk, compression ratio")
    s.add_argument("path", help="cache path or URL (file://, memory://, s3://...)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")

    s = sub.add_parser(
        "verify",
        help="check the cache is whole (its manifest) and read every committed chunk "
        "in parallel; name each damaged object",
    )
    s.add_argument("path")
    s.add_argument(
        "--workers", type=int, default=None, help="dask threads (default: one per core; 16 for an object store)"
    )
    s.add_argument(
        "--no-manifest",
        action="store_true",
        help="accept a cache without a manifest (an unfinished dump, or written before format 1.1) and "
        "check only its committed samples",
    )

    s = sub.add_parser("plan", help="measure candidate encodings on calibration samples against a budget")
    s.add_argument("--calib", required=True, help="an existing cache whose first committed samples calibrate")
    s.add_argument("--samples", type=int, required=True, help="number of samples the new cache will hold")
    s.add_argument("--budget", required=True, help=f"disk budget: {SIZE_HELP}")
    s.add_argument("--calib-samples", type=int, default=16, help="how many calibration samples to use (16)")
    s.add_argument(
        "--candidates",
        default=",".join(DEFAULT_CANDIDATES),
        help="comma-separated encodings, each optionally '@compressor' (default: %(default)s)",
    )
    s.add_argument(
        "--compressor", default=None, help="compressor for candidates without '@' (default: the calibration cache's)"
    )
    s.add_argument("--json", action="store_true", help="also print the plan as JSON")

    s = sub.add_parser("repack", help="re-encode a cache (e.g. fp16 -> int8), preserving identity and samples")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--encoding", required=True, help=ENCODING_HELP)
    s.add_argument("--compressor", default=None, help=f"{COMPRESSOR_HELP} (default: the source's)")
    s.add_argument(
        "--workers", type=int, default=None, help="dask threads (default: one per core; 16 for an object store)"
    )
    s.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    return p


def _inspect(args: argparse.Namespace) -> int:
    from cache_format.summary import format_summary, summarize

    info = summarize(args.path)
    print(json.dumps(info, indent=2, sort_keys=True) if args.json else format_summary(info))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from cache_format.verify import verify_cache

    if args.workers is not None and args.workers < 1:
        raise CacheError(f"--workers {args.workers} must be >= 1", "pass a positive thread count")
    report = verify_cache(args.path, workers=args.workers, require_manifest=not args.no_manifest)
    print(report.summary())
    return 0 if report.ok else 1


def _plan(args: argparse.Namespace) -> int:
    from cache_format.reader import CacheReader

    budget = parse_size(args.budget)
    if args.samples < 1:
        raise CacheError(f"--samples {args.samples} must be >= 1", "pass the number of samples to cache")
    if args.calib_samples < 1:
        raise CacheError(f"--calib-samples {args.calib_samples} must be >= 1", "use a few dozen samples")
    reader = CacheReader(args.calib)
    indices = [int(i) for i in reader.committed().nonzero()[0][: args.calib_samples]]
    if not indices:
        raise CacheError(
            f"calibration cache {args.calib} has no committed samples",
            "calibrate from a cache with at least one written sample",
        )
    samples = [reader.read_sample(i) for i in indices]
    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    result = plan(
        [s.features for s in samples],
        args.samples,
        budget,
        candidates,
        levels=reader.levels,
        metas=[s.meta for s in samples],
        compressor=args.compressor or reader.compressor,
        shard_samples=reader.layout.shard_samples,
        tile=reader.layout.tile,
    )
    print(result.table())
    if reader.encoding != "fp32":
        print(
            f"note: the calibration cache is {reader.encoding}: its values are already rounded, so encodings "
            f"at least as precise measure as lossless (an fp32 calibration cache gives true fidelities)"
        )
    assert result.choice is not None
    print(
        f"choice: {result.choice.label} - {format_size(result.choice.projected_bytes)} for {args.samples} "
        f"samples, worst-level relative RMSE {result.choice.worst_rel_rmse:.2e}"
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    return 0


def _repack(args: argparse.Namespace) -> int:
    from cache_format.repack import repack

    res = repack(args.src, args.dst, args.encoding, args.compressor, workers=args.workers, overwrite=args.overwrite)
    print(
        f"repacked {res.samples} committed samples {res.src} -> {res.dst} as {res.encoding}@{res.compressor} "
        f"({format_size(res.bytes_written)} of sample data written)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(join_size_arguments(argv))
    except SystemExit as exc:  # argparse already printed usage / help
        return int(exc.code or 0)
    handler = {"inspect": _inspect, "verify": _verify, "plan": _plan, "repack": _repack}[args.command]
    try:
        return handler(args)
    except CacheError as exc:
        print(f"icd cache {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
