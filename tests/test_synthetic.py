"""detection.data.synthetic: deterministic bytes, valid COCO, annotations that match the pixels."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from detection.data.synthetic import generate
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
