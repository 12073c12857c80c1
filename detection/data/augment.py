"""The augmentation plan: which resize scale and flip each (image, variant) gets, as a pure function.

Stage one (teacher dump) and stage two (student training) must agree on every sample's geometry without
sharing state, so the plan is data, not a random process: `params(image_id, variant, h, w)` depends only
on the plan's seed and its arguments, and the plan round-trips through JSON (it is stored in the cache).

Variant choice: the (short side, flip) combinations are enumerated and each image draws a permutation of
them from `numpy.random.default_rng([seed, image_id, cycle])`, so variants 0..n-1 of one image are all
different (no cache space is spent on duplicates) and later variants start a new permutation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from detection.errors import UserError

PLAN_FORMAT_VERSION = 1
# Tag that separates the per-epoch variant draw from the geometry draw in the seed sequence.
_EPOCH_DRAW_TAG = 0x5EED


@dataclass(frozen=True)
class AugParams:
    """The geometry of one sample: original size, resize scale and result size, horizontal flip."""

    image_id: int
    variant: int
    scale: float
    flip: bool
    orig_h: int
    orig_w: int
    resized_h: int
    resized_w: int

    @property
    def scale_xy(self) -> tuple[float, float]:
        """Per-axis factors actually applied (resized / original); they differ from `scale` by rounding."""
        return self.resized_w / self.orig_w, self.resized_h / self.orig_h

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AugParams:
        return cls(
            image_id=int(d["image_id"]),
            variant=int(d["variant"]),
            scale=float(d["scale"]),
            flip=bool(d["flip"]),
            orig_h=int(d["orig_h"]),
            orig_w=int(d["orig_w"]),
            resized_h=int(d["resized_h"]),
            resized_w=int(d["resized_w"]),
        )


def resized_shape(h: int, w: int, short: int, max_size: int) -> tuple[float, int, int]:
    """detectron2's ResizeShortestEdge: short side to `short`, capped so the long side <= `max_size`.

    `short == 0` means no resize; `max_size == 0` means no cap. Returns (scale, new_h, new_w).
    """
    if short <= 0:
        return 1.0, h, w
    scale = short / min(h, w)
    if max_size > 0 and max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return scale, int(h * scale + 0.5), int(w * scale + 0.5)


@dataclass(frozen=True)
class AugmentationPlan:
    """Multi-scale + flip augmentation as data: (seed, image_id, variant, h, w) -> AugParams."""

    seed: int
    num_variants: int
    min_sizes: Sequence[int]
    max_size: int
    flip: bool
    _combos: tuple[tuple[int, bool], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sizes = tuple(int(s) for s in self.min_sizes)
        object.__setattr__(self, "min_sizes", sizes)
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "num_variants", int(self.num_variants))
        object.__setattr__(self, "max_size", int(self.max_size))
        object.__setattr__(self, "flip", bool(self.flip))
        if not sizes or any(s < 0 for s in sizes):
            raise UserError(
                f"augmentation min sizes must be a non-empty list of sizes >= 0, got {list(sizes)}",
                "set INPUT.MIN_SIZE_TRAIN to e.g. [640, 672, 704] (0 = no resize)",
            )
        if self.max_size < 0:
            raise UserError(
                f"augmentation max size must be >= 0, got {self.max_size}",
                "set INPUT.MAX_SIZE_TRAIN / MAX_SIZE_TEST to e.g. 1333 (0 = no cap)",
            )
        if self.num_variants < 1:
            raise UserError(
                f"the number of augmentation variants must be >= 1, got {self.num_variants}",
                "set CACHE.NUM_VARIANTS to 1 or more",
            )
        flips = (False, True) if self.flip else (False,)
        object.__setattr__(self, "_combos", tuple((s, f) for s in sizes for f in flips))

    # -- construction from a config -----------------------------------------------------------------
    @classmethod
    def for_training(cls, cfg: Any) -> AugmentationPlan:
        return cls(
            seed=cfg.CACHE.AUG_SEED,
            num_variants=cfg.CACHE.NUM_VARIANTS,
            min_sizes=list(cfg.INPUT.MIN_SIZE_TRAIN),
            max_size=cfg.INPUT.MAX_SIZE_TRAIN,
            flip=_flip_mode(cfg.INPUT.RANDOM_FLIP),
        )

    @classmethod
    def for_testing(cls, cfg: Any) -> AugmentationPlan:
        return cls(
            seed=cfg.CACHE.AUG_SEED,
            num_variants=1,
            min_sizes=[cfg.INPUT.MIN_SIZE_TEST],
            max_size=cfg.INPUT.MAX_SIZE_TEST,
            flip=False,
        )

    # -- the plan ---------------------------------------------------------------------------------
    def params(self, image_id: int, variant: int, orig_h: int, orig_w: int) -> AugParams:
        """The geometry of (image, variant): a pure function of the seed and the arguments."""
        if not 0 <= variant < self.num_variants:
            raise UserError(
                f"augmentation variant {variant} is out of range: the plan has "
                f"{self.num_variants} variant(s) per image",
                "use a variant in 0..num_variants-1 (CACHE.NUM_VARIANTS)",
            )
        if orig_h <= 0 or orig_w <= 0:
            raise UserError(
                f"image {image_id} has an invalid size: height {orig_h}, width {orig_w}",
                "fix the image's height/width in the annotation file",
            )
        n = len(self._combos)
        cycle, slot = divmod(int(variant), n)
        order = np.random.default_rng([self.seed, int(image_id), cycle]).permutation(n)
        short, flip = self._combos[int(order[slot])]
        scale, rh, rw = resized_shape(int(orig_h), int(orig_w), short, self.max_size)
        return AugParams(
            image_id=int(image_id),
            variant=int(variant),
            scale=float(scale),
            flip=bool(flip),
            orig_h=int(orig_h),
            orig_w=int(orig_w),
            resized_h=rh,
            resized_w=rw,
        )

    def sample_variant(self, epoch: int, image_id: int) -> int:
        """The variant stage two uses for `image_id` in `epoch`: every variant once per num_variants epochs."""
        n = self.num_variants
        if n == 1:
            return 0
        cycle, slot = divmod(int(epoch), n)
        order = np.random.default_rng([self.seed, int(image_id), cycle, _EPOCH_DRAW_TAG]).permutation(n)
        return int(order[slot])

    # -- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_FORMAT_VERSION,
            "resize": "shortest_edge",
            "interpolation": "bilinear",
            "seed": self.seed,
            "num_variants": self.num_variants,
            "min_sizes": list(self.min_sizes),
            "max_size": self.max_size,
            "flip": self.flip,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "a stored record") -> AugmentationPlan:
        """The plan `to_dict` wrote; `source` (e.g. "cache /data/c") names where the record came from."""
        required = ("seed", "num_variants", "min_sizes", "max_size", "flip")
        missing = [k for k in required if k not in d]
        if missing:
            raise UserError(
                f"the augmentation plan of {source} is missing {missing}: {dict(d)}",
                "it was written by an incompatible version; re-create it",
            )
        version = int(d.get("version", PLAN_FORMAT_VERSION))
        if version != PLAN_FORMAT_VERSION:
            raise UserError(
                f"the augmentation plan of {source} has version {version}, which this code does not "
                f"read (it reads version {PLAN_FORMAT_VERSION})",
                "re-create it with this version",
            )
        return cls(
            seed=d["seed"],
            num_variants=d["num_variants"],
            min_sizes=list(d["min_sizes"]),
            max_size=d["max_size"],
            flip=d["flip"],
        )


def _flip_mode(mode: str) -> bool:
    if mode not in ("horizontal", "none"):
        raise UserError(
            f"INPUT.RANDOM_FLIP must be 'horizontal' or 'none', got {mode!r}",
            "set INPUT.RANDOM_FLIP horizontal (or none)",
        )
    return mode == "horizontal"


# -- applying params ---------------------------------------------------------------------------------
def _check_frame(shape: Sequence[int], p: AugParams, what: str) -> None:
    if tuple(shape) != (p.orig_h, p.orig_w):
        raise ValueError(
            f"{what} of size {tuple(shape)} does not match the augmentation params' "
            f"original size {(p.orig_h, p.orig_w)} for image {p.image_id}"
        )


def _bilinear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and float32 weights (w0, w1) of a 1-D bilinear resize, align_corners=False:
    output pixel x samples the input at (x + 0.5) * size_in / size_out - 0.5, clamped to the image.
    Computed in float64, then rounded once: no dependence on a compiler's float32 contractions."""
    src = (np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5
    src = np.clip(src, 0.0, size_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, size_in - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, np.float32(1.0) - w1, w1


def resize_bilinear(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of [C, H, W] float32 to `size` (align_corners=False, no antialias), whose result does
    not depend on the number of torch threads.

    Written by hand because torch's CPU `interpolate` is not thread-count invariant: its vectorised kernel
    splits the work across threads and rounds differently per split (up to 5e-5 on 0-255 pixels between
    1 and 2 threads), so DataLoader workers (1 thread) and the main process (N threads) made different
    pixels, hence different cached teacher features. Here every output value is the same sequence of
    single-threaded numpy float32 operations (gathers, products, one sum per pass: the width pass, then
    the height pass, as torch weighs them), which no thread count changes. It is as fast as torch's
    kernel on one thread; values agree with it to ~1e-2 on 0-255 pixels (torch computes the sampling
    positions in float32).
    """
    out_h, out_w = size
    y0, y1, wy0, wy1 = _bilinear_taps(image.shape[-2], out_h)
    x0, x1, wx0, wx1 = _bilinear_taps(image.shape[-1], out_w)
    a = image.detach().to("cpu", torch.float32).numpy()
    rows = np.take(a, x0, axis=-1) * wx0 + np.take(a, x1, axis=-1) * wx1  # [C, H, out_w]
    out = np.take(rows, y0, axis=-2) * wy0[:, None] + np.take(rows, y1, axis=-2) * wy1[:, None]  # [C, out_h, out_w]
    return torch.from_numpy(out)


def apply_image(image: torch.Tensor, p: AugParams) -> torch.Tensor:
    """Resize [3,H,W] with bilinear (align_corners=False, no antialias) in float32, then flip.

    Deterministic on CPU whatever the thread count (resize_bilinear); stage one and stage two produce the
    same pixels for the same params, in DataLoader workers or not.
    """
    if image.dim() != 3:
        raise ValueError(f"apply_image expects [C,H,W], got shape {tuple(image.shape)}")
    _check_frame(image.shape[-2:], p, "image")
    out = image.to(torch.float32)
    if (p.resized_h, p.resized_w) != (p.orig_h, p.orig_w):
        out = resize_bilinear(out, (p.resized_h, p.resized_w))
    if p.flip:
        out = out.flip(-1)
    return out.contiguous()


def apply_boxes(boxes: torch.Tensor, p: AugParams) -> torch.Tensor:
    """xyxy boxes in the original frame -> the sample's frame (same per-axis factors as the image)."""
    sx, sy = p.scale_xy
    out = boxes.to(torch.float32).reshape(-1, 4).clone()
    out[:, 0::2] *= sx
    out[:, 1::2] *= sy
    if p.flip:
        x1 = p.resized_w - out[:, 2]
        x2 = p.resized_w - out[:, 0]
        out[:, 0], out[:, 2] = x1, x2
    return out


def invert_boxes(boxes: torch.Tensor, p: AugParams) -> torch.Tensor:
    """xyxy boxes in the sample's frame -> the original image frame (for evaluation), clipped to it."""
    sx, sy = p.scale_xy
    out = boxes.to(torch.float32).reshape(-1, 4).clone()
    if p.flip:
        x1 = p.resized_w - out[:, 2]
        x2 = p.resized_w - out[:, 0]
        out[:, 0], out[:, 2] = x1, x2
    out[:, 0::2] = (out[:, 0::2] / sx).clamp(0, p.orig_w)
    out[:, 1::2] = (out[:, 1::2] / sy).clamp(0, p.orig_h)
    return out


def apply_masks(masks: torch.Tensor, p: AugParams) -> torch.Tensor:
    """[n,H,W] uint8 masks -> [n,rh,rw] uint8 (nearest-exact resize, then flip)."""
    if masks.dim() != 3:
        raise ValueError(f"apply_masks expects [n,H,W], got shape {tuple(masks.shape)}")
    _check_frame(masks.shape[-2:], p, "masks")
    if masks.shape[0] == 0:
        return torch.zeros((0, p.resized_h, p.resized_w), dtype=torch.uint8)
    out = masks.to(torch.uint8)
    if (p.resized_h, p.resized_w) != (p.orig_h, p.orig_w):
        out = F.interpolate(out[:, None].float(), size=(p.resized_h, p.resized_w), mode="nearest-exact")[:, 0].to(
            torch.uint8
        )
    if p.flip:
        out = out.flip(-1)
    return out.contiguous()


def apply_polygons(polygons: Sequence[Sequence[float]], p: AugParams) -> list[np.ndarray]:
    """COCO polygons (flat x,y lists) -> float64 arrays in the sample's frame (to rasterise at its size)."""
    sx, sy = p.scale_xy
    out = []
    for poly in polygons:
        xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2).copy()
        xy[:, 0] *= sx
        xy[:, 1] *= sy
        if p.flip:
            xy[:, 0] = p.resized_w - xy[:, 0]
        out.append(xy.reshape(-1))
    return out
