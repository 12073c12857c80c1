"""detection.data.synthetic: deterministic bytes, valid COCO, annotations that match the pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from detection.data.synthetic import Difficulty, generate, render_image
from detection.engine.synth_cli import main


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    a = all_files(Path(generate(tmp_path / "a", train=5, val=3, size=48, seed=7)["root"]))
    b = all_files(Path(generate(tmp_path / "b", train=5, val=3, size=48, seed=7)["root"]))
    c = all_files(Path(generate(tmp_path / "c", train=5, val=3, size=48, seed=8)["root"]))
    assert len(a) == 2 + 5 + 3 and a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


def test_more_images_keep_the_first_ones_and_stale_images_are_removed(tmp_path):
    small = generate(tmp_path / "s", train=2, val=0, size=48, seed=1)
    root = tmp_path / "big"
    generate(root, train=4, val=0, size=48, seed=1)
    assert (root / "train" / "000002.png").read_bytes() == (Path(small["train_images"]) / "000002.png").read_bytes()
    generate(root, train=2, val=0, size=48, seed=1)
    assert sorted(p.name for p in (root / "train").iterdir()) == ["000001.png", "000002.png"]


def test_tiny_coco_loads_in_pycocotools_with_consistent_annotations(tiny_coco):
    coco = COCO(tiny_coco["train_json"])
    assert len(coco.getCatIds()) >= 3
    assert len(coco.getImgIds()) == 16
    widths = set()
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        pixels = np.asarray(Image.open(Path(tiny_coco["train_images"]) / info["file_name"]))
        assert pixels.shape == (info["height"], info["width"], 3) and pixels.dtype == np.uint8
        widths.add(info["width"] / info["height"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert anns, "every synthetic image has at least one object"
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= info["width"] and y + h <= info["height"]
            assert ann["iscrowd"] == 0 and ann["area"] > 0
            mask = coco.annToMask(ann)  # polygons rasterise back to the visible area and stay in the box
            assert abs(int(mask.sum()) - ann["area"]) <= 0.05 * ann["area"] + 2
            ys, xs = np.nonzero(mask)
            assert xs.min() >= x - 1 and xs.max() < x + w + 1 and ys.min() >= y - 1 and ys.max() < y + h + 1
    assert len(widths) > 1  # aspect ratios vary, so resize and padding paths get exercised


def test_objects_differ_from_their_background(tiny_coco):
    """Annotated pixels must be distinguishable from the background around them (learnable data)."""
    coco = COCO(tiny_coco["val_json"])
    gaps = []
    for ann in coco.loadAnns(coco.getAnnIds()):
        info = coco.loadImgs(ann["image_id"])[0]
        pixels = np.asarray(Image.open(Path(tiny_coco["val_images"]) / info["file_name"]), dtype=np.float64)
        mask = coco.annToMask(ann).astype(bool)
        others = np.zeros_like(mask)
        for other in coco.loadAnns(coco.getAnnIds(imgIds=ann["image_id"])):
            others |= coco.annToMask(other).astype(bool)
        if (~others).sum():
            gaps.append(np.abs(pixels[mask].mean(0) - pixels[~others].mean(0)).sum())
    assert np.median(gaps) > 40


def test_cli_writes_the_dataset_and_rejects_bad_sizes(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "d"), "--train", "2", "--val", "1", "--size", "40", "--seed", "3"]) == 0
    data = json.loads((tmp_path / "d" / "annotations" / "instances_val.json").read_text())
    assert len(data["images"]) == 1 and (tmp_path / "d" / "val" / data["images"][0]["file_name"]).is_file()
    assert "DATASETS.CATALOG.synth_train" in capsys.readouterr().out
    assert main(["--out", str(tmp_path / "e"), "--size", "8"]) == 2
    assert "icd synth: error: --size 8 is too small" in capsys.readouterr().err


@pytest.mark.parametrize("train, val", [(-1, 2), (0, 0)])
def test_cli_rejects_bad_counts(tmp_path, capsys, train, val):
    assert main(["--out", str(tmp_path), "--train", str(train), "--val", str(val)]) == 2
    assert "icd synth: error:" in capsys.readouterr().err


def test_default_difficulty_draws_the_original_dataset(tmp_path):
    """The annotations of the dataset as it was before Difficulty existed (sha256 taken from that code):
    the demo and the benchmark's full size depend on it."""
    import hashlib

    paths = generate(tmp_path, train=4, val=2, size=64, seed=3, difficulty=Difficulty())
    digest = hashlib.sha256(Path(paths["train_json"]).read_bytes() + Path(paths["val_json"]).read_bytes())
    assert digest.hexdigest() == "47eb32c9443518f6d7219106e4a0dc03fe76bf1be9e5bb1f5cb3729dd45f7d8d"


