"""The architecture table: what the code knows of each MODEL.META_ARCHITECTURE, in one place.

Every question the code asks of an architecture name (its FPN levels and strides, its head family, what
it predicts and is evaluated on, how torchvision builds it, how detectron2's conventions build it, what a
detectron2 checkpoint of it looks like) is a lookup here, never an if/elif on the name. The static facts
are an `Architecture` entry; the code that builds a model is registered against the entry by the module
that holds it, as detectron2's META_ARCH_REGISTRY registers meta-architectures:

    @ARCHITECTURES.register(RETINANET_ARCH)              # modeling/meta_arch/retinanet.py
    def build_retinanet(cfg, backbone, num_classes, common): ...

A name missing from the table, or a table entry without the part a run needs, is one UserError naming it;
nothing falls back to another architecture. Adding a family is one model file under modeling/meta_arch/
(its builder and forward) plus one entry below (ARCHITECTURE.md, "Adding an architecture").

A leaf: it imports nothing of the project but the error root.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from detection.errors import UserError

# Stride of every FPN level name the project uses.
LEVEL_STRIDES: dict[str, int] = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}
# The two FPN layouts: P3-P7 from res3-res5 (P6/P7 from P5 or C5), P2-P6 from res2-res5 (max-pooled P6).
P3_P7 = ("p3", "p4", "p5", "p6", "p7")
P2_P6 = ("p2", "p3", "p4", "p5", "p6")

# What an entry's code parts are, and who registers them.
BUILD = "build"  # torchvision backend: (cfg, backbone, num_classes, common) -> torchvision-style nn.Module
FORWARD = "forward"  # (model, image_list, raw FPN dict, targets, training) -> losses or detections
BUILD_D2 = "build_detectron2"  # MODEL.CONVENTIONS detectron2: same signature as BUILD (interop/d2_conventions.py)
# (detectron2 key, num_anchors) -> Rule | None: its head's tensor names (interop/d2_checkpoint.py)
CHECKPOINT_RULES = "d2_checkpoint_rules"
PARTS = (BUILD, FORWARD, BUILD_D2, CHECKPOINT_RULES)

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Architecture:
    """One meta-architecture's facts. Code parts live in `ArchitectureTable` (registered by their modules)."""

    name: str  # MODEL.META_ARCHITECTURE
    title: str  # how tables and messages name it
    levels: tuple[str, ...]  # its FPN levels, finest first: what ICD distils by default (docs/METHOD.md 1, 10)
    head_family: str  # heads initialise one another within a family (DISTILL.INIT_FROM_TEACHER)
    boxes: bool  # predicts boxes of its own: box AP is evaluated
    masks: bool  # predicts instance masks: MODEL.MASK_ON must be True
    boxes_only: str = ""  # the same detector without masks, offered when MODEL.MASK_ON is False
    own_module: bool = False  # the project's own module: MODEL.BACKEND detectron2 does not apply
    adelaidet_native: bool = False  # already AdelaiDet's function: MODEL.CONVENTIONS detectron2 does not apply
    d2_top_block_in: str = "p5"  # where detectron2's configs take P6 from (P3-P7 layouts only)
    anchors_per_position: bool = False  # its head predicts several anchors per position (RetinaNet's 9)
    # MODEL.BACKEND detectron2 (interop/d2_backend.py): how a detectron2 config names and counts it
    d2_meta_architecture: str = ""  # its MODEL.META_ARCHITECTURE there
    d2_proposal_generator: str = ""  # its MODEL.PROPOSAL_GENERATOR.NAME, where that is what tells it apart
    d2_classes_section: str = ""  # the MODEL section whose NUM_CLASSES (K) is its class count
    d2_adelaidet: bool = False  # AdelaiDet's config and modules build it (`adet` must be importable)
    # detectron2/AdelaiDet checkpoints of it (interop/d2_checkpoint.py):
    checkpoint_title: str = ""  # how messages name it
    checkpoint_signature: tuple[str, ...] = ()  # key prefixes all present in its checkpoints (longest match wins)
    class_logits: str = ""  # the project's class-logit weight, K (+ background) rows (x anchors)
    background_class: bool = True  # class_logits has a background row
    teacher_config: str = ""  # the R-101 teacher config for such a checkpoint

    @property
    def strides(self) -> dict[str, int]:
        return {name: LEVEL_STRIDES[name] for name in self.levels}

    @property
    def first_level(self) -> int:
        """The index of its finest level (2 for P2-P6, 3 for P3-P7): FPN lateral i feeds level first + i."""
        return int(self.levels[0][1:])

    @property
    def max_pooled_p6(self) -> bool:
        return self.levels == P2_P6


