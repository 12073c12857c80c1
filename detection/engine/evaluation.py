"""COCO evaluation with pycocotools: box AP and/or mask AP (per architecture), as a table and as JSON.

The model sees test images resized by the test-time augmentation plan; its detections come back in
that sample frame and are mapped to the original image frame (`invert_boxes`) and to the dataset's
category ids before COCOeval. Each process evaluates its own share of the images; rank 0 gathers
them, runs COCOeval and writes OUTPUT_DIR/inference/{coco_results,metrics}.json.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from tqdm import tqdm

from detection import comm
from detection.data.augment import AugmentationPlan, AugParams, invert_boxes
from detection.data.datasets import CocoIndex, DetectionDataset, collate, load_dataset
from detection.engine.checkpoint import last_checkpoint, load_weights
from detection.engine.commands import default_setup
from detection.errors import UserError
from detection.modeling.architectures import ARCHITECTURES
from detection.modeling.detector import build_model

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


# --- detections -> COCO result records ----------------------------------------------------------
def _masks_to_original(masks: torch.Tensor, p: AugParams) -> torch.Tensor:
    """[n,1,rh,rw] mask probabilities in the sample frame -> [n,H,W] bool in the original frame."""
    if p.flip:
        masks = masks.flip(-1)
    if (p.resized_h, p.resized_w) != (p.orig_h, p.orig_w):
        masks = F.interpolate(masks.float(), size=(p.orig_h, p.orig_w), mode="bilinear", align_corners=False)
    return masks[:, 0] > 0.5


def detections_to_coco(
    detections: dict[str, torch.Tensor], p: AugParams, label_to_cat_id: dict[int, int]
) -> list[dict[str, Any]]:
    """One image's detections (sample frame, contiguous labels) -> COCO result dicts (original frame)."""
    boxes = invert_boxes(detections["boxes"].detach().cpu(), p)
    scores = detections["scores"].detach().cpu().tolist()
    labels = detections["labels"].detach().cpu().tolist()
    rles: list[Any] = [None] * len(labels)
    if "masks" in detections and len(labels):
        binary = _masks_to_original(detections["masks"].detach().cpu(), p).numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    records = []
    for (x1, y1, x2, y2), score, label, rle in zip(boxes.tolist(), scores, labels, rles):
        if label not in label_to_cat_id:  # e.g. the background slot of a sigmoid classifier
            continue
        record = {
            "image_id": int(p.image_id),
            "category_id": int(label_to_cat_id[label]),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": float(score),
        }
        if rle is not None:
            record["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
        records.append(record)
    return records


@torch.no_grad()
def run_inference(
    model: nn.Module, dataset: DetectionDataset, device: torch.device, num_workers: int = 0, show_progress: bool = True
) -> list[dict[str, Any]]:
    """This rank's share of the dataset (items rank, rank + world, ...) -> COCO result records.

    One image per forward pass (as detectron2's inference) so results do not depend on the batch
    composition or the number of processes.
    """
    rank, world = comm.get_rank(), comm.get_world_size()
    indices = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=1, num_workers=num_workers, collate_fn=collate
    )
    was_training = model.training
    model.eval()
    records: list[dict[str, Any]] = []
    try:
        for batch in tqdm(
            loader,
            desc="eval",
            unit="img",
            disable=not (show_progress and comm.is_main_process()),
            dynamic_ncols=True,
            mininterval=1.0,
        ):
            detections, _features, _images = model([sample["image"].to(device) for sample in batch])
            for sample, det in zip(batch, detections):
                records.extend(detections_to_coco(det, sample["aug"], dataset.index.label_to_cat_id))
    finally:
        model.train(was_training)
    return records


