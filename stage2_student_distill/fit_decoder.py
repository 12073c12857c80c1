"""`icd fit-decoder`: fit ICD's decoder once per teacher cache, from the cache alone, before any student.

    icd fit-decoder --config-file CFG --cache PATH [--resume] [KEY VALUE ...]

Why this exists: the decoder (query encoder + instance-conditional decoder + auxiliary predictor) is
trained only by the auxiliary identification/localisation task, which reads nothing but the teacher's
features and the ground truth, both in the cache. So it can be fitted once per cache and shared by every
student distilled from it. `icd distill` loads the result with DISTILL.DECODER_WEIGHTS and keeps
training it jointly with the student, as the paper does; without that key, joint training from scratch
(the paper) is unchanged. A short student schedule then starts from a decoder whose attention already
separates instances (docs/METHOD.md, section 9.4).

The config is the student's distillation config: DATASETS.TRAIN (class and box-size priors of the fake
queries), the DISTILL architecture keys, DISTILL.OPTIMIZER, and DISTILL.FIT (iterations, batch size,
held-out fraction, checkpoint period). Output in OUTPUT_DIR:
- decoder_final.pth: the fitted weights and what they were fitted for (levels, widths, teacher);
- decoder_signals.json: what the decoder learnt, measured on held-out images of the cache (signals.py);
- metrics.json and TensorBoard scalars: losses and the prior's entropy during fitting.
Checkpoints are written atomically every DISTILL.FIT.CHECKPOINT_PERIOD iterations; --resume continues
from the last one and reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cache_contract.identity import dataset_mismatch
from cache_format import CacheReader
from cache_format.state import check_apart
from detection.config import CfgNode, setup_cfg
from detection.data.datasets import class_statistics
from detection.data.loader import build_train_loader
from detection.engine.checkpoint import last_checkpoint, load_checkpoint
from detection.engine.commands import default_argument_parser, default_setup, run_command
from detection.engine.trainer import Trainer
from detection.errors import UserError
from stage2_student_distill.method.losses import prior_entropy
from stage2_student_distill.method.module import ICDModule, build_icd_optimizer
from stage2_student_distill.method.queries import query_generator
from stage2_student_distill.signals import (
    SIGNALS_FILE,
    DecoderSignals,
    evaluation_samples,
    format_signals,
    measure,
    record_signals,
)
from stage2_student_distill.teacher_samples import (
    TeacherBatch,
    TeacherCollate,
    TeacherSampleDataset,
    iter_batches,
    split_by_image,
)

FINAL = "decoder_final.pth"
# Held-out samples measured at the end (a seeded choice): enough for stable signals, bounded at COCO scale.
MEASURED_SAMPLES = 256
# The parts of ICDModule the auxiliary task trains (the student-side value projection is not among them).
FITTED_PARTS = ("query_encoder", "decoder", "aux_predictor")
# DISTILL keys a fitted decoder must share with the run that loads it (the rest do not change its weights).
ARCHITECTURE_KEYS = ("NUM_HEADS", "HIDDEN_DIM", "FFN_DIM", "POS_TEMPERATURE", "KEY_NORM", "SPATIAL_PRIOR")


def fitted_parts(icd: ICDModule) -> nn.ModuleDict:
    """A view of the fitted parts (sharing parameters), so their state dict keys equal ICDModule's."""
    return nn.ModuleDict({name: getattr(icd, name) for name in FITTED_PARTS})


def fit_levels(cfg: Any, reader: CacheReader) -> list[str]:
    """CACHE.LEVELS when set (a subset of the cache's), else all of the cache's levels."""
    names = list(cfg.CACHE.LEVELS) or reader.level_names
    unknown = [name for name in names if name not in reader.level_names]
    if unknown:
        raise UserError(
            f"CACHE.LEVELS {unknown} are not in the cache {reader.url} (it holds {reader.level_names})",
            "leave CACHE.LEVELS empty, or name levels the cache holds",
        )
    return names


def fit_identity(cfg: Any, reader: CacheReader, levels: Sequence[str], num_classes: int) -> dict[str, Any]:
    """What the fitted weights are valid for; checked by `icd distill` before loading them."""
    channels = {lv.name: lv.channels for lv in reader.levels}
    return {
        "levels": list(levels),
        "channels": int(channels[levels[0]]),
        "num_classes": int(num_classes),
        "distill": {key: cfg.DISTILL[key] for key in ARCHITECTURE_KEYS},
        "teacher": dict(reader.attributes.get("teacher", {}) or {}),
        "cache": reader.url,
    }


