"""detection.modeling.architectures: one table, every part registered, no fallback, no names elsewhere."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import detection.interop.d2_checkpoint  # noqa: F401  (registers the checkpoint rules)
import detection.modeling.detector as detector
from detection.errors import UserError
from detection.interop import d2_conventions
from detection.modeling.architectures import (
    ARCHITECTURES,
    BUILD,
    BUILD_D2,
    CHECKPOINT_RULES,
    FORWARD,
    P3_P7,
    PARTS,
    Architecture,
    ArchitectureTable,
)

REPO = Path(__file__).resolve().parents[1]
K = 3


def test_every_entry_has_its_parts():
    for entry in ARCHITECTURES:
        for part in (BUILD, FORWARD, CHECKPOINT_RULES):
            assert ARCHITECTURES.has_part(entry.name, part), (entry.name, part)
        # detectron2's conventions are a builder unless the module already computes AdelaiDet's function
        assert ARCHITECTURES.has_part(entry.name, BUILD_D2) == (not entry.adelaidet_native), entry.name
        assert entry.strides == {level: 2 ** int(level[1:]) for level in entry.levels}


def _table_with(extra: Architecture) -> ArchitectureTable:
    table = ArchitectureTable()
    for entry in ARCHITECTURES:
        table.add(entry)
        for part in PARTS:
            if ARCHITECTURES.has_part(entry.name, part):
                table.register(entry, part)(ARCHITECTURES.part(entry.name, part))
    table.add(extra)
    return table


def test_unknown_architecture_is_one_error(cfg_tiny):
    cfg_tiny.MODEL.META_ARCHITECTURE = "ATSS"
    with pytest.raises(UserError, match="MODEL.META_ARCHITECTURE 'ATSS' is not a known detector"):
        detector.build_detector(cfg_tiny, K + 1)


def test_half_registered_architecture_is_refused_never_built_as_another(cfg_tiny, monkeypatch):
    """An entry in the table without a builder is named as such (the old chains built a Mask R-CNN)."""
    atss = Architecture("ATSS", "ATSS", P3_P7, head_family="ATSS", boxes=True, masks=False)
    table = _table_with(atss)
    monkeypatch.setattr(detector, "ARCHITECTURES", table)
    monkeypatch.setattr(d2_conventions, "ARCHITECTURES", table)
    cfg_tiny.MODEL.META_ARCHITECTURE = "ATSS"
    with pytest.raises(UserError, match="ATSS is in the architecture table but has no build registered"):
        detector.build_detector(cfg_tiny, K + 1)


def test_a_part_for_a_name_outside_the_table_fails_at_registration():
    with pytest.raises(AssertionError, match="not in the architecture table"):
        ARCHITECTURES.register("ATSS", BUILD)


def _string_constants(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
    }
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    }


def test_architecture_names_are_literals_only_in_the_table():
    """Everything else asks the table; a chain on names cannot come back unnoticed."""
    names = set(ARCHITECTURES.names())
    allowed = {
        REPO / "detection" / "modeling" / "architectures.py",
        REPO / "detection" / "config" / "defaults.py",  # the default config (MODEL.META_ARCHITECTURE RetinaNet)
    }
    offenders = {}
    for package in (
        "icd",
        "detection",
        "cache_format",
        "cache_contract",
        "stage1_teacher_dump",
        "stage2_student_distill",
        "bench",
    ):
        for path in sorted((REPO / package).rglob("*.py")):
            found = _string_constants(path) & names
            if found and path not in allowed:
                offenders[str(path.relative_to(REPO))] = sorted(found)
    assert not offenders, offenders
