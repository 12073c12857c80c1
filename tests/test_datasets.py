"""detection.data.datasets: catalog lookup, validation errors a user can hit, and what the Dataset returns."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detection.data.augment import AugmentationPlan, apply_boxes
from detection.data.datasets import (
    CocoIndex,
    DetectionDataset,
    class_statistics,
    collate,
    load_coco_json,
    load_dataset,
    resolve_dataset,
)
from detection.data.loader import InfiniteSampler
from detection.errors import UserError


@pytest.fixture(scope="module")
def train_data(tiny_coco) -> dict:
    return json.loads(Path(tiny_coco["train_json"]).read_text())


def write_json(tmp_path: Path, data: dict, name: str = "ann.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


# -- catalog ---------------------------------------------------------------------------------------------
def test_catalog_names_resolve_to_their_paths(cfg_tiny, tiny_coco):
    assert resolve_dataset(cfg_tiny, "synth_train") == (tiny_coco["train_json"], tiny_coco["train_images"])
    cfg_tiny.DATASETS.CATALOG["as_mapping"] = {"json_file": "a.json", "image_root": "imgs"}
    assert resolve_dataset(cfg_tiny, "as_mapping") == ("a.json", "imgs")


def test_builtin_coco_names_resolve_under_the_env_var(cfg_tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    json_path, root = resolve_dataset(cfg_tiny, "coco_2017_val")
    assert json_path == str(tmp_path / "coco" / "annotations" / "instances_val2017.json")
    assert root == str(tmp_path / "coco" / "val2017")


def test_builtin_name_without_the_env_var_is_a_user_error(cfg_tiny, monkeypatch):
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    with pytest.raises(UserError, match=r"coco_2017_train.*DETECTRON2_DATASETS.*not set") as exc:
        resolve_dataset(cfg_tiny, "coco_2017_train")
    assert "export DETECTRON2_DATASETS=" in exc.value.fix


def test_unknown_dataset_lists_known_names_and_suggests_one(cfg_tiny):
    with pytest.raises(UserError) as exc:
        resolve_dataset(cfg_tiny, "synth_trian")
    assert "unknown dataset 'synth_trian'" in exc.value.problem
    for name in ("synth_train", "synth_val", "coco_2017_train", "coco_2017_val"):
        assert name in exc.value.problem
    assert "did you mean 'synth_train'" in exc.value.fix


def test_malformed_catalog_entry_is_a_user_error(cfg_tiny):
    cfg_tiny.DATASETS.CATALOG["broken"] = ["only_one_path.json"]
    with pytest.raises(UserError, match=r"DATASETS.CATALOG.broken must be \[annotation_json, image_root\]"):
        resolve_dataset(cfg_tiny, "broken")


# -- loading and validation ---------------------------------------------------------------------------
def test_tiny_coco_index_has_contiguous_labels_and_all_images(cfg_tiny, train_data):
    index = load_dataset(cfg_tiny, "synth_train")
    assert isinstance(index, CocoIndex)
    assert index.num_classes == len(train_data["categories"]) >= 3
    assert sorted(index.cat_id_to_label.values()) == list(range(1, index.num_classes + 1))
    assert {index.label_to_cat_id[v]: v for v in index.label_to_cat_id.values()} == index.cat_id_to_label
    assert [im.id for im in index.images] == [im["id"] for im in train_data["images"]]
    assert sum(len(im.annotations) for im in index.images) == len(train_data["annotations"])
    assert index.num_degenerate_dropped == 0 and len(index.json_sha256) == 64


def test_category_ids_map_to_contiguous_labels_and_back(tmp_path, train_data):
    data = copy.deepcopy(train_data)
    remap = {1: 7, 2: 3, 3: 90, 4: 12}  # sparse ids as in COCO
    for cat in data["categories"]:
        cat["id"] = remap[cat["id"]]
    for ann in data["annotations"]:
        ann["category_id"] = remap[ann["category_id"]]
    index = load_coco_json(write_json(tmp_path, data), "imgs")
    assert index.cat_id_to_label == {3: 1, 7: 2, 12: 3, 90: 4}
    assert index.label_to_cat_id == {1: 3, 2: 7, 3: 12, 4: 90}
    assert index.class_names == ["ellipse", "rectangle", "cross", "triangle"]


def test_missing_annotation_file_names_the_path(tmp_path):
    with pytest.raises(UserError, match=r"annotation file not found: .*missing.json"):
        load_coco_json(tmp_path / "missing.json", tmp_path)


def test_malformed_json_reports_the_position(tmp_path, tiny_coco):
    path = tmp_path / "cut.json"
    path.write_text(Path(tiny_coco["train_json"]).read_text()[:500])
    with pytest.raises(UserError, match=r"cut.json is not valid JSON at line 1, column \d+"):
        load_coco_json(path, tmp_path)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_top_level_keys_are_named(tmp_path, train_data, key):
    data = {k: v for k, v in train_data.items() if k != key}
    with pytest.raises(UserError, match=rf"missing top-level key\(s\) \['{key}'\]"):
        load_coco_json(write_json(tmp_path, data), tmp_path)


def test_unknown_category_names_the_annotation(tmp_path, train_data):
    data = copy.deepcopy(train_data)
    data["annotations"][3]["category_id"] = 99
    bad_id = data["annotations"][3]["id"]
    with pytest.raises(UserError, match=rf"annotation {bad_id} has category_id 99, which is not in 'categories'"):
        load_coco_json(write_json(tmp_path, data), tmp_path)


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda d: d["annotations"][0].pop("bbox"), "has no 'bbox'"),
        (lambda d: d["annotations"][0].__setitem__("bbox", [1, 2, 3]), "expected [x, y, width, height]"),
        (lambda d: d["annotations"][0].__setitem__("image_id", 12345), "image_id 12345, which is not in 'images'"),
        (lambda d: d["images"][0].pop("height"), "has no 'height'"),
        (lambda d: d["images"].append(dict(d["images"][0])), "appears more than once"),
        (lambda d: d["annotations"][0].__setitem__("segmentation", [[1, 2, 3]]), "not a flat list of x, y"),
    ],
)
def test_other_malformed_entries_are_user_errors(tmp_path, train_data, mutate, words):
    data = copy.deepcopy(train_data)
    mutate(data)
    with pytest.raises(UserError) as exc:
        load_coco_json(write_json(tmp_path, data), tmp_path)
    assert words in str(exc.value)


def test_degenerate_boxes_are_dropped_counted_and_warned_once(tmp_path, train_data, caplog):
    data = copy.deepcopy(train_data)
    data["annotations"][0]["bbox"][2] = 0  # zero width
    data["annotations"][1]["bbox"][3] = -4  # negative height
    data["annotations"][2]["bbox"][:2] = [500, 500]  # entirely outside the image
    dropped_ids = {a["id"] for a in data["annotations"][:3]}
    with caplog.at_level(logging.WARNING, logger="detection.data.datasets"):
        index = load_coco_json(write_json(tmp_path, data), tmp_path)
    assert index.num_degenerate_dropped == 3
    kept = {a.id for im in index.images for a in im.annotations}
    assert not (kept & dropped_ids) and len(kept) == len(data["annotations"]) - 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dropped 3 annotation(s)" in warnings[0].getMessage()


def test_boxes_are_clipped_to_the_image(tmp_path, train_data):
    data = copy.deepcopy(train_data)
    image = data["images"][0]
    ann = next(a for a in data["annotations"] if a["image_id"] == image["id"])
    ann["bbox"] = [-5, -5, image["width"] + 20, 10]
    index = load_coco_json(write_json(tmp_path, data), tmp_path)
    box = next(a for a in index.image(image["id"]).annotations if a.id == ann["id"]).bbox_xyxy
    assert box == (0.0, 0.0, float(image["width"]), 5.0)


def test_images_without_annotations_and_crowds_are_skipped_for_training_only(tmp_path, train_data, tiny_coco):
    data = copy.deepcopy(train_data)
    first, second = data["images"][0]["id"], data["images"][1]["id"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != first]
    for a in data["annotations"]:
        if a["image_id"] == second:
            a["iscrowd"] = 1
    index = load_coco_json(write_json(tmp_path, data), tiny_coco["train_images"])
    assert index.num_images_without_annotations == 2
    assert [im.id for im in index.training_images()] == [im["id"] for im in data["images"][2:]]
    plan = AugmentationPlan(seed=0, num_variants=1, min_sizes=[64], max_size=96, flip=False)
    assert len(DetectionDataset(index, plan, training=True)) == len(data["images"]) - 2
    evaluation = DetectionDataset(index, plan, training=False)
    assert len(evaluation) == len(data["images"])
    crowd_item = evaluation[1]
    assert crowd_item["image_id"] == second
    assert crowd_item["target"]["boxes"].shape == (0, 4) and crowd_item["target"]["labels"].shape == (0,)


# -- the Dataset ------------------------------------------------------------------------------------------
def test_items_are_resized_images_with_transformed_targets(cfg_tiny, tiny_coco):
    index = load_dataset(cfg_tiny, "synth_train")
    plan = AugmentationPlan(seed=0, num_variants=2, min_sizes=[64, 80], max_size=120, flip=True)
    dataset = DetectionDataset(index, plan, training=True)
    assert len(dataset) == 2 * len(index.training_images())
    for i in range(4):
        item = dataset[i]
        image = index.training_images()[i // 2]
        p = item["aug"]
        assert p == plan.params(image.id, i % 2, image.height, image.width) == dataset.sample_params(i)
        assert item["image_id"] == image.id
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, p.resized_h, p.resized_w)
        assert 0 <= float(item["image"].min()) and float(item["image"].max()) <= 255 + 1e-3  # 0-255 units
        raw = torch.tensor([a.bbox_xyxy for a in image.instances])
        assert torch.equal(item["target"]["boxes"], apply_boxes(raw, p))
        assert item["target"]["labels"].tolist() == [a.label for a in image.instances]
        assert item["target"]["labels"].dtype == torch.int64
    assert collate([dataset[0], dataset[1]])[1]["aug"].variant == 1


def test_images_are_rgb_0_255_pixels_in_chw_order(cfg_tiny):
    index = load_dataset(cfg_tiny, "synth_val")
    pixels = np.asarray(Image.open(index.images[0].file_name).convert("RGB"), dtype=np.float32)
    plan = AugmentationPlan(seed=0, num_variants=2, min_sizes=[0], max_size=0, flip=True)  # no resize
    dataset = DetectionDataset(index, plan, training=False)
    flips = set()
    for variant in (0, 1):  # the two variants of image 0: one plain, one mirrored
        item = dataset[variant]
        flips.add(item["aug"].flip)
        expected = pixels[:, ::-1] if item["aug"].flip else pixels
        assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), expected)
    assert flips == {False, True}


def test_masks_cover_their_boxes(cfg_tiny):
    index = load_dataset(cfg_tiny, "synth_val")
    plan = AugmentationPlan(seed=1, num_variants=1, min_sizes=[80], max_size=120, flip=True)
    dataset = DetectionDataset(index, plan, training=False, with_masks=True)
    for i in range(3):
        item = dataset[i]
        masks, boxes = item["target"]["masks"], item["target"]["boxes"]
        assert masks.dtype == torch.uint8 and masks.shape == (len(boxes), item["aug"].resized_h, item["aug"].resized_w)
        for mask, box in zip(masks, boxes):
            rows, cols = torch.nonzero(mask, as_tuple=True)
            extent = torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float32)
            assert (extent - box).abs().max() <= 2.0


def test_variant_sampler_items_take_an_epoch(cfg_tiny):
    index = load_dataset(cfg_tiny, "synth_train")
    plan = AugmentationPlan(seed=0, num_variants=3, min_sizes=[64, 72, 80], max_size=120, flip=False)
    dataset = DetectionDataset(index, plan, training=True, variant_sampler=plan.sample_variant)
    assert len(dataset) == len(index.training_images())
    image_id = index.training_images()[2].id
    variants = [dataset.locate((epoch, 2))[1] for epoch in range(3)]
    assert variants == [plan.sample_variant(e, image_id) for e in range(3)] and sorted(variants) == [0, 1, 2]
    assert dataset[(1, 2)]["aug"].variant == variants[1]
    with pytest.raises(IndexError):
        dataset.locate(len(dataset))


def images_index(tmp_path: Path, train_data: dict, tiny_coco: dict) -> tuple[CocoIndex, Path]:
    root = tmp_path / "imgs"
    root.mkdir()
    for im in train_data["images"]:
        (root / im["file_name"]).write_bytes((Path(tiny_coco["train_images"]) / im["file_name"]).read_bytes())
    return load_coco_json(tiny_coco["train_json"], root), root


def test_missing_image_is_a_user_error_naming_the_file(tmp_path, train_data, tiny_coco):
    index, root = images_index(tmp_path, train_data, tiny_coco)
    plan = AugmentationPlan(seed=0, num_variants=1, min_sizes=[64], max_size=96, flip=False)
    victim = index.training_images()[0]
    Path(victim.file_name).unlink()
    with pytest.raises(
        UserError, match=rf"image file not found: .*{Path(victim.file_name).name} \(image id {victim.id}\)"
    ):
        DetectionDataset(index, plan, training=True)[0]


def test_corrupt_or_resized_image_is_a_user_error_naming_the_file(tmp_path, train_data, tiny_coco):
    index, root = images_index(tmp_path, train_data, tiny_coco)
    plan = AugmentationPlan(seed=0, num_variants=1, min_sizes=[64], max_size=96, flip=False)
    dataset = DetectionDataset(index, plan, training=True)
    first, second = index.training_images()[:2]
    Path(first.file_name).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(UserError, match=rf"cannot read image file .*{Path(first.file_name).name}"):
        dataset[0]
    Image.new("RGB", (10, 10)).save(second.file_name)
    with pytest.raises(UserError, match=rf"{Path(second.file_name).name} .* is 10x10 but the annotation file says"):
        dataset[1]


# -- statistics and sampling -------------------------------------------------------------------------------
def test_class_statistics_match_a_manual_count(tmp_path):
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": 100, "width": 200}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 10]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 60, 30]},
            {"id": 3, "image_id": 1, "category_id": 2, "bbox": [0, 0, 100, 50]},
            {"id": 4, "image_id": 1, "category_id": 2, "bbox": [0, 0, 100, 50], "iscrowd": 1},
        ],
    }
    prior, mean, std = class_statistics(load_coco_json(write_json(tmp_path, data), tmp_path))
    assert torch.allclose(prior, torch.tensor([2 / 3, 1 / 3, 0.0]))
    assert torch.allclose(mean[0], torch.tensor([0.2, 0.2])) and torch.allclose(std[0], torch.tensor([0.1, 0.1]))
    assert torch.allclose(mean[1], torch.tensor([0.5, 0.5])) and torch.allclose(std[1], torch.zeros(2))
    # a class without instances falls back to all instances: w/W = (0.1, 0.3, 0.5)
    assert torch.allclose(mean[2], torch.tensor([0.3, 0.3]))
    assert torch.isfinite(std).all()


def test_infinite_sampler_is_seeded_and_shards_like_distributed_sampler():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    assert take(InfiniteSampler(10, seed=3), 25) == take(InfiniteSampler(10, seed=3), 25)
    assert take(InfiniteSampler(10, seed=3), 10) != take(InfiniteSampler(10, seed=4), 10)
    epoch0 = take(InfiniteSampler(10, seed=3), 10)
    assert sorted(epoch0) == list(range(10)) and epoch0 != list(range(10))
    assert take(InfiniteSampler(4, seed=3, shuffle=False), 6) == [0, 1, 2, 3, 0, 1]
    shards = [take(InfiniteSampler(7, seed=1, rank=r, world_size=3), 3) for r in range(3)]
    assert {i for s in shards for i in s} == set(range(7))  # one epoch, padded by wrap-around to 9
    assert all(len(set(s)) == 3 for s in shards)
    pairs = take(InfiniteSampler(3, seed=0, yield_epoch=True), 7)
    assert [e for e, _ in pairs] == [0, 0, 0, 1, 1, 1, 2]
    with pytest.raises(UserError, match="empty dataset"):
        InfiniteSampler(0)


def test_dataloader_batches_are_lists(cfg_tiny):
    index = load_dataset(cfg_tiny, "synth_train")
    plan = AugmentationPlan.for_training(cfg_tiny)
    dataset = DetectionDataset(index, plan, training=True, variant_sampler=plan.sample_variant)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=2, collate_fn=collate, sampler=InfiniteSampler(len(dataset), seed=0, yield_epoch=True)
    )
    batch = next(iter(loader))
    assert isinstance(batch, list) and len(batch) == 2
    assert all(item["image"].shape[-2:] == (item["aug"].resized_h, item["aug"].resized_w) for item in batch)