class ArchitectureTable:
    """The entries by name, and each entry's registered code parts."""

    def __init__(self) -> None:
        self._entries: dict[str, Architecture] = {}
        self._parts: dict[tuple[str, str], Callable[..., Any]] = {}

    def add(self, entry: Architecture) -> Architecture:
        assert entry.name not in self._entries, f"architecture {entry.name} is in the table twice"
        assert entry.levels in (P3_P7, P2_P6), f"{entry.name}: levels {entry.levels} are neither P3-P7 nor P2-P6"
        self._entries[entry.name] = entry
        return entry

    def register(self, entry: Architecture | str, part: str = BUILD) -> Callable[[F], F]:
        """Decorator: `fn` is `part` of the table's `entry` (an entry or its name; one registration per part)."""
        name = entry.name if isinstance(entry, Architecture) else entry
        assert part in PARTS, f"unknown part {part!r}; parts are {PARTS}"
        assert name in self._entries, f"{name} is registered as a {part} but is not in the architecture table"

        def decorate(fn: F) -> F:
            assert (name, part) not in self._parts, f"{name} has two {part} registrations"
            self._parts[(name, part)] = fn
            return fn

        return decorate

    def get(self, name: str) -> Architecture:
        if name not in self._entries:
            raise UserError(
                f"MODEL.META_ARCHITECTURE '{name}' is not a known detector.", f"use one of: {', '.join(self._entries)}."
            )
        return self._entries[name]

    def part(self, name: str, part: str) -> Callable[..., Any]:
        """`name`'s registered `part`; a missing one is a half-registered architecture, refused by name."""
        self.get(name)
        if (name, part) not in self._parts:
            raise UserError(
                f"{name} is in the architecture table but has no {part} registered.",
                f"register one with @ARCHITECTURES.register({name!r}, {part!r}) in its module "
                "(ARCHITECTURE.md, 'Adding an architecture').",
            )
        return self._parts[(name, part)]

    def has_part(self, name: str, part: str) -> bool:
        return (name, part) in self._parts

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Architecture]:
        return iter(self._entries.values())


ARCHITECTURES = ArchitectureTable()
RETINANET_ARCH = ARCHITECTURES.add(
    Architecture(
        "RetinaNet",
        "RetinaNet",
        P3_P7,
        head_family="RetinaNet",
        boxes=True,
        masks=False,
        d2_top_block_in="res5",
        anchors_per_position=True,
        checkpoint_title="RetinaNet",
        checkpoint_signature=("head.cls_score.weight",),
        class_logits="head.classification_head.cls_logits.weight",
        teacher_config="configs/Teachers/retinanet_R_101_FPN_3x.yaml",
        d2_meta_architecture="RetinaNet",
        d2_classes_section="RETINANET",
    )
)
FCOS_ARCH = ARCHITECTURES.add(
    Architecture(
        "FCOS",
        "FCOS",
        P3_P7,
        head_family="FCOS",
        boxes=True,
        masks=False,
        checkpoint_title="FCOS (AdelaiDet)",
        checkpoint_signature=("proposal_generator.fcos_head.cls_logits.weight",),
        class_logits="head.classification_head.cls_logits.weight",
        teacher_config="configs/Teachers/fcos_R_101_FPN_3x.yaml",
        d2_meta_architecture="OneStageDetector",
        d2_proposal_generator="FCOS",
        d2_classes_section="FCOS",
        d2_adelaidet=True,
    )
)
FASTER_RCNN_ARCH = ARCHITECTURES.add(
    Architecture(
        "FasterRCNN",
        "Faster R-CNN",
        P2_P6,
        head_family="R-CNN",
        boxes=True,
        masks=False,
        checkpoint_title="Faster R-CNN",
        checkpoint_signature=("roi_heads.box_predictor.cls_score.weight",),
        class_logits="roi_heads.box_predictor.cls_score.weight",
        teacher_config="configs/Teachers/faster_rcnn_R_101_FPN_3x.yaml",
        d2_meta_architecture="GeneralizedRCNN",
        d2_classes_section="ROI_HEADS",
    )
)
MASK_RCNN_ARCH = ARCHITECTURES.add(
    Architecture(
        "MaskRCNN",
        "Mask R-CNN",
        P2_P6,
        head_family="R-CNN",
        boxes=True,
        masks=True,
        boxes_only="FasterRCNN",
        checkpoint_title="Mask R-CNN",
        checkpoint_signature=("roi_heads.box_predictor.cls_score.weight", "roi_heads.mask_head."),
        class_logits="roi_heads.box_predictor.cls_score.weight",
        teacher_config="configs/Teachers/mask_rcnn_R_101_FPN_3x.yaml",
        d2_meta_architecture="GeneralizedRCNN",
        d2_classes_section="ROI_HEADS",
    )
)
# CondInst's detector is FCOS's head: its family, so a CondInst student takes an FCOS teacher's head.
CONDINST_ARCH = ARCHITECTURES.add(
    Architecture(
        "CondInst",
        "CondInst",
        P3_P7,
        head_family="FCOS",
        boxes=True,
        masks=True,
        boxes_only="FCOS",
        own_module=True,
        checkpoint_title="CondInst (AdelaiDet)",
        checkpoint_signature=("proposal_generator.fcos_head.cls_logits.weight", "controller."),
        class_logits="head.classification_head.cls_logits.weight",
        teacher_config="configs/Teachers/condinst_R_101_FPN_3x.yaml",
    )
)
# SOLOv2's boxes are only its masks' extents (no box AP); its FPN has no P7; K sigmoid classes, no background.
SOLOV2_ARCH = ARCHITECTURES.add(
    Architecture(
        "SOLOv2",
        "SOLOv2",
        P2_P6,
        head_family="SOLOv2",
        boxes=False,
        masks=True,
        own_module=True,
        adelaidet_native=True,
        checkpoint_title="SOLOv2 (AdelaiDet)",
        checkpoint_signature=("ins_head.",),
        class_logits="ins_head.cate_pred.weight",
        background_class=False,
        teacher_config="configs/Teachers/solov2_R_101_FPN_3x.yaml",
    )
)
