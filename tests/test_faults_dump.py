"""Fault injection on stage one and the commands around it (issue 10): kill points from mid-creation to
the manifest, damaged shards and teacher weights repaired by `--resume` / `--repair`, full and read-only
disks, bad paths, errors in DataLoader workers, and determinism whatever the worker and thread counts.

A "kill" here is an exception no handler catches (`_Killed`, a BaseException) raised at the chosen point
in-process: nothing after it runs, as after SIGKILL (the real `kill -9` mid-shard is
tests/test_stage1_dump.py::test_kill_9_then_resume_equals_uninterrupted_dump). Every resumed or repaired
cache must be byte-identical to an uninterrupted dump, file by file.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_cfg_tiny

from cache_format import CacheReader
from cache_format.errors import CacheError, CorruptChunkError, IcdError
from cache_format.verify import verify_cache
from detection.config import CfgNode
from detection.data.datasets import load_dataset
from detection.engine.checkpoint import save_checkpoint
from detection.errors import UserError
from detection.modeling.detector import build_detector
from stage1_teacher_dump.cli import format_summary
from stage1_teacher_dump.dump import run_dump

REPO = Path(__file__).resolve().parents[1]


class _Killed(BaseException):
    """SIGKILL at a chosen point: no `except Exception` and no cleanup handler stops it."""


@pytest.fixture(scope="module")
def env(tiny_coco, tmp_path_factory) -> SimpleNamespace:
    """A seeded teacher, its dump config (fp16, 16 samples in 4 shards) and an uninterrupted reference dump."""
    root = tmp_path_factory.mktemp("dump_faults")
    cfg = make_cfg_tiny(tiny_coco, root / "output")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = build_detector(cfg, load_dataset(cfg, "synth_train").num_classes + 1)
    weights = save_checkpoint(root / "teacher" / "model_final.pth", teacher)
    cfg.merge_from_list(
        [
            "MODEL.WEIGHTS",
            str(weights),
            "CACHE.ENCODING",
            "fp16",
            "CACHE.SHARD_SAMPLES",
            "4",
            "CACHE.BATCH_SIZE",
            "4",
            "INPUT.MIN_SIZE_TRAIN",
            "[48, 64]",
            "CACHE.CALIBRATION_SAMPLES",
            "2",
        ]
    )
    reference = root / "reference"
    run_dump(cfg, str(reference))
    return SimpleNamespace(cfg=cfg, root=root, reference=reference)


def _cfg(env: SimpleNamespace, tmp_path: Path, **overrides) -> CfgNode:
    cfg = env.cfg.clone()
    cfg.OUTPUT_DIR = str(tmp_path / "output")
    if overrides:
        cfg.merge_from_dict(overrides, source="test")
    return cfg


def _tree(path: Path) -> dict[str, bytes]:
    """Every file of a cache by relative path (zarr's leftover '.partial' temporaries excluded)."""
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and ".partial" not in p.name
    }


def _assert_same_cache(a: Path, b: Path) -> None:
    ta, tb = _tree(a), _tree(b)
    assert sorted(ta) == sorted(tb), set(ta) ^ set(tb)
    different = [k for k in ta if ta[k] != tb[k]]
    assert not different, different