def test_harder_task_has_more_classes_smaller_and_more_instances_and_records_its_options(tmp_path):
    hard = Difficulty(classes=12, max_objects=12, min_extent=0.08, max_extent=0.3, max_hidden=0.6, clutter=6)
    easy_json = generate(tmp_path / "easy", train=24, val=0, size=96, seed=0)["train_json"]
    hard_json = generate(tmp_path / "hard", train=24, val=0, size=96, seed=0, difficulty=hard)["train_json"]
    easy, data = json.loads(Path(easy_json).read_text()), json.loads(Path(hard_json).read_text())
    assert [c["id"] for c in data["categories"]] == list(range(1, 13))
    assert data["categories"][:4] == easy["categories"]  # the original classes keep their ids
    assert len({a["category_id"] for a in data["annotations"]}) >= 10
    assert data["info"]["difficulty"] == {
        "classes": 12,
        "max_objects": 12,
        "min_extent": 0.08,
        "max_extent": 0.3,
        "max_hidden": 0.6,
        "clutter": 6,
    }
    assert "difficulty" not in easy["info"]
    assert len(data["annotations"]) > 1.5 * len(easy["annotations"])
    areas = {name: np.median([a["area"] for a in d["annotations"]]) for name, d in (("easy", easy), ("hard", data))}
    assert areas["hard"] < 0.5 * areas["easy"]
    coco = COCO(hard_json)  # still valid COCO whose polygons rasterise back to the visible area
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert abs(int(coco.annToMask(ann).sum()) - ann["area"]) <= 0.05 * ann["area"] + 2


def test_clutter_changes_pixels_but_not_the_draws_of_the_shapes_before_it(tmp_path):
    """Clutter has its own random stream: the shapes draw from theirs as without it (the first class drawn is
    the same; later draws depend on the colours under each shape)."""
    changed = []
    for index in range(6):
        a, anns_a = render_image(0, "train", index, 96, Difficulty(classes=12, max_objects=8))
        b, anns_b = render_image(0, "train", index, 96, Difficulty(classes=12, max_objects=8, clutter=8))
        changed.append((a != b).any(axis=-1).mean())
        assert [x["category_id"] for x in anns_b][:1] == [x["category_id"] for x in anns_a][:1]
    assert np.mean(changed) > 0.05 and min(changed) == 0.0  # up to 8 blobs: some images draw none


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--classes", ["13"]),
        ("--classes", ["0"]),
        ("--extent", ["0.5", "0.2"]),
        ("--max-hidden", ["1.0"]),
        ("--clutter", ["-1"]),
        ("--max-objects", ["0"]),
    ],
)
def test_cli_rejects_bad_difficulty(tmp_path, capsys, flag, value):
    assert main(["--out", str(tmp_path / "d"), "--train", "1", "--val", "0", flag, *value]) == 2
    err = capsys.readouterr().err
    assert f"icd synth: error: {flag}" in err and "Traceback" not in err
    assert not (tmp_path / "d" / "annotations").exists()
