"""Stage one as one straight flow: plan the cache, open it, run the teacher over owned shards, write.

    samples (image x variant) -> identity + levels -> encoding (config or budget plan) -> create/resume
    -> DataLoader (decode + augment in workers) -> teacher forward -> background writer -> commit

Each process owns whole shards (shard s belongs to rank s % world_size) and batches never cross a
shard, so the cache is the same whatever the number of processes or interruptions (stage1.batching).
A dump that writes everything it will finishes the cache: rank 0 writes its manifest last
(cache_format.integrity). `--resume` starts an interrupted creation over, or checks and repairs the
existing cache before writing what is left (stage1_teacher_dump.resume).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cache_contract.geometry import level_size, padded_shape
from cache_contract.identity import identity_attributes
from cache_contract.teacher import fpn_and_head_weights, load_teacher, sample_features
from cache_format import CacheReader, CacheWriter, LevelSpec, SampleMeta
from cache_format import state as store_states
from cache_format.budget import format_size
from cache_format.budget import plan as plan_budget
from cache_format.integrity import finish_cache
from cache_format.state import check_apart
from cache_format.store import usage
from detection import comm
from detection.data.augment import AugmentationPlan
from detection.data.datasets import resolve_dataset, train_index
from detection.errors import UserError
from detection.modeling.detector import DetectorAdapter
from stage1_teacher_dump.background_writer import BackgroundWriter
from stage1_teacher_dump.batching import shard_batches
from stage1_teacher_dump.resume import ResumeCheck, check_resumable, prepare_resume
from stage1_teacher_dump.samples import DumpDataset, collate_records, enumerate_samples

# Fault injection for the crash-safety tests: SIGKILL this process after N samples were handed to the
# cache writer - a real `kill -9` at a chosen point, reproducible unlike a timer in the test.
KILL_AFTER_ENV = "ICD_DUMP_FAULT_KILL_AFTER"


@dataclass
class DumpSummary:
    """What a dump did, for the final message and for tests."""

    cache: str
    encoding: str
    num_samples: int
    written_now: int
    committed: int
    bytes_on_disk: int
    seconds: float
    skipped: list[str] = field(default_factory=list)
    plan_table: str = ""
    existing: bool = False  # dry run on an existing cache: `committed` is what it holds
    finished: bool = False  # the manifest was written: the cache is complete
    repairs: list[str] = field(default_factory=list)
    resumed: bool = False  # an existing cache was continued
    deep_checked: bool = False  # ... after reading every committed chunk (--repair, or damage found)
    manifest_kept: bool = False  # the cache was already finished and intact: nothing was rewritten
    unread_shards: int = 0  # committed shards the resume kept without reading their chunks
    sizes_from: str = ""  # ... whose objects' sizes it confirmed from this


def check_apart_from_sources(cfg: Any, cache: str) -> None:
    """Refuse a cache location that is, contains or lies inside what the dump reads (the training images,
    their annotation file, the teacher checkpoint): an interrupted creation there is started over, which
    clears the location, and a cache written into a dataset mixes with it."""
    sources = {"MODEL.WEIGHTS": str(cfg.MODEL.WEIGHTS)}
    for name in cfg.DATASETS.TRAIN:
        json_path, image_root = resolve_dataset(cfg, name)
        sources[f"annotation file of {name}"] = json_path
        sources[f"image directory of {name}"] = image_root
    check_apart(cache, "cache", sources, "choose a --cache path outside the dataset and the teacher checkpoint")


def cache_levels(cfg: Any, teacher: DetectorAdapter, samples: list) -> list[LevelSpec]:
    """The levels to keep (CACHE.LEVELS, default: ICD's for the architecture) sized for the largest sample."""
    names = list(cfg.CACHE.LEVELS) or list(teacher.levels)
    unknown = [name for name in names if name not in teacher.strides]
    if unknown:
        raise UserError(
            f"CACHE.LEVELS {unknown} are not FPN levels of {teacher.architecture} (it has {teacher.levels})",
            f"choose CACHE.LEVELS from {teacher.levels}, or leave it empty for ICD's default",
        )
    max_h = max(p.resized_h for _, p in samples)
    max_w = max(p.resized_w for _, p in samples)
    strides = teacher.strides
    return [
        LevelSpec(name, strides[name], teacher.out_channels, *level_size(max_h, max_w, strides[name])) for name in names
    ]


def calibration_features(
    teacher: DetectorAdapter, dataset: DumpDataset, count: int, levels: list[LevelSpec], amp: bool
) -> list[dict[str, np.ndarray]]:
    """Teacher features of the first `count` readable samples: the budget planner's measurement set."""
    calib: list[dict[str, np.ndarray]] = []
    for index in range(len(dataset)):
        if len(calib) >= count:
            break
        record = dataset[index]
        if "error" in record:
            continue
        (features,) = sample_features(teacher, [record["image"]], [lv.name for lv in levels], amp)
        calib.append({name: to_numpy(feature) for name, feature in features.items()})
    return calib


def to_numpy(feature: Any) -> np.ndarray:
    """A feature tensor as the float32 numpy array the cache writer takes."""
    return feature.detach().to("cpu", dtype=torch.float32).contiguous().numpy()


def feature_budget(budget: int | None, reserved: int, upper_bound: int = 0) -> int | None:
    """What the features may use of `budget` once the teacher-weights blob (`reserved` bytes) is stored.

    Checked before calibration runs the teacher; `upper_bound` (int8_upper_bound) lets the refusal say
    a total budget that would fit.
    """
    if budget is None:
        return None
    if budget <= reserved:
        total = (
            f"; a total --budget of {format_size(reserved + upper_bound, round_up=True)} fits (the weights + "
            f"at most {format_size(upper_bound, round_up=True)} of int8 features)"
            if upper_bound
            else ""
        )
        raise UserError(
            f"the budget {format_size(budget)} does not even hold the teacher's FPN + head weights "
            f"({format_size(reserved)}), which every cache stores for DISTILL.INIT_FROM_TEACHER{total}",
            "raise --budget (`--dry-run` without --budget measures every encoding's total)",
        )
    return budget - reserved


def int8_upper_bound(samples: list, levels: list[LevelSpec]) -> int:
    """Bytes the smallest encoding (int8) needs at most: one byte per value uncompressed, plus its scales
    and the records, with 5% for indexes and metadata. A budget this large always fits int8."""
    per_level = sum(
        lv.channels * int(np.prod(level_size(p.resized_h, p.resized_w, lv.stride))) + 8 * lv.channels
        for _, p in samples
        for lv in levels
    )
    records = len(samples) * 8 * (10 + len(levels))
    return int((per_level + records) * 1.05) + 64 * 1024


def choose_encoding(
    cfg: Any,
    teacher: DetectorAdapter,
    dataset: DumpDataset,
    levels: list[LevelSpec],
    budget: int | None,
    dry_run: bool,
    reserved: int = 0,
) -> tuple[str, str, str]:
    """(encoding, compressor, plan table): the configured ones, or the planner's choice under `budget`.

    With a budget (or --dry-run) the planner measures real teacher features of the first samples, so a
    cache that cannot fit is refused before the full run spends any GPU time. `reserved` bytes of the
    budget (the teacher weights) are not available to the features.
    """
    encoding, compressor = str(cfg.CACHE.ENCODING), str(cfg.CACHE.COMPRESSOR)
    if encoding == "auto" and budget is None:
        raise UserError(
            "CACHE.ENCODING auto lets the budget planner choose, but no --budget was given",
            "pass --budget SIZE (e.g. --budget 200GB) or set CACHE.ENCODING to fp32/fp16/bf16/int8",
        )
    if budget is None and not dry_run:
        return encoding, compressor, ""
    # Before the teacher runs: a budget that cannot even hold the teacher weights is refused at once.
    available = feature_budget(budget, reserved, int8_upper_bound(dataset.samples, levels))
    calib = calibration_features(teacher, dataset, int(cfg.CACHE.CALIBRATION_SAMPLES), levels, bool(cfg.SOLVER.AMP))
    if not calib:
        raise UserError("no readable image to calibrate the budget planner on", "check the training images")
    candidates = None if encoding == "auto" else [(encoding, compressor)]
    result = plan_budget(
        calib,
        num_samples=len(dataset),
        budget_bytes=available if available is not None else 2**62,
        candidates=candidates,
        levels=levels,
        compressor=compressor,
        shard_samples=int(cfg.CACHE.SHARD_SAMPLES),
        tile=int(cfg.CACHE.TILE),
        reserved_bytes=reserved,
    )
    note = (
        f"\n(budget {format_size(budget)} = {format_size(available)} for features + {format_size(reserved)} "
        "teacher weights)"
        if budget is not None
        else ""
    )
    return result.choice.encoding, result.choice.compressor, result.table() + note


def dump_loader(
    cfg: Any,
    dataset: DumpDataset,
    samples: Sequence[Any],
    todo: list[int],
    size_divisibility: int,
    device: torch.device,
) -> DataLoader:
    """The dump's batches of `todo` (shard by shard, CACHE.BATCH_SIZE of one padded shape) as a DataLoader."""
    shapes = {i: padded_shape(samples[i][1].resized_h, samples[i][1].resized_w, size_divisibility) for i in todo}
    batches = shard_batches(todo, shapes, int(cfg.CACHE.SHARD_SAMPLES), int(cfg.CACHE.BATCH_SIZE))
    workers = int(cfg.DATALOADER.NUM_WORKERS)
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate_records,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers else None,
    )


