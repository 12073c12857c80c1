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
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cache_contract.identity import dataset_mismatch
from cache_format import CacheReader
from detection.engine.checkpoint import capture_rng_state, last_checkpoint, load_checkpoint, resume_from, save_checkpoint
from detection.engine.commands import default_argument_parser, default_setup, run_command
from detection.config import CfgNode, setup_cfg
from detection.data.datasets import class_statistics
from detection.engine.trainer import MetricsLog
from detection.errors import UserError
from stage2_student_distill.method.module import ICDModule, build_icd_optimizer
from stage2_student_distill.method.losses import prior_entropy
from stage2_student_distill.signals import (
    SIGNALS_FILE,
    DecoderSignals,
    evaluation_samples,
    format_signals,
    measure,
    record_signals,
)
from stage2_student_distill.teacher_samples import TeacherCollate, TeacherSampleDataset, iter_batches, split_by_image

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
        raise UserError(f"CACHE.LEVELS {unknown} are not in the cache {reader.url} (it holds {reader.level_names})",
                        "leave CACHE.LEVELS empty, or name levels the cache holds")
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


def epoch_batches(num_items: int, batch_size: int, seed: int, start_iter: int, max_iter: int) -> Iterator[list[int]]:
    """Item indices of iterations start_iter.. max_iter-1: seeded shuffles of all items, epoch after epoch.

    A function of (seed, iteration) only, so a resumed run reads exactly the batches it would have read.
    """
    permutations: dict[int, np.ndarray] = {}
    for iteration in range(start_iter, max_iter):
        batch = []
        for position in range(iteration * batch_size, (iteration + 1) * batch_size):
            epoch = position // num_items
            if epoch not in permutations:
                permutations = {epoch: np.random.default_rng([seed, epoch]).permutation(num_items)}
            batch.append(int(permutations[epoch][position % num_items]))
        yield batch


def query_generator(seed: int, iteration: int) -> torch.Generator:
    """The fake-query/jitter generator of one iteration (CPU, as the ICD modules require)."""
    state = np.random.SeedSequence([int(seed) % 2**63, 0, iteration]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]) & (2**63 - 1))