def _copy_reference(env: SimpleNamespace, tmp_path: Path) -> Path:
    return Path(shutil.copytree(env.reference, tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------- kill points
def _kill_at(monkeypatch, module, name: str, call: int = 1, after: bool = False):
    """Replace module.name so that its `call`-th call raises _Killed (before it runs, or after with `after`)."""
    real = getattr(module, name)
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call and not after:
            raise _Killed()
        out = real(*args, **kwargs)
        if calls["n"] == call:
            raise _Killed()
        return out

    monkeypatch.setattr(module, name, dying)


@pytest.mark.parametrize(
    "point", ["mid-creation", "teacher_weights/ appears", "mid teacher weights", "before the manifest"]
)
def test_every_kill_point_resumes_to_the_uninterrupted_cache(env, tmp_path, monkeypatch, point) -> None:
    """Holes 2 and 8: kill right after teacher_weights/ appears, or during the store's creation, then
    `--resume` gives the cache an uninterrupted dump gives, teacher weights and manifest included."""
    import cache_format.writer as writer_module
    import stage1_teacher_dump.dump as dump_module

    cfg, cache = _cfg(env, tmp_path), tmp_path / "cache"
    if point == "mid-creation":
        _kill_at(monkeypatch, writer_module, "create_arrays", after=True)
    elif point == "teacher_weights/ appears":
        _kill_at(monkeypatch, writer_module, "_weights_codecs")  # the group exists, no tensor yet
    elif point == "mid teacher weights":
        _kill_at(monkeypatch, writer_module, "_weights_codecs", call=5)
    else:
        _kill_at(monkeypatch, dump_module, "finish_cache")
    with pytest.raises(_Killed):
        run_dump(cfg, str(cache))
    monkeypatch.undo()
    if point != "mid-creation":  # (mid-creation it is not a cache yet)
        assert not verify_cache(str(cache)).ok
    summary = run_dump(cfg, str(cache), resume=True)
    assert summary.finished and summary.committed == summary.num_samples
    _assert_same_cache(cache, env.reference)
    assert verify_cache(str(cache)).ok
    assert CacheReader(str(cache)).teacher_weights().keys() == CacheReader(str(env.reference)).teacher_weights().keys()


def test_hole8_an_interrupted_creation_is_started_over_by_a_plain_run_too(env, tmp_path, monkeypatch) -> None:
    import cache_format.writer as writer_module

    cfg, cache = _cfg(env, tmp_path), tmp_path / "cache"
    _kill_at(monkeypatch, writer_module, "create_arrays", after=True)
    with pytest.raises(_Killed):
        run_dump(cfg, str(cache))
    monkeypatch.undo()
    run_dump(cfg, str(cache))  # neither "not a cache" nor "already exists"
    _assert_same_cache(cache, env.reference)


def test_hole2_disk_full_during_creation_is_one_error_and_resumes_whole(env, tmp_path, monkeypatch) -> None:
    import cache_format.writer as writer_module

    cfg, cache = _cfg(env, tmp_path), tmp_path / "cache"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(cache / "teacher_weights"))

    monkeypatch.setattr(writer_module, "_weights_codecs", full)
    with pytest.raises(CacheError, match="(?s)teacher weights.*No space left on device.*--resume"):
        run_dump(cfg, str(cache))
    monkeypatch.undo()
    run_dump(cfg, str(cache), resume=True)
    _assert_same_cache(cache, env.reference)


# ----------------------------------------------------------------------------------------------- repairs
def test_hole4_deleting_a_bad_shard_and_resuming_repairs_it(env, tmp_path, capsys) -> None:
    cache = _copy_reference(env, tmp_path)
    victim = cache / "features" / "p4" / "c" / "2" / "0" / "0" / "0"
    victim.unlink()
    assert "features/p4/c/2/0/0/0" in verify_cache(str(cache)).summary()
    summary = run_dump(_cfg(env, tmp_path), str(cache), resume=True)
    assert summary.written_now == 4 and summary.repairs
    assert "rewriting 1 damaged shard(s): 2" in capsys.readouterr().out
    _assert_same_cache(cache, env.reference)


def test_hole4_resume_repair_is_the_repair_procedure_in_one_command(env, tmp_path, capsys) -> None:
    cache = _copy_reference(env, tmp_path)
    shard = cache / "features" / "p3" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only reading it finds it
    shard.write_bytes(bytes(data))
    next((cache / "teacher_weights").glob("*/c")).rename(tmp_path / "lost_weight_chunks")  # a tensor's chunk gone
    from icd.cli import main as icd

    config = tmp_path / "dump.yaml"
    config.write_text(_cfg(env, tmp_path).dump())
    assert icd(["dump", "--config-file", str(config), "--cache", str(cache), "--repair"]) == 0
    out = capsys.readouterr().out
    assert "damaged: features/p3/c/1/0/0/0" in out and "storing the teacher weights again" in out
    _assert_same_cache(cache, env.reference)


@pytest.mark.parametrize("victim", ["features/p3/c/1/0/0/0", "instances/boxes/c/0/0"])
def test_resume_without_a_manifest_never_finishes_over_a_truncated_committed_shard(
    env, tmp_path, monkeypatch, capsys, victim
) -> None:
    """Issue 20 item 3: a dump killed after 3 of its 4 shards, one committed object then truncated to half.
    There is no manifest to hold its size; the plain resume finds it by its shard index (features) or by
    reading the small chunk (instances), rewrites the shard and finishes byte-identical to the reference."""
    from cache_format import CacheWriter

    cfg, cache = _cfg(env, tmp_path), tmp_path / "cache"
    _kill_at(monkeypatch, CacheWriter, "write_shard", call=3, after=True)
    with pytest.raises(_Killed):
        run_dump(cfg, str(cache))
    monkeypatch.undo()
    path = cache / victim
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    summary = run_dump(cfg, str(cache), resume=True)
    out = capsys.readouterr().out
    assert f"damaged: {victim}" in out and "rewriting 1 damaged shard(s)" in out, out
    assert summary.finished and summary.written_now == 8  # the damaged shard and the one never written
    _assert_same_cache(cache, env.reference)


def test_plain_resume_of_a_finished_cache_keeps_every_byte_and_names_what_it_did_not_read(env, tmp_path) -> None:
    """Issue 20 item 3: a finished cache with a flipped feature byte (same size: only reading finds it). A
    plain resume writes nothing - the manifest is kept, not rewritten over unread chunks - and says which
    shards it did not read and that only --repair would catch a flipped byte; --repair then does."""
    cache = _copy_reference(env, tmp_path)
    shard = cache / "features" / "p4" / "c" / "3" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    before = _tree(cache)
    summary = run_dump(_cfg(env, tmp_path), str(cache), resume=True)
    assert _tree(cache) == before and summary.manifest_kept and summary.written_now == 0
    text = format_summary(summary, None, False)
    assert "already finished: its manifest is kept" in text and "manifest written" not in text, text
    assert "not read: the chunks of the 4 shard(s)" in text and "the manifest's sizes" in text, text
    assert "--resume --repair" in text and "flipped" in text, text
    repaired = run_dump(_cfg(env, tmp_path), str(cache), repair=True)
    assert repaired.written_now == 4 and "not read" not in format_summary(repaired, None, False)
    _assert_same_cache(cache, env.reference)


def test_repair_refuses_to_rewrite_under_an_edited_codec_list_and_changes_nothing(env, tmp_path) -> None:
    """Issue 20 item 4: a crc32c codec removed from features/p3/zarr.json makes every p3 chunk undecodable;
    --repair used to rewrite those intact shards under the edited list and certify them."""
    cache = _copy_reference(env, tmp_path)
    doc = json.loads((cache / "features" / "p3" / "zarr.json").read_text())
    inner = doc["codecs"][0]["configuration"]["codecs"]
    inner[:] = [c for c in inner if c["name"] != "crc32c"]
    (cache / "features" / "p3" / "zarr.json").write_text(json.dumps(doc))
    before = _tree(cache)
    with pytest.raises(IcdError, match="features/p3/zarr.json") as info:
        run_dump(_cfg(env, tmp_path), str(cache), repair=True)
    assert "crc32c" in str(info.value) and "restore" in str(info.value)
    assert _tree(cache) == before


def test_damaged_metadata_is_refused_on_resume_naming_the_file(env, tmp_path) -> None:
    cache = _copy_reference(env, tmp_path)
    doc = json.loads((cache / "samples" / "records" / "zarr.json").read_text())
    doc["shape"][0] = 12
    (cache / "samples" / "records" / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(IcdError, match="samples/records/zarr.json"):
        run_dump(_cfg(env, tmp_path), str(cache), resume=True)


# ---------------------------------------------------------------------------------- determinism (hole 7)
def test_hole7_num_workers_0_and_2_write_byte_identical_caches(env, tmp_path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the main process resizes with 2 threads, DataLoader workers with 1
    try:
        for workers in (0, 2):
            # upscaling (short side 72-80 of 64-px images): where torch's resize depended on the thread count
            cfg = _cfg(
                env,
                tmp_path,
                DATALOADER={"NUM_WORKERS": workers},
                INPUT={"MIN_SIZE_TRAIN": [72, 80], "MAX_SIZE_TRAIN": 128},
            )
            run_dump(cfg, str(tmp_path / f"workers{workers}"))
    finally:
        torch.set_num_threads(threads)
    _assert_same_cache(tmp_path / "workers0", tmp_path / "workers2")


# ------------------------------------------------------------------------------------- hole 9, small items
def test_hole9_full_disk_while_writing_advises_resume_not_an_api(env, tmp_path, monkeypatch) -> None:
    from cache_format import CacheWriter

    def full(self, shard, pending):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CacheWriter, "_write_runs", full)
    with pytest.raises(IcdError) as info:
        run_dump(_cfg(env, tmp_path), str(tmp_path / "cache"))
    assert "--resume" in info.value.fix and "CacheWriter" not in str(info.value)


def test_hole9_images_without_annotations_are_counted_and_not_cached(env, tmp_path, capsys) -> None:
    annotations = json.loads(Path(env.cfg.DATASETS.CATALOG["synth_train"][0]).read_text())
    empty = annotations["images"][3]["id"]
    annotations["annotations"] = [a for a in annotations["annotations"] if a["image_id"] != empty]
    (tmp_path / "train.json").write_text(json.dumps(annotations))
    cfg = _cfg(env, tmp_path)
    cfg.DATASETS.CATALOG["synth_train"] = [str(tmp_path / "train.json"), env.cfg.DATASETS.CATALOG["synth_train"][1]]
    summary = run_dump(cfg, str(tmp_path / "cache"))
    assert "1 of 16 training image(s) have no (non-crowd) annotations and are not cached" in capsys.readouterr().out
    assert summary.num_samples == summary.committed == 15
    assert empty not in {int(r[1]) for r in CacheReader(str(tmp_path / "cache")).records()}


def test_hole9_an_image_size_says_which_is_height_and_width(env, tmp_path) -> None:
    annotations = json.loads(Path(env.cfg.DATASETS.CATALOG["synth_train"][0]).read_text())
    annotations["images"][1]["width"] = 0
    (tmp_path / "train.json").write_text(json.dumps(annotations))
    cfg = _cfg(env, tmp_path)
    cfg.DATASETS.CATALOG["synth_train"] = [str(tmp_path / "train.json"), env.cfg.DATASETS.CATALOG["synth_train"][1]]
    with pytest.raises(UserError, match="height 64 and width 0"):
        load_dataset(cfg, "synth_train")


def test_hole9_train_finds_a_missing_image_file_before_training(env, tmp_path) -> None:
    from detection.engine.trainer import build_trainer

    images = Path(shutil.copytree(env.cfg.DATASETS.CATALOG["synth_train"][1], tmp_path / "images"))
    gone = sorted(images.iterdir())[5]
    gone.unlink()
    cfg = _cfg(env, tmp_path, DATASETS={"TEST": []})
    cfg.DATASETS.CATALOG["synth_train"] = [env.cfg.DATASETS.CATALOG["synth_train"][0], str(images)]
    with pytest.raises(UserError, match=f"1 of 16 training image file\\(s\\) do not exist: .*{gone.name}"):
        build_trainer(cfg)


def test_hole9_resume_refuses_a_changed_layout_naming_the_keys(env, tmp_path) -> None:
    cache = _copy_reference(env, tmp_path)
    cfg = _cfg(env, tmp_path, CACHE={"SHARD_SAMPLES": 8, "TILE": 32})
    with pytest.raises(UserError, match="(?s)CACHE.SHARD_SAMPLES: cache has 4, this run has 8.*CACHE.TILE"):
        run_dump(cfg, str(cache), resume=True)


def test_hole9_a_budget_below_the_teacher_weights_is_refused_before_calibration(env, tmp_path, monkeypatch) -> None:
    import stage1_teacher_dump.dump as dump_module

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration ran the teacher before the budget was checked")

    cfg = _cfg(env, tmp_path, CACHE={"ENCODING": "auto"})
    with monkeypatch.context() as patch:
        patch.setattr(dump_module, "calibration_features", no_calibration)
        with pytest.raises(UserError, match="does not even hold the teacher") as info:
            run_dump(cfg, str(tmp_path / "tiny"), budget=10_000)
    total = info.value.problem.split("a total --budget of ")[1].split(" fits")[0]  # e.g. '1.23 MB'
    value, unit = total.split()
    budget = int(float(value) * {"KB": 1e3, "MB": 1e6, "GB": 1e9}[unit])
    summary = run_dump(cfg, str(tmp_path / "fits"), budget=budget)  # the advice works
    assert summary.finished


def test_hole9_dry_run_on_an_existing_cache_does_not_say_would_write(env, tmp_path) -> None:
    cache = _copy_reference(env, tmp_path)
    text = format_summary(run_dump(_cfg(env, tmp_path), str(cache), dry_run=True), None, True)
    assert "would write 16" not in text and "exists (16/16 samples committed" in text, text
    assert "--resume would write no samples" in text


# ----------------------------------------------------------------------------- stage two refuses damage
def test_hole1_hole3_distill_refuses_lost_weights_and_records_before_training(
    cfg_tiny, teacher_cache, distill_cfg, tmp_path
) -> None:
    from stage2_student_distill.cli import build_distill_trainer

    url, _ = teacher_cache("fp32")
    weights = shutil.copytree(url, tmp_path / "weights")
    chunk = next((weights / "teacher_weights").glob("*/c/0/0/0/0"))  # a conv weight's one chunk
    chunk.unlink()
    cfg = distill_cfg(cfg_tiny, OUTPUT_DIR=str(tmp_path / "out"))
    with pytest.raises(CorruptChunkError, match="fails its checksum"):
        build_distill_trainer(cfg, str(weights), with_evaluation=False)
    records = shutil.copytree(url, tmp_path / "records")
    (records / "samples" / "records" / "c" / "1" / "0").unlink()
    with pytest.raises(CorruptChunkError, match="samples/records/c/1/0"):
        build_distill_trainer(cfg, str(records), with_evaluation=False)


def test_hole5_a_corrupt_chunk_read_in_a_dataloader_worker_ends_distill_in_one_line(
    cfg_tiny, teacher_cache, distill_cfg, tmp_path, capfd
):
    from stage2_student_distill.cli import main as distill_main

    url, _ = teacher_cache("fp32")
    cache = shutil.copytree(url, tmp_path / "cache")
    for shard in (cache / "features" / "p3" / "c").glob("*/0/0/0"):  # every p3 shard: any batch hits one
        data = bytearray(shard.read_bytes())
        data[len(data) // 3] ^= 0xFF
        shard.write_bytes(bytes(data))
    cfg = distill_cfg(
        cfg_tiny, OUTPUT_DIR=str(tmp_path / "out"), DATALOADER={"NUM_WORKERS": 2}, TEST={"EVAL_PERIOD": 0}
    )
    config = tmp_path / "distill.yaml"
    config.write_text(cfg.dump())
    assert distill_main(["--config-file", str(config), "--cache", str(cache)]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and "DataLoader worker" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("icd distill: error:")]
    assert len(errors) == 1 and "level p3" in errors[0], err


# ----------------------------------------------------------------------- start-up paths (hole 6), real disks
def _icd(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "icd", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def _one_error_line(stderr: str, command: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and lines and lines[0].startswith(f"icd {command}: error: "), stderr
    assert all(line.startswith("  fix: ") for line in lines[1:]), stderr  # the problem, then the fix
    return lines[0]


@pytest.mark.parametrize("where", ["plain file", "below a plain file"])
def test_hole6_a_cache_path_that_cannot_be_a_directory_is_one_line_exit_2(env, tmp_path, capsys, where) -> None:
    from icd.cli import main as icd

    plain = tmp_path / "plain"
    plain.write_text("not a cache")
    config = tmp_path / "dump.yaml"
    config.write_text(_cfg(env, tmp_path).dump())
    cache = plain if where == "plain file" else plain / "sub"
    assert icd(["dump", "--config-file", str(config), "--cache", str(cache)]) == 2
    assert "is a file" in _one_error_line(capsys.readouterr().err, "dump")


def _can_mount_tmpfs() -> str:
    """'' when `unshare -rm` can mount a tmpfs here, else why not."""
    if not shutil.which("unshare"):
        return "no unshare(1)"
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True, text=True
    )
    return "" if probe.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {probe.stderr.strip()}"


def test_hole6_full_and_read_only_disks_are_one_line_exit_2_and_resumable(env, tmp_path) -> None:
    """Real filesystems: a tmpfs too small for the cache's creation, a read-only one (for the cache and
    for `icd train`'s OUTPUT_DIR); after the full disk grows, `--resume` finishes a whole cache."""
    why = _can_mount_tmpfs()
    if why:
        pytest.skip(why)
    config = tmp_path / "dump.yaml"
    config.write_text(_cfg(env, tmp_path).dump())
    train = tmp_path / "train.yaml"
    train.write_text(_cfg(env, tmp_path, SOLVER={"MAX_ITER": 1}, DATASETS={"TEST": []}).dump())
    mnt, out = tmp_path / "mnt", tmp_path / "results"
    mnt.mkdir()
    out.mkdir()
    icd = f"{sys.executable} -m icd"
    script = f"""
cd {REPO}
mount -t tmpfs -o size=8k tmpfs {mnt} || exit 90
{icd} dump --config-file {config} --cache {mnt}/cache >{out}/full.out 2>{out}/full.err; echo $? >{out}/full.rc
mount -o remount,size=64m {mnt}
{icd} dump --config-file {config} --cache {mnt}/cache --resume >{out}/resume.out 2>{out}/resume.err
echo $? >{out}/resume.rc
cp -r {mnt}/cache {out}/cache
mkdir {mnt}/ro && mount -t tmpfs -o ro,size=64k tmpfs {mnt}/ro
{icd} dump --config-file {config} --cache {mnt}/ro/cache >{out}/ro.out 2>{out}/ro.err; echo $? >{out}/ro.rc
{icd} train --config-file {train} OUTPUT_DIR {mnt}/ro/train >{out}/train.out 2>{out}/train.err
echo $? >{out}/train.rc
"""
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr

    def result(name: str) -> tuple[int, str]:
        return int((out / f"{name}.rc").read_text()), (out / f"{name}.err").read_text()

    rc, err = result("full")
    assert rc == 2 and "No space left on device" in _one_error_line(err, "dump"), err
    rc, err = result("resume")
    assert rc == 0, err
    _assert_same_cache(out / "cache", env.reference)
    rc, err = result("ro")
    assert rc == 2 and "Read-only file system" in _one_error_line(err, "dump"), err
    rc, err = result("train")
    assert rc == 2 and "Read-only file system" in _one_error_line(err, "train"), err


# ----------------------------------------------------------------- issue 20: targets apart from sources
def test_dump_refuses_a_cache_inside_the_training_images_and_writes_nothing(env, tmp_path) -> None:
    images = Path(shutil.copytree(env.cfg.DATASETS.CATALOG["synth_train"][1], tmp_path / "images"))
    cfg = _cfg(env, tmp_path)
    cfg.DATASETS.CATALOG["synth_train"] = [env.cfg.DATASETS.CATALOG["synth_train"][0], str(images)]
    before = sorted(p.name for p in images.iterdir())
    with pytest.raises(CacheError, match="the cache .*/images/cache lies inside the image directory of synth_train"):
        run_dump(cfg, str(images / "cache"))
    assert sorted(p.name for p in images.iterdir()) == before


def test_a_negative_budget_is_one_line_naming_it_not_argparse_usage(env, tmp_path, capsys) -> None:
    from cache_format.cli import main as cache_cli
    from stage1_teacher_dump.cli import main as dump_main

    config = tmp_path / "dump.yaml"
    config.write_text(_cfg(env, tmp_path).dump())
    assert dump_main(["--config-file", str(config), "--cache", str(tmp_path / "c"), "--budget", "-5GB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("icd dump: error: size '-5GB' is not positive") and "expected one argument" not in err, err
    assert len(err.strip().splitlines()) == 2 and not (tmp_path / "c").exists()
    assert cache_cli(["plan", "--calib", str(env.reference), "--samples", "10", "--budget", "-5GB"]) == 2
    assert "size '-5GB' is not positive" in capsys.readouterr().err


def test_distill_and_fit_decoder_refuse_an_output_dir_inside_the_cache_before_writing(
    cfg_tiny, teacher_cache, distill_cfg, tmp_path
) -> None:
    from stage2_student_distill.cli import build_distill_trainer
    from stage2_student_distill.fit_decoder import DecoderFitter

    url, _ = teacher_cache("fp32")
    cache = Path(shutil.copytree(url, tmp_path / "cache"))
    before = _tree(cache)
    for out in (cache, cache / "run"):
        cfg = distill_cfg(cfg_tiny, OUTPUT_DIR=str(out))
        with pytest.raises(CacheError, match="OUTPUT_DIR .* (is|lies inside) the cache"):
            build_distill_trainer(cfg, str(cache), with_evaluation=False)
        with pytest.raises(CacheError, match="OUTPUT_DIR .* (is|lies inside) the cache"):
            DecoderFitter(cfg, str(cache))
    assert _tree(cache) == before and not (cache / "run").exists()


# ------------------------------------------------------------------ issue 20 item 5: silent one-liners
def test_train_says_it_skips_training_images_without_annotations_as_the_dump_does(env, tmp_path, capsys) -> None:
    from detection.engine.trainer import build_trainer

    annotations = json.loads(Path(env.cfg.DATASETS.CATALOG["synth_train"][0]).read_text())
    empty = annotations["images"][3]["id"]
    annotations["annotations"] = [a for a in annotations["annotations"] if a["image_id"] != empty]
    (tmp_path / "train.json").write_text(json.dumps(annotations))
    cfg = _cfg(env, tmp_path, DATASETS={"TEST": []})
    cfg.DATASETS.CATALOG["synth_train"] = [str(tmp_path / "train.json"), env.cfg.DATASETS.CATALOG["synth_train"][1]]
    build_trainer(cfg)
    assert (
        "icd train: 1 of 16 training image(s) have no (non-crowd) annotations and are skipped for training"
        in capsys.readouterr().out
    )


def test_resume_without_a_checkpoint_says_it_starts_a_new_run(
    cfg_tiny, teacher_cache, distill_cfg, tmp_path, capsys
) -> None:
    """detectron2's behaviour (one job script for the first start and every restart), said in one line."""
    from stage2_student_distill.cli import build_distill_trainer

    url, _ = teacher_cache("fp32")
    cfg = distill_cfg(cfg_tiny, OUTPUT_DIR=str(tmp_path / "out"))
    trainer = build_distill_trainer(cfg, url, resume=True, with_evaluation=False)
    out = capsys.readouterr().out
    assert f"--resume: no checkpoint to resume in {tmp_path / 'out'}" in out and "iteration 0" in out, out
    assert trainer.iteration == 0
    build_distill_trainer(cfg, url, resume=False, with_evaluation=False)
    assert "--resume" not in capsys.readouterr().out
    from stage2_student_distill.fit_decoder import DecoderFitter

    fitter = DecoderFitter(distill_cfg(cfg_tiny, OUTPUT_DIR=str(tmp_path / "fit")), url)
    assert not fitter.resume_or_load(True)
    assert (
        fitter.iteration == 0 and f"--resume: no checkpoint to resume in {tmp_path / 'fit'}" in capsys.readouterr().out
    )
