"""A deterministic synthetic COCO-format detection dataset.

Why hand-written: no weights or datasets can be downloaded, and tests and the demo need a dataset that a
tiny detector can learn in minutes but not trivially: shapes (the class) of random colour and texture,
varied size, rotation, aspect and image shape, occluding each other, on cluttered backgrounds.

Each image is a pure function of (seed, split, index) through numpy Generators, so a split's first images
do not change when more are requested, and the same arguments give the same bytes (PNG with fixed
settings, JSON with sorted keys). Annotations describe the *visible* part of each shape: bbox, area and
polygons come from the visible mask (contours via contourpy); shapes hidden or cut off by more than
MAX_HIDDEN of their area are rejected at placement, so every drawn shape is annotated.

`Difficulty` (the CLI's --classes, --max-objects, --extent, --max-hidden, --clutter) makes the task
harder where a detector's capacity matters: more classes (shapes that differ in a few vertices), more and
smaller instances, more occlusion, unannotated clutter shapes in the background. Its defaults draw exactly
the dataset of the defaults before it existed: the clutter has its own random stream, and every other
option only changes the values of draws that the defaults make too.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import contourpy
import numpy as np
from PIL import Image, ImageDraw

from detection.errors import UserError

CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "rectangle", "supercategory": "shape"},
    {"id": 2, "name": "ellipse", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 4, "name": "cross", "supercategory": "shape"},
]
# More classes for a harder task (--classes): appended, so the first four keep their ids.
EXTRA_SHAPES = ("pentagon", "hexagon", "star", "arrow", "semicircle", "l_shape", "t_shape", "trapezoid")
ALL_CATEGORIES: list[dict[str, Any]] = CATEGORIES + [
    {"id": len(CATEGORIES) + 1 + i, "name": name, "supercategory": "shape"} for i, name in enumerate(EXTRA_SHAPES)
]
SPLITS = {"train": 0, "val": 1}
MAX_HIDDEN = 0.4  # a shape may lose at most this fraction of its area to occluders and the image border
MIN_VISIBLE_PIXELS = 12
PNG_SETTINGS = {"format": "PNG", "compress_level": 6, "optimize": False}
_CLUTTER_STREAM = 1  # the clutter's generator: default_rng([seed, split, index, _CLUTTER_STREAM])


@dataclass(frozen=True)
class Difficulty:
    """How hard the task is; the defaults are the original dataset, byte for byte."""

    classes: int = len(CATEGORIES)  # the first `classes` of ALL_CATEGORIES
    max_objects: int | None = None  # shapes tried per image, 1..max_objects (None: max(3, size // 24))
    min_extent: float = 0.18  # a shape's diameter, as a fraction of the image's shorter side
    max_extent: float = 0.5
    max_hidden: float = MAX_HIDDEN  # the largest share of a shape hidden by occluders and the border
    clutter: int = 0  # unannotated distractor blobs per image, up to this many

    def __post_init__(self) -> None:
        if not 1 <= self.classes <= len(ALL_CATEGORIES):
            raise UserError(
                f"--classes {self.classes}: this dataset has 1 to {len(ALL_CATEGORIES)} shape classes",
                f"e.g. --classes {len(ALL_CATEGORIES)}",
            )
        if self.max_objects is not None and self.max_objects < 1:
            raise UserError(
                f"--max-objects {self.max_objects}: need at least one object per image", "e.g. --max-objects 12"
            )
        if not 0 < self.min_extent <= self.max_extent <= 1:
            raise UserError(
                f"--extent {self.min_extent} {self.max_extent}: need 0 < LO <= HI <= 1 (fractions of the "
                "image's shorter side)",
                "e.g. --extent 0.08 0.3",
            )
        if not 0 <= self.max_hidden < 1:
            raise UserError(f"--max-hidden {self.max_hidden}: need a fraction in [0, 1)", "e.g. --max-hidden 0.6")
        if self.clutter < 0:
            raise UserError(f"--clutter {self.clutter}: need a non-negative count", "e.g. --clutter 6")

    @property
    def categories(self) -> list[dict[str, Any]]:
        return ALL_CATEGORIES[: self.classes]

    def changed(self) -> dict[str, Any]:
        """The options that differ from the defaults (what the annotation files record)."""
        default = asdict(Difficulty())
        return {k: v for k, v in asdict(self).items() if v != default[k]}


# -- shapes -----------------------------------------------------------------------------------------
def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _shape_polygon(rng: np.random.Generator, name: str, extent: float) -> np.ndarray:
    """Vertices (k, 2) centred on the origin; `extent` is roughly the shape's diameter in pixels."""
    r = extent / 2
    if name == "rectangle":
        aspect = rng.uniform(0.45, 1.0)
        w, h = r, r * aspect
        pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]])
        angle = rng.uniform(-0.45, 0.45)
    elif name == "ellipse":
        aspect = rng.uniform(0.5, 1.0)
        t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        pts = np.stack([r * np.cos(t), r * aspect * np.sin(t)], 1)
        angle = rng.uniform(0, math.pi)
    elif name == "triangle":
        base = rng.uniform(0, 2 * math.pi)
        angles = base + np.array([0.0, 2.09, 4.19]) + rng.uniform(-0.35, 0.35, 3)
        radii = r * rng.uniform(0.8, 1.05, 3)
        pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
        angle = 0.0
    elif name == "cross":
        a = r * rng.uniform(0.28, 0.42)  # half arm thickness
        pts = np.array(
            [[-a, -r], [a, -r], [a, -a], [r, -a], [r, a], [a, a], [a, r], [-a, r], [-a, a], [-r, a], [-r, -a], [-a, -a]]
        )
        angle = rng.uniform(0, math.pi / 2)
    elif name in ("pentagon", "hexagon"):
        k = 5 if name == "pentagon" else 6
        t = np.arange(k) * 2 * math.pi / k
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
        angle = rng.uniform(0, 2 * math.pi / k)
    elif name == "star":
        inner = rng.uniform(0.38, 0.5)
        t = np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * inner)
        pts = np.stack([radii * np.cos(t), radii * np.sin(t)], 1)
        angle = rng.uniform(0, 2 * math.pi / 5)
    elif name == "arrow":
        a, head = r * rng.uniform(0.18, 0.28), r * rng.uniform(0.45, 0.6)  # half shaft width, head length
        tip = r - head
        pts = np.array([[-r, -a], [tip, -a], [tip, -2.2 * a], [r, 0.0], [tip, 2.2 * a], [tip, a], [-r, a]])
        angle = rng.uniform(0, 2 * math.pi)
    elif name == "semicircle":
        t = np.linspace(0, math.pi, 24)
        pts = np.stack([r * np.cos(t), r * np.sin(t) - r / 2], 1)
        angle = rng.uniform(0, 2 * math.pi)
    elif name == "l_shape":
        a = r * rng.uniform(0.35, 0.5)  # arm thickness
        pts = np.array([[-r, -r], [-r + a, -r], [-r + a, r - a], [r, r - a], [r, r], [-r, r]])
        angle = rng.uniform(0, 2 * math.pi)
    elif name == "t_shape":
        a = r * rng.uniform(0.18, 0.26)  # half stem width
        bar = r * rng.uniform(0.35, 0.5)  # bar thickness
        pts = np.array(
            [[-r, -r], [r, -r], [r, -r + bar], [a, -r + bar], [a, r], [-a, r], [-a, -r + bar], [-r, -r + bar]]
        )
        angle = rng.uniform(0, 2 * math.pi)
    elif name == "trapezoid":
        top = rng.uniform(0.3, 0.55)
        h = r * rng.uniform(0.55, 0.8)
        pts = np.array([[-r, h], [r, h], [r * top, -h], [-r * top, -h]])
        angle = rng.uniform(-0.45, 0.45)
    else:
        raise ValueError(f"unknown shape {name}")
    return _rotate(pts, angle)