class DecoderFitter:
    """Fits the decoder parts of an ICDModule on one cache; owns the checkpoints of OUTPUT_DIR."""

    def __init__(self, cfg: CfgNode, cache: str, resume: bool = False) -> None:
        fit = cfg.DISTILL.FIT
        self.max_iter, self.batch_size = int(fit.MAX_ITER), int(fit.IMS_PER_BATCH)
        self.period = int(fit.CHECKPOINT_PERIOD)
        if self.max_iter < 1 or self.batch_size < 1 or self.period < 1:
            raise UserError(f"invalid DISTILL.FIT: MAX_ITER={self.max_iter}, IMS_PER_BATCH={self.batch_size}, "
                            f"CHECKPOINT_PERIOD={self.period}", "use positive values (e.g. 2000, 8, 500)")
        self.reader = CacheReader(cache)
        cfg, index = default_setup(cfg, need_train_index=True)  # seeds, resolves K, saves config.yaml
        self.cfg, self.output_dir = cfg, Path(cfg.OUTPUT_DIR)
        mismatch = dataset_mismatch(self.reader.attributes, self.reader.url, index)
        if mismatch:
            raise UserError(mismatch, "fit the decoder with the dataset the cache was made from")
        self.levels = fit_levels(cfg, self.reader)
        self.strides = {lv.name: lv.stride for lv in self.reader.levels if lv.name in self.levels}
        self.identity = fit_identity(cfg, self.reader, self.levels, index.num_classes)
        self.fit_samples, self.held_samples = split_by_image(self.reader, float(fit.HELD_OUT_FRACTION), int(cfg.SEED))
        prior, size_mean, size_std = class_statistics(index)
        self.icd = ICDModule.from_config(cfg, index.num_classes, self.identity["channels"], class_prior=prior,
                                         size_prior_mean=size_mean, size_prior_std=size_std)
        self.parts = fitted_parts(self.icd)
        self.optimizer, self.scheduler = build_icd_optimizer(self.parts, cfg, max_iter=self.max_iter)
        self.clip_norm = float(cfg.DISTILL.OPTIMIZER.CLIP_NORM)
        self.iteration = 0
        checkpoint = last_checkpoint(self.output_dir) if resume else None
        if checkpoint is not None:
            # checked before loading: OUTPUT_DIR may hold another command's checkpoints
            if (load_checkpoint(checkpoint).get("extra", {}) or {}).get("fit") != self.identity:
                raise UserError(f"the checkpoint {checkpoint} was not fitted by `icd fit-decoder` with this config "
                                "and cache", "resume with the config and cache the fit was started with, or use a "
                                "new OUTPUT_DIR")
            # the batches and queries are functions of (SEED, iteration): no RNG state to restore
            self.iteration, _extra, _rng = resume_from(checkpoint, self.parts, self.optimizer, self.scheduler)
            print(f"Resuming from {checkpoint} at iteration {self.iteration}.", flush=True)

    def loader(self) -> DataLoader:
        dataset = TeacherSampleDataset(self.reader.url, self.fit_samples, self.levels)
        batches = list(epoch_batches(len(dataset), self.batch_size, int(self.cfg.SEED), self.iteration, self.max_iter))
        workers = int(self.cfg.DATALOADER.NUM_WORKERS)
        return DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                          collate_fn=TeacherCollate(self.levels, self.strides),
                          prefetch_factor=2 if workers else None)

    def save(self, name: str) -> Path:
        return save_checkpoint(self.output_dir / name, self.parts, self.optimizer, self.scheduler,
                               self.iteration, extra={"fit": self.identity}, rng_per_rank=[capture_rng_state()])

    def run(self) -> DecoderSignals:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        device = torch.device(self.cfg.MODEL.DEVICE)
        self.icd.to(device).train()
        log = MetricsLog(self.output_dir, enabled=True)
        log_period = int(self.cfg.SOLVER.LOG_PERIOD)
        sums: dict[str, float] = {}
        bar = tqdm(total=self.max_iter, initial=self.iteration, desc="fit-decoder", unit="it", dynamic_ncols=True,
                   mininterval=1.0)
        try:
            for batch in self.loader():
                start = time.perf_counter()
                batch = batch.to(device)
                decoded = self.icd.decode(batch.features, batch.image_sizes, batch.targets, self.levels, self.strides,
                                          query_generator(int(self.cfg.SEED), self.iteration))
                losses = self.icd.auxiliary_losses(decoded)
                sum(losses.values()).backward()
                if self.clip_norm > 0:  # DISTILL.OPTIMIZER.CLIP_NORM, as in `icd distill`
                    nn.utils.clip_grad_norm_(self.parts.parameters(), self.clip_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.iteration += 1
                values = {k: float(v.detach()) for k, v in losses.items()}
                values["ident_prior_entropy"] = float(prior_entropy(decoded.queries.is_real, decoded.queries.padding))
                values["time"] = time.perf_counter() - start
                for key, value in values.items():
                    sums[key] = sums.get(key, 0.0) + value
                sums["count"] = sums.get("count", 0.0) + 1
                bar.update(1)
                if self.iteration % log_period == 0 or self.iteration == self.max_iter:
                    count = sums.pop("count")
                    log.write(self.iteration, {**{k: v / count for k, v in sums.items()},
                                               "lr": self.optimizer.param_groups[0]["lr"]})
                    bar.set_postfix(loss_ident=f"{sums['loss_ident'] / count:.3f}", refresh=False)
                    sums = {}
                if self.iteration % self.period == 0 and self.iteration < self.max_iter:
                    self.save(f"decoder_{self.iteration:07d}.pth")
        finally:
            bar.close()
            log.close()
        self.save(FINAL)
        signals = self.measure()
        record_signals(self.output_dir, self.iteration, signals,
                       {"split": "held-out images" if len(self.held_samples) else "fitting images",
                        "cache": self.reader.url})
        return signals

    def measure(self) -> DecoderSignals:
        """Signals on (up to MEASURED_SAMPLES of) the held-out images; the fitting images if none is held out."""
        samples = evaluation_samples(self.reader, MEASURED_SAMPLES, int(self.cfg.SEED),
                                     self.held_samples if len(self.held_samples) else self.fit_samples)
        return measure(self.icd, iter_batches(self.reader, samples, self.batch_size, self.levels), self.levels,
                       self.strides, seed=int(self.cfg.SEED))


def load_fitted_decoder(icd: ICDModule, path: str | Path, cfg: Any, levels: Sequence[str],
                        teacher: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load `icd fit-decoder`'s weights into `icd`'s decoder parts, refusing a decoder fitted for another setup.

    teacher: the teacher identity of the features the decoder will see (the cache's), when known.
    """
    state = load_checkpoint(path)
    identity = (state.get("extra", {}) or {}).get("fit") if isinstance(state, dict) else None
    if identity is None or "model" not in state:
        raise UserError(f"{path} is not a decoder written by `icd fit-decoder`",
                        f"point DISTILL.DECODER_WEIGHTS at the {FINAL} of an `icd fit-decoder` run")
    distill = {key: cfg.DISTILL[key] for key in ARCHITECTURE_KEYS}
    mismatches = [f"DISTILL.{k} {identity['distill'].get(k)!r} vs {distill[k]!r}" for k in ARCHITECTURE_KEYS
                  if identity["distill"].get(k) != distill[k]]
    if list(identity["levels"]) != list(levels):
        mismatches.append(f"levels {identity['levels']} vs {list(levels)}")
    if identity["num_classes"] != icd.query_builder.num_classes or identity["channels"] != icd.channels:
        mismatches.append(f"{identity['num_classes']} classes / {identity['channels']} channels vs "
                          f"{icd.query_builder.num_classes} / {icd.channels}")
    fitted_sha, sha = identity["teacher"].get("weights_sha256", ""), (teacher or {}).get("weights_sha256", "")
    if fitted_sha and sha and fitted_sha != sha:
        mismatches.append(f"teacher weights sha256 {fitted_sha[:12]}... vs {sha[:12]}...")
    if mismatches:
        raise UserError(f"the decoder {path} was fitted for another setup: " + "; ".join(mismatches),
                        "fit a decoder with this config and cache (`icd fit-decoder`), or leave "
                        "DISTILL.DECODER_WEIGHTS empty to train the decoder from scratch")
    fitted_parts(icd).load_state_dict(state["model"])
    return identity


def build_parser() -> argparse.ArgumentParser:
    parser = default_argument_parser(
        "icd fit-decoder", "Fit ICD's decoder (query encoder, decoder, auxiliary predictor) on a teacher cache "
        f"alone, once per cache; `icd distill` loads OUTPUT_DIR/{FINAL} with DISTILL.DECODER_WEIGHTS. "
        "One process (--num-gpus is ignored).",
        resume="continue from OUTPUT_DIR's last checkpoint")
    parser.add_argument("--cache", required=True, metavar="PATH", help="the teacher cache written by `icd dump`")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> None:
        cfg = setup_cfg(args.config_file, args.opts)
        signals = DecoderFitter(cfg, args.cache, resume=args.resume).run()
        print(format_signals(signals, f"decoder fitted; held-out signals ({Path(cfg.OUTPUT_DIR) / SIGNALS_FILE})"))

    return run_command("fit-decoder", body, interrupted="continue with --resume from the last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