def run_dump(
    cfg: Any, cache: str, budget: int | None = None, dry_run: bool = False, resume: bool = False, repair: bool = False
) -> DumpSummary:
    """Dump the teacher's features of every (image, variant) of DATASETS.TRAIN into `cache`.

    `repair` (implies `resume`) reads every committed chunk before resuming and rewrites damaged shards.
    """
    start = time.perf_counter()
    resume = resume or repair
    rank, world = comm.get_rank(), comm.get_world_size()
    state = store_states.store_state(cache)  # first: a path that cannot be a cache fails before any work
    if state == store_states.OTHER:
        raise UserError(
            f"{cache} holds something that is not an ICD teacher cache; stage one never writes into it",
            "choose a new --cache path",
        )
    exists = state == store_states.CACHE
    if exists and not resume and not dry_run:
        raise UserError(
            f"a cache already exists at {cache}; stage one never overwrites one silently",
            "pass --resume to continue it, or choose a new --cache path (or delete the old one)",
        )
    if resume and state == store_states.ABSENT:
        raise UserError(f"--resume was given but there is no cache at {cache}", "drop --resume to start a new cache")
    device = comm.device_for_process(cfg.MODEL.DEVICE)
    amp = bool(cfg.SOLVER.AMP)
    index = train_index(cfg)
    check_apart_from_sources(cfg, cache)
    plan = AugmentationPlan.for_training(cfg)
    samples = enumerate_samples(index, plan)
    empty = len(index.images) - len(index.training_images())
    if empty and rank == 0:
        print(
            f"icd dump: {empty} of {len(index.images)} training image(s) have no (non-crowd) annotations and are "
            "not cached: stage two skips them, as `icd train` does",
            flush=True,
        )
    dataset = DumpDataset(samples)
    teacher = load_teacher(cfg, index.num_classes, device)
    levels = cache_levels(cfg, teacher, samples)
    attributes = identity_attributes(cfg, index, plan)

    plan_table = ""
    weights = fpn_and_head_weights(teacher)
    reserved = sum(int(value.nbytes) for value in weights.values())  # stored compressed: an upper bound
    if exists:
        encoding = check_resumable(cache, attributes, cfg, levels, len(samples))
        if dry_run:
            committed = int(np.count_nonzero(CacheReader(cache, check_manifest=False).committed()))
            return DumpSummary(
                cache, encoding, len(samples), 0, committed, usage(cache)[1], time.perf_counter() - start, existing=True
            )
    else:
        choice: tuple[str, str, str] | None = None
        if rank == 0:
            choice = choose_encoding(cfg, teacher, dataset, levels, budget, dry_run, reserved)
        encoding, compressor, plan_table = comm.broadcast_object(choice)
    if dry_run:
        return DumpSummary(cache, encoding, len(samples), 0, 0, 0, time.perf_counter() - start, plan_table=plan_table)

    check = ResumeCheck()
    if rank == 0:
        if not exists:
            if state == store_states.CREATING:
                print(f"icd dump: the creation of the cache at {cache} was interrupted; starting it over", flush=True)
            writer = CacheWriter.create(
                cache,
                num_samples=len(samples),
                levels=levels,
                encoding=encoding,
                compressor=compressor,
                attributes=attributes,
                shard_samples=int(cfg.CACHE.SHARD_SAMPLES),
                tile=int(cfg.CACHE.TILE),
                overwrite=state == store_states.CREATING,
            )
            writer.put_teacher_weights(weights)
            writer.close()
        else:
            check = prepare_resume(cache, weights, deep=repair)
            for line in check.notes:
                print(f"icd dump: {line}", flush=True)
    check = comm.broadcast_object(check)

    writer = CacheWriter.open(cache, rank=rank, world_size=world)
    todo = writer.uncommitted_owned_samples()
    loader = dump_loader(cfg, dataset, samples, todo, teacher.size_divisibility, device)
    owned_total = len(writer.owned_samples())
    available = feature_budget(budget, reserved)
    budget_share = None if available is None else available * owned_total / max(1, len(samples))

    skipped: list[str] = []
    written = 0
    tracker = WriteTracker(writer, todo)
    background = BackgroundWriter(tracker.write)
    progress = tqdm(total=len(todo), unit="img", desc=f"dump {encoding}", disable=rank != 0, dynamic_ncols=True)
    try:
        for records in loader:
            readable = []
            for record in records:
                if "error" in record:
                    if not cfg.CACHE.SKIP_UNREADABLE:
                        raise record["error"]
                    skipped.append(f"{record['file_name']}: {record['error'].problem}")
                    tqdm.write(f"icd dump: skipping unreadable image {record['file_name']} (CACHE.SKIP_UNREADABLE)")
                else:
                    readable.append(record)
            if readable:
                per_sample = sample_features(teacher, [r["image"] for r in readable], [lv.name for lv in levels], amp)
                for record, features in zip(readable, per_sample):
                    p = record["params"]
                    meta = SampleMeta(
                        image_id=p.image_id,
                        variant=p.variant,
                        scale=p.scale,
                        flip=p.flip,
                        resized_h=p.resized_h,
                        resized_w=p.resized_w,
                    )
                    arrays = {name: to_numpy(feature) for name, feature in features.items()}
                    background.submit((record["index"], arrays, meta, record["boxes"], record["classes"]))
                    written += 1
            progress.update(len(records))
            check_budget(tracker, budget_share, owned_total, progress, cache)
        background.close()
        writer.close()
    except OSError as exc:
        _abandon(background, progress)
        if exc.errno == errno.ENOSPC:
            raise UserError(
                f"the disk holding {cache} is full; committed samples are kept",
                "free space (or move the cache), then rerun the same command with --resume",
            ) from None
        raise
    except BaseException:
        _abandon(background, progress)
        raise
    progress.close()
    if skipped and rank == 0:
        _record_skipped(cfg, skipped)
    comm.synchronize()
    # Every rank wrote all it will: the manifest, written last, says the cache is complete. A finished
    # cache found intact that nothing was written to keeps its manifest (any write would have withdrawn it).
    kept = False
    if rank == 0:
        kept = check.finished and CacheReader(cache).finished
        if not kept:
            finish_cache(cache)
    kept = comm.broadcast_object(kept)
    committed = int(np.count_nonzero(CacheReader(cache).committed()))
    return DumpSummary(
        cache,
        encoding,
        len(samples),
        written,
        committed,
        usage(cache)[1],
        time.perf_counter() - start,
        skipped=comm_gather_skipped(skipped),
        plan_table=plan_table,
        finished=True,
        repairs=check.notes,
        resumed=exists,
        deep_checked=repair or check.deep,
        manifest_kept=kept,
        unread_shards=check.unread_shards,
        sizes_from=check.sizes_from,
    )


