"""COCO-format datasets: catalog lookup, validated json loading and the torch Dataset.

Validation lives here, at load time, so a bad annotation file fails in seconds with the offending
annotation named instead of hours into a run. Labels are remapped to contiguous 1..K (torchvision
convention; 0 is background) and the mapping is kept so evaluation can map back to category ids.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from detection.data.augment import AugmentationPlan, AugParams, apply_boxes, apply_image, apply_masks, apply_polygons
from detection.errors import UserError

logger = logging.getLogger(__name__)

DATASETS_ENV = "DETECTRON2_DATASETS"
# Builtin names resolve under $DETECTRON2_DATASETS exactly as in detectron2's builtin COCO registration.
BUILTIN_DATASETS: dict[str, tuple[str, str]] = {
    "coco_2017_train": ("coco/annotations/instances_train2017.json", "coco/train2017"),
    "coco_2017_val": ("coco/annotations/instances_val2017.json", "coco/val2017"),
}


class UnreadableImageError(UserError):
    """An image file that is missing, unreadable or of the wrong size (stage one may skip these)."""

    def __init__(self, problem: str, fix: str = "", image_id: int | None = None) -> None:
        super().__init__(problem, fix)
        self.image_id = image_id

    def __reduce__(self):  # crosses from DataLoader workers to the main process with its image id
        return type(self), (self.problem, self.fix, self.image_id)


# -- catalog -----------------------------------------------------------------------------------------
def resolve_dataset(cfg: Any, name: str) -> tuple[str, str]:
    """`name` -> (annotation json path, image root): DATASETS.CATALOG first, then builtin COCO names."""
    catalog = cfg.DATASETS.CATALOG
    if name in catalog:
        return _catalog_entry(name, catalog[name])
    if name in BUILTIN_DATASETS:
        root = os.environ.get(DATASETS_ENV, "")
        if not root:
            json_rel, img_rel = BUILTIN_DATASETS[name]
            raise UserError(
                f"dataset '{name}' is a builtin COCO dataset located through ${DATASETS_ENV}, which is not set",
                f"export {DATASETS_ENV}=/path/to/datasets (holding {json_rel} and {img_rel}/), "
                f'or register your own: DATASETS.CATALOG.{name} "[annotations.json, image_dir]"',
            )
        json_rel, img_rel = BUILTIN_DATASETS[name]
        return os.path.join(root, json_rel), os.path.join(root, img_rel)
    known = sorted(set(catalog) | set(BUILTIN_DATASETS))
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UserError(
        f"unknown dataset '{name}'; known datasets: {', '.join(known)}",
        f'{hint}register it with DATASETS.CATALOG.{name} "[annotations.json, image_dir]" '
        "(in the config file or as an override)",
    )


def _catalog_entry(name: str, entry: Any) -> tuple[str, str]:
    if isinstance(entry, Mapping) and "json_file" in entry and "image_root" in entry:
        json_file, image_root = entry["json_file"], entry["image_root"]
    elif isinstance(entry, (list, tuple)) and len(entry) == 2:
        json_file, image_root = entry
    else:
        raise UserError(
            f"DATASETS.CATALOG.{name} must be [annotation_json, image_root], got {entry!r}",
            f'write e.g. DATASETS.CATALOG.{name} "[data/annotations/train.json, data/train]" '
            "or a mapping with json_file and image_root",
        )
    if not isinstance(json_file, str) or not isinstance(image_root, str):
        raise UserError(
            f"DATASETS.CATALOG.{name} entries must be paths (text), got {entry!r}",
            "give the annotation json path and the image directory as strings",
        )
    expand = lambda p: os.path.expandvars(os.path.expanduser(p))  # noqa: E731
    return expand(json_file), expand(image_root)


# -- the index ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CocoAnnotation:
    """One object: xyxy box clipped to the image, contiguous label, crowd flag and raw segmentation."""

    id: int
    category_id: int
    label: int
    bbox_xyxy: tuple[float, float, float, float]
    area: float
    iscrowd: bool
    segmentation: Any = None


@dataclass
class CocoImage:
    id: int
    file_name: str  # path joined with the image root
    height: int
    width: int
    annotations: list[CocoAnnotation] = field(default_factory=list)

    @property
    def instances(self) -> list[CocoAnnotation]:
        """Annotations that are training targets (crowd regions excluded)."""
        return [a for a in self.annotations if not a.iscrowd]


@dataclass
class CocoIndex:
    """A validated COCO annotation file: images (json order), categories and the label mapping."""

    json_path: str
    image_root: str
    json_sha256: str
    images: list[CocoImage]
    categories: list[dict[str, Any]]  # {"id", "name"} sorted by id
    cat_id_to_label: dict[int, int]  # category id -> 1..K
    label_to_cat_id: dict[int, int]
    num_degenerate_dropped: int = 0
    num_images_without_annotations: int = 0

    @property
    def num_classes(self) -> int:
        """K, the number of foreground classes (models use K + 1 with background)."""
        return len(self.categories)

    @property
    def class_names(self) -> list[str]:
        """Names indexed by label - 1."""
        return [c["name"] for c in self.categories]

    def training_images(self) -> list[CocoImage]:
        """Images with at least one non-crowd annotation (the others teach nothing)."""
        return [im for im in self.images if im.instances]

    def image(self, image_id: int) -> CocoImage:
        if not hasattr(self, "_by_id"):
            object.__setattr__(self, "_by_id", {im.id: im for im in self.images})
        return self._by_id[image_id]  # type: ignore[attr-defined]


def _bad(json_path: str, what: str, fix: str = "fix or remove the entry in the annotation file") -> UserError:
    return UserError(f"{json_path}: {what}", fix)


def _as_int(value: Any, json_path: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise _bad(json_path, f"{what} must be an integer, got {value!r}")
    return int(value)


def load_coco_json(json_path: str | os.PathLike, image_root: str | os.PathLike) -> CocoIndex:
    """Read and validate a COCO instances file; drops (and counts) boxes with no area, in one warning."""
    json_path, image_root = str(json_path), str(image_root)
    try:
        raw = Path(json_path).read_bytes()
    except FileNotFoundError:
        raise UserError(
            f"annotation file not found: {json_path}",
            "check the dataset's json path (DATASETS.CATALOG or $DETECTRON2_DATASETS)",
        ) from None
    except OSError as exc:
        raise UserError(
            f"cannot read annotation file {json_path}: {exc.strerror or exc}", "check the file's permissions"
        ) from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" at line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise UserError(
            f"annotation file {json_path} is not valid JSON{where}: {msg}",
            "repair or re-export the file (is it truncated?)",
        ) from None
    if not isinstance(data, dict):
        raise _bad(
            json_path,
            f"the top level must be an object, got {type(data).__name__}",
            "use a COCO instances file with 'images', 'annotations' and 'categories'",
        )
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise _bad(
            json_path,
            f"missing top-level key(s) {missing}",
            "use a COCO instances file with 'images', 'annotations' and 'categories' "
            "(image-info-only test files cannot be trained or evaluated on)",
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise _bad(json_path, f"'{key}' must be a list, got {type(data[key]).__name__}")

    categories, cat_id_to_label = _load_categories(data["categories"], json_path)
    images, by_id = _load_images(data["images"], json_path, image_root)

    dropped, first_dropped = 0, None
    seen_ann_ids: set[int] = set()
    known_cats = sorted(cat_id_to_label)
    for k, ann in enumerate(data["annotations"]):
        ann_id = _entry_id(json_path, "annotation", k, ann, ("id", "image_id", "category_id", "bbox"), seen_ann_ids)
        seen_ann_ids.add(ann_id)
        image_id = _as_int(ann["image_id"], json_path, f"annotation {ann_id} image_id")
        if image_id not in by_id:
            raise _bad(json_path, f"annotation {ann_id} refers to image_id {image_id}, which is not in 'images'")
        cat_id = _as_int(ann["category_id"], json_path, f"annotation {ann_id} category_id")
        if cat_id not in cat_id_to_label:
            raise _bad(
                json_path,
                f"annotation {ann_id} has category_id {cat_id}, which is not in 'categories' (known ids: {known_cats})",
                "add the category to 'categories' or fix the annotation's category_id",
            )
        bbox = ann["bbox"]
        if (
            not isinstance(bbox, (list, tuple))
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
            or not all(math.isfinite(v) for v in bbox)
        ):
            raise _bad(
                json_path, f"annotation {ann_id} has bbox {bbox!r}; expected [x, y, width, height] of finite numbers"
            )
        image = by_id[image_id]
        x, y, w, h = (float(v) for v in bbox)
        x1, y1 = max(x, 0.0), max(y, 0.0)
        x2, y2 = min(x + w, float(image.width)), min(y + h, float(image.height))
        if w <= 0 or h <= 0 or x2 <= x1 or y2 <= y1:
            dropped += 1
            first_dropped = ann_id if first_dropped is None else first_dropped
            continue
        image.annotations.append(
            CocoAnnotation(
                id=ann_id,
                category_id=cat_id,
                label=cat_id_to_label[cat_id],
                bbox_xyxy=(x1, y1, x2, y2),
                area=float(ann.get("area", w * h)),
                iscrowd=bool(ann.get("iscrowd", 0)),
                segmentation=_check_segmentation(ann.get("segmentation"), ann_id, json_path),
            )
        )

    if dropped:
        logger.warning(
            "%s: dropped %d annotation(s) whose box has no area inside the image (first: annotation %s)",
            json_path,
            dropped,
            first_dropped,
        )
    empty = sum(1 for im in images if not im.instances)
    if empty:
        logger.info(
            "%s: %d of %d image(s) have no (non-crowd) annotations; they are skipped for training "
            "and kept for evaluation",
            json_path,
            empty,
            len(images),
        )
    return CocoIndex(
        json_path=json_path,
        image_root=image_root,
        json_sha256=hashlib.sha256(raw).hexdigest(),
        images=images,
        categories=categories,
        cat_id_to_label=cat_id_to_label,
        label_to_cat_id={v: k for k, v in cat_id_to_label.items()},
        num_degenerate_dropped=dropped,
        num_images_without_annotations=empty,
    )


def _load_categories(cats: list, json_path: str) -> tuple[list[dict[str, Any]], dict[int, int]]:
    if not cats:
        raise _bad(json_path, "'categories' is empty", "list the dataset's categories with id and name")
    out: dict[int, dict[str, Any]] = {}
    for k, cat in enumerate(cats):
        if not isinstance(cat, dict) or "id" not in cat:
            raise _bad(json_path, f"categories[{k}] must be an object with an 'id', got {cat!r}")
        cid = _as_int(cat["id"], json_path, f"categories[{k}].id")
        if cid in out:
            raise _bad(json_path, f"category id {cid} appears more than once", "give categories unique ids")
        out[cid] = {"id": cid, "name": str(cat.get("name", cid))}
    ordered = [out[c] for c in sorted(out)]
    return ordered, {c["id"]: i + 1 for i, c in enumerate(ordered)}


def _entry_id(json_path: str, kind: str, k: int, entry: Any, keys: Sequence[str], seen: Container[int]) -> int:
    """The id of `images[k]` / `annotations[k]` after checking it is an object with `keys` and a new integer id."""
    section = f"{kind}s"
    if not isinstance(entry, dict):
        raise _bad(json_path, f"{section}[{k}] must be an object, got {entry!r}")
    for key in keys:
        if key not in entry:
            raise _bad(json_path, f"{kind} {entry.get('id', f'#{k}')} ({section}[{k}]) has no '{key}'")
    entry_id = _as_int(entry["id"], json_path, f"{section}[{k}].id")
    if entry_id in seen:
        raise _bad(json_path, f"{kind} id {entry_id} appears more than once", f"give {section} unique ids")
    return entry_id


def _load_images(entries: list, json_path: str, image_root: str) -> tuple[list[CocoImage], dict[int, CocoImage]]:
    images: list[CocoImage] = []
    by_id: dict[int, CocoImage] = {}
    for k, im in enumerate(entries):
        image_id = _entry_id(json_path, "image", k, im, ("id", "file_name", "height", "width"), by_id)
        height = _as_int(im["height"], json_path, f"image {image_id} height")
        width = _as_int(im["width"], json_path, f"image {image_id} width")
        if height <= 0 or width <= 0:
            raise _bad(json_path, f"image {image_id} has height {height} and width {width}; both must be positive")
        record = CocoImage(
            id=image_id, file_name=os.path.join(image_root, str(im["file_name"])), height=height, width=width
        )
        images.append(record)
        by_id[image_id] = record
    return images, by_id


def _check_segmentation(seg: Any, ann_id: int, json_path: str) -> Any:
    """Polygons (list of flat x,y lists; those with < 3 points dropped) or RLE; None when absent/empty."""
    if seg is None:
        return None
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            raise _bad(json_path, f"annotation {ann_id} has an RLE segmentation without 'counts'/'size'")
        return seg
    if isinstance(seg, list):
        polys = []
        for poly in seg:
            # structure only (first coordinate, even length): checking every number of COCO's ~40M
            # coordinates would cost seconds, and pycocotools rejects non-numbers when masks are built
            if (
                not isinstance(poly, list)
                or len(poly) % 2
                or (poly and (isinstance(poly[0], bool) or not isinstance(poly[0], (int, float))))
            ):
                raise _bad(
                    json_path,
                    f"annotation {ann_id} has a polygon that is not a flat list of x, y numbers: {str(poly)[:80]}",
                )
            if len(poly) >= 6:
                polys.append(poly)
        return polys or None
    raise _bad(
        json_path, f"annotation {ann_id} has segmentation of type {type(seg).__name__}; expected polygons or RLE"
    )


# -- statistics for stage two ---------------------------------------------------------------------------
def class_statistics(index: CocoIndex) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(class frequency prior [K], box (w/W, h/H) mean [K,2], std [K,2]) over training instances.

    Classes without instances get prior 0 and the statistics of all instances, so sampling from them
    never produces NaNs.
    """
    k = index.num_classes
    labels, wh = [], []
    for im in index.images:
        for a in im.instances:
            x1, y1, x2, y2 = a.bbox_xyxy
            labels.append(a.label - 1)
            wh.append(((x2 - x1) / im.width, (y2 - y1) / im.height))
    if not labels:
        raise UserError(
            f"{index.json_path} has no (non-crowd) annotations to compute class statistics from",
            "use a training set with annotations",
        )
    lab = torch.tensor(labels, dtype=torch.long)
    whs = torch.tensor(wh, dtype=torch.float64)
    counts = torch.bincount(lab, minlength=k).to(torch.float64)
    prior = counts / counts.sum()
    mean = whs.mean(0).repeat(k, 1)
    std = whs.std(0, unbiased=False).repeat(k, 1)
    for c in range(k):
        sel = whs[lab == c]
        if len(sel):
            mean[c] = sel.mean(0)
            std[c] = sel.std(0, unbiased=False)
    return prior.float(), mean.float(), std.float()