class FitIdentity:
    """The checkpoint's 'fit' entry: what the weights were fitted for (read back by `load_fitted_decoder`).

    Restoring it refuses a checkpoint fitted with another config or cache.
    """

    def __init__(self, identity: dict[str, Any]) -> None:
        self.identity = identity

    def state_dict(self) -> dict[str, Any]:
        return self.identity

    def load_state_dict(self, state: Any, checkpoint: str | Path = "the checkpoint") -> None:
        if state != self.identity:
            raise UserError(
                f"{checkpoint} was not fitted by `icd fit-decoder` with this config and cache",
                "resume with the config and cache the fit was started with, or use a new OUTPUT_DIR",
            )


class DecoderFitter(Trainer):
    """The engine's Trainer fitting the decoder parts of an ICDModule on one cache; `run_step` is one
    auxiliary-task iteration. Its model is `fitted_parts(icd)`, optimised by the ICD module's AdamW
    over DISTILL.FIT.MAX_ITER; batches come from the engine's seeded, resumable loader over the
    fitting images (DISTILL.FIT.IMS_PER_BATCH each); checkpoints are decoder_*.pth in OUTPUT_DIR.
    """

    checkpoint_prefix = "decoder"
    progress_label = "fit-decoder"

    def __init__(self, cfg: CfgNode, cache: str) -> None:
        fit = cfg.DISTILL.FIT
        max_iter, batch_size, period = int(fit.MAX_ITER), int(fit.IMS_PER_BATCH), int(fit.CHECKPOINT_PERIOD)
        if max_iter < 1 or batch_size < 1 or period < 1:
            raise UserError(
                f"invalid DISTILL.FIT: MAX_ITER={max_iter}, IMS_PER_BATCH={batch_size}, CHECKPOINT_PERIOD={period}",
                "use positive values (e.g. 2000, 8, 500)",
            )
        # before config.yaml is written: OUTPUT_DIR's files must not land inside the cache
        check_apart(
            str(cfg.OUTPUT_DIR),
            "OUTPUT_DIR",
            {"cache": cache},
            "set OUTPUT_DIR to a directory outside the cache (e.g. output/decoder_<cache name>)",
            allow=("contains",),
        )
        self.reader = CacheReader(cache)
        cfg, index = default_setup(cfg, need_train_index=True)  # seeds, resolves K, saves config.yaml
        mismatch = dataset_mismatch(self.reader.attributes, self.reader.url, index)
        if mismatch:
            raise UserError(mismatch, "fit the decoder with the dataset the cache was made from")
        self.batch_size = batch_size
        self.levels = fit_levels(cfg, self.reader)
        self.strides = {lv.name: lv.stride for lv in self.reader.levels if lv.name in self.levels}
        self.identity = fit_identity(cfg, self.reader, self.levels, index.num_classes)
        self.fit_samples, self.held_samples = split_by_image(self.reader, float(fit.HELD_OUT_FRACTION), int(cfg.SEED))
        prior, size_mean, size_std = class_statistics(index)
        self.icd = ICDModule.from_config(
            cfg,
            index.num_classes,
            self.identity["channels"],
            levels=self.levels,
            strides=self.strides,
            class_prior=prior,
            size_prior_mean=size_mean,
            size_prior_std=size_std,
        )
        dataset = TeacherSampleDataset(self.reader.url, self.fit_samples, self.levels)
        loader = build_train_loader(
            cfg, dataset, TeacherCollate(self.levels, self.strides), ims_per_batch=batch_size, group_by_aspect=False
        )
        super().__init__(cfg, fitted_parts(self.icd), loader, max_iter=max_iter, checkpoint_period=period)
        self.icd.to(self.device).train()
        self.clip_norm = float(cfg.DISTILL.OPTIMIZER.CLIP_NORM)
        self.checkpointables["fit"] = FitIdentity(self.identity)
        self.last_metrics: dict[str, Tensor] = {}

    def build_optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """The ICD module's AdamW + warm-up/cosine (as in `icd distill`), over DISTILL.FIT.MAX_ITER."""
        return build_icd_optimizer(self.module, self.cfg, max_iter=self.max_iter)

    def resume_or_load(self, resume: bool) -> bool:
        """With `resume`: continue OUTPUT_DIR's last fit exactly. A new fit starts from the module's own
        initialisation (MODEL.WEIGHTS names the student's weights, not the decoder's)."""
        checkpoint = last_checkpoint(self.output_dir) if resume else None
        if checkpoint is None:
            if resume:  # as `icd train` / `icd distill` (and detectron2): a fresh start, said in one line
                print(
                    f"--resume: no checkpoint to resume in {self.output_dir} (no last_checkpoint naming an "
                    "existing file); starting a new fit at iteration 0",
                    flush=True,
                )
            return False
        # checked before the engine loads it: OUTPUT_DIR may hold another command's or config's checkpoints
        extra = load_checkpoint(checkpoint).get("extra", {}) or {}
        self.checkpointables["fit"].load_state_dict(extra.get("fit"), checkpoint)
        return super().resume_or_load(True)

    def run_step(self, batch: TeacherBatch) -> dict[str, Tensor]:
        """One iteration of the auxiliary task: decode the cached teacher features, loss, AdamW step."""
        batch = batch.to(self.device)
        decoded = self.icd.decode(
            batch.features, batch.image_sizes, batch.targets, query_generator(int(self.cfg.SEED), 0, self.iteration)
        )  # one process: rank 0
        losses = self.icd.auxiliary_losses(decoded)
        total = self.total_loss(losses)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.clip_norm > 0:  # DISTILL.OPTIMIZER.CLIP_NORM, as in `icd distill`
            nn.utils.clip_grad_norm_(self.module.parameters(), self.clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.last_metrics = {"ident_prior_entropy": prior_entropy(decoded.queries.is_real, decoded.queries.padding)}
        return losses

    def step_metrics(self) -> dict[str, Tensor]:
        """`ident_prior_entropy`: the loss_ident of always predicting this batch's real/fake ratio."""
        return self.last_metrics

    def run(self) -> DecoderSignals:
        """Fit to DISTILL.FIT.MAX_ITER (decoder_final.pth), then measure and record the decoder's signals."""
        self.train()
        signals = self.measure()
        record_signals(
            self.output_dir,
            self.iteration,
            signals,
            {"split": "held-out images" if len(self.held_samples) else "fitting images", "cache": self.reader.url},
        )
        return signals

    def measure(self) -> DecoderSignals:
        """Signals on (up to MEASURED_SAMPLES of) the held-out images; the fitting images if none is held out."""
        samples = evaluation_samples(
            self.reader,
            MEASURED_SAMPLES,
            int(self.cfg.SEED),
            self.held_samples if len(self.held_samples) else self.fit_samples,
        )
        return measure(
            self.icd, iter_batches(self.reader, samples, self.batch_size, self.levels), seed=int(self.cfg.SEED)
        )


def load_fitted_decoder(
    icd: ICDModule, path: str | Path, cfg: Any, levels: Sequence[str], teacher: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Load `icd fit-decoder`'s weights into `icd`'s decoder parts, refusing a decoder fitted for another setup.

    teacher: the teacher identity of the features the decoder will see (the cache's), when known.
    """
    state = load_checkpoint(path)
    identity = (state.get("extra", {}) or {}).get("fit") if isinstance(state, dict) else None
    if identity is None or "model" not in state:
        raise UserError(
            f"{path} is not a decoder written by `icd fit-decoder`",
            f"point DISTILL.DECODER_WEIGHTS at the {FINAL} of an `icd fit-decoder` run",
        )
    distill = {key: cfg.DISTILL[key] for key in ARCHITECTURE_KEYS}
    mismatches = [
        f"DISTILL.{k} {identity['distill'].get(k)!r} vs {distill[k]!r}"
        for k in ARCHITECTURE_KEYS
        if identity["distill"].get(k) != distill[k]
    ]
    if list(identity["levels"]) != list(levels):
        mismatches.append(f"levels {identity['levels']} vs {list(levels)}")
    if identity["num_classes"] != icd.query_builder.num_classes or identity["channels"] != icd.channels:
        mismatches.append(
            f"{identity['num_classes']} classes / {identity['channels']} channels vs "
            f"{icd.query_builder.num_classes} / {icd.channels}"
        )
    fitted_sha, sha = identity["teacher"].get("weights_sha256", ""), (teacher or {}).get("weights_sha256", "")
    if fitted_sha and sha and fitted_sha != sha:
        mismatches.append(f"teacher weights sha256 {fitted_sha[:12]}... vs {sha[:12]}...")
    if mismatches:
        raise UserError(
            f"the decoder {path} was fitted for another setup: " + "; ".join(mismatches),
            "fit a decoder with this config and cache (`icd fit-decoder`), or leave "
            "DISTILL.DECODER_WEIGHTS empty to train the decoder from scratch",
        )
    fitted_parts(icd).load_state_dict(state["model"])
    return identity


def build_parser() -> argparse.ArgumentParser:
    parser = default_argument_parser(
        "icd fit-decoder",
        "Fit ICD's decoder (query encoder, decoder, auxiliary predictor) on a teacher cache "
        f"alone, once per cache; `icd distill` loads OUTPUT_DIR/{FINAL} with DISTILL.DECODER_WEIGHTS. "
        "One process (--num-gpus is ignored).",
        resume="continue from OUTPUT_DIR's last checkpoint",
    )
    parser.add_argument("--cache", required=True, metavar="PATH", help="the teacher cache written by `icd dump`")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> None:
        cfg = setup_cfg(args.config_file, args.opts)
        fitter = DecoderFitter(cfg, args.cache)
        fitter.resume_or_load(args.resume)
        signals = fitter.run()
        print(format_signals(signals, f"decoder fitted; held-out signals ({Path(cfg.OUTPUT_DIR) / SIGNALS_FILE})"))

    return run_command("fit-decoder", body, interrupted="continue with --resume from the last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
