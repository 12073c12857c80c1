"""detectron2 / AdelaiDet checkpoints as MODEL.WEIGHTS: read them safely, map their names, load strictly.

Accepted files:
- detectron2 model-zoo `.pkl`: a pickled dict whose "model" maps detectron2 names to numpy arrays
  (with "__author__", possibly "matching_heuristics"); read by an unpickler that only builds numpy
  arrays and plain containers, so loading never runs pickled code;
- detectron2 / AdelaiDet training `.pth`: {"model": state_dict, "optimizer": ..., ...};
- Caffe2-named ImageNet backbones (detectron2's ImageNetPretrained/MSRA/R-50.pkl: "res2_0_branch2a_w",
  "matching_heuristics"): backbone only, FrozenBN statistics 0 / 1 as detectron2 fills them in.

Detection checkpoints (RetinaNet, Faster R-CNN, Mask R-CNN, AdelaiDet FCOS, CondInst and SOLOv2) load all
or nothing: every tensor of the model must come from the file and every tensor of the file must be used
or be one of the known derived buffers (pixel mean/std, cell anchors: checked against the config, then skipped),
else one UserError says what differs. The loader prints what was loaded as is, what was converted
(class layouts: detectron2 has no background class for sigmoid heads and puts it last for softmax
ones; this project keeps torchvision's `num_classes = K + 1` with 0 = background) and what was skipped.
The architecture options that make the torchvision model compute the same function live in
detection.interop.d2_conventions; see docs/D2_INTEROP.md.
"""

from __future__ import annotations

import codecs
import collections
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from detection.errors import UserError
from detection.modeling.architectures import (
    ARCHITECTURES,
    CHECKPOINT_RULES,
    CONDINST_ARCH,
    FASTER_RCNN_ARCH,
    FCOS_ARCH,
    MASK_RCNN_ARCH,
    RETINANET_ARCH,
    SOLOV2_ARCH,
)
from detection.modeling.meta_arch.condinst import SIZE_OF_INTEREST_PER_STRIDE

# Logit of the background class added to sigmoid heads (RetinaNet, FCOS) that detectron2 trains without
# one: sigmoid(-1e4) == 0 in float32 and float16, so it never passes a score threshold.
BACKGROUND_LOGIT = -1.0e4


def _title(family: str, unknown: str = "model of an unknown kind") -> str:
    """How messages name a checkpoint's family (`family_of`)."""
    if family in ARCHITECTURES:
        return ARCHITECTURES.get(family).checkpoint_title
    return "ImageNet backbone" if family == "backbone" else unknown


