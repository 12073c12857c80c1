"""DISTILL.INIT_FROM_TEACHER initialises only what the student shares with its teacher: FPN + head within
a head family, the FPN alone (level by level) across families, and it says what it loaded."""

from __future__ import annotations

import torch

from cache_contract.teacher import init_from_teacher
from detection.modeling.detector import DetectorAdapter, build_detector
from stage2_student_distill.cli import build_distill_trainer

K = 4


def _build(cfg_tiny, arch: str, seed: int) -> DetectorAdapter:
    cfg = cfg_tiny.clone()
    cfg.MODEL.META_ARCHITECTURE = arch
    cfg.MODEL.MASK_ON = arch in ("MaskRCNN", "CondInst", "SOLOv2")
    torch.manual_seed(seed)
    return build_detector(cfg, K + 1)


def _state(model: DetectorAdapter) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.fpn_and_head_state_dict().items()}


def _init(cfg, teacher_arch: str, student_arch: str):
    """A seeded teacher's FPN + head state, the student's state before and after init_from_teacher, the report."""
    teacher = _state(_build(cfg, teacher_arch, 0))
    student = _build(cfg, student_arch, 1)
    before = _state(student)
    report = init_from_teacher(student, teacher, teacher_arch)
    return teacher, before, report, _state(student)


def test_fcos_student_takes_no_tensor_of_a_retinanet_head(cfg_tiny):
    teacher, before, report, after = _init(cfg_tiny, "RetinaNet", "FCOS")
    head = sorted(k for k in teacher if k.startswith("head."))
    assert report.head == [] and not report.same_family and sorted(report.skipped_head) == head
    assert all(torch.equal(after[k], before[k]) for k in before if not k.startswith("backbone.fpn."))
    fpn = [k for k in teacher if k.startswith("backbone.fpn.")]
    assert sorted(report.fpn) == sorted(fpn) and all(torch.equal(after[k], teacher[k]) for k in fpn)
    line = report.summary()
    assert line == (
        f"initialised from the RetinaNet teacher: FPN ({len(fpn)} tensors); skipped: the RetinaNet head "
        f"({len(head)} tensors: not the FCOS family)"
    )


def test_the_family_decides_not_matching_names(cfg_tiny):
    """Head tensors whose names and shapes all match are still refused from a teacher of another family."""
    fcos_state = _state(_build(cfg_tiny, "FCOS", 0))
    student = _build(cfg_tiny, "FCOS", 1)
    before = _state(student)
    report = init_from_teacher(student, fcos_state, "RetinaNet")  # recorded as another family
    assert report.head == [] and report.skipped_mismatch == []
    assert all(torch.equal(student.fpn_and_head_state_dict()[k], before[k]) for k in report.skipped_head)


def test_same_family_loads_fpn_and_head(cfg_tiny):
    for teacher_arch, student_arch in (("FCOS", "FCOS"), ("RetinaNet", "RetinaNet"), ("FCOS", "CondInst")):
        teacher = _state(_build(cfg_tiny, teacher_arch, 0))
        student = _build(cfg_tiny, student_arch, 1)
        report = init_from_teacher(student, teacher, teacher_arch)
        after = _state(student)
        assert report.same_family and report.head and report.fpn, (teacher_arch, student_arch)
        assert report.skipped == [] and all(torch.equal(after[k], teacher[k]) for k in teacher)
        assert (
            f"FPN ({len(report.fpn)} tensors) + head ({len(report.head)} tensors); skipped: nothing" in report.summary()
        )


def test_fpn_is_mapped_by_level_across_fpn_layouts(cfg_tiny):
    """A P3-P7 RetinaNet teacher's P3..P5 convs land on a P2-P6 Faster R-CNN student's P3..P5, not on P2..P4."""
    teacher, before, report, after = _init(cfg_tiny, "RetinaNet", "FasterRCNN")
    for kind in ("inner_blocks", "layer_blocks"):
        for i in range(3):  # teacher P3, P4, P5 -> student indices 1, 2, 3
            for p in ("weight", "bias"):
                assert torch.equal(
                    after[f"backbone.fpn.{kind}.{i + 1}.0.{p}"], teacher[f"backbone.fpn.{kind}.{i}.0.{p}"]
                )
        assert torch.equal(after[f"backbone.fpn.{kind}.0.0.weight"], before[f"backbone.fpn.{kind}.0.0.weight"])  # P2
    assert sorted(report.skipped_mismatch) == sorted(k for k in teacher if k.startswith("backbone.fpn.extra_blocks."))
    assert report.head == [] and len(report.fpn) == 12

    # and back: the R-CNN's P3..P5 go to the RetinaNet's P3..P5; its P2 has no counterpart
    back = _build(cfg_tiny, "RetinaNet", 2)
    report = init_from_teacher(back, after, "FasterRCNN")
    assert torch.equal(
        back.fpn_and_head_state_dict()["backbone.fpn.layer_blocks.0.0.weight"],
        after["backbone.fpn.layer_blocks.1.0.weight"],
    )
    assert sorted(k for k in report.skipped_mismatch if k.startswith("backbone.")) == [
        "backbone.fpn.inner_blocks.0.0.bias",
        "backbone.fpn.inner_blocks.0.0.weight",
        "backbone.fpn.layer_blocks.0.0.bias",
        "backbone.fpn.layer_blocks.0.0.weight",
    ]


def test_unknown_teacher_architecture_loads_the_fpn_only(cfg_tiny):
    teacher = _state(_build(cfg_tiny, "RetinaNet", 0))
    report = init_from_teacher(_build(cfg_tiny, "RetinaNet", 1), teacher, "")
    assert report.head == [] and report.fpn and "unknown teacher" in report.summary()


def test_distill_prints_what_it_initialised(cfg_tiny, distill_cfg, teacher_cache, tmp_path, capsys):
    """An FCOS student distilled from the (RetinaNet) cache starts with the teacher's FPN and its own head."""
    url, _ = teacher_cache("fp32")
    cfg = distill_cfg(cfg_tiny, OUTPUT_DIR=str(tmp_path / "fcos"))
    cfg.MODEL.META_ARCHITECTURE = "FCOS"
    trainer = build_distill_trainer(cfg, url, with_evaluation=False)
    out = capsys.readouterr().out
    assert "DISTILL.INIT_FROM_TEACHER: FCOS student initialised from the RetinaNet teacher: FPN (" in out
    assert "skipped: the RetinaNet head" in out
    assert trainer.teacher_init is not None and trainer.teacher_init.head == []
