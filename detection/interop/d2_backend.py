"""MODEL.BACKEND detectron2: the detector built by detectron2 itself, behind the DetectorAdapter contract.

Where detectron2 (and AdelaiDet for FCOS) is importable, a detectron2 user can dump a teacher exactly as
detectron2 builds it: MODEL.D2_CONFIG names a detectron2 config (a file, or a model-zoo name such as
COCO-Detection/retinanet_R_101_FPN_3x.yaml), `detectron2.modeling.build_model` builds it, and this
adapter gives stage one and stage two the same view as the torchvision backend's: training ->
(loss dict, FPN features p2..p7, ImageList); eval -> (detections in the sample frame, features,
ImageList); `preprocess` / `features` for stage one; FPN + head weights under the torchvision
backend's names (detection.interop.d2_checkpoint's map), so one cache serves students of either backend.
Where detectron2 is missing, building raises one UserError saying how to install it.

The project's config stays authoritative for what the rest of the pipeline reads (architecture, depth,
FPN width, classes, pixel mean/std and input format, size divisibility); they must agree with the
detectron2 config, and a difference is refused naming both values.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from detection.errors import UserError
from detection.interop import d2_checkpoint
from detection.modeling.architectures import ARCHITECTURES, LEVEL_STRIDES

INSTALL = (
    "build detectron2 from source (it is not on PyPI): git clone https://github.com/facebookresearch/detectron2 "
    "&& pip install 'setuptools<81' && cd detectron2 && python setup.py build_ext --inplace, then put it on "
    "PYTHONPATH (docs/D2_INTEROP.md), or use MODEL.BACKEND torchvision with the checkpoint as MODEL.WEIGHTS"
)
ADELAIDET = (
    "install AdelaiDet (git clone https://github.com/aim-uofa/AdelaiDet && python setup.py build develop) "
    "on top of detectron2, or use MODEL.BACKEND torchvision with the checkpoint as MODEL.WEIGHTS"
)


def import_detectron2(architecture: str) -> Any:
    """The detectron2 package (and AdelaiDet's config/registrations for FCOS), or one UserError."""
    try:
        import detectron2  # noqa: F401
        import detectron2.config
        import detectron2.modeling
    except ImportError as exc:
        raise UserError(f"MODEL.BACKEND detectron2, but detectron2 cannot be imported here ({exc}).", INSTALL) from None
    if ARCHITECTURES.get(architecture).d2_adelaidet:
        try:
            import adet.config  # noqa: F401
            import adet.modeling  # noqa: F401 - importing it registers AdelaiDet's FCOS with detectron2
        except ImportError as exc:
            raise UserError(
                f"MODEL.BACKEND detectron2 with FCOS needs AdelaiDet, which cannot be imported ({exc}).", ADELAIDET
            ) from None
    return detectron2


def resolve_d2_config(name: str) -> str:
    """A config file path: MODEL.D2_CONFIG as a path, else as a detectron2 model-zoo name."""
    if not name:
        raise UserError(
            "MODEL.BACKEND detectron2 needs MODEL.D2_CONFIG (the detectron2 config to build).",
            "set MODEL.D2_CONFIG to a detectron2 config file or model-zoo name, e.g. "
            "COCO-Detection/retinanet_R_101_FPN_3x.yaml (configs/Teachers/ set it)",
        )
    if os.path.isfile(name):
        return name
    from detectron2 import model_zoo

    try:
        return model_zoo.get_config_file(name)
    except RuntimeError:
        raise UserError(
            f"MODEL.D2_CONFIG '{name}' is neither a file nor a detectron2 model-zoo config.",
            "give the path of a detectron2 config file, or a name like COCO-Detection/retinanet_R_101_FPN_3x.yaml",
        ) from None


def d2_config(cfg: Any, num_classes: int) -> Any:
    """The detectron2 CfgNode: MODEL.D2_CONFIG, with the device and class count of this run."""
    entry = ARCHITECTURES.get(cfg.MODEL.META_ARCHITECTURE)
    import_detectron2(entry.name)
    path = resolve_d2_config(str(cfg.MODEL.D2_CONFIG))
    if entry.d2_adelaidet:
        from adet.config import get_cfg
    else:
        from detectron2.config import get_cfg
    d2cfg = get_cfg()
    try:
        d2cfg.merge_from_file(path)
    except Exception as exc:  # detectron2 raises KeyError / AssertionError / yaml errors for bad files
        raise UserError(
            f"detectron2 cannot read MODEL.D2_CONFIG '{path}': {type(exc).__name__}: {exc}",
            "point MODEL.D2_CONFIG at a detectron2 config of this detectron2 version",
        ) from None
    k = num_classes - 1
    d2cfg.MODEL.DEVICE = str(cfg.MODEL.DEVICE)
    d2cfg.MODEL.WEIGHTS = ""  # MODEL.WEIGHTS is loaded by the project (detection.engine.checkpoint), reported there
    d2cfg.MODEL.RETINANET.NUM_CLASSES = k
    d2cfg.MODEL.ROI_HEADS.NUM_CLASSES = k
    getattr(d2cfg.MODEL, entry.d2_classes_section).NUM_CLASSES = k
    _check_agreement(cfg, d2cfg, path)
    d2cfg.freeze()
    return d2cfg


def d2_architecture(d2cfg: Any) -> str:
    """The table's name for what a detectron2 config builds; its own META_ARCHITECTURE if no entry matches."""
    meta, generator = d2cfg.MODEL.META_ARCHITECTURE, d2cfg.MODEL.PROPOSAL_GENERATOR.NAME
    for entry in ARCHITECTURES:
        if (
            entry.d2_meta_architecture == meta
            and entry.d2_proposal_generator in ("", generator)
            and entry.masks == bool(d2cfg.MODEL.MASK_ON)
        ):
            return entry.name
    return meta


def _check_agreement(cfg: Any, d2cfg: Any, path: str) -> None:
    """The project config and the detectron2 config must describe the same model and input."""
    checks = [
        ("MODEL.META_ARCHITECTURE", cfg.MODEL.META_ARCHITECTURE, d2_architecture(d2cfg)),
        ("MODEL.BACKBONE.DEPTH", int(cfg.MODEL.BACKBONE.DEPTH), int(d2cfg.MODEL.RESNETS.DEPTH)),
        ("MODEL.FPN.OUT_CHANNELS", int(cfg.MODEL.FPN.OUT_CHANNELS), int(d2cfg.MODEL.FPN.OUT_CHANNELS)),
        ("MODEL.INPUT_FORMAT", str(cfg.MODEL.INPUT_FORMAT), str(d2cfg.INPUT.FORMAT)),
        (
            "MODEL.PIXEL_MEAN",
            [round(float(v), 4) for v in cfg.MODEL.PIXEL_MEAN],
            [round(float(v), 4) for v in d2cfg.MODEL.PIXEL_MEAN],
        ),
        (
            "MODEL.PIXEL_STD",
            [round(float(v), 4) for v in cfg.MODEL.PIXEL_STD],
            [round(float(v), 4) for v in d2cfg.MODEL.PIXEL_STD],
        ),
    ]
    diffs = [f"{name}: project {ours!r}, detectron2 {theirs!r}" for name, ours, theirs in checks if ours != theirs]
    if diffs:
        raise UserError(
            f"MODEL.D2_CONFIG {path} describes another model than the project config:\n    " + "\n    ".join(diffs),
            "set these project keys to the detectron2 config's values (the cache records them), "
            "or use a matching MODEL.D2_CONFIG",
        )


class D2DetectorAdapter(nn.Module):
    """A detectron2-built detector with the torchvision adapter's interface (detection.modeling.detector.DetectorAdapter)."""

    backend = "detectron2"

    def __init__(
        self, model: nn.Module, d2cfg: Any, architecture: str, size_divisibility: int, levels: list[str]
    ) -> None:
        super().__init__()
        self.model = model
        self.d2cfg = d2cfg
        self.architecture = architecture
        self.mask_on = ARCHITECTURES.get(architecture).masks
        self.levels = list(levels)
        self.strides = {name: LEVEL_STRIDES[name] for name in self.levels}
        shapes = model.backbone.output_shape()
        missing = [name for name in self.levels if name not in shapes]
        if missing:
            raise UserError(
                f"the detectron2 backbone of {architecture} has no FPN level(s) {missing} (it has {sorted(shapes)}).",
                "use a detectron2 config with an FPN backbone",
            )
        self.out_channels = int(shapes[self.levels[0]].channels)
        own = int(model.backbone.size_divisibility or 1)
        if size_divisibility % own:
            raise UserError(
                f"MODEL.SIZE_DIVISIBILITY {size_divisibility} is not a multiple of the detectron2 "
                f"backbone's size divisibility {own}.",
                f"set MODEL.SIZE_DIVISIBILITY {own} (or a multiple)",
            )
        self.size_divisibility = int(size_divisibility)
        self.input_format = str(d2cfg.INPUT.FORMAT)
        self.iteration = 0

    # --- the parts every stage uses -------------------------------------------------------------
    def preprocess(self, images: list[Tensor]) -> ImageList:
        """RGB 0-255 -> the model's channel order, normalised with its pixel mean/std, zero-padded."""
        from detectron2.structures import ImageList as D2ImageList

        mean, std = self.model.pixel_mean, self.model.pixel_std
        normalised = [
            ((img.flip(0) if self.input_format == "BGR" else img).to(mean.device) - mean) / std for img in images
        ]
        batch = D2ImageList.from_tensors(normalised, self.size_divisibility)
        return ImageList(batch.tensor, [tuple(int(v) for v in s) for s in batch.image_sizes])

    def features(self, batched: Tensor) -> dict[str, Tensor]:
        out = self.model.backbone(batched)
        return {name: out[name] for name in self.levels}

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[dict[str, Tensor] | list[dict[str, Tensor]], dict[str, Tensor], ImageList]:
        from detectron2.structures import ImageList as D2ImageList

        if self.training and targets is None:
            raise ValueError("D2DetectorAdapter.forward needs targets in training mode.")
        image_list = self.preprocess(images)
        d2_images = D2ImageList(image_list.tensors, image_list.image_sizes)
        raw = self.model.backbone(image_list.tensors)
        with self._event_storage():
            if self.training:
                outputs: Any = self._losses(d2_images, raw, self._instances(targets, image_list.image_sizes))
                self.iteration += 1
            else:
                outputs = self._detections(d2_images, raw)
        return outputs, {name: raw[name] for name in self.levels}, image_list

    @contextlib.contextmanager
    def _event_storage(self):  # detectron2's heads log to the current EventStorage while training
        from detectron2.utils.events import EventStorage

        with EventStorage(self.iteration):
            yield

    def _instances(self, targets: list[dict[str, Tensor]], sizes: list[tuple[int, int]]) -> list[Any]:
        from detectron2.structures import BitMasks, Boxes, Instances

        out = []
        for target, size in zip(targets, sizes):
            inst = Instances(size)
            inst.gt_boxes = Boxes(target["boxes"].float())
            inst.gt_classes = target["labels"].long() - 1  # detectron2's classes are 0..K-1
            if self.mask_on and "masks" in target:
                inst.gt_masks = BitMasks(target["masks"].bool())
            out.append(inst)
        return out

    def _losses(self, images: Any, raw: dict[str, Tensor], gt: list[Any]) -> dict[str, Tensor]:
        # detectron2's three meta-architecture shapes, told apart by their modules: GeneralizedRCNN
        # (proposals, then RoI heads), a one-stage proposal network (AdelaiDet's FCOS), RetinaNet (one head).
        model = self.model
        if hasattr(model, "roi_heads"):
            proposals, proposal_losses = model.proposal_generator(images, raw, gt)
            _, detector_losses = model.roi_heads(images, raw, proposals, gt)
            return {**detector_losses, **proposal_losses}
        if hasattr(model, "proposal_generator"):
            _, losses = model.proposal_generator(images, raw, gt)
            return losses
        feats = [raw[f] for f in model.head_in_features]
        return model.forward_training(images, feats, model.head(feats), gt)

    def _detections(self, images: Any, raw: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        from detectron2.modeling import detector_postprocess

        model = self.model  # the three shapes of _losses
        if hasattr(model, "roi_heads"):
            proposals, _ = model.proposal_generator(images, raw, None)
            results, _ = model.roi_heads(images, raw, proposals, None)
        elif hasattr(model, "proposal_generator"):
            results, _ = model.proposal_generator(images, raw, None)
        else:
            feats = [raw[f] for f in model.head_in_features]
            results = model.forward_inference(images, feats, model.head(feats))
        out = []
        for result, (h, w) in zip(results, images.image_sizes):
            r = detector_postprocess(result, h, w)
            det = {"boxes": r.pred_boxes.tensor, "scores": r.scores, "labels": r.pred_classes + 1}
            if r.has("pred_masks"):
                det["masks"] = r.pred_masks[:, None].float()  # [N, 1, H, W], as the torchvision backend
            out.append(det)
        return out

    # --- ICD's teacher initialisation, under the torchvision backend's names ----------------------
    def _project_map(self) -> dict[str, tuple[str, Any]]:
        """detectron2 key -> (torchvision-backend key, Rule) for every FPN / head tensor."""
        lateral_base = ARCHITECTURES.get(self.architecture).first_level
        anchors = self._num_anchors()
        out = {}
        for key in self.model.state_dict():
            if key.startswith("backbone.bottom_up.") or key.endswith("num_batches_tracked"):
                continue
            rule = d2_checkpoint.rule_for(key, self.architecture, lateral_base, anchors)
            if rule is not None:
                out[key] = (rule.target, rule)
        return out

    def _num_anchors(self) -> int:
        if ARCHITECTURES.get(self.architecture).anchors_per_position:
            return int(self.model.head.bbox_pred.out_channels) // 4
        return 1

    def _num_classes(self) -> int:
        """K + 1, the torchvision backend's class count."""
        section = ARCHITECTURES.get(self.architecture).d2_classes_section
        return int(getattr(self.d2cfg.MODEL, section).NUM_CLASSES) + 1

    def fpn_and_head_state_dict(self) -> dict[str, Tensor]:
        """FPN + head weights, named and laid out as the torchvision backend's (d2_checkpoint's map)."""
        state = self.model.state_dict()
        return {
            target: rule.convert(state[key].detach().clone(), self._num_classes())
            for key, (target, rule) in self._project_map().items()
        }

    def load_fpn_and_head(self, state: dict[str, Tensor]) -> list[str]:
        """Load torchvision-backend-named FPN/head tensors whose shapes fit; return the skipped keys."""
        own = self.model.state_dict()
        accepted: dict[str, Tensor] = {}
        used = set()
        for key, (target, rule) in self._project_map().items():
            if target not in state:
                continue
            value = rule.invert(torch.as_tensor(state[target]), tuple(own[key].shape))
            if value is not None and tuple(value.shape) == tuple(own[key].shape):
                accepted[key] = value.to(own[key].dtype)
                used.add(target)
        self.model.load_state_dict(accepted, strict=False)
        return sorted(key for key in state if key not in used)


def build_d2_detector(cfg: Any, num_classes: int) -> D2DetectorAdapter:
    """Build MODEL.D2_CONFIG with detectron2 for K = num_classes - 1 classes, randomly initialised."""

    arch = cfg.MODEL.META_ARCHITECTURE
    d2cfg = d2_config(cfg, num_classes)
    from detectron2.modeling import build_model

    model = build_model(d2cfg)
    return D2DetectorAdapter(model, d2cfg, arch, int(cfg.MODEL.SIZE_DIVISIBILITY), list(ARCHITECTURES.get(arch).levels))