def check_image_files(images: Sequence[CocoImage], what: str = "training") -> None:
    """Refuse a run whose image files are not all there, at start-up: one stat per image (about a second
    for COCO), so a missing file is found before training rather than when it is first drawn (or never,
    in a short run)."""
    missing = [im.file_name for im in images if not os.path.isfile(im.file_name)]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(
            f"{len(missing)} of {len(images)} {what} image file(s) do not exist: {shown}",
            "check the dataset's image directory (DATASETS.CATALOG, DETECTRON2_DATASETS), or remove "
            "those images from the annotation file",
        )


# -- the torch dataset ----------------------------------------------------------------------------------
def read_image(image: CocoImage) -> torch.Tensor:
    """The image as float32 [3, H, W] RGB 0-255 (EXIF orientation applied), checked against the json size."""
    try:
        with Image.open(image.file_name) as pil:
            pil = ImageOps.exif_transpose(pil).convert("RGB")
            array = np.array(pil, dtype=np.uint8)
    except FileNotFoundError:
        raise UnreadableImageError(
            f"image file not found: {image.file_name} (image id {image.id})",
            "check the dataset's image root directory",
            image_id=image.id,
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImageError(
            f"cannot read image file {image.file_name} (image id {image.id}): {exc}",
            "replace the corrupt file, or remove the image from the annotation file",
            image_id=image.id,
        ) from None
    if array.shape[:2] != (image.height, image.width):
        raise UnreadableImageError(
            f"image file {image.file_name} (image id {image.id}) is {array.shape[0]}x{array.shape[1]} "
            f"but the annotation file says {image.height}x{image.width}",
            "fix the image's height/width in the annotation file (or the image)",
            image_id=image.id,
        )
    return torch.from_numpy(array).permute(2, 0, 1).to(torch.float32).contiguous()


def _mask_of(ann: CocoAnnotation, p: AugParams) -> np.ndarray:
    """One instance mask [rh, rw] uint8 in the sample frame: polygons are transformed, then rasterised."""
    from pycocotools import mask as mask_utils

    seg = ann.segmentation
    if seg is None:
        raise UserError(
            f"annotation {ann.id} has no segmentation, but masks were requested",
            "set MODEL.MASK_ON False, or add polygon/RLE segmentation to the annotations",
        )
    if isinstance(seg, list):
        polys = [poly.tolist() for poly in apply_polygons(seg, p)]
        rles = mask_utils.frPyObjects(polys, p.resized_h, p.resized_w)
        return mask_utils.decode(mask_utils.merge(rles)).astype(np.uint8)
    rle = mask_utils.frPyObjects(seg, p.orig_h, p.orig_w) if isinstance(seg.get("counts"), list) else seg
    full = torch.from_numpy(mask_utils.decode(rle).astype(np.uint8))[None]
    return apply_masks(full, p)[0].numpy()


class DetectionDataset(Dataset):
    """(image, variant) -> resized image + transformed targets, exactly as the plan says.

    Without `variant_sampler` there is one item per (image, variant) (item i = image i // V, variant
    i % V): stage one dumps them all. With `variant_sampler(epoch, image_id) -> variant` (e.g.
    `plan.sample_variant`) there is one item per image and an item index may be `(epoch, i)`, as
    yielded by `InfiniteSampler(..., yield_epoch=True)`.
    """

    def __init__(
        self,
        index: CocoIndex,
        plan: AugmentationPlan,
        training: bool,
        variant_sampler: Callable[[int, int], int] | None = None,
        with_masks: bool = False,
    ) -> None:
        self.index = index
        self.plan = plan
        self.training = training
        self.variant_sampler = variant_sampler
        self.with_masks = with_masks
        self.images = index.training_images() if training else list(index.images)
        if not self.images:
            what = "images with annotations" if training else "images"
            raise UserError(f"{index.json_path} has no {what}", "check the dataset's annotation file")

    def __len__(self) -> int:
        per_image = 1 if self.variant_sampler is not None else self.plan.num_variants
        return len(self.images) * per_image

    def locate(self, item: int | tuple[int, int]) -> tuple[CocoImage, int]:
        """Item index (or (epoch, index)) -> (image record, variant)."""
        epoch, i = item if isinstance(item, tuple) else (0, item)
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for a dataset of {len(self)} items")
        if self.variant_sampler is not None:
            image = self.images[i]
            return image, int(self.variant_sampler(int(epoch), image.id))
        image = self.images[i // self.plan.num_variants]
        return image, i % self.plan.num_variants

    def sample_params(self, item: int | tuple[int, int]) -> AugParams:
        """The geometry of an item from the json sizes alone (no image read): for sizing caches."""
        image, variant = self.locate(item)
        return self.plan.params(image.id, variant, image.height, image.width)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        image, variant = self.locate(item)
        pixels = read_image(image)
        p = self.plan.params(image.id, variant, image.height, image.width)
        instances = image.instances
        boxes = torch.tensor([a.bbox_xyxy for a in instances], dtype=torch.float32).reshape(-1, 4)
        target: dict[str, torch.Tensor] = {
            "boxes": apply_boxes(boxes, p),
            "labels": torch.tensor([a.label for a in instances], dtype=torch.int64),
        }
        if self.with_masks:
            masks = [_mask_of(a, p) for a in instances]
            target["masks"] = (
                torch.from_numpy(np.stack(masks))
                if masks
                else torch.zeros((0, p.resized_h, p.resized_w), dtype=torch.uint8)
            )
        return {"image": apply_image(pixels, p), "target": target, "aug": p, "image_id": image.id}


def collate(batch: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Detection batches are lists: images differ in size and are padded by the model."""
    return list(batch)


def load_dataset(cfg: Any, name: str) -> CocoIndex:
    """resolve_dataset + load_coco_json."""
    return load_coco_json(*resolve_dataset(cfg, name))


def train_index(cfg: Any) -> CocoIndex:
    """The validated index of the one training dataset, DATASETS.TRAIN."""
    names = list(cfg.DATASETS.TRAIN)
    if len(names) != 1:
        raise UserError(
            f"DATASETS.TRAIN must name exactly one dataset, got {names}.",
            "merge the annotation files into one COCO json and register it in DATASETS.CATALOG.",
        )
    return load_dataset(cfg, names[0])


def resolve_num_classes(cfg: Any, index: CocoIndex | None = None) -> int:
    """K, the number of foreground classes: MODEL.NUM_CLASSES, else the training dataset's categories."""
    k = int(cfg.MODEL.NUM_CLASSES)
    if index is None and k > 0:
        return k
    index = index if index is not None else train_index(cfg)
    if k > 0 and k != index.num_classes:
        raise UserError(
            f"MODEL.NUM_CLASSES is {k} but the training dataset {index.json_path} has {index.num_classes} categories.",
            f"set MODEL.NUM_CLASSES {index.num_classes} (or 0 to take it from the dataset).",
        )
    return index.num_classes
