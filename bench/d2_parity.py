"""detectron2 parity: does a detectron2 checkpoint compute the same thing on the torchvision backend?

    PYTHONPATH=/path/to/detectron2 python -m bench.d2_parity [--quick] [--out bench/results/d2_parity.json]
                                                             [--models retinanet faster_rcnn mask_rcnn]

For each detector (R-50 FPN, detectron2's model-zoo config, 80 classes):
1. detectron2 builds it (`build_model`) with a seeded random initialisation; FrozenBN affine parameters
   are then redrawn and its statistics set from calibration images (other than the test images), and
   the prediction layers redrawn, so that a mis-mapped BN or class layout would show and the untrained
   model makes detections at all (detectron2's prior bias would leave RetinaNet with none);
2. its state dict is written as a model-zoo `.pkl` (numpy arrays, "__author__"), the format users bring;
3. the project builds the matching teacher config (configs/Teachers/*, with MODEL.BACKBONE.DEPTH 50) on
   the torchvision backend and loads that file through MODEL.WEIGHTS (detection.engine.checkpoint.load_weights);
4. both run on the same images (RGB for the project, BGR for detectron2, as each expects), one batch
   of images of different sizes: the normalised padded input, every FPN level and the final detections
   are compared. Per level: max abs difference, max abs difference / max |detectron2 value| (the
   "relative" difference of the goal: within 1e-4) and the relative L2 error. Detections: counts, and
   how many of detectron2's top detections the project reproduces (same class, IoU >= 0.99), with the
   largest score and box-coordinate differences among them (mask IoU for Mask R-CNN);
5. two ablations on the same weights show what the options buy (see `ablations`).
AdelaiDet's FCOS, CondInst and SOLOv2 (`--models fcos condinst solov2`) are compared the same way where AdelaiDet is
importable too: it does not install from the package registries, but builds from a source checkout
like detectron2 (`python setup.py build_ext --inplace`, checkout on PYTHONPATH); its configs are read
from that checkout (`configs/FCOS-Detection/R_50_1x.yaml`, `configs/CondInst/MS_R_50_1x.yaml`,
`configs/SOLOv2/R50_3x.yaml`). Without it
they are reported as skipped (their conversion is tested in tests/test_d2_checkpoint.py with checkpoints
written in AdelaiDet's names and shapes). SOLOv2 predicts no boxes (AdelaiDet's are zeros), so its
detections are matched by mask IoU instead.
Without detectron2 the benchmark writes a JSON saying it was skipped and exits 0 (so `make bench` runs).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "retinanet": ("COCO-Detection/retinanet_R_50_FPN_1x.yaml", "configs/Teachers/retinanet_R_101_FPN_3x.yaml"),
    "faster_rcnn": ("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", "configs/Teachers/faster_rcnn_R_101_FPN_3x.yaml"),
    "mask_rcnn": (
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
        "configs/Teachers/mask_rcnn_R_101_FPN_3x.yaml",
    ),
}
# AdelaiDet models: (config under the AdelaiDet checkout's configs/, the project's teacher config).
ADELAIDET_MODELS = {
    "fcos": ("FCOS-Detection/R_50_1x.yaml", "configs/Teachers/fcos_R_101_FPN_3x.yaml"),
    "condinst": ("CondInst/MS_R_50_1x.yaml", "configs/Teachers/condinst_R_101_FPN_3x.yaml"),
    "solov2": ("SOLOv2/R50_3x.yaml", "configs/Teachers/solov2_R_101_FPN_3x.yaml"),
}
NUM_CLASSES = 80
TOP_K = 50


def images(seed: int, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Smooth random RGB images with integer 0-255 values (exact in both channel orders)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        coarse = torch.rand(1, 3, h // 16 + 1, w // 16 + 1, generator=gen)
        fine = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
        noise = torch.rand(3, h, w, generator=gen) * 0.15
        out.append(((fine * 0.85 + noise) * 255).round().clamp(0, 255))
    return out


def randomise(model: torch.nn.Module, seed: int, calibration: list[torch.Tensor]) -> None:
    """Redraw FrozenBN affine parameters and prediction layers; set BN statistics from `calibration`.

    The statistics are each FrozenBN input's per-channel mean and variance on the calibration images
    (what a trained BN holds), so activations stay O(1) through 50+ layers instead of growing to 1e4.
    """
    from detectron2.layers import FrozenBatchNorm2d

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if ".norm." in name and name.endswith("weight"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
            elif ".norm." in name and name.endswith("bias"):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
            elif name.endswith(("cls_score.bias", "objectness_logits.bias")):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) - 1.0)
            elif name.endswith("cls_logits.bias"):  # FCOS / CondInst: scored with the centre-ness product
                tensor.copy_(torch.randn(tensor.shape, generator=gen))
            elif name.endswith("fcos_head.bbox_pred.bias"):
                # distances go through a ReLU: a positive bias keeps most boxes non-empty, which the
                # final clip-and-drop-empty step would otherwise remove (leaving little to compare)
                tensor.copy_(1.0 + 0.1 * torch.randn(tensor.shape, generator=gen))
            elif name.endswith("cate_pred.bias"):
                # SOLOv2 computes a full-image mask for every (grid cell, class) above its threshold before
                # any top-k: a prior this low keeps that to a few hundred of its 3872 x 80 candidates
                tensor.copy_(0.5 * torch.randn(tensor.shape, generator=gen) - 4.0)
            elif name.endswith(
                (
                    "cls_score.weight",
                    "bbox_pred.weight",
                    "anchor_deltas.weight",
                    "objectness_logits.weight",
                    "cls_logits.weight",
                    "cate_pred.weight",
                )
            ):
                tensor.copy_(0.05 * torch.randn(tensor.shape, generator=gen))

        def calibrate(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0]
            module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
            module.running_var.copy_(x.var(dim=(0, 2, 3)))

        hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
        model.backbone(reference_input(model, calibration).tensor)
        for hook in hooks:
            hook.remove()


def reference_input(model: torch.nn.Module, bgr: list[torch.Tensor]) -> Any:
    """The reference model's normalised, padded batch (AdelaiDet's FCOS, a detectron2 ProposalNetwork, and
    its CondInst normalise inside their forward, without preprocess_image: done here as they do it)."""
    if hasattr(model, "preprocess_image"):
        return model.preprocess_image([{"image": img} for img in bgr])
    from detectron2.structures import ImageList

    normalise = getattr(model, "normalizer", None) or (lambda x: (x - model.pixel_mean) / model.pixel_std)
    return ImageList.from_tensors([normalise(img) for img in bgr], model.backbone.size_divisibility)


def reference_cfg(name: str, config: str) -> Any:
    """detectron2's model-zoo config, or AdelaiDet's from the importable checkout (None: no checkout)."""
    if name in ADELAIDET_MODELS:
        import adet
        import adet.modeling  # noqa: F401  (registers AdelaiDet's meta-architectures)
        from adet.config import get_cfg as adet_get_cfg

        path = Path(adet.__file__).resolve().parents[1] / "configs" / config
        if not path.is_file():
            return None
        cfg = adet_get_cfg()
        cfg.merge_from_file(str(path))
    else:
        from detectron2 import model_zoo
        from detectron2.config import get_cfg as d2_get_cfg

        cfg = d2_get_cfg()
        cfg.merge_from_file(model_zoo.get_config_file(config))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def level_stats(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    diff = (ours - ref).abs()
    return {
        "shape": list(ref.shape),
        "max_abs": float(diff.max()),
        "max_ref": float(ref.abs().max()),
        "max_rel": float(diff.max() / ref.abs().max().clamp_min(1e-12)),
        "rel_l2": float((ours - ref).norm() / ref.norm().clamp_min(1e-12)),
    }


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou as iou

    return iou(a, b) if len(a) and len(b) else torch.zeros(len(a), len(b))


def mask_iou_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n, H, W] x [m, H, W] boolean masks -> [n, m] IoU."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None] - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


def compare_detections(ours: dict[str, torch.Tensor], ref: Any, by_masks: bool = False) -> dict[str, Any]:
    """Match detectron2's top detections to the project's: same class (ours = d2 + 1), IoU >= 0.99 (of
    boxes; of masks with `by_masks`, for SOLOv2, whose reference boxes are zeros)."""
    ref_boxes, ref_scores, ref_labels = ref.pred_boxes.tensor, ref.scores, ref.pred_classes + 1
    k = min(TOP_K, len(ref_scores))
    if by_masks:
        ious = (
            mask_iou_matrix(ref.pred_masks[:k].bool(), ours["masks"][:, 0] >= 0.5)
            if k and len(ours["scores"])
            else torch.zeros(k, len(ours["scores"]))
        )
    else:
        ious = box_iou(ref_boxes[:k], ours["boxes"])
    used: set[int] = set()
    matched, score_diff, box_diff, mask_iou = 0, 0.0, 0.0, []
    for i in range(k):
        candidates = [
            j
            for j in torch.argsort(ious[i], descending=True).tolist()
            if j not in used and int(ours["labels"][j]) == int(ref_labels[i]) and ious[i, j] >= 0.99
        ]
        if not candidates:
            continue
        j = candidates[0]
        used.add(j)
        matched += 1
        score_diff = max(score_diff, float((ours["scores"][j] - ref_scores[i]).abs()))
        if not by_masks:
            box_diff = max(box_diff, float((ours["boxes"][j] - ref_boxes[i]).abs().max()))
        if "masks" in ours and ref.has("pred_masks"):
            a, b = ours["masks"][j, 0] >= 0.5, ref.pred_masks[i].bool()
            union = (a | b).sum().item()
            mask_iou.append((a & b).sum().item() / union if union else 1.0)
    same_order = bool(
        len(ours["scores"]) >= k
        and torch.equal(ours["labels"][:k], ref_labels[:k])
        and (by_masks or torch.allclose(ours["boxes"][:k], ref_boxes[:k], atol=1e-2))
    )
    out = {
        "detectron2": len(ref_scores),
        "project": len(ours["scores"]),
        "top_k": k,
        "top_k_matched": matched,
        "top_k_same_order": same_order,
        "max_score_diff": score_diff,
        "max_box_diff": None if by_masks else box_diff,
    }
    if mask_iou:
        out["min_mask_iou"] = min(mask_iou)
        out["mean_mask_iou"] = sum(mask_iou) / len(mask_iou)
    return out


def run_model(
    name: str, d2_config: str, teacher_config: str, seed: int, sizes: list[tuple[int, int]], work: Path
) -> dict[str, Any]:
    from detectron2.modeling import build_model

    from detection.config import setup_cfg
    from detection.engine.checkpoint import load_weights
    from detection.modeling.detector import build_detector

    d2cfg = reference_cfg(name, d2_config)
    if d2cfg is None:
        return {
            "skipped": f"AdelaiDet is importable but its configs/{d2_config} is not beside it (use a source checkout)"
        }
    torch.manual_seed(seed)
    d2_model = build_model(d2cfg).eval()
    rgb = images(seed, sizes)
    bgr = [img.flip(0) for img in rgb]
    randomise(d2_model, seed, images(seed + 100, sizes))
    pkl = work / f"{name}_d2.pkl"
    with open(pkl, "wb") as handle:
        pickle.dump(
            {
                "model": {k: v.detach().cpu().numpy() for k, v in d2_model.state_dict().items()},
                "__author__": "bench.d2_parity",
            },
            handle,
        )

    cfg = setup_cfg(
        str(REPO / teacher_config), ["MODEL.BACKBONE.DEPTH", "50", "MODEL.WEIGHTS", str(pkl), "MODEL.DEVICE", "cpu"]
    )
    ours = build_detector(cfg, NUM_CLASSES + 1).eval()
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        load_weights(ours, pkl)

    result: dict[str, Any] = {"d2_config": d2_config, "teacher_config": teacher_config, "load_report": log.getvalue()}
    with torch.no_grad():
        start = time.perf_counter()
        d2_in = reference_input(d2_model, bgr)
        d2_feats = d2_model.backbone(d2_in.tensor)
        inputs = [{"image": img, "height": img.shape[1], "width": img.shape[2]} for img in bgr]
        # AdelaiDet's CondInst infers one image size per batch (Instances.cat): detections image by image
        # there, and so here, so that both pad alike
        one_by_one = name == "condinst"
        d2_out = [d2_model([x])[0] for x in inputs] if one_by_one else d2_model(inputs)
        d2_seconds = time.perf_counter() - start
        start = time.perf_counter()
        our_in = ours.preprocess(rgb)
        our_feats = ours.features(our_in.tensors)
        our_out = [ours([img])[0][0] for img in rgb] if one_by_one else ours(rgb)[0]
        our_seconds = time.perf_counter() - start
    result["input"] = level_stats(our_in.tensors, d2_in.tensor)
    result["levels"] = {lvl: level_stats(our_feats[lvl], d2_feats[lvl]) for lvl in ours.levels}
    result["detections"] = [
        compare_detections(o, r["instances"], by_masks=name == "solov2") for o, r in zip(our_out, d2_out)
    ]
    result["seconds"] = {"detectron2": round(d2_seconds, 2), "project": round(our_seconds, 2)}
    result["ablations"] = ablations(name, ours, cfg, rgb, d2_feats, d2_out)
    result["worst_level_max_rel"] = max(s["max_rel"] for s in result["levels"].values())
    result["features_within_1e-4"] = result["worst_level_max_rel"] <= 1e-4
    result["top_detections_same"] = all(d["top_k_matched"] == d["top_k"] for d in result["detections"])
    return result


def ablations(
    name: str,
    ours: torch.nn.Module,
    cfg: Any,
    rgb: list[torch.Tensor],
    d2_feats: dict[str, torch.Tensor],
    d2_out: list[dict[str, Any]],
) -> dict[str, Any]:
    """What two of the options buy, measured by switching them off on the same converted weights.

    - "torchvision FrozenBN arithmetic": the backbone's D2FrozenBatchNorm2d replaced by torchvision's
      FrozenBatchNorm2d (same function, x * scale + shift instead of the fused op): features only;
    - "torchvision conventions": the converted weights in a model built with MODEL.CONVENTIONS
      torchvision (anchors, pooling, proposal selection, post-processing as torchvision does them; the
      loader refuses this, so the tensors are copied directly here): detections.
    """
    from torchvision.ops.misc import FrozenBatchNorm2d

    from detection.interop.d2_conventions import D2FrozenBatchNorm2d
    from detection.modeling.detector import build_detector

    out: dict[str, Any] = {}
    plain = build_detector(cfg, NUM_CLASSES + 1).eval()
    plain.load_state_dict(ours.state_dict())

    def swap(module: torch.nn.Module) -> None:
        for child_name, child in module.named_children():
            if isinstance(child, D2FrozenBatchNorm2d):
                replacement = FrozenBatchNorm2d(child.weight.shape[0], eps=child.eps)
                replacement.load_state_dict(child.state_dict())
                setattr(module, child_name, replacement)
            else:
                swap(child)

    swap(plain.model.backbone.body)
    with torch.no_grad():
        feats = plain.features(plain.preprocess(rgb).tensors)
    out["torchvision FrozenBN arithmetic"] = {
        "worst_level_max_rel": max(level_stats(feats[lvl], d2_feats[lvl])["max_rel"] for lvl in plain.levels)
    }
    if name not in MODELS:  # AdelaiDet's FCOS needs its scales, SOLOv2 has no conventions to switch
        return out
    tv_cfg = cfg.clone()
    tv_cfg.MODEL.CONVENTIONS = "torchvision"
    tv = build_detector(tv_cfg, NUM_CLASSES + 1).eval()
    tv.load_state_dict(ours.state_dict())
    with torch.no_grad():
        tv_out, _, _ = tv(rgb)
    dets = [compare_detections(o, r["instances"]) for o, r in zip(tv_out, d2_out)]
    out["torchvision conventions"] = {
        "top_k_matched": [d["top_k_matched"] for d in dets],
        "top_k": [d["top_k"] for d in dets],
    }
    return out


def markdown(result: dict[str, Any]) -> str:
    if result.get("skipped"):
        return f"skipped: {result['skipped']}"
    lines = [
        f"Images: {result['sizes']} (one batch), seed {result['seed']}, R-50 FPN, {NUM_CLASSES} classes, "
        "random init (FrozenBN redrawn and calibrated, prediction layers redrawn). Relative = max |project - "
        "detectron2| / max |detectron2| per level (goal 1e-4).",
        "",
        "| model | input max abs | "
        + " | ".join(f"{lvl} max rel" for lvl in ("p2", "p3", "p4", "p5", "p6", "p7"))
        + " | worst rel L2 | detections (d2 / ours per image) | top-k matched | max score diff | max box diff |",
        "|---|---:|" + "---:|" * 6 + "---:|---|---|---:|---:|",
    ]
    for name, r in result["models"].items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} |" + " |" * 11)
            continue
        levels = [
            f"{r['levels'][lvl]['max_rel']:.1e}" if lvl in r["levels"] else "-"
            for lvl in ("p2", "p3", "p4", "p5", "p6", "p7")
        ]
        dets = r["detections"]
        counts = ", ".join(f"{d['detectron2']}/{d['project']}" for d in dets)
        matched = ", ".join(f"{d['top_k_matched']}/{d['top_k']}" for d in dets)
        lines.append(
            f"| {name} | {r['input']['max_abs']:.1e} | "
            + " | ".join(levels)
            + f" | {max(s['rel_l2'] for s in r['levels'].values()):.1e}"
            + f" | {counts} | {matched}"
            + f" | {max(d['max_score_diff'] for d in dets):.1e} | "
            + (
                f"{max(d['max_box_diff'] for d in dets):.1e} |"
                if dets[0]["max_box_diff"] is not None
                else "- (no boxes) |"
            )
        )
        if any("min_mask_iou" in d for d in dets):
            lines.append(
                f"| {name} masks: min IoU of matched masks "
                f"{min(d.get('min_mask_iou', 1.0) for d in dets):.4f} |" + " |" * 11
            )
    lines += [
        "",
        "Ablations on the same converted weights (what the options buy):",
        "",
        "| model | torchvision FrozenBN arithmetic: worst level max rel | torchvision conventions: top-k matched |",
        "|---|---:|---|",
    ]
    for name, r in result["models"].items():
        if "ablations" in r:
            a = r["ablations"]
            tv = a.get("torchvision conventions")
            lines.append(
                f"| {name} | {a['torchvision FrozenBN arithmetic']['worst_level_max_rel']:.1e} | "
                + (", ".join(f"{m}/{k}" for m, k in zip(tv["top_k_matched"], tv["top_k"])) if tv else "-")
                + " |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.d2_parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "d2_parity.json")
    parser.add_argument("--quick", action="store_true", help="smaller images")
    parser.add_argument(
        "--models", nargs="+", choices=sorted({**MODELS, **ADELAIDET_MODELS}), default=[*MODELS, *ADELAIDET_MODELS]
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = [(256, 320), (224, 288)] if args.quick else [(480, 640), (512, 384)]
    result: dict[str, Any] = {"sizes": sizes, "seed": args.seed, "quick": args.quick, "models": {}}
    start = time.perf_counter()
    try:
        import detectron2
    except ImportError as exc:
        result["skipped"] = f"detectron2 is not importable ({exc}); build it from source (docs/D2_INTEROP.md)"
        print(f"bench.d2_parity: {result['skipped']}", file=sys.stderr)
    else:
        result["detectron2"] = {
            "version": getattr(detectron2, "__version__", "?"),
            "path": str(Path(detectron2.__file__).parent),
        }
        torch.set_num_threads(max(1, torch.get_num_threads()))
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.models:
                d2_config, teacher_config = {**MODELS, **ADELAIDET_MODELS}[name]
                if name in ADELAIDET_MODELS and importlib.util.find_spec("adet") is None:
                    result["models"][name] = {
                        "skipped": "needs AdelaiDet (build it from a source checkout, put it "
                        "on PYTHONPATH); conversion tested in tests/test_d2_checkpoint.py"
                    }
                    continue
                print(f"[d2_parity] {name} ...", flush=True)
                result["models"][name] = run_model(name, d2_config, teacher_config, args.seed, sizes, Path(tmp))
    result["seconds_total"] = round(time.perf_counter() - start, 1)
    result["markdown"] = markdown(result)
    print(result["markdown"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