# --- reading -----------------------------------------------------------------------------------
class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, numbers, strings and containers; refuses any other global.

    The callables numpy's own pickles name are resolved through numpy's public reduce protocol
    (`ndarray.__reduce__`), not through numpy's internal module paths, which moved in numpy 2.
    """

    _SAFE: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    _RECONSTRUCT = np.zeros(0).__reduce__()[0]
    _SCALAR = np.float32(0).__reduce__()[0]

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._SAFE:
            return self._SAFE[(module, name)]
        if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            if name == "_reconstruct":
                return self._RECONSTRUCT
            if name == "scalar":
                return self._SCALAR
        raise pickle.UnpicklingError(f"the file wants to build {module}.{name}, which a weights file never needs")


def read_pickle(path: str | Path) -> Any:
    """A detectron2 `.pkl` (Python 3 or 2 pickle of numpy arrays), without running pickled code."""
    try:
        with open(path, "rb") as handle:
            return _ArraysOnlyUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise UserError(
            f"cannot read '{path}' as a detectron2 .pkl checkpoint: {exc}",
            "point MODEL.WEIGHTS at a detectron2 model-zoo .pkl or a .pth checkpoint",
        ) from None


@dataclass
class D2Checkpoint:
    """A detectron2-named state dict and what its file said about itself."""

    source: str
    state: dict[str, Tensor]
    author: str = ""
    matching_heuristics: bool = False
    family: str = ""
    notes: list[str] = field(default_factory=list)


_C2_BACKBONE = re.compile(r"^(conv1_|res_conv1_|res\d_\d+_branch|fc1000_)")


def from_payload(payload: Any, source: str) -> D2Checkpoint | None:
    """The checkpoint if `payload` (a loaded file) has detectron2 names, else None (another format)."""
    if not isinstance(payload, dict):
        return None
    author = str(payload.get("__author__", "")) if isinstance(payload.get("__author__", ""), str) else ""
    heuristics = bool(payload.get("matching_heuristics", False))
    if isinstance(payload.get("blobs"), dict):  # Detectron (Caffe2) model zoo: {"blobs": {name: array}}
        payload = {k: v for k, v in payload["blobs"].items() if not k.endswith("_momentum")}
        author, heuristics = author or "Caffe2", True
    state = payload.get("model", payload) if isinstance(payload.get("model", None), dict) else payload
    if not isinstance(state, dict) or not state:
        return None
    keys = [k for k in state if isinstance(k, str)]
    stripped = {re.sub(r"^(module\.)?(model\.)?", "", k): k for k in keys}
    notes: list[str] = []
    if any(k.startswith("backbone.bottom_up.") for k in stripped):
        renamed = {new: state[old] for new, old in stripped.items()}
    elif any(_C2_BACKBONE.match(k) for k in keys):
        renamed = _rename_c2_backbone({k: state[k] for k in keys}, notes)
    elif heuristics and any(k.startswith(("stem.", "res2.")) for k in keys):
        renamed = {f"backbone.bottom_up.{k}": state[k] for k in keys}
    else:
        return None
    tensors: dict[str, Tensor] = {}
    for key, value in renamed.items():
        if isinstance(value, np.ndarray):
            tensors[key] = torch.from_numpy(np.ascontiguousarray(value))
        elif isinstance(value, Tensor):
            tensors[key] = value
        else:
            notes.append(f"{key}: not an array ({type(value).__name__}), ignored")
    ckpt = D2Checkpoint(source=source, state=tensors, author=author, matching_heuristics=heuristics, notes=notes)
    ckpt.family = family_of(tensors)
    return ckpt


def _rename_c2_backbone(state: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Caffe2 ResNet names -> detectron2's (the naming rules of detectron2's C2 loader, for a backbone)."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key.startswith("fc1000_"):
            notes.append(f"{key}: ImageNet classifier, not part of a detector")
            continue
        name = {
            "conv1_w": "stem.conv1.weight",
            "res_conv1_bn_s": "stem.conv1.norm.weight",
            "res_conv1_bn_b": "stem.conv1.norm.bias",
        }.get(key)
        match = re.match(r"^res(\d)_(\d+)_branch(1|2a|2b|2c)_(w|bn_s|bn_b|bn_rm|bn_riv)$", key)
        if name is None and match:
            stage, block, branch, what = match.groups()
            layer = {"1": "shortcut", "2a": "conv1", "2b": "conv2", "2c": "conv3"}[branch]
            suffix = {
                "w": "weight",
                "bn_s": "norm.weight",
                "bn_b": "norm.bias",
                "bn_rm": "norm.running_mean",
                "bn_riv": "norm.running_var",
            }[what]
            name = f"res{stage}.{block}.{layer}.{suffix}"
        if name is None:
            notes.append(f"{key}: not a ResNet tensor, ignored")
            continue
        out[f"backbone.bottom_up.{name}"] = value
    # Caffe2's affine BN has no statistics; detectron2's FrozenBN fills in mean 0 / variance 1.
    for key in [k for k in out if k.endswith(".norm.weight")]:
        base = key[: -len("weight")]
        if base + "running_mean" not in out:
            out[base + "running_mean"] = np.zeros_like(out[key])
            out[base + "running_var"] = np.ones_like(out[key])
    return out


def family_of(state: dict[str, Tensor]) -> str:
    """An architecture name, 'backbone' or 'unknown', by its tensors: the table entry whose
    `checkpoint_signature` prefixes all occur, the longest signature first (Mask R-CNN's holds Faster R-CNN's)."""
    keys = set(state)
    matches = [
        entry
        for entry in ARCHITECTURES
        if entry.checkpoint_signature
        and all(any(k.startswith(prefix) for k in keys) for prefix in entry.checkpoint_signature)
    ]
    if matches:
        return max(matches, key=lambda entry: len(entry.checkpoint_signature)).name
    if all(k.startswith("backbone.bottom_up.") for k in keys):
        return "backbone"
    return "unknown"


def resnet_depth(state: dict[str, Tensor], prefix: str = "backbone.bottom_up.") -> int | None:
    """18 / 34 / 50 / 101 from the block count of res4 and the block type; None if not a ResNet."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"res4\.(\d+)\.", k))}
    if not blocks:
        return None
    bottleneck = any(k.startswith(prefix + "res4.0.conv3.") for k in state)
    return {(2, False): 18, (6, False): 34, (6, True): 50, (23, True): 101}.get((len(blocks), bottleneck))


