"""`icd distill`: stage two, train a student with ICD from a teacher cache (or, with --online, a live teacher).

    icd distill --config-file CFG --cache PATH [--online] [--resume] [--eval-only] [--num-gpus N] [KEY VALUE ...]

Everything that can reject the run (dataset, cache compatibility, teacher weights) is checked while the
run is set up, before the first iteration. In cached mode no teacher is built. With --online the teacher
runs live on the same samples: with --cache, the cache's samples, variants and geometry (its features
are ignored) so the run is directly comparable with the cached one; without --cache, the augmentation
plan of the config (the original ICD).
"""

from __future__ import annotations

import sys
from typing import Any

from cache_contract.identity import dataset_mismatch, preprocessing_identity, recorded_plan
from cache_format import CacheReader, check_compatibility
from cache_format.errors import CacheError
from cache_format.state import check_apart
from detection import comm
from detection.config import CfgNode, setup_cfg
from detection.data.augment import AugmentationPlan
from detection.data.datasets import CocoIndex, check_image_files, class_statistics
from detection.data.loader import build_train_loader
from detection.engine.commands import default_argument_parser, default_setup, launch, run_command
from detection.engine.evaluation import evaluate, evaluate_checkpoint
from detection.errors import UserError
from detection.modeling.detector import DetectorAdapter, build_model
from stage2_student_distill.data import (
    CachedTeacherFeatures,
    DistillCollate,
    DistillDataset,
    SampleTable,
    report_skipped,
)
from stage2_student_distill.fit_decoder import load_fitted_decoder
from stage2_student_distill.method.module import ICDModule
from stage2_student_distill.online import OnlineTeacher, build_online_teacher
from stage2_student_distill.signals import report_distill_signals
from stage2_student_distill.trainer import DistillTrainer

OUTPUT_DIR_FIX = "set OUTPUT_DIR to a directory outside the cache (e.g. output/<run name>)"


def distill_levels(cfg: Any, student: DetectorAdapter) -> list[str]:
    """The levels to distil: CACHE.LEVELS when set (a subset of the student's), else ICD's for the student."""
    names = list(cfg.CACHE.LEVELS) or list(student.levels)
    unknown = [name for name in names if name not in student.strides]
    if unknown:
        raise UserError(
            f"CACHE.LEVELS {unknown} are not FPN levels of the student {student.architecture} "
            f"(it has {student.levels})",
            f"choose CACHE.LEVELS from {student.levels}, or leave it empty for ICD's default",
        )
    return names


def student_identity(cfg: Any, student: DetectorAdapter, levels: list[str]) -> dict[str, Any]:
    """What check_compatibility compares: the distilled levels and the preprocessing (as stage one records it)."""
    return {
        "levels": [
            {"name": name, "stride": student.strides[name], "channels": student.out_channels} for name in levels
        ],
        "preprocessing": preprocessing_identity(cfg),
    }


def check_cache_serves(
    reader: CacheReader, cfg: Any, index: CocoIndex, student: DetectorAdapter, levels: list[str], features: bool = True
) -> None:
    """Refuse a cache this student cannot distil from, naming the reason (before any training).

    features=False (--online with a cache): only its samples are used, so its levels and teacher
    weights do not matter, but its preprocessing and dataset still must match.
    """
    check_compatibility(reader.attributes, student_identity(cfg, student, levels if features else []))
    mismatch = dataset_mismatch(reader.attributes, reader.url, index)
    if mismatch:
        raise UserError(
            mismatch, "train the student on the dataset the cache was made from, or dump a cache for this dataset"
        )
    cached_k = reader.attributes.get("num_classes")
    if cached_k is not None and int(cached_k) != index.num_classes:
        raise UserError(
            f"the cache {reader.url} has {cached_k} classes, the training dataset {index.num_classes}",
            "use the dataset the cache was dumped from",
        )
    if features and cfg.DISTILL.INIT_FROM_TEACHER:
        # Read (and checked against their checksums) before training: missing, incomplete or damaged
        # weights are refused here with the fix (`icd dump ... --resume` stores them), never read as zeros.
        reader.teacher_weights()


def check_teacher(teacher: DetectorAdapter, tcfg: Any, cfg: Any, student: DetectorAdapter, levels: list[str]) -> None:
    """--online: the live teacher must offer the student's levels, strides and channels."""
    offered = {
        "levels": [{"name": n, "stride": s, "channels": teacher.out_channels} for n, s in teacher.strides.items()],
        "preprocessing": preprocessing_identity(tcfg),
    }
    check_compatibility(
        offered,
        student_identity(cfg, student, levels),
        source="online teacher",
        fix="choose a teacher (DISTILL.TEACHER) with the student's levels and FPN width",
    )


def require_cache(cache: str | None, online: bool) -> None:
    if not online and not cache:
        raise UserError(
            "cached distillation needs the teacher cache: no --cache was given",
            "pass --cache PATH (written by `icd dump`), or --online to run the teacher live",
        )


