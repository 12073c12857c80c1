"""What a finished student run did, beyond its AP: the evidence for why ICD helps or does not (issue 21).

    python -m bench.mechanism RUN_DIR [--cache CACHE] [--batches 4] [--out JSON]

RUN_DIR is an `icd train` or `icd distill` output dir (bench/accuracy.py's <work>/<size>/runs/<row>/<mode>/
seed<k>). Read from its metrics.json, for every run:

- the curves: the distillation loss (and loss_ident, the detection losses) per logged window, and COCO AP
  at every evaluation (TEST.EVAL_PERIOD) - has the run flattened, did the distillation loss fall?

With --cache (the teacher cache the row distils from; the run's own for a distill run), the student's final
weights on the first --batches batches the run trained on (epoch 0, its SEED: the same batches in every mode):

- feature distance: per FPN level, ||student - teacher||^2 / ||teacher||^2 over the pixels inside the
  instances' boxes and over those outside (the valid image area only, padding excluded): does the student's
  FPN come closer to the teacher's where the instances are, as ICD's instance-conditional attention intends?
- gradient ratio: per level, ||d loss_distill / d F|| / ||d (detection losses) / d F|| at the student's FPN
  outputs F (the tensors that feed its heads), with the run's own ICD decoder and DISTILL.LAMBDA: how hard
  the distillation pulls against detection at the end of training. For a run without an ICD state
  (a baseline) the ratio is not measured; for LAMBDA 0 it is reported per unit LAMBDA.

Nothing is written into RUN_DIR: the set-up's own files go to a temporary dir.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def curves(run_dir: Path) -> dict[str, Any]:
    """{'train': [{iteration, loss_distill, ...}], 'eval': [{iteration, box_AP, ...}]} from metrics.json."""
    train, evals = [], []
    for line in (run_dir / "metrics.json").read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        aps = {
            f"{k.split('/')[0].replace('bbox', 'box').replace('segm', 'mask')}_AP": float(v)  # COCO AP, %
            for k, v in record.items()
            if k in ("bbox/AP", "segm/AP") and v is not None
        }
        if aps:
            evals.append({"iteration": int(record["iteration"]), **aps})
        elif "total_loss" in record:
            train.append(
                {
                    k: v
                    for k, v in record.items()
                    if k == "iteration"
                    or k.startswith("loss")
                    or k in ("total_loss", "lr", "classification", "bbox_regression")
                }
            )
    return {"train": train, "eval": evals}


def _level_masks(
    targets: Sequence[dict[str, Any]], sizes: Sequence[tuple[int, int]], shape: tuple[int, int], stride: int
) -> tuple[Any, Any]:
    """Boolean [N, H, W] masks at one level: inside any instance box, and valid (the unpadded image)."""
    import torch

    n, (h, w) = len(sizes), shape
    inside = torch.zeros(n, h, w, dtype=torch.bool)
    valid = torch.zeros(n, h, w, dtype=torch.bool)
    for i, ((ih, iw), target) in enumerate(zip(sizes, targets)):
        valid[i, : math.ceil(ih / stride), : math.ceil(iw / stride)] = True
        for x0, y0, x1, y1 in target["boxes"].tolist():
            c0, r0 = int(x0 // stride), int(y0 // stride)
            c1, r1 = max(c0 + 1, math.ceil(x1 / stride)), max(r0 + 1, math.ceil(y1 / stride))
            inside[i, r0:r1, c0:c1] = True
    return inside & valid, valid & ~inside


def measure(run_dir: Path, cache: str, batches: int) -> dict[str, Any]:
    """Feature distances (inside / outside instances) and gradient ratios per level, over `batches` batches."""
    import torch

    from detection.config import get_cfg
    from detection.engine.checkpoint import load_checkpoint
    from detection.engine.trainer import images_and_targets
    from stage2_student_distill.cli import build_distill_trainer

    weights = run_dir / "model_final.pth"
    cfg = get_cfg()
    cfg.merge_from_file(str(run_dir / "config.yaml"))
    with tempfile.TemporaryDirectory(prefix="icd_mechanism_") as scratch:
        # the run's final weights, not the teacher's FPN; nothing written into the run's dir
        cfg.merge_from_list(
            [
                "OUTPUT_DIR",
                scratch,
                "MODEL.WEIGHTS",
                str(weights),
                "DISTILL.INIT_FROM_TEACHER",
                "False",
                "DISTILL.DECODER_WEIGHTS",
                "",
                "DATALOADER.NUM_WORKERS",
                "0",
                "DISTILL.ENABLED",
                "True",
            ]
        )
        trainer = build_distill_trainer(cfg, cache, resume=False, with_evaluation=False)
        icd_state = (load_checkpoint(weights).get("extra") or {}).get("icd")
        if icd_state is not None:
            trainer.icd.load_state_dict(icd_state)
        lam = float(cfg.DISTILL.LAMBDA)
        if lam == 0:  # teacher-init only: the gradient the loss would have, per unit of LAMBDA
            trainer.icd.loss_weight = 1.0
        levels, strides = trainer.levels, trainer.strides
        sums = {
            name: {"in_d": 0.0, "in_t": 0.0, "out_d": 0.0, "out_t": 0.0, "g_det": 0.0, "g_dis": 0.0} for name in levels
        }
        data = iter(trainer.build_loader(0))
        trainer.model.train()
        for _ in range(batches):
            batch = next(data)
            images, targets = images_and_targets(batch.samples, trainer.device)
            sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
            detection_losses, features, _ = trainer.model(images, targets)
            teacher = trainer.teacher_features(batch, images)  # {level: [N, C, H, W]}, padded as the batch
            student = {name: features[name] for name in levels}
            for name in levels:
                inside, outside = _level_masks(targets, sizes, tuple(student[name].shape[-2:]), strides[name])
                diff = (student[name].detach() - teacher[name]).pow(2).sum(1).cpu()  # [N, H, W]
                energy = teacher[name].pow(2).sum(1).cpu()
                sums[name]["in_d"] += float(diff[inside].sum())
                sums[name]["in_t"] += float(energy[inside].sum())
                sums[name]["out_d"] += float(diff[outside].sum())
                sums[name]["out_t"] += float(energy[outside].sum())
            if icd_state is None:
                continue
            icd_losses = trainer.icd_model(
                teacher, student, sizes, targets, trainer.query_generator(), detach_student=False
            )
            tensors = [student[name] for name in levels]
            g_det = torch.autograd.grad(sum(detection_losses.values()), tensors, retain_graph=True, allow_unused=True)
            g_dis = torch.autograd.grad(icd_losses["loss_distill"], tensors, allow_unused=True)
            for name, gd, gs in zip(levels, g_det, g_dis):
                sums[name]["g_det"] += 0.0 if gd is None else float(gd.pow(2).sum())
                sums[name]["g_dis"] += 0.0 if gs is None else float(gs.pow(2).sum())
    out: dict[str, Any] = {"lambda": lam, "batches": batches, "decoder": icd_state is not None, "levels": {}}
    for name, s in sums.items():
        level = {
            "distance_inside": s["in_d"] / s["in_t"] if s["in_t"] else math.nan,
            "distance_outside": s["out_d"] / s["out_t"] if s["out_t"] else math.nan,
        }
        if icd_state is not None:  # the distillation loss is linear in LAMBDA
            ratio = math.sqrt(s["g_dis"] / s["g_det"]) if s["g_det"] else math.nan
            level["grad_ratio"] = 0.0 if lam == 0 else ratio
            level["grad_ratio_per_lambda"] = ratio if lam == 0 else ratio / lam
        out["levels"][name] = level
    return out


def markdown(run_dir: Path, result: dict[str, Any]) -> str:
    lines = [f"Run {run_dir}", ""]
    evals = result["curves"]["eval"]
    if evals:
        keys = [k for k in evals[-1] if k != "iteration"]
        lines += [
            "AP curve: "
            + "; ".join(f"{e['iteration']}: " + " / ".join(f"{e[k]:.2f}" for k in keys if k in e) for e in evals),
            "",
        ]
    train = [r for r in result["curves"]["train"] if "loss_distill" in r]
    if train:
        picks = train[:: max(1, len(train) // 8)]
        picks += [train[-1]] if picks[-1] is not train[-1] else []
        lines += ["loss_distill: " + "; ".join(f"{r['iteration']}: {r['loss_distill']:.4f}" for r in picks), ""]
    levels = (result.get("measured") or {}).get("levels")
    if levels:
        lines += [
            f"DISTILL.LAMBDA {result['measured']['lambda']:g}, {result['measured']['batches']} batch(es)",
            "",
            "| level | ‖s-t‖²/‖t‖² inside instances | outside | grad ratio distill / detection | per unit LAMBDA |",
            "|---|---:|---:|---:|---:|",
        ]

        def shown(value: float | None) -> str:
            return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"

        for name, m in levels.items():
            lines.append(
                f"| {name} | {m['distance_inside']:.3f} | {m['distance_outside']:.3f} | "
                f"{shown(m.get('grad_ratio'))} | {shown(m.get('grad_ratio_per_lambda'))} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from bench.accuracy import json_safe

    parser = argparse.ArgumentParser(prog="python -m bench.mechanism", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished icd train / icd distill output dir")
    parser.add_argument("--cache", default=None, help="the teacher cache (features and samples) to measure against")
    parser.add_argument("--batches", type=int, default=4, help="training batches measured (epoch 0, the run's SEED)")
    parser.add_argument("--out", type=Path, default=None, help="JSON result (default: print only)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    run_dir = args.run_dir
    if not (run_dir / "metrics.json").is_file() or not (run_dir / "model_final.pth").is_file():
        print(
            f"bench.mechanism: error: {run_dir} is not a finished run (no metrics.json / model_final.pth); "
            "pass an icd train or icd distill OUTPUT_DIR",
            file=sys.stderr,
        )
        return 2
    if args.batches < 1:
        parser.error("--batches must be at least 1")
    result: dict[str, Any] = {"run": str(run_dir), "curves": curves(run_dir)}
    if args.cache:
        result["measured"] = measure(run_dir, args.cache, args.batches)
    print(markdown(run_dir, result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(json_safe(result), indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