def _polygon_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _rasterise(pts: np.ndarray, h: int, w: int) -> np.ndarray:
    canvas = Image.new("L", (w, h), 0)
    # PIL treats vertex (x, y) as the centre of pixel (x, y); COCO coordinates put it at (x+0.5, y+0.5).
    ImageDraw.Draw(canvas).polygon([(float(x) - 0.5, float(y) - 0.5) for x, y in pts], fill=1)
    return np.asarray(canvas, dtype=bool)


# -- textures and backgrounds --------------------------------------------------------------------------
def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3)


def _coords(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))


def _texture(rng: np.random.Generator, h: int, w: int, colour: np.ndarray) -> np.ndarray:
    """A full-image (h, w, 3) fill: solid, stripes or speckle, in the given base colour."""
    kind = rng.integers(3)
    base = np.broadcast_to(colour, (h, w, 3)).astype(np.float64)
    if kind == 0:
        return base.copy()
    if kind == 1:
        xx, yy = _coords(h, w)
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(3, 8)
        phase = (xx * math.cos(theta) + yy * math.sin(theta)) / period
        stripe = (np.floor(phase) % 2)[..., None]
        other = np.clip(colour + rng.choice([-1, 1], 3) * rng.uniform(40, 90, 3), 0, 255)
        return base * (1 - stripe) + other * stripe
    return base + rng.normal(0, rng.uniform(15, 35), (h, w, 1))


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Gradient + low-frequency blotches + noise + distractor lines."""
    xx, yy = _coords(h, w)
    theta = rng.uniform(0, 2 * math.pi)
    t = xx * math.cos(theta) + yy * math.sin(theta)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    c0, c1 = _colour(rng), _colour(rng)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    blotch_grid = rng.uniform(-40, 40, (4, 4, 3))
    blotches = np.stack(
        [
            np.asarray(Image.fromarray(blotch_grid[..., c].astype(np.float32)).resize((w, h), Image.BILINEAR))
            for c in range(3)
        ],
        -1,
    )
    img = img + blotches + rng.normal(0, rng.uniform(2, 10), (h, w, 1))
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 7))):
        x0, x1 = rng.uniform(-0.1, 1.1, 2) * w
        y0, y1 = rng.uniform(-0.1, 1.1, 2) * h
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 3)))
    return np.asarray(canvas, dtype=np.float64)


def _draw_clutter(rng: np.random.Generator, image: np.ndarray, count: int, difficulty: Difficulty) -> None:
    """Up to `count` unannotated blobs (irregular star-convex polygons, textured) painted into the
    background, sized like the objects: a detector must learn what is not an object. Objects are drawn
    over them, so they never hide an annotated shape."""
    h, w = image.shape[:2]
    for _ in range(int(rng.integers(0, count + 1))):
        extent = rng.uniform(difficulty.min_extent, difficulty.max_extent) * min(h, w)
        k = int(rng.integers(7, 13))
        t = np.sort(rng.uniform(0, 2 * math.pi, k))
        radii = extent / 2 * rng.uniform(0.35, 1.0, k)
        pts = np.stack([radii * np.cos(t), radii * np.sin(t)], 1) + rng.uniform((0, 0), (w, h))
        mask = _rasterise(pts, h, w)
        image[mask] = _texture(rng, h, w, _colour(rng))[mask]


# -- polygons of visible masks --------------------------------------------------------------------------
def _mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons (flat x, y lists) tracing a binary mask's regions along pixel edges."""
    padded = np.pad(mask.astype(np.float64), 1)
    x = np.arange(padded.shape[1]) - 0.5  # padded pixel j has its centre at x = j - 1 + 0.5
    y = np.arange(padded.shape[0]) - 0.5
    gen = contourpy.contour_generator(x, y, padded, line_type=contourpy.LineType.Separate)
    polys = []
    for line in gen.lines(0.5):
        pts = _drop_collinear(np.asarray(line)[:-1])  # closed lines repeat their first point
        if len(pts) >= 3 and _polygon_area(pts) >= 1.0:
            polys.append([round(float(v), 2) for v in pts.reshape(-1)])
    return polys