def build_distill_trainer(
    cfg: CfgNode, cache: str | None, online: bool = False, resume: bool = False, with_evaluation: bool = True
) -> DistillTrainer:
    """Check everything and build the trainer for this process (one of several under DDP)."""
    if not cfg.DISTILL.ENABLED:
        raise UserError(
            "DISTILL.ENABLED is False: `icd distill` has nothing to distil",
            "set DISTILL.ENABLED True, or train the student alone with `icd train`",
        )
    require_cache(cache, online)
    if cache:  # before config.yaml is written: OUTPUT_DIR's files must not land inside the cache
        check_apart(str(cfg.OUTPUT_DIR), "OUTPUT_DIR", {"cache": cache}, OUTPUT_DIR_FIX, allow=("contains",))
    reader = CacheReader(cache) if cache else None
    cfg, index = default_setup(cfg, need_train_index=True)  # seeds this rank, resolves K, saves config.yaml
    num_classes = int(cfg.MODEL.NUM_CLASSES)

    student = build_model(cfg, num_classes)
    levels = distill_levels(cfg, student)
    if reader is not None:
        check_cache_serves(reader, cfg, index, student, levels, features=not online)
    prior, size_mean, size_std = class_statistics(index)
    icd = ICDModule.from_config(
        cfg,
        num_classes,
        student.out_channels,
        levels=levels,
        strides=student.strides,
        class_prior=prior,
        size_prior_mean=size_mean,
        size_prior_std=size_std,
    )
    if cfg.DISTILL.DECODER_WEIGHTS:  # a decoder fitted from the cache (`icd fit-decoder`), trained on jointly
        load_fitted_decoder(
            icd,
            cfg.DISTILL.DECODER_WEIGHTS,
            cfg,
            levels,
            teacher=reader.attributes.get("teacher") if reader is not None and not online else None,
        )

    teacher = None
    if online:
        device = comm.device_for_process(cfg.MODEL.DEVICE)
        adapter, tcfg = build_online_teacher(cfg, num_classes, device, reader.attributes if reader else None)
        check_teacher(adapter, tcfg, cfg, student, levels)
        teacher = OnlineTeacher(adapter, levels, adapter.strides, student.size_divisibility, amp=bool(cfg.SOLVER.AMP))

    with_masks = bool(cfg.MODEL.MASK_ON)
    if reader is not None:
        plan = recorded_plan(reader.attributes, reader.url)
        table = SampleTable.from_reader(reader, plan.num_variants)
        if not any(table.has_image(image.id) for image in index.training_images()):
            raise CacheError(
                f"no training image of {index.json_path} has a committed sample in {reader.url}",
                "dump the cache from this dataset (`icd dump`), or finish the dump with --resume",
            )
        dataset = DistillDataset(
            index,
            plan,
            table=table,
            cache_url=reader.url,
            levels=levels,
            read_features=not online,
            with_masks=with_masks,
        )
        report_skipped(dataset, reader)
    else:
        dataset = DistillDataset(index, AugmentationPlan.for_training(cfg), with_masks=with_masks)
    check_image_files(dataset.items.images)
    loader = build_train_loader(cfg, dataset, DistillCollate(levels, student.strides, student.size_divisibility))

    teacher_weights = None
    if cfg.DISTILL.INIT_FROM_TEACHER:
        teacher_weights = teacher.fpn_and_head_state_dict if teacher is not None else reader.teacher_weights
    teacher_architecture = (
        teacher.teacher.architecture
        if teacher is not None
        else str((reader.attributes.get("teacher") or {}).get("architecture", ""))
    )
    if comm.is_main_process():
        if teacher is None:
            source = f"the cache {reader.url} ({reader.encoding})"
        else:
            source = f"the live teacher {teacher.teacher.architecture}" + (
                f", samples and geometry from the cache {reader.url}" if reader is not None else ""
            )
        print(
            f"icd distill: {student.architecture} student, levels {', '.join(levels)}, {len(dataset)} training "
            f"images; teacher features from {source}",
            flush=True,
        )
    features = teacher or CachedTeacherFeatures(levels, comm.device_for_process(cfg.MODEL.DEVICE))
    trainer = DistillTrainer(
        cfg,
        student,
        loader,
        icd,
        features,
        teacher_weights=teacher_weights,
        teacher_architecture=teacher_architecture,
        evaluate=(lambda model: evaluate(cfg, model)) if with_evaluation else None,
    )
    trainer.resume_or_load(resume)
    return trainer


def distill(
    cfg: CfgNode, cache: str | None, online: bool, resume: bool, eval_only: bool
) -> dict[str, dict[str, float]]:
    """One process's run: train the student (or with eval_only, only evaluate it); the final COCO metrics."""
    if eval_only:
        return evaluate_checkpoint(cfg, resume=resume)
    trainer = build_distill_trainer(cfg, cache, online=online, resume=resume)
    results = trainer.train()
    if cache and not online and comm.is_main_process():  # what the decoder learnt, from the cached features
        report_distill_signals(trainer.icd, cache, trainer.output_dir, trainer.iteration, int(trainer.cfg.SEED))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = default_argument_parser(
        "icd distill",
        "Train a student detector with ICD from the teacher features cached by `icd dump`, then "
        "evaluate it with COCO AP (printed and saved under OUTPUT_DIR/inference/).",
        resume="continue from OUTPUT_DIR/last_checkpoint (student, ICD modules, both optimizers, RNG, data order)",
        eval_only=True,
    )
    parser.add_argument(
        "--cache",
        default=None,
        metavar="PATH",
        help="the teacher cache (path or URL); with --online only its samples and geometry are used",
    )
    parser.add_argument(
        "--online",
        action="store_true",
        help="run the teacher (DISTILL.TEACHER, defaulting to the cache's) live instead of reading "
        "its features: the original ICD, as a reference",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> None:
        cfg = setup_cfg(args.config_file, args.opts)
        if not args.eval_only:
            require_cache(args.cache, args.online)  # here too: before any rank is spawned
        launch(
            distill, args.num_gpus, (cfg, args.cache, args.online, args.resume, args.eval_only), device=cfg.MODEL.DEVICE
        )

    return run_command("distill", body, interrupted="continue with --resume from the last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