# --- the name map ------------------------------------------------------------------------------
@dataclass
class Rule:
    """One detectron2 name -> one project name (without the adapter's 'model.' prefix), maybe re-laid out.

    kind: "" (copied), "sigmoid_classes" (a background class added in front of each anchor's K),
    "softmax_background" (background moved from last to first), "box_deltas" (background deltas added
    in front; class-agnostic deltas repeated), "masks" (background mask added; agnostic repeated),
    "classes" (K classes in both layouts, copied as is: only the class count is checked).
    """

    target: str
    kind: str = ""
    num_anchors: int = 1

    @property
    def note(self) -> str:
        return {
            "sigmoid_classes": f"background class added (logit {BACKGROUND_LOGIT:g}, never scores)",
            "softmax_background": "background class moved from last to first",
            "box_deltas": "background deltas (zeros) added in front",
            "masks": "background mask (zeros) added in front",
        }.get(self.kind, "")

    def convert(self, value: Tensor, num_classes: int) -> Tensor:
        """detectron2 layout -> project layout, for `num_classes` = K + 1."""
        rest = value.shape[1:]
        if self.kind == "sigmoid_classes":
            a = self.num_anchors
            grouped = value.reshape(a, value.shape[0] // a, *rest)  # [A, K, ...]
            fill = BACKGROUND_LOGIT if value.dim() == 1 else 0.0
            background = torch.full((a, 1, *rest), fill, dtype=value.dtype)
            return torch.cat([background, grouped], dim=1).reshape(-1, *rest)  # [A*(K+1), ...]
        if self.kind == "softmax_background":
            return torch.cat([value[-1:], value[:-1]], dim=0)
        if self.kind == "box_deltas":
            if value.shape[0] == 4:  # CLS_AGNOSTIC_BBOX_REG: the same deltas for every class
                return value.repeat(num_classes, *([1] * len(rest)))
            return torch.cat([torch.zeros(4, *rest, dtype=value.dtype), value], dim=0)
        if self.kind == "masks":
            if value.shape[0] == 1:  # CLS_AGNOSTIC_MASK
                return value.repeat(num_classes, *([1] * len(rest)))
            return torch.cat([torch.zeros(1, *rest, dtype=value.dtype), value], dim=0)
        return value

    def invert(self, value: Tensor, d2_shape: tuple[int, ...]) -> Tensor | None:
        """Project layout -> detectron2 layout of `d2_shape` (None where it cannot be: agnostic heads)."""
        rest = value.shape[1:]
        if self.kind == "sigmoid_classes":
            a = self.num_anchors
            if value.shape[0] % a:
                return None
            return value.reshape(a, value.shape[0] // a, *rest)[:, 1:].reshape(-1, *rest)
        if self.kind == "softmax_background":
            return torch.cat([value[1:], value[:1]], dim=0)
        if self.kind == "box_deltas":
            return value[4:] if d2_shape[0] != 4 else None
        if self.kind == "masks":
            return value[1:] if d2_shape[0] != 1 else None
        return value


def _backbone_rule(key: str, lateral_base: int) -> Rule | None:
    rest = key[len("backbone.") :]
    if rest.startswith("bottom_up."):
        body = rest[len("bottom_up.") :]
        if body.startswith("stem.conv1.norm."):
            return Rule("backbone.body.bn1." + body[len("stem.conv1.norm.") :])
        if body == "stem.conv1.weight":
            return Rule("backbone.body.conv1.weight")
        m = re.match(r"^res(\d)\.(\d+)\.(conv\d|shortcut)\.(norm\.)?(\w+)$", body)
        if not m:
            return None
        stage, block, layer, norm, leaf = m.groups()
        if layer == "shortcut":
            name = "downsample.1" if norm else "downsample.0"
        else:
            name = f"bn{layer[-1]}" if norm else layer
        return Rule(f"backbone.body.layer{int(stage) - 1}.{block}.{name}.{leaf}")
    m = re.match(r"^fpn_(lateral|output)(\d)\.(weight|bias)$", rest)
    if m:
        kind, stage, leaf = m.groups()
        blocks = "inner_blocks" if kind == "lateral" else "layer_blocks"
        return Rule(f"backbone.fpn.{blocks}.{int(stage) - lateral_base}.0.{leaf}")
    m = re.match(r"^top_block\.(p6|p7)\.(weight|bias)$", rest)
    if m:
        return Rule(f"backbone.fpn.extra_blocks.{m.group(1)}.{m.group(2)}")
    return None


def rule_for(key: str, family: str, lateral_base: int, num_anchors: int) -> Rule | None:
    """The project name of detectron2 tensor `key` in a `family` model (None: not a tensor we know).

    The backbone's rules are shared; a head's are its architecture's CHECKPOINT_RULES (registered below).
    """
    if key.startswith("backbone."):
        return _backbone_rule(key, lateral_base)
    if not family:
        return None
    return ARCHITECTURES.part(family, CHECKPOINT_RULES)(key, num_anchors)


@ARCHITECTURES.register(RETINANET_ARCH, CHECKPOINT_RULES)
def _retinanet_rule(key: str, num_anchors: int) -> Rule | None:
    m = re.match(r"^head\.(cls|bbox)_subnet\.(\d+)\.(weight|bias)$", key)
    if m:
        kind, index, leaf = m.groups()
        branch = "classification_head" if kind == "cls" else "regression_head"
        return Rule(f"head.{branch}.conv.{int(index) // 2}.0.{leaf}")
    if key.startswith("head.cls_score."):
        return Rule("head.classification_head.cls_logits." + key.rsplit(".", 1)[1], "sigmoid_classes", num_anchors)
    if key.startswith("head.bbox_pred."):
        return Rule("head.regression_head.bbox_reg." + key.rsplit(".", 1)[1])
    return None


@ARCHITECTURES.register(FASTER_RCNN_ARCH, CHECKPOINT_RULES)
def _faster_rcnn_rule(key: str, num_anchors: int) -> Rule | None:
    rpn = {"conv": "conv.0.0", "objectness_logits": "cls_logits", "anchor_deltas": "bbox_pred"}
    m = re.match(r"^proposal_generator\.rpn_head\.(\w+)\.(weight|bias)$", key)
    if m and m.group(1) in rpn:
        return Rule(f"rpn.head.{rpn[m.group(1)]}.{m.group(2)}")
    m = re.match(r"^roi_heads\.box_head\.fc([12])\.(weight|bias)$", key)
    if m:
        return Rule(f"roi_heads.box_head.fc{5 + int(m.group(1))}.{m.group(2)}")
    if key.startswith("roi_heads.box_predictor.cls_score."):
        return Rule("roi_heads.box_predictor.cls_score." + key.rsplit(".", 1)[1], "softmax_background")
    if key.startswith("roi_heads.box_predictor.bbox_pred."):
        return Rule("roi_heads.box_predictor.bbox_pred." + key.rsplit(".", 1)[1], "box_deltas")
    return None


@ARCHITECTURES.register(MASK_RCNN_ARCH, CHECKPOINT_RULES)
def _mask_rcnn_rule(key: str, num_anchors: int) -> Rule | None:
    rule = _faster_rcnn_rule(key, num_anchors)
    if rule is not None:
        return rule
    m = re.match(r"^roi_heads\.mask_head\.mask_fcn(\d)\.(weight|bias)$", key)
    if m:
        return Rule(f"roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}")
    if key.startswith("roi_heads.mask_head.deconv."):
        return Rule("roi_heads.mask_predictor.conv5_mask." + key.rsplit(".", 1)[1])
    if key.startswith("roi_heads.mask_head.predictor."):
        return Rule("roi_heads.mask_predictor.mask_fcn_logits." + key.rsplit(".", 1)[1], "masks")
    return None


@ARCHITECTURES.register(FCOS_ARCH, CHECKPOINT_RULES)
def _fcos_rule(key: str, num_anchors: int) -> Rule | None:
    head = "proposal_generator.fcos_head."
    m = re.match(re.escape(head) + r"(cls|bbox)_tower\.(\d+)\.(weight|bias)$", key)
    if m:
        branch = "classification_head" if m.group(1) == "cls" else "regression_head"
        return Rule(f"head.{branch}.conv.{m.group(2)}.{m.group(3)}")
    simple = {"bbox_pred": "head.regression_head.bbox_reg", "ctrness": "head.regression_head.bbox_ctrness"}
    m = re.match(re.escape(head) + r"(\w+)\.(weight|bias)$", key)
    if m and m.group(1) in simple:
        return Rule(f"{simple[m.group(1)]}.{m.group(2)}")
    if key.startswith(head + "cls_logits."):
        return Rule("head.classification_head.cls_logits." + key.rsplit(".", 1)[1], "sigmoid_classes", 1)
    m = re.match(re.escape(head) + r"scales\.(\d)\.scale$", key)
    if m:
        return Rule(f"head.regression_head.scales.{m.group(1)}")
    return None


@ARCHITECTURES.register(CONDINST_ARCH, CHECKPOINT_RULES)
def _condinst_rule(key: str, num_anchors: int) -> Rule | None:
    if key.startswith(("controller.", "mask_branch.")):
        return Rule(key)  # detection/modeling/meta_arch/condinst.py keeps AdelaiDet's names for these
    return _fcos_rule(key, num_anchors)


@ARCHITECTURES.register(SOLOV2_ARCH, CHECKPOINT_RULES)
def _solov2_rule(key: str, num_anchors: int) -> Rule | None:
    if key.startswith(("ins_head.", "mask_head.")):
        # detection/modeling/meta_arch/solov2.py keeps AdelaiDet's module tree (towers as flat conv-GN-ReLU
        # Sequentials), so the names are the same; the category branch has K sigmoid classes in both.
        return Rule(key, "classes" if key.startswith("ins_head.cate_pred.") else "")
    return None


# --- loading ------------------------------------------------------------------------------------
@dataclass
class Conversion:
    state: dict[str, Tensor]  # adapter keys ('model.' prefix) -> tensors
    loaded: int = 0
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)


def _model_facts(adapter: nn.Module) -> dict[str, Any]:
    """What the built model is: architecture, depth, FPN width, classes, options (for messages)."""
    model = adapter.model
    own = {k[len("model.") :]: v for k, v in adapter.state_dict().items() if k.startswith("model.")}
    blocks = {int(m.group(1)) for k in own if (m := re.match(r"^backbone\.body\.layer3\.(\d+)\.", k))}
    bottleneck = "backbone.body.layer3.0.conv3.weight" in own
    depth = {(2, False): 18, (6, False): 34, (6, True): 50, (23, True): 101}.get((len(blocks), bottleneck))
    options = dict(getattr(model.transform, "options", {}) or {})
    return {
        "own": own,
        "architecture": adapter.architecture,
        "depth": depth,
        "options": options,
        "lateral_base": ARCHITECTURES.get(adapter.architecture).first_level,
    }


def _num_anchors(own: dict[str, Tensor], architecture: str) -> int:
    if ARCHITECTURES.get(architecture).anchors_per_position and "head.regression_head.bbox_reg.weight" in own:
        return int(own["head.regression_head.bbox_reg.weight"].shape[0]) // 4
    return 1


def _classes(rule: Rule, value: Tensor) -> int:
    """K (foreground classes) of a detectron2 class-layout tensor; 0 for class-agnostic deltas / masks."""
    n = int(value.shape[0])
    if rule.kind == "sigmoid_classes":
        return n // rule.num_anchors if n % rule.num_anchors == 0 else -1
    if rule.kind == "softmax_background":
        return n - 1
    if rule.kind == "classes":
        return n
    if rule.kind == "box_deltas":
        return 0 if n == 4 else n // 4
    return 0 if n == 1 else n  # masks


def convert(ckpt: D2Checkpoint, adapter: nn.Module) -> Conversion:
    """Map `ckpt` onto the project model `adapter` (a torchvision-backend DetectorAdapter), strictly."""
    facts = _model_facts(adapter)
    own, arch = facts["own"], facts["architecture"]
    family = ckpt.family
    what = f"'{ckpt.source}' is a detectron2 {_title(family)} checkpoint"
    if family == "unknown" or (family != "backbone" and family != arch):
        fix = (
            f"use {ARCHITECTURES.get(family).teacher_config} (or MODEL.META_ARCHITECTURE {family} with its options)"
            if family in ARCHITECTURES
            else "use a detectron2/AdelaiDet RetinaNet, Faster R-CNN, Mask R-CNN, FCOS, CondInst or SOLOv2 checkpoint, "
            "or an ImageNet backbone"
        )
        raise UserError(f"{what}, but the config builds {arch}; nothing was loaded.", fix)
    native = family == "backbone" or ARCHITECTURES.get(family).adelaidet_native
    if not native and facts["options"].get("conventions") != "detectron2":
        raise UserError(
            f"{what}, but the model is built with torchvision's conventions, so the weights would "
            "compute another function (anchors, RoI pooling, post-processing differ); nothing was loaded.",
            f"use {ARCHITECTURES.get(family).teacher_config}, or set MODEL.CONVENTIONS detectron2 with MODEL.INPUT_FORMAT, "
            "MODEL.PIXEL_MEAN/STD and MODEL.RESNETS.STRIDE_IN_1X1 as the checkpoint was trained",
        )
    ckpt_depth = resnet_depth(ckpt.state)
    problems: list[str] = []
    if ckpt_depth and facts["depth"] and ckpt_depth != facts["depth"]:
        problems.append(f"ResNet depth: checkpoint R-{ckpt_depth}, model R-{facts['depth']} (MODEL.BACKBONE.DEPTH)")
    num_anchors = _num_anchors(own, arch)
    out = Conversion(state={})
    unused: list[str] = []
    for key, value in sorted(ckpt.state.items()):
        if key.endswith("num_batches_tracked"):
            out.skipped.append(f"{key} (BatchNorm counter)")
            continue
        if key in ("pixel_mean", "pixel_std"):
            _check_pixel_stat(key, value, facts["options"], problems, out)
            continue
        if "anchor_generator.cell_anchors" in key:
            _check_cell_anchors(key, value, adapter, problems, out)
            continue
        if family == CONDINST_ARCH.name and key in ("mask_head._iter", "mask_head.sizes_of_interest"):
            _check_condinst_buffer(key, value, problems, out)
            continue
        if family == CONDINST_ARCH.name and key.startswith(("mask_branch.seg_head.", "mask_branch.logits.")):
            # the `_sem` configs' auxiliary semantic-segmentation loss: a training-only branch
            out.skipped.append(f"{key} (AdelaiDet's training-only semantic-loss branch; inference does not use it)")
            continue
        rule = rule_for(key, family if family != "backbone" else "", facts["lateral_base"], num_anchors)
        if rule is None or rule.target not in own:
            unused.append(key + (f" (-> {rule.target})" if rule else ""))
            continue
        shape = tuple(own[rule.target].shape)
        tensor = value.to(own[rule.target].dtype)
        if rule.kind:
            if tensor.shape[1:] != own[rule.target].shape[1:]:
                problems.append(_shape_problem(key, rule.target, tuple(tensor.shape), shape))
                continue
            model_k = _model_classes(own, arch, num_anchors)
            ckpt_k = _classes(rule, tensor)
            if ckpt_k != model_k and not (rule.kind in ("box_deltas", "masks") and ckpt_k == 0):
                problems.append(
                    f"classes: checkpoint {ckpt_k}, model {model_k} (MODEL.NUM_CLASSES or the training "
                    "set's categories)"
                )
                continue
            tensor = rule.convert(tensor, model_k + 1)
            if rule.note:
                out.converted.append(f"{key}: {rule.note}")
            else:
                out.loaded += 1
        else:
            out.loaded += 1
        if tuple(tensor.shape) != shape:
            problems.append(_shape_problem(key, rule.target, tuple(tensor.shape), shape))
            continue
        out.state["model." + rule.target] = tensor
    needed = [
        k
        for k in own
        if not k.endswith("num_batches_tracked") and (family != "backbone" or k.startswith("backbone.body."))
    ]
    missing = [k for k in needed if "model." + k not in out.state]
    if unused and not problems:  # a depth difference already explains the surplus blocks
        problems.append(f"{len(unused)} checkpoint tensor(s) the model has no place for, e.g. {unused[:4]}")
    if missing and not problems:
        problems.append(f"{len(missing)} model tensor(s) not in the checkpoint, e.g. {missing[:4]}")
    if problems:
        raise UserError(
            f"{what} that does not fit the configured {arch}"
            f"{' R-' + str(facts['depth']) if facts['depth'] else ''}; nothing was loaded:\n    "
            + "\n    ".join(dict.fromkeys(problems)),
            f"use the config the checkpoint was trained with ({ARCHITECTURES.get(family).teacher_config if family in ARCHITECTURES else 'same depth'}"
            " with MODEL.BACKBONE.DEPTH, MODEL.FPN.OUT_CHANNELS, MODEL.FPN.TOP_BLOCK_IN as trained)",
        )
    out.skipped += ckpt.notes
    return out


def _model_classes(own: dict[str, Tensor], arch: str, num_anchors: int) -> int:
    entry = ARCHITECTURES.get(arch)
    return int(own[entry.class_logits].shape[0]) // num_anchors - int(entry.background_class)


def _shape_problem(key: str, target: str, got: tuple[int, ...], want: tuple[int, ...]) -> str:
    if target.startswith("backbone.fpn.extra_blocks.p6.weight") and got[1] != want[1]:
        source = "res5" if got[1] != got[0] else "p5"
        return (
            f"P6 input: the checkpoint computes P6 from {source} ({got[1]} channels), the model from a "
            f"{want[1]}-channel input (set MODEL.FPN.TOP_BLOCK_IN {source})"
        )
    return f"{key}: checkpoint {got} vs model {want} ({target})"


def _check_pixel_stat(key: str, value: Tensor, options: dict[str, Any], problems: list[str], out: Conversion) -> None:
    wanted = options.get(key)
    if wanted is None:
        out.skipped.append(f"{key} (from the config)")
        return
    have = [float(v) for v in value.flatten()]
    if len(have) != len(wanted) or any(abs(a - b) > 1e-3 for a, b in zip(have, wanted)):
        problems.append(
            f"{key}: the checkpoint was trained with {have}, the config has {wanted} "
            f"(MODEL.{key.upper()}, in MODEL.INPUT_FORMAT {options.get('input_format', 'RGB')} order)"
        )
        return
    out.checked.append(f"{key} = config")


def _check_cell_anchors(key: str, value: Tensor, adapter: nn.Module, problems: list[str], out: Conversion) -> None:
    level = int(key.rsplit(".", 1)[1])
    model = adapter.model
    generator = getattr(model, "anchor_generator", None) or getattr(
        getattr(model, "rpn", None), "anchor_generator", None
    )
    mine = getattr(generator, f"cell_anchors_{level}", None)
    if mine is None:
        out.skipped.append(f"{key} (anchors come from the config)")
        return
    if tuple(mine.shape) != tuple(value.shape) or not torch.allclose(mine.cpu(), value.float(), atol=1e-3):
        problems.append(
            f"{key}: the checkpoint's cell anchors differ from MODEL.ANCHOR_GENERATOR's "
            f"(first {value.reshape(-1, 4)[0].tolist()} vs {mine[0].tolist()})"
        )
        return
    out.checked.append(f"{key} = config anchors")


def _check_condinst_buffer(key: str, value: Tensor, problems: list[str], out: Conversion) -> None:
    """AdelaiDet CondInst's two mask-head buffers: a training counter, and the relative coordinates'
    scale per level, which the project fixes at 8 x the level's stride (64 .. 1024, AdelaiDet's default)."""
    if key == "mask_head._iter":
        out.skipped.append(f"{key} (AdelaiDet's training iteration counter)")
        return
    want = [float(SIZE_OF_INTEREST_PER_STRIDE * stride) for stride in (8, 16, 32, 64, 128)]  # P3-P7
    have = [float(v) for v in value.flatten()]
    if have != want:
        problems.append(
            f"{key}: the checkpoint scales relative coordinates by {have}, the project's CondInst by "
            f"{want} (MODEL.CONDINST.SIZES_OF_INTEREST other than AdelaiDet's default is not supported)"
        )
        return
    out.checked.append(f"{key} = {want}")


def report(ckpt: D2Checkpoint, conversion: Conversion, adapter: nn.Module) -> str:
    """The lines the loader prints: what the file is, loaded / converted / skipped, config-given facts."""
    options = dict(getattr(getattr(adapter.model, "transform", None), "options", {}) or {})
    kind = _title(ckpt.family, ckpt.family)
    depth = resnet_depth(ckpt.state)
    lines = [
        f"MODEL.WEIGHTS {ckpt.source}: detectron2 {kind} checkpoint"
        + (f" (R-{depth})" if depth else "")
        + (f", by {ckpt.author}" if ckpt.author else "")
        + f": {conversion.loaded} tensor(s) loaded as they are, {len(conversion.converted)} converted, "
        f"{len(conversion.skipped)} skipped" + (f", {len(conversion.checked)} checked" if conversion.checked else "")
    ]
    lines += [f"  converted {line}" for line in conversion.converted]
    lines += [f"  skipped {line}" for line in conversion.skipped]
    lines += [f"  checked {line}" for line in conversion.checked]
    if ckpt.family == "backbone":
        lines.append("  the FPN and heads keep their initialisation (an ImageNet backbone has none)")
    if getattr(adapter, "backend", "") == "detectron2":
        lines.append(
            "  the model is built by detectron2 (MODEL.BACKEND detectron2): detectron2's names, nothing converted"
        )
    if options:
        lines.append(
            f"  from the config (not stored in the file): input {options.get('input_format')}, pixel mean "
            f"{options.get('pixel_mean')}, std {options.get('pixel_std')}, STRIDE_IN_1X1 "
            f"{options.get('stride_in_1x1')}, P6 from {options.get('top_block_in')}, conventions "
            f"{options.get('conventions')}"
        )
    return "\n".join(lines)


def same_names(ckpt: D2Checkpoint, adapter: nn.Module) -> Conversion:
    """`ckpt` for a detectron2-built adapter (MODEL.BACKEND detectron2): names as they are, strictly."""
    own = {k[len("model.") :]: v for k, v in adapter.state_dict().items() if k.startswith("model.")}
    arch, family = adapter.architecture, ckpt.family
    what = f"'{ckpt.source}' is a detectron2 {_title(family)} checkpoint"
    if family == "unknown" or (family != "backbone" and family != arch):
        raise UserError(
            f"{what}, but MODEL.D2_CONFIG builds {arch}; nothing was loaded.",
            "use a checkpoint of the configured architecture, or the matching MODEL.D2_CONFIG",
        )
    out = Conversion(state={})
    problems: list[str] = []
    unused: list[str] = []
    for key, value in sorted(ckpt.state.items()):
        if key.endswith("num_batches_tracked") and key not in own:
            out.skipped.append(f"{key} (BatchNorm counter)")
        elif key in ("pixel_mean", "pixel_std") or "anchor_generator.cell_anchors" in key:
            out.skipped.append(f"{key} (detectron2 computes it from its config)")
        elif key not in own:
            unused.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            problems.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}")
        else:
            out.state["model." + key] = value.to(own[key].dtype)
            out.loaded += 1
    needed = [
        k
        for k in own
        if not k.endswith("num_batches_tracked") and (family != "backbone" or k.startswith("backbone.bottom_up."))
    ]
    missing = [k for k in needed if "model." + k not in out.state]
    if unused:
        problems.append(f"{len(unused)} checkpoint tensor(s) the model has no place for, e.g. {unused[:4]}")
    if missing:
        problems.append(f"{len(missing)} model tensor(s) not in the checkpoint, e.g. {missing[:4]}")
    if problems:
        raise UserError(
            f"{what} that does not fit the model MODEL.D2_CONFIG builds; nothing was loaded:\n    "
            + "\n    ".join(problems),
            "use the detectron2 config the checkpoint was trained with",
        )
    out.skipped += ckpt.notes
    return out


def load_into(adapter: nn.Module, ckpt: D2Checkpoint) -> Conversion:
    """Load `ckpt` into an adapter, all or nothing (converted for the torchvision backend); print the report."""
    if getattr(adapter, "backend", "torchvision") == "detectron2":
        conversion = same_names(ckpt, adapter)
    else:
        conversion = convert(ckpt, adapter)
    result = adapter.load_state_dict(conversion.state, strict=False)
    leftover = [
        k
        for k in result.missing_keys
        if not k.endswith("num_batches_tracked")
        and (ckpt.family != "backbone" or k.startswith(("model.backbone.body.", "model.backbone.bottom_up.")))
    ]
    if leftover or result.unexpected_keys:  # convert() covered every key; this would be a bug here
        raise RuntimeError(f"detectron2 conversion left {leftover[:3]} / {result.unexpected_keys[:3]}")
    print(report(ckpt, conversion, adapter), flush=True)
    return conversion