# --- COCOeval ----------------------------------------------------------------------------------
def coco_ground_truth(index: CocoIndex) -> COCO:
    """A pycocotools COCO object built from the validated index (missing area/iscrowd are filled in)."""
    annotations = []
    for image in index.images:
        for a in image.annotations:
            x1, y1, x2, y2 = a.bbox_xyxy
            seg = a.segmentation if a.segmentation is not None else [[x1, y1, x2, y1, x2, y2, x1, y2]]
            annotations.append(
                {
                    "id": a.id,
                    "image_id": image.id,
                    "category_id": a.category_id,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": a.area,
                    "iscrowd": int(a.iscrowd),
                    "segmentation": seg,
                }
            )
    gt = COCO()
    gt.dataset = {
        "images": [
            {"id": im.id, "height": im.height, "width": im.width, "file_name": im.file_name} for im in index.images
        ],
        "annotations": annotations,
        "categories": [dict(c) for c in index.categories],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def coco_metrics(
    gt: COCO, records: list[dict[str, Any]], iou_type: str, class_names: dict[int, str]
) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl and 'AP-<class>' in percent; all 0 when there is no detection.

    An area range without ground truth gives NaN (COCOeval's -1), as in detectron2.
    """
    if not records:
        return {**{m: 0.0 for m in METRIC_NAMES}, **{f"AP-{name}": 0.0 for name in class_names.values()}}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes([dict(r) for r in records])
        evaluator = COCOeval(gt, dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats[: len(METRIC_NAMES)]
    metrics = {m: (float(v) * 100 if v >= 0 else math.nan) for m, v in zip(METRIC_NAMES, stats)}
    precision = evaluator.eval["precision"]  # [IoU, recall, category, area, max dets]
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        metrics[f"AP-{class_names[cat_id]}"] = float(p.mean()) * 100 if p.size else math.nan
    return metrics


def format_table(task: str, metrics: dict[str, float]) -> str:
    """A plain-text table: the summary metrics, then per-category AP in columns."""

    def cell(v: float) -> str:
        return "  nan" if math.isnan(v) else f"{v:6.2f}"

    lines = [
        f"Evaluation results for {task}:",
        " | ".join(f"{m:>6}" for m in METRIC_NAMES),
        " | ".join(cell(metrics[m]) for m in METRIC_NAMES),
    ]
    per_class = [(k[3:], v) for k, v in metrics.items() if k.startswith("AP-")]
    if per_class:
        width = max(8, max(len(name) for name, _ in per_class))
        lines.append(f"Per-category {task} AP:")
        for i in range(0, len(per_class), 3):
            lines.append("  ".join(f"{name:<{width}} {cell(v)}" for name, v in per_class[i : i + 3]))
    return "\n".join(lines)


def _json_safe(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    return {task: {k: (None if math.isnan(v) else v) for k, v in values.items()} for task, values in metrics.items()}


# --- the whole evaluation ----------------------------------------------------------------------
def evaluation_tasks(cfg: Any) -> list[str]:
    """COCOeval tasks for MODEL.META_ARCHITECTURE: box AP where it predicts boxes (not SOLOv2, whose
    boxes are only its masks' extents), mask AP where it predicts masks (MODEL.MASK_ON)."""
    tasks = ["bbox"] if ARCHITECTURES.get(cfg.MODEL.META_ARCHITECTURE).boxes else []
    return tasks + (["segm"] if cfg.MODEL.MASK_ON else [])


def evaluate_dataset(cfg: Any, model: nn.Module, name: str, output_dir: Path) -> dict[str, dict[str, float]]:
    """Evaluate one test dataset on all ranks; every rank returns rank 0's metrics."""
    index = load_dataset(cfg, name)
    dataset = DetectionDataset(index, AugmentationPlan.for_testing(cfg), training=False)
    device = next(model.parameters()).device
    records = run_inference(model, dataset, device, num_workers=int(cfg.DATALOADER.NUM_WORKERS))
    gathered = comm.all_gather(records)
    results: dict[str, dict[str, float]] = {}
    if comm.is_main_process():
        records = [r for part in gathered for r in part]
        tasks = evaluation_tasks(cfg)
        gt = coco_ground_truth(index)
        names = {c["id"]: c["name"] for c in index.categories}
        for task in tasks:
            results[task] = coco_metrics(gt, records, task, names)
            print(f"[{name}] " + format_table(task, results[task]), flush=True)
        if not records:
            print(f"[{name}] the model made no detection above MODEL.SCORE_THRESH_TEST: AP is 0.", flush=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "coco_results.json").write_text(json.dumps(records))
        (output_dir / "metrics.json").write_text(json.dumps(_json_safe(results), indent=2, allow_nan=False))
    return comm.broadcast_object(results)


def evaluate(cfg: Any, model: nn.Module, dataset_names: Iterable[str] | None = None) -> dict[str, dict[str, float]]:
    """COCO-evaluate `model` on DATASETS.TEST. One dataset: {task: metrics}, results in
    OUTPUT_DIR/inference/; several: {'<name>/<task>': metrics}, results in OUTPUT_DIR/inference/<name>/.
    """
    names = list(dataset_names if dataset_names is not None else cfg.DATASETS.TEST)
    root = Path(cfg.OUTPUT_DIR) / "inference"
    if len(names) == 1:
        return evaluate_dataset(cfg, model, names[0], root)
    results: dict[str, dict[str, float]] = {}
    for name in names:
        for task, metrics in evaluate_dataset(cfg, model, name, root / name).items():
            results[f"{name}/{task}"] = metrics
    return results


def weights_to_evaluate(cfg: Any, resume: bool = False) -> str:
    """The checkpoint `icd eval` / `--eval-only` evaluates: with `resume` the last one in OUTPUT_DIR, else
    MODEL.WEIGHTS; a user error when there is none."""
    checkpoint = last_checkpoint(cfg.OUTPUT_DIR) if resume else None
    weights = str(checkpoint) if checkpoint is not None else cfg.MODEL.WEIGHTS
    if not weights:
        raise UserError(
            "no weights to evaluate: MODEL.WEIGHTS is empty"
            + (" and OUTPUT_DIR has no checkpoint to resume" if resume else ""),
            "add `MODEL.WEIGHTS /path/to/model_final.pth` to the command line (or --resume with a checkpoint in "
            "OUTPUT_DIR).",
        )
    return weights


def evaluate_checkpoint(cfg: Any, resume: bool = False) -> dict[str, dict[str, float]]:
    """The configured detector with `weights_to_evaluate`, evaluated on DATASETS.TEST in this process."""
    weights = weights_to_evaluate(cfg, resume)
    cfg, _index = default_setup(cfg, need_train_index=False)
    model = build_model(cfg, cfg.MODEL.NUM_CLASSES)
    load_weights(model, weights)
    return evaluate(cfg, model)