class WriteTracker:
    """Counts samples whose shard has been written, so bytes/sample is measured on what is on disk."""

    def __init__(self, writer: CacheWriter, todo: list[int]) -> None:
        self.writer = writer
        self.pending_per_shard: dict[int, int] = {}
        for index in todo:
            shard = writer.layout.shard_of(index)
            self.pending_per_shard[shard] = self.pending_per_shard.get(shard, 0) + 1
        self.written_shards: set[int] = set()
        self.samples_on_disk = 0
        self.handed_over = 0
        self.kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)

    def write(self, item: tuple) -> None:
        index = item[0]
        self.writer.write_sample(*item)
        self.handed_over += 1
        if self.kill_after and self.handed_over >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        shard = self.writer.layout.shard_of(index)
        if shard not in self.written_shards and self.writer.is_committed(index):
            self.written_shards.add(shard)
            self.samples_on_disk += self.pending_per_shard.get(shard, 0)


def check_budget(tracker: WriteTracker, budget_share: float | None, total: int, progress: tqdm, cache: str) -> None:
    """Show bytes written and the projection; stop cleanly (resumable) if the budget would be exceeded."""
    done_bytes = tracker.writer.bytes_written
    if tracker.samples_on_disk == 0 or done_bytes == 0:
        return
    per_sample = done_bytes / tracker.samples_on_disk
    projected = per_sample * max(total, 1)
    progress.set_postfix_str(
        f"{format_size(done_bytes)} written, projected {format_size(projected)}"
        + (f" / budget {format_size(budget_share)}" if budget_share else "")
    )
    if budget_share is not None and projected > budget_share:
        raise UserError(
            f"the cache at {cache} would exceed its budget: at {format_size(per_sample)}/sample the projected "
            f"total is {format_size(projected)} > {format_size(budget_share)} for this process; the committed "
            "samples are kept",
            "raise --budget, or repack to a smaller encoding (`icd cache repack SRC DST --encoding int8`), "
            "then rerun with --resume",
        )


def _abandon(background: BackgroundWriter, progress: tqdm) -> None:
    """Stop writing after an error: committed samples stay, the uncommitted rest is redone on resume."""
    progress.close()
    # The writer thread may fail again on the same cause (e.g. the full disk); the original error is the
    # one the user needs to see, so a second one from closing is dropped.
    with contextlib.suppress(Exception):
        background.close()


def _record_skipped(cfg: Any, skipped: list[str]) -> None:
    out = Path(cfg.OUTPUT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    (out / "skipped_images.json").write_text(json.dumps(skipped, indent=2))


def comm_gather_skipped(skipped: list[str]) -> list[str]:
    return [item for part in comm.all_gather(skipped) for item in part]
