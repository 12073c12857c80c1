"""detection.config: what a detectron2 user relies on (_BASE_, KEY VALUE overrides, clear errors)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from detection.config import get_cfg, save_config, setup_cfg
from detection.config.defaults import DEFAULTS
from detection.errors import UserError
from detection.modeling.architectures import ARCHITECTURES

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_get_cfg_is_an_independent_copy_with_attribute_and_dict_access():
    a, b = get_cfg(), get_cfg()
    a.SOLVER.MAX_ITER = 7
    a["MODEL"]["BACKBONE"]["DEPTH"] = 18
    assert b.SOLVER.MAX_ITER == DEFAULTS["SOLVER"]["MAX_ITER"]
    assert DEFAULTS["MODEL"]["BACKBONE"]["DEPTH"] == 50
    assert a.MODEL.BACKBONE.DEPTH == 18 and a["SOLVER"]["MAX_ITER"] == 7
    with pytest.raises(AttributeError, match="SOLVER.NOPE"):
        _ = a.SOLVER.NOPE


def test_freeze_blocks_nested_assignment_and_defrost_allows_it():
    cfg = get_cfg().freeze()
    with pytest.raises(AttributeError, match="frozen"):
        cfg.SOLVER.MAX_ITER = 1
    with pytest.raises(AttributeError, match="frozen"):
        cfg["MODEL"]["DEVICE"] = "cuda"
    with pytest.raises(AttributeError, match="frozen"):
        cfg.merge_from_list(["SOLVER.MAX_ITER", "1"])
    cfg.defrost()
    cfg.SOLVER.MAX_ITER = 1
    assert cfg.SOLVER.MAX_ITER == 1


def test_pickle_and_clone_keep_values_and_frozen_state():
    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.MAX_ITER", "12"])
    cfg.freeze()
    for copy_ in (pickle.loads(pickle.dumps(cfg)), cfg.clone()):
        assert copy_ == cfg and copy_.SOLVER.MAX_ITER == 12
        assert copy_.is_frozen() and copy_.SOLVER.is_frozen()


def test_base_chain_is_relative_to_each_file_and_children_win(tmp_path):
    write(tmp_path / "Base.yaml", "SOLVER:\n  MAX_ITER: 10\n  BASE_LR: 0.5\nMODEL:\n  DEVICE: cuda\n")
    write(tmp_path / "mid" / "Mid.yaml", "_BASE_: ../Base.yaml\nSOLVER:\n  MAX_ITER: 20\n")
    leaf = write(tmp_path / "mid" / "deep" / "leaf.yaml", "_BASE_: ../Mid.yaml\nMODEL:\n  BACKBONE:\n    DEPTH: 18\n")
    cfg = setup_cfg(leaf)
    assert cfg.SOLVER.MAX_ITER == 20  # Mid overrides Base
    assert cfg.SOLVER.BASE_LR == 0.5  # inherited from Base
    assert cfg.MODEL.DEVICE == "cuda"
    assert cfg.MODEL.BACKBONE.DEPTH == 18
    assert cfg.SOLVER.WEIGHT_DECAY == DEFAULTS["SOLVER"]["WEIGHT_DECAY"]  # untouched keys keep defaults


def test_overrides_apply_after_the_file(tmp_path):
    f = write(tmp_path / "c.yaml", "SOLVER:\n  MAX_ITER: 10\n")
    cfg = setup_cfg(f, ["SOLVER.MAX_ITER", "30"])
    assert cfg.SOLVER.MAX_ITER == 30


def test_base_cycle_is_a_user_error_naming_the_chain(tmp_path):
    write(tmp_path / "a.yaml", "_BASE_: b.yaml\n")
    write(tmp_path / "b.yaml", "_BASE_: a.yaml\n")
    with pytest.raises(UserError, match="cycle") as exc:
        setup_cfg(tmp_path / "a.yaml")
    assert "a.yaml" in str(exc.value) and "b.yaml" in str(exc.value)


def test_missing_config_and_missing_base_name_the_path(tmp_path):
    with pytest.raises(UserError, match="not found: .*nope.yaml"):
        setup_cfg(tmp_path / "nope.yaml")
    child = write(tmp_path / "child.yaml", "_BASE_: gone/Base.yaml\n")
    with pytest.raises(UserError, match="gone/Base.yaml"):
        setup_cfg(child)


def test_invalid_yaml_reports_the_position(tmp_path):
    f = write(tmp_path / "bad.yaml", "SOLVER:\n  MAX_ITER: [1, 2\n  BASE_LR: 0.1\n")
    with pytest.raises(UserError, match=r"bad.yaml is not valid YAML at line \d+, column \d+"):
        setup_cfg(f)


def test_unknown_key_in_file_suggests_the_closest_valid_key(tmp_path):
    f = write(tmp_path / "typo.yaml", "SOLVER:\n  BASE_RL: 0.1\n")
    with pytest.raises(UserError) as exc:
        setup_cfg(f)
    msg = str(exc.value)
    assert "unknown config key 'SOLVER.BASE_RL'" in msg and "typo.yaml" in msg
    assert "did you mean SOLVER.BASE_LR" in msg


def test_unknown_key_in_overrides_suggests_the_closest_valid_key():
    with pytest.raises(UserError) as exc:
        get_cfg().merge_from_list(["SOLVER.MAX_ITERS", "5"])
    assert "'SOLVER.MAX_ITERS'" in str(exc.value) and "SOLVER.MAX_ITER" in exc.value.fix
    with pytest.raises(UserError, match="did you mean MODEL.BACKBONE.DEPTH"):
        get_cfg().merge_from_list(["MODEL.DEPTH", "18"])  # right leaf, wrong section


def test_override_values_are_parsed_like_detectron2():
    cfg = get_cfg()
    cfg.merge_from_list(
        [
            "SOLVER.MAX_ITER",
            "100",
            "SOLVER.BASE_LR",
            "1",  # int widened to float
            "SOLVER.AMP",
            "true",
            "INPUT.MIN_SIZE_TRAIN",
            "(640, 672)",  # python tuple syntax
            "SOLVER.STEPS",
            "[10, 20]",
            "DATASETS.TRAIN",
            "synth_train",  # a single value for a list key
            "OUTPUT_DIR",
            "2024",  # a str key keeps the text
            "MODEL.PIXEL_MEAN",
            "[1, 2, 3]",
        ]
    )
    assert cfg.SOLVER.MAX_ITER == 100 and isinstance(cfg.SOLVER.MAX_ITER, int)
    assert cfg.SOLVER.BASE_LR == 1.0 and isinstance(cfg.SOLVER.BASE_LR, float)
    assert cfg.SOLVER.AMP is True
    assert cfg.INPUT.MIN_SIZE_TRAIN == [640, 672]
    assert cfg.SOLVER.STEPS == [10, 20]
    assert cfg.DATASETS.TRAIN == ["synth_train"]
    assert cfg.OUTPUT_DIR == "2024"
    assert cfg.MODEL.PIXEL_MEAN == [1.0, 2.0, 3.0] and all(isinstance(v, float) for v in cfg.MODEL.PIXEL_MEAN)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("SOLVER.MAX_ITER", "abc", "expects an int"),
        ("SOLVER.MAX_ITER", "1.5", "expects an int"),
        ("SOLVER.AMP", "1", "expects a bool"),
        ("SOLVER.BASE_LR", "fast", "expects a float"),
        ("INPUT.MIN_SIZE_TRAIN", "[640, big]", "expects an int"),
        ("SOLVER", "3", "is a section"),
    ],
)
def test_type_mismatch_names_key_value_and_expected_type(key, value, expected):
    cfg = get_cfg()
    with pytest.raises(UserError) as exc:
        cfg.merge_from_list([key, value])
    msg = str(exc.value)
    assert expected in msg and key in msg and value.strip("[]").split(",")[-1].strip() in msg
    assert cfg == get_cfg()  # a failed merge leaves the config unchanged


def test_type_mismatch_in_a_file_names_the_file(tmp_path):
    f = write(tmp_path / "t.yaml", "MODEL:\n  BACKBONE:\n    DEPTH: fifty\n")
    with pytest.raises(UserError, match=r"MODEL.BACKBONE.DEPTH' \(from .*t.yaml\) expects an int"):
        setup_cfg(f)


def test_odd_number_of_override_tokens_is_a_user_error():
    with pytest.raises(UserError, match="KEY VALUE pairs"):
        get_cfg().merge_from_list(["SOLVER.MAX_ITER", "1", "MODEL.DEVICE"])


def test_catalog_accepts_user_dataset_names_from_file_and_overrides(tmp_path):
    f = write(tmp_path / "d.yaml", "DATASETS:\n  CATALOG:\n    mine_train: [a.json, imgs]\n")
    cfg = setup_cfg(f, ["DATASETS.CATALOG.mine_val", "[b.json, imgs_val]"])
    assert cfg.DATASETS.CATALOG.mine_train == ["a.json", "imgs"]
    assert cfg.DATASETS.CATALOG["mine_val"] == ["b.json", "imgs_val"]


def test_dump_round_trips_through_merge_from_file(tmp_path):
    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.MAX_ITER", "7", "DATASETS.CATALOG.x", "[a.json, b]", "INPUT.MIN_SIZE_TRAIN", "(1, 2)"])
    path = save_config(cfg, tmp_path / "out")
    assert path == tmp_path / "out" / "config.yaml"
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary file left behind
    assert setup_cfg(path) == cfg


def test_save_config_defaults_to_output_dir(tmp_path):
    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path / "run")
    assert save_config(cfg).read_text() == cfg.dump()


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml")))
def test_every_shipped_config_loads(path):
    cfg = setup_cfg(REPO / path)
    assert cfg.MODEL.META_ARCHITECTURE in ARCHITECTURES
    assert cfg.MODEL.MASK_ON == ARCHITECTURES.get(cfg.MODEL.META_ARCHITECTURE).masks


def test_coco_configs_set_the_depth_their_name_says():
    paths = [
        p
        for folder in ("COCO-Detection", "COCO-InstanceSegmentation")
        for p in (REPO / "configs" / folder).glob("*_R_*_FPN_*.yaml")
    ]
    assert len(paths) >= 12 + 18
    arch_of = {
        "retinanet": "RetinaNet",
        "fcos": "FCOS",
        "faster_rcnn": "FasterRCNN",
        "mask_rcnn": "MaskRCNN",
        "condinst": "CondInst",
        "solov2": "SOLOv2",
    }
    for path in paths:
        depth = int(path.stem.split("_R_")[1].split("_")[0])
        cfg = setup_cfg(path)
        assert cfg.MODEL.BACKBONE.DEPTH == depth, path.name
        assert cfg.MODEL.META_ARCHITECTURE == arch_of[path.stem.split("_R_")[0]], path.name
        assert cfg.SOLVER.MAX_ITER == (270000 if path.stem.endswith("_3x") else 90000), path.name
