"""DistillTrainer: cached == online, no teacher in cached mode, refusals before training, resume, warm-up."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cache_format import CacheReader
from cache_format.errors import CacheError
from detection.config import save_config
from detection.engine.checkpoint import load_checkpoint
from detection.engine.trainer import images_and_targets
from detection.errors import UserError
from detection.modeling import detector as zoo
from stage2_student_distill import cli
from stage2_student_distill.cli import build_distill_trainer
from stage2_student_distill.data import CachedTeacherFeatures
from stage2_student_distill.online import OnlineTeacher
from stage2_student_distill.trainer import DistillTrainer

ICD_LOSSES = ("loss_distill", "loss_ident", "loss_loc")


def metrics(output_dir: str) -> list[dict]:
    lines = (Path(output_dir) / "metrics.json").read_text().splitlines()
    return [json.loads(line) for line in lines if "loss_distill" in line]


def parameters(trainer: DistillTrainer) -> dict[str, torch.Tensor]:
    out = {f"student.{k}": v.detach().clone() for k, v in trainer.module.state_dict().items()}
    out.update({f"icd.{k}": v.detach().clone() for k, v in trainer.icd.state_dict().items()})
    return out


def run(cfg, cache: str | None, online: bool = False, resume: bool = False) -> DistillTrainer:
    trainer = build_distill_trainer(cfg, cache, online=online, resume=resume, with_evaluation=False)
    trainer.train()
    return trainer


def test_cached_and_online_training_give_the_same_losses_and_parameters(cfg_tiny, teacher_cache, distill_cfg, tmp_path):
    url, _ = teacher_cache("fp32")
    results = {}
    for mode in ("cached", "online"):
        # The distillation reaches the student in the last of the three iterations: with two steps through
        # the student, a 1e-6 difference in teacher features can flip an argmax of the stem's max-pool (a
        # discontinuity of the network, not of the data path) and move conv1 by ~1e-3 relative.
        cfg = distill_cfg(
            cfg_tiny, OUTPUT_DIR=str(tmp_path / mode), SOLVER={"MAX_ITER": 3}, DISTILL={"WARMUP_DETACH_ITERS": 2}
        )
        results[mode] = (run(cfg, url, online=mode == "online"), metrics(cfg.OUTPUT_DIR))
    (cached, cached_log), (online, online_log) = results["cached"], results["online"]
    assert len(cached_log) == len(online_log) == 3
    for a, b in zip(cached_log, online_log):
        losses = [k for k in a if k in ICD_LOSSES or k in ("classification", "bbox_regression", "total_loss")]
        assert len(losses) == 6  # every loss is logged separately
        for key in losses:
            assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), key
    p_cached, p_online = parameters(cached), parameters(online)
    assert p_cached.keys() == p_online.keys()
    # Teacher features of a batched (online) and a per-sample (cache) forward differ by fp32 rounding
    # (~1e-6 relative); three SGD steps carry that to ~1e-5 relative on parameters that start at zero.
    # Any real divergence (padding, variant, geometry, RNG) moves them by orders of magnitude more.
    for key in p_cached:
        a, b = p_cached[key].double(), p_online[key].double()
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-12, key
    assert isinstance(cached.teacher_features, CachedTeacherFeatures) and isinstance(
        online.teacher_features, OnlineTeacher
    )


def test_cached_mode_builds_and_runs_no_teacher(cfg_tiny, teacher_cache, distill_cfg, tmp_path, monkeypatch):
    url, _ = teacher_cache("fp16")
    built = []
    original_init = zoo.DetectorAdapter.__init__

    def counting_init(self, *args, **kwargs):
        built.append(args[1])
        original_init(self, *args, **kwargs)

    def no_teacher(*args, **kwargs):
        raise AssertionError("a teacher forward pass ran in cached mode")

    monkeypatch.setattr(zoo.DetectorAdapter, "__init__", counting_init)
    monkeypatch.setattr("stage2_student_distill.online.sample_features", no_teacher)
    cfg = distill_cfg(cfg_tiny, OUTPUT_DIR=str(tmp_path / "out"), SOLVER={"MAX_ITER": 2})
    trainer = run(cfg, url)
    assert built == ["RetinaNet"]  # the student, and nothing else
    assert isinstance(trainer.teacher_features, CachedTeacherFeatures)
    assert len(metrics(cfg.OUTPUT_DIR)) == 2


@pytest.mark.parametrize(
    "override, reason",
    [
        (
            {"MODEL": {"FPN": {"OUT_CHANNELS": 64}}, "DISTILL": {"HIDDEN_DIM": 64}},
            "level p3 channels: cache 32, student 64",
        ),
        ({"MODEL": {"SIZE_DIVISIBILITY": 64}}, "preprocessing.size_divisibility"),
        ({"INPUT": {"MIN_SIZE_TRAIN": [48]}}, "preprocessing.min_size_train"),
        ({"MODEL": {"META_ARCHITECTURE": "FasterRCNN"}}, "level p2: the student needs it"),
    ],
)
def test_an_incompatible_student_fails_before_the_first_iteration(
    cfg_tiny, teacher_cache, distill_cfg, tmp_path, monkeypatch, capsys, override, reason
):
    url, _ = teacher_cache("fp16")
    monkeypatch.setattr(DistillTrainer, "run_step", lambda *a: pytest.fail("training started"))
    cfg = distill_cfg(cfg_tiny, OUTPUT_DIR=str(tmp_path / "out"))
    cfg.merge_from_dict(override, source="test")
    config = save_config(cfg, tmp_path / "cfg")
    assert cli.main(["--config-file", str(config), "--cache", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("icd distill: error: the cache does not match the student")
    assert reason in err and "fix:" in err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_resume_continues_exactly(cfg_tiny, teacher_cache, distill_cfg, tmp_path):
    url, _ = teacher_cache("fp32")
    straight_cfg = distill_cfg(
        cfg_tiny,
        OUTPUT_DIR=str(tmp_path / "straight"),
        DISTILL={"WARMUP_DETACH_ITERS": 3},
        SOLVER={"MAX_ITER": 4, "CHECKPOINT_PERIOD": 2},
    )
    straight = run(straight_cfg, url)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(tmp_path / "straight" / "model_0000002.pth", resumed_dir)
    (resumed_dir / "last_checkpoint").write_text("model_0000002.pth\n")
    assert set(load_checkpoint(resumed_dir / "model_0000002.pth")["extra"]) == {"icd", "icd_optimizer", "icd_scheduler"}
    resumed_cfg = straight_cfg.clone()
    resumed_cfg.OUTPUT_DIR = str(resumed_dir)
    resumed = run(resumed_cfg, url, resume=True)
    assert resumed.iteration == straight.iteration == 4
    assert resumed.skipped_teacher_keys is None  # resumed weights are not overwritten by the teacher's
    timing = ("time", "data_time", "eta_seconds")
    drop = lambda rows: [{k: v for k, v in row.items() if k not in timing} for row in rows]  # noqa: E731
    assert drop(metrics(str(resumed_dir))) == drop(metrics(straight_cfg.OUTPUT_DIR))[2:]
    a, b = parameters(straight), parameters(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert straight.icd_scheduler.state_dict() == resumed.icd_scheduler.state_dict()


def test_distillation_reaches_the_student_only_after_the_warm_up(cfg_tiny, teacher_cache, distill_cfg, tmp_path):
    url, _ = teacher_cache("fp32")
    cfg = distill_cfg(cfg_tiny, OUTPUT_DIR=str(tmp_path / "out"), DISTILL={"WARMUP_DETACH_ITERS": 5})
    trainer = build_distill_trainer(cfg, url, with_evaluation=False)
    batch = next(iter(trainer.build_loader(0)))
    # the step asks for detached student features before DISTILL.WARMUP_DETACH_ITERS, attached from then on
    asked, icd = [], trainer.icd_model

    def recording(*args, detach_student):
        asked.append(detach_student)
        return icd(*args, detach_student=detach_student)

    trainer.icd_model = recording
    for iteration in (4, 5):
        trainer.iteration = iteration
        trainer.run_step(batch)
    assert asked == [True, False]
    # ... and detaching keeps loss_distill away from the student, never from the student-side projection
    images, targets = images_and_targets(batch.samples, trainer.device)
    sizes = [tuple(image.shape[-2:]) for image in images]
    fpn = [p for n, p in trainer.module.named_parameters() if ".fpn." in n]

    def icd_losses(detach: bool) -> dict:
        trainer.module.zero_grad(set_to_none=True)
        trainer.icd.zero_grad(set_to_none=True)
        _, student, _ = trainer.model(images, targets)
        return icd(
            batch.teacher_features,
            {level: student[level] for level in trainer.levels},
            sizes,
            targets,
            trainer.query_generator(),
            detach_student=detach,
        )

    for detach in (True, False):
        icd_losses(detach)["loss_distill"].backward()
        reached = any(p.grad is not None and p.grad.abs().sum() > 0 for p in fpn)
        assert reached == (not detach)
        assert trainer.icd.student_value.v_proj.weight.grad.abs().sum() > 0
    # the auxiliary losses train the query encoder and decoder, never the student
    losses = icd_losses(False)
    (losses["loss_ident"] + losses["loss_loc"]).backward()
    assert all(p.grad is None for p in trainer.module.parameters())
    assert trainer.icd.decoder.q_proj.weight.grad.abs().sum() > 0


def test_the_two_optimizers_own_disjoint_parameters(cfg_tiny, teacher_cache, distill_cfg, tmp_path):
    url, _ = teacher_cache("fp16")
    trainer = build_distill_trainer(distill_cfg(cfg_tiny, OUTPUT_DIR=str(tmp_path / "out")), url, with_evaluation=False)
    sgd = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    adamw = {id(p) for group in trainer.icd_optimizer.param_groups for p in group["params"]}
    assert not sgd & adamw
    assert sgd == {id(p) for p in trainer.module.parameters() if p.requires_grad}
    assert adamw == {id(p) for p in trainer.icd.parameters()}
    assert isinstance(trainer.icd_optimizer, torch.optim.AdamW)
    # each is clipped its own way: the student by value (SOLVER.CLIP_GRADIENTS, 1.0), ICD by total norm (0.01)
    trainer.run_step(next(iter(trainer.build_loader(0))))  # gradients stay until the next step clears them
    icd_grads = [p.grad for p in trainer.icd.parameters() if p.grad is not None]
    total_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in icd_grads]))
    assert icd_grads and total_norm <= 0.01 * (1 + 1e-4)  # (nn.utils.get_total_norm is torch >= 2.6 only)
    student_grads = [p.grad for p in trainer.module.parameters() if p.grad is not None]
    assert max(float(g.abs().max()) for g in student_grads) <= 1.0


def test_init_from_teacher_copies_the_cached_fpn_and_head(cfg_tiny, teacher_cache, distill_cfg, tmp_path):
    url, _ = teacher_cache("fp16")
    stored = CacheReader(url).teacher_weights()
    for init in (True, False):
        cfg = distill_cfg(cfg_tiny, OUTPUT_DIR=str(tmp_path / str(init)), DISTILL={"INIT_FROM_TEACHER": init})
        student = build_distill_trainer(cfg, url, with_evaluation=False).module.fpn_and_head_state_dict()
        same = [
            torch.equal(student[k], torch.from_numpy(v))
            for k, v in stored.items()
            if k.endswith("weight") and "fpn" in k
        ]
        assert all(same) if init else not any(same)


def test_cli_errors_exit_2_with_the_reason(cfg_tiny, teacher_cache, distill_cfg, tmp_path, capsys):
    config = str(save_config(distill_cfg(cfg_tiny, OUTPUT_DIR=str(tmp_path / "out")), tmp_path / "cfg"))
    assert cli.main(["--config-file", config]) == 2
    assert "no --cache was given" in capsys.readouterr().err
    assert cli.main(["--config-file", config, "--cache", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("icd distill: error: ")
    assert cli.main(["--config-file", config, "--online"]) == 2
    assert "DISTILL.TEACHER" in capsys.readouterr().err
    assert cli.main(["--config-file", config, "--cache", teacher_cache("fp16")[0], "DISTILL.ENABLED", "False"]) == 2
    assert "icd train" in capsys.readouterr().err


def test_icd_distill_trains_and_prints_the_coco_table(cfg_tiny, teacher_cache, distill_cfg, tmp_path, capsys):
    url, _ = teacher_cache("int8")
    out = tmp_path / "out"
    config = str(save_config(distill_cfg(cfg_tiny, OUTPUT_DIR=str(out), SOLVER={"MAX_ITER": 2}), tmp_path / "cfg"))
    assert cli.main(["--config-file", config, "--cache", url]) == 0
    printed = capsys.readouterr().out
    assert "Evaluation results for bbox" in printed and "real-vs-fake AUC" in printed
    assert "bbox" in json.loads((out / "inference" / "metrics.json").read_text())
    assert (out / "model_final.pth").is_file()
    # what the decoder learnt: next to the losses every step, and measured on cached samples at the end
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert all(0 < r["ident_prior_entropy"] < 0.7 for r in records if "loss_ident" in r)
    assert any("decoder/auc" in r for r in records)
    assert json.loads((out / "decoder_signals.json").read_text())["num_real"] > 0
    # the final checkpoint's model is a plain student: --eval-only (icd eval's path) loads it
    assert cli.main(["--config-file", config, "--eval-only", "MODEL.WEIGHTS", str(out / "model_final.pth")]) == 0


def test_icd_state_from_another_config_is_refused_on_resume(cfg_tiny, teacher_cache, distill_cfg, tmp_path):
    url, _ = teacher_cache("fp16")
    cfg = distill_cfg(cfg_tiny, OUTPUT_DIR=str(tmp_path / "out"), SOLVER={"MAX_ITER": 1})
    run(cfg, url)
    other = distill_cfg(cfg, DISTILL={"FFN_DIM": 32}, SOLVER={"MAX_ITER": 2})
    with pytest.raises(UserError, match="'icd' state does not fit"):
        build_distill_trainer(other, url, resume=True, with_evaluation=False)


def test_an_empty_cache_is_refused(cfg_tiny, teacher_cache, distill_cfg, tmp_path):
    url, _ = teacher_cache("fp16", skip=frozenset(range(16)))
    with pytest.raises(CacheError, match="no committed sample"):
        build_distill_trainer(distill_cfg(cfg_tiny, OUTPUT_DIR=str(tmp_path / "out")), url, with_evaluation=False)


def test_online_without_a_cache_replays_the_configs_plan_and_pads_like_the_cache(
    cfg_tiny, teacher_cache, distill_cfg, tmp_path
):
    url, weights = teacher_cache("fp32")
    cfg = distill_cfg(
        cfg_tiny,
        OUTPUT_DIR=str(tmp_path / "online"),
        DISTILL={"TEACHER": {"META_ARCHITECTURE": "RetinaNet", "DEPTH": 18, "WEIGHTS": weights}},
    )
    online = build_distill_trainer(cfg, None, online=True, with_evaluation=False)
    cached = build_distill_trainer(distill_cfg(cfg, OUTPUT_DIR=str(tmp_path / "cached")), url, with_evaluation=False)
    for a, b in zip(online.build_loader(0), cached.build_loader(0)):
        images = [s["image"] for s in a.samples]
        assert all(torch.equal(x, s["image"]) for x, s in zip(images, b.samples))
        live = online.teacher_features(a, images)  # padded to the student's grid (32), as the cache is
        for level, stored in b.teacher_features.items():
            assert live[level].shape == stored.shape
            assert (live[level] - stored).abs().max() <= 1e-5 * stored.abs().max()
            stride = online.strides[level]
            for i, image in enumerate(images):  # zero outside each image's valid region, as in the cache
                h, w = -(-image.shape[-2] // stride), -(-image.shape[-1] // stride)
                padding = torch.ones(stored.shape[-2:], dtype=torch.bool)
                padding[:h, :w] = False
                assert (live[level][i][:, padding] == 0).all() and (stored[i][:, padding] == 0).all()
        break
