"""`icd train`: train a baseline detector (teacher or student) with COCO evaluation, as detectron2's train_net.

    icd train --config-file CFG [--resume] [--eval-only] [--num-gpus N] [KEY VALUE ...]
"""
from __future__ import annotations

import argparse
import random
import sys
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from detection import distributed as comm
from detection.augment import AugmentationPlan
from detection.checkpoint import last_checkpoint, load_weights
from detection.config import CfgNode, add_config_arguments, save_config, setup_cfg
from detection.datasets import CocoIndex, DetectionDataset, InfiniteSampler, collate, load_dataset
from detection.engine import LoaderFactory, Trainer
from detection.errors import UserError, run_command
from detection.evaluation import evaluate
from detection.zoo import DetectorAdapter, build_detector

NUM_GPUS_HELP = (
    "number of processes: one per GPU with MODEL.DEVICE cuda (NCCL); on CPU, N gloo processes. "
    "Ignored under torchrun, which starts the processes itself."
)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_index(cfg: Any) -> CocoIndex:
    """The one training dataset's validated index."""
    names = list(cfg.DATASETS.TRAIN)
    if len(names) != 1:
        raise UserError(f"DATASETS.TRAIN must name exactly one dataset, got {names}.",
                        "merge the annotation files into one COCO json and register it in DATASETS.CATALOG.")
    return load_dataset(cfg, names[0])


def resolve_num_classes(cfg: Any, index: CocoIndex | None = None) -> int:
    """K, the number of foreground classes: MODEL.NUM_CLASSES, else the training dataset's categories."""
    k = int(cfg.MODEL.NUM_CLASSES)
    if index is None and k > 0:
        return k
    index = index if index is not None else train_index(cfg)
    if k > 0 and k != index.num_classes:
        raise UserError(
            f"MODEL.NUM_CLASSES is {k} but the training dataset {index.json_path} has {index.num_classes} categories.",
            f"set MODEL.NUM_CLASSES {index.num_classes} (or 0 to take it from the dataset).",
        )
    return index.num_classes


def build_model(cfg: Any, num_classes: int) -> DetectorAdapter:
    """The detector for K = `num_classes` foreground classes on MODEL.DEVICE (randomly initialised)."""
    model = build_detector(cfg, num_classes + 1)
    return model.to(comm.device_for_process(cfg.MODEL.DEVICE))


def batch_stream(dataset: DetectionDataset, sampler: InfiniteSampler, batch_size: int, group_by_aspect: bool,
                 skip_batches: int = 0) -> Iterator[list[Any]]:
    """Item indices of each batch, endlessly; optionally grouping landscape and portrait images.

    Written here because the grouping must be resumable: the stream is a pure function of the sampler,
    so resuming at iteration i replays (index arithmetic only, no image reads) and drops i batches.
    """
    buckets: dict[bool, list[Any]] = {False: [], True: []}
    emitted = 0
    for item in sampler:
        image, _variant = dataset.locate(item)
        group = group_by_aspect and image.width >= image.height
        buckets[group].append(item)
        if len(buckets[group]) == batch_size:
            batch, buckets[group] = buckets[group], []
            emitted += 1
            if emitted > skip_batches:
                yield batch


class _BatchSampler:
    """A DataLoader batch_sampler over `batch_stream` (a re-iterable object, as DataLoader expects)."""

    def __init__(self, **stream_args: Any) -> None:
        self.stream_args = stream_args

    def __iter__(self) -> Iterator[list[Any]]:
        return batch_stream(**self.stream_args)


def build_train_loader(cfg: Any, index: CocoIndex) -> LoaderFactory:
    """A factory start_iter -> DataLoader yielding the batches the uninterrupted run would see from there."""
    world = comm.get_world_size()
    total = int(cfg.SOLVER.IMS_PER_BATCH)
    if total < world or total % world:
        raise UserError(f"SOLVER.IMS_PER_BATCH {total} is not divisible by the {world} processes.",
                        f"use a multiple of {world} (images per batch are split evenly across processes).")
    plan = AugmentationPlan.for_training(cfg)
    dataset = DetectionDataset(index, plan, training=True, variant_sampler=plan.sample_variant,
                               with_masks=bool(cfg.MODEL.MASK_ON))

    def build(start_iter: int) -> DataLoader:
        sampler = InfiniteSampler(len(dataset), seed=int(cfg.SEED), shuffle=True, yield_epoch=True)
        batches = _BatchSampler(dataset=dataset, sampler=sampler, batch_size=total // world,
                                group_by_aspect=bool(cfg.DATALOADER.ASPECT_RATIO_GROUPING), skip_batches=start_iter)
        workers = int(cfg.DATALOADER.NUM_WORKERS)
        return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                          persistent_workers=False, prefetch_factor=2 if workers else None)

    return build


def _prepare(cfg: CfgNode, need_train_index: bool) -> tuple[CfgNode, CocoIndex | None]:
    """Seed this process, resolve MODEL.NUM_CLASSES and save the merged config (rank 0)."""
    seed_all(int(cfg.SEED) + comm.get_rank())
    torch.backends.cudnn.benchmark = bool(cfg.CUDNN_BENCHMARK)
    cfg = cfg.clone()
    index = train_index(cfg) if need_train_index or not cfg.MODEL.NUM_CLASSES else None
    cfg.MODEL.NUM_CLASSES = resolve_num_classes(cfg, index)
    if comm.is_main_process():
        save_config(cfg)
    return cfg, index


def build_trainer(cfg: CfgNode, resume: bool = False) -> Trainer:
    """The Trainer for `cfg` in this process (one of several under DDP), resumed or loaded from MODEL.WEIGHTS."""
    cfg, index = _prepare(cfg, need_train_index=True)
    model = build_model(cfg, cfg.MODEL.NUM_CLASSES)
    return Trainer(cfg, model, build_train_loader(cfg, index), evaluate=lambda m: evaluate(cfg, m), resume=resume)


def train_detector(cfg: CfgNode, resume: bool = False, eval_only: bool = False) -> dict[str, dict[str, float]]:
    """Train (or only evaluate) in this process, which may be one of several; returns the evaluation."""
    if not eval_only:
        return build_trainer(cfg, resume).train()
    cfg, _index = _prepare(cfg, need_train_index=False)
    model = build_model(cfg, cfg.MODEL.NUM_CLASSES)
    checkpoint = last_checkpoint(cfg.OUTPUT_DIR) if resume else None
    weights = str(checkpoint) if checkpoint is not None else cfg.MODEL.WEIGHTS
    if not weights:
        raise UserError("--eval-only needs weights to evaluate.",
                        "give MODEL.WEIGHTS /path/model_final.pth, or --resume with a checkpoint in OUTPUT_DIR.")
    load_weights(model, weights)
    return evaluate(cfg, model)


def _worker(cfg: CfgNode, resume: bool, eval_only: bool) -> None:
    train_detector(cfg, resume=resume, eval_only=eval_only)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icd train", description="Train a baseline detector (teacher or student) "
                                     "and evaluate it with COCO AP.")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT_DIR/last_checkpoint (iteration, optimizer, RNG, data order)")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate MODEL.WEIGHTS (or, with --resume, "
                        "the last checkpoint)")
    parser.add_argument("--num-gpus", type=int, default=1, metavar="N", help=NUM_GPUS_HELP)
    return add_config_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> None:
        cfg = setup_cfg(args.config_file, args.opts)
        comm.launch(_worker, args.num_gpus, (cfg, args.resume, args.eval_only), device=cfg.MODEL.DEVICE)

    return run_command("train", body, interrupted="continue with --resume from the last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