def _drop_collinear(pts: np.ndarray) -> np.ndarray:
    if len(pts) < 4:
        return pts
    prev, nxt = np.roll(pts, 1, 0), np.roll(pts, -1, 0)
    cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - pts[:, 1]) - (pts[:, 1] - prev[:, 1]) * (nxt[:, 0] - pts[:, 0])
    return pts[np.abs(cross) > 1e-9]


# -- one image --------------------------------------------------------------------------------------------
def render_image(
    seed: int, split: str, index: int, size: int, difficulty: Difficulty = Difficulty()
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Pixels (h, w, 3) uint8 and annotations (category_id, bbox, area, segmentation) of one image."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    h = size
    w = int(round(size * rng.uniform(0.75, 1.25)))
    image = _background(rng, h, w)
    if difficulty.clutter:
        _draw_clutter(
            np.random.default_rng([seed, SPLITS[split], index, _CLUTTER_STREAM]), image, difficulty.clutter, difficulty
        )
    categories_drawn = difficulty.categories
    max_hidden = difficulty.max_hidden
    owner = np.full((h, w), -1, dtype=np.int32)
    full_area: list[float] = []
    categories: list[int] = []
    fills: list[tuple[np.ndarray, np.ndarray]] = []
    max_objects = difficulty.max_objects or max(3, size // 24)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cat = categories_drawn[int(rng.integers(len(categories_drawn)))]
        extent = rng.uniform(difficulty.min_extent, difficulty.max_extent) * min(h, w)
        poly = _shape_polygon(rng, cat["name"], extent)
        area = _polygon_area(poly)
        lo, hi = poly.min(0), poly.max(0)
        for _attempt in range(8):
            margin = 0.15 * extent
            cx = rng.uniform(-lo[0] - margin, w - hi[0] + margin)
            cy = rng.uniform(-lo[1] - margin, h - hi[1] + margin)
            mask = _rasterise(poly + (cx, cy), h, w)
            if mask.sum() < max(MIN_VISIBLE_PIXELS, (1 - max_hidden) * area):
                continue  # too much of it falls outside the image
            trial = np.where(mask, len(full_area), owner)
            counts = np.bincount(trial[trial >= 0], minlength=len(full_area) + 1)
            if all(
                counts[j] >= max(MIN_VISIBLE_PIXELS, (1 - max_hidden) * full_area[j]) for j in range(len(full_area))
            ):
                break
        else:
            continue  # no placement keeps the others mostly visible: skip this shape
        colour = _colour(rng)
        local_bg = image[mask].mean(0)
        for _ in range(5):  # keep the shape distinguishable from what is under it
            if np.abs(colour - local_bg).sum() >= 100:
                break
            colour = _colour(rng)
        owner = trial
        full_area.append(float(area))  # hidden fraction counts the border and occluders together
        categories.append(cat["id"])
        fills.append((mask, _texture(rng, h, w, colour)))
    for mask, texture in fills:
        image[mask] = texture[mask]
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    annotations = []
    for j, cat_id in enumerate(categories):
        visible = owner == j
        ys, xs = np.nonzero(visible)
        polygons = _mask_polygons(visible)
        if len(xs) < MIN_VISIBLE_PIXELS or not polygons:
            continue
        x0, y0 = int(xs.min()), int(ys.min())
        annotations.append(
            {
                "category_id": cat_id,
                "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
                "area": int(len(xs)),
                "segmentation": polygons,
                "iscrowd": 0,
            }
        )
    return pixels, annotations


# -- whole dataset ---------------------------------------------------------------------------------------
def _write_split(
    root: Path, split: str, count: int, size: int, seed: int, difficulty: Difficulty = Difficulty()
) -> Path:
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    names = set()
    for i in range(count):
        image_id = i + 1
        pixels, anns = render_image(seed, split, i, size, difficulty)
        name = f"{image_id:06d}.png"
        names.add(name)
        Image.fromarray(pixels).save(image_dir / name, **PNG_SETTINGS)
        images.append(
            {"id": image_id, "file_name": name, "height": int(pixels.shape[0]), "width": int(pixels.shape[1])}
        )
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    for stale in image_dir.glob("*.png"):  # images of an earlier, larger run would be unannotated
        if stale.name not in names:
            stale.unlink()
    info: dict[str, Any] = {"description": f"icd synthetic shapes ({split}, size {size}, seed {seed})", "version": "1"}
    if difficulty.changed():
        info["difficulty"] = difficulty.changed()
    data = {
        "info": info,
        "licenses": [],
        "categories": difficulty.categories,
        "images": images,
        "annotations": annotations,
    }
    json_path = root / "annotations" / f"instances_{split}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, sort_keys=True, separators=(",", ":")), encoding="utf-8")
    return json_path


def generate(
    out_dir: str | Path,
    train: int = 200,
    val: int = 50,
    size: int = 128,
    seed: int = 0,
    difficulty: Difficulty | None = None,
) -> dict[str, str]:
    """Write the dataset; returns {root, train_json, train_images, val_json, val_images} as strings."""
    difficulty = difficulty or Difficulty()
    if train < 0 or val < 0 or train + val == 0:
        raise UserError(
            f"--train {train} --val {val}: need a non-negative number of images, not both zero",
            "e.g. --train 200 --val 50",
        )
    if size < 32:
        raise UserError(f"--size {size} is too small to draw recognisable shapes", "use --size 32 or more")
    root = Path(out_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create output directory {root}: {exc.strerror or exc}", "choose a writable --out directory"
        ) from None
    paths = {"root": str(root)}
    for split, count in (("train", train), ("val", val)):
        paths[f"{split}_json"] = str(_write_split(root, split, count, size, seed, difficulty))
        paths[f"{split}_images"] = str(root / split)
    return paths
