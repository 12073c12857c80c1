"""Fault injection on a finished cache (cache_format only, no torch): every array kind deleted, truncated
or flipped, metadata edited, the manifest lost or edited. `icd cache verify` must fail naming the object
at fault, and the reader must refuse what verify fails (issue 10, holes 1, 3, 4, 8, 9)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cache_format import CacheError, CacheReader, CacheWriter, CorruptChunkError, LevelSpec, SampleMeta
from cache_format.cli import main as cache_cli
from cache_format.integrity import finish_cache
from cache_format.repack import repack
from cache_format.state import ABSENT, CACHE, CREATING, OTHER, store_state
from cache_format.synthetic import fpn_like_features
from cache_format.verify import verify_cache

LEVELS = [LevelSpec("p3", 8, 6, 10, 10), LevelSpec("p4", 16, 6, 5, 5)]
WEIGHTS = {
    "head.w": np.arange(12, dtype=np.float32).reshape(3, 4) + 1,
    "head.b": np.zeros(4, np.float32),
    "fpn.w": np.ones((2, 2, 1, 1), np.float32),
}


def _sample(i: int):
    rng = np.random.default_rng(i)
    rh, rw = 80 - i, 60 + i
    return (
        fpn_like_features(rng, LEVELS, rh, rw),
        SampleMeta(i, 0, 1.0, False, rh, rw),
        np.full((i % 2, 4), i, np.float32),
        np.full(i % 2, i, np.int64),
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished int8 cache of 8 samples in 4 shards, with teacher weights (one all zeros: never stored)."""
    path = tmp_path_factory.mktemp("finished") / "cache"
    w = CacheWriter.create(
        str(path),
        num_samples=8,
        levels=LEVELS,
        encoding="int8",
        shard_samples=2,
        tile=4,
        attributes={"dataset": {"name": "synthetic"}},
    )
    w.put_teacher_weights(WEIGHTS)
    for i in range(8):
        w.write_sample(i, *_sample(i))
    w.close()
    finish_cache(str(path))
    return path


@pytest.fixture
def cache(finished: Path, tmp_path: Path) -> Path:
    """A fresh copy of the finished cache for one test to damage."""
    return Path(shutil.copytree(finished, tmp_path / "cache"))


def _bad(report) -> set[str]:
    return {p.key for p in report.problems}


def test_the_finished_cache_verifies(finished: Path, capsys) -> None:
    report = verify_cache(str(finished))
    assert report.ok and report.integrity.finished, report.summary()
    assert not (finished / "teacher_weights" / "head.b" / "c").exists()  # all zeros: legitimately absent
    assert cache_cli(["verify", str(finished)]) == 0
    assert "finished (manifest checked)" in capsys.readouterr().out


# Each array kind: its object in shard 1 (samples 2, 3), and how a training run would read it.
OBJECTS = {
    "features": ("features/p3/c/1/0/0/0", lambda r: r.read_sample(2)),
    "records": ("samples/records/c/1/0", lambda r: r.committed()),
    "quant": ("samples/quant/c/1/0", lambda r: r.read_sample(2)),
    "boxes": ("instances/boxes/c/1/0", lambda r: r.read_sample(3)),
    "classes": ("instances/classes/c/1", lambda r: r.read_sample(3)),
    "teacher weight": ("teacher_weights/head.w/c/0/0", lambda r: r.teacher_weights()),
}


def _damage(path: Path, mode: str) -> None:
    data = path.read_bytes()
    if mode == "delete":
        path.unlink()
    elif mode == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # flip one byte in the middle
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(flipped))


@pytest.mark.parametrize("mode", ["delete", "truncate", "flip"])
@pytest.mark.parametrize("kind", list(OBJECTS))
def test_a_damaged_object_of_every_kind_fails_verify_by_name_and_is_refused(cache: Path, kind: str, mode: str) -> None:
    key, read = OBJECTS[kind]
    _damage(cache / key, mode)
    report = verify_cache(str(cache))
    assert not report.ok and key in _bad(report), report.summary()
    with pytest.raises(CorruptChunkError) as info:
        read(CacheReader(str(cache)))
    assert key in str(info.value) or info.value.key == key or "sample" in str(info.value)


def test_hole1_deleted_teacher_weight_chunk_is_never_read_as_zeros(cache: Path, tmp_path: Path, capsys) -> None:
    (cache / "teacher_weights" / "head.w" / "c" / "0" / "0").unlink()
    assert cache_cli(["verify", str(cache)]) == 1
    assert "BAD teacher_weights/head.w/c/0/0" in capsys.readouterr().out
    with pytest.raises(CorruptChunkError, match="head.w"):
        CacheReader(str(cache)).teacher_weights()
    # repack refuses to copy the zeros into a clean-looking cache, and leaves no destination behind
    assert cache_cli(["repack", str(cache), str(tmp_path / "copy"), "--encoding", "fp16"]) == 2
    assert "head.w" in capsys.readouterr().err and not (tmp_path / "copy").exists()


def test_hole3_deleted_records_chunk_fails_verify_and_the_reader(cache: Path, capsys) -> None:
    (cache / "samples" / "records" / "c" / "1" / "0").unlink()
    assert cache_cli(["verify", str(cache)]) == 1
    out = capsys.readouterr().out
    assert "BAD samples/records/c/1/0" in out and "samples 2, 3 committed when the dump finished" in out
    reader = CacheReader(str(cache))
    with pytest.raises(CorruptChunkError, match="samples/records/c/1/0"):
        reader.committed()
    with pytest.raises(CorruptChunkError, match="samples/records/c/1/0"):
        reader.records()


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "document,edit,key",
    [
        ("zarr.json", lambda d: d["attributes"].__setitem__("num_samples", 6), "zarr.json"),  # hole 3: 8 -> 6
        ("zarr.json", lambda d: d["attributes"].__setitem__("shard_samples", 4), "zarr.json"),
        ("zarr.json", lambda d: d["attributes"].__setitem__("dataset", {"name": "other"}), "zarr.json"),
        ("samples/records/zarr.json", lambda d: d["shape"].__setitem__(0, 6), "samples/records/zarr.json"),
        ("features/p4/zarr.json", lambda d: d["shape"].__setitem__(0, 6), "features/p4/zarr.json"),
        ("instances/boxes/zarr.json", lambda d: d["shape"].__setitem__(0, 512), "instances/boxes/zarr.json"),
    ],
)
def test_edited_metadata_fails_verify_naming_the_document_and_the_reader_refuses(
    cache: Path, document, edit, key
) -> None:
    _edit_json(cache / document, edit)
    report = verify_cache(str(cache))
    assert not report.ok and key in _bad(report), report.summary()
    with pytest.raises(CorruptChunkError) as info:
        CacheReader(str(cache))
    assert info.value.key == key


def test_a_lost_or_edited_manifest(cache: Path, capsys) -> None:
    _edit_json(cache / "manifest" / "zarr.json", lambda d: d["attributes"].__setitem__("committed", 9))
    assert not verify_cache(str(cache)).ok and "manifest/zarr.json" in _bad(verify_cache(str(cache)))
    with pytest.raises(CorruptChunkError, match="manifest/zarr.json"):
        CacheReader(str(cache))
    (cache / "manifest" / "zarr.json").unlink()
    assert cache_cli(["verify", str(cache)]) == 1
    assert "UNFINISHED manifest/zarr.json missing: the dump did not finish" in capsys.readouterr().out
    assert cache_cli(["verify", str(cache), "--no-manifest"]) == 0  # what is committed is intact


def test_a_cache_written_before_manifests_is_named_as_such(cache: Path, capsys) -> None:
    (cache / "manifest" / "zarr.json").unlink()
    _edit_json(cache / "zarr.json", lambda d: d["attributes"].__setitem__("format_version", "1.0"))
    _edit_json(cache / "teacher_weights" / "zarr.json", lambda d: d["attributes"].pop("crc32c"))
    assert cache_cli(["verify", str(cache)]) == 1
    out = capsys.readouterr().out
    assert "written before manifests (format 1.0" in out and "--no-manifest" in out and "--resume" in out
    assert cache_cli(["verify", str(cache), "--no-manifest"]) == 0
    assert CacheReader(str(cache)).read_sample(5).meta.image_id == 5  # still readable


def test_verify_names_files_once_without_repeating_the_location(cache: Path, capsys) -> None:
    _damage(cache / "features" / "p4" / "c" / "2" / "0" / "0" / "0", "flip")
    (cache / "samples" / "quant" / "c" / "3" / "0").unlink()
    assert cache_cli(["verify", str(cache), "--workers", "2"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{cache}: ") and all(str(cache) not in line for line in lines[1:])
    assert any(line.startswith("  BAD features/p4/c/2/0/0/0: shard 2, sample") for line in lines), lines
    assert any(line.startswith("  BAD samples/quant/c/3/0: missing") for line in lines), lines
    assert lines[-1].startswith("  fix: `icd dump") and "--resume --repair" in lines[-1]


def test_hole9_a_failed_repack_leaves_no_partial_destination(cache: Path, tmp_path: Path) -> None:
    _damage(cache / "features" / "p3" / "c" / "3" / "0" / "0" / "0", "flip")  # found mid-copy (shard 3)
    dst = tmp_path / "repacked"
    with pytest.raises(CorruptChunkError):
        repack(str(cache), str(dst), "fp16")
    assert not dst.exists()


def test_repack_of_a_finished_cache_is_finished(finished: Path, tmp_path: Path) -> None:
    dst = str(tmp_path / "fp16")
    repack(str(finished), dst, "fp16")
    report = verify_cache(dst)
    assert report.ok and report.integrity.finished, report.summary()
    assert np.array_equal(CacheReader(dst).teacher_weights()["head.w"], WEIGHTS["head.w"])


class _Killed(BaseException):
    """Stands for SIGKILL at a chosen point: nothing after it runs, no cleanup handler catches it."""


def test_hole8_an_interrupted_creation_is_recognised_and_can_be_started_over(tmp_path: Path, monkeypatch) -> None:
    import cache_format.writer as writer_module

    url = str(tmp_path / "c")
    real = writer_module.create_arrays

    def die_after_creating(root, *args, **kwargs):
        real(root, *args, **kwargs)
        raise _Killed()

    monkeypatch.setattr(writer_module, "create_arrays", die_after_creating)
    with pytest.raises(_Killed):
        CacheWriter.create(url, num_samples=4, levels=LEVELS, encoding="fp16", shard_samples=2, tile=4)
    monkeypatch.undo()
    assert store_state(url) == CREATING
    with pytest.raises(CacheError, match="creation was interrupted"):
        CacheReader(url)
    w = CacheWriter.create(url, num_samples=4, levels=LEVELS, encoding="fp16", shard_samples=2, tile=4, overwrite=True)
    assert store_state(url) == CACHE and w.uncommitted_owned_samples() == [0, 1, 2, 3]


def test_store_states_and_paths_that_cannot_be_caches(tmp_path: Path) -> None:
    assert store_state(str(tmp_path / "new")) == ABSENT
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.txt").write_text("mine")
    assert store_state(str(tmp_path / "other")) == OTHER
    plain = tmp_path / "plain"
    plain.write_text("a file")
    for url, match in ((plain, "is a file, not a cache directory"), (plain / "sub", "is a file")):
        with pytest.raises(CacheError, match=match):
            store_state(str(url))
        with pytest.raises(CacheError, match=match):
            CacheWriter.create(str(url), num_samples=2, levels=LEVELS, encoding="fp16")


# ------------------------------------------------------------------------------------- issue 20, items 3, 4
def test_verify_blames_only_the_int8_scales_chunk_when_only_it_is_damaged(cache: Path) -> None:
    """The records-side blocks (int8 scales) are read with every sample: their failure is theirs alone,
    never the intact boxes / classes / features of the shard."""
    _damage(cache / "samples" / "quant" / "c" / "1" / "0", "flip")
    report = verify_cache(str(cache))
    assert _bad(report) == {"samples/quant/c/1/0"}, report.summary()


@pytest.mark.parametrize("document", ["features/p3/zarr.json", "instances/boxes/zarr.json"])
def test_an_edited_codec_list_is_named_as_the_metadata_file_never_as_its_intact_chunks(cache: Path, document) -> None:
    def drop_crc(doc):
        codecs = doc["codecs"][0]["configuration"]["codecs"] if document.startswith("features") else doc["codecs"]
        codecs[:] = [c for c in codecs if c["name"] != "crc32c"]

    _edit_json(cache / document, drop_crc)
    report = verify_cache(str(cache))
    assert _bad(report) == {document}, report.summary()
    assert "crc32c" in report.summary() and "restore the named metadata file" in report.summary()
    for opening in (lambda: CacheReader(str(cache)), lambda: CacheWriter.open(str(cache))):
        with pytest.raises(CorruptChunkError) as info:  # nothing is read or written under it
            opening()
        assert info.value.key == document


def test_the_cheap_check_finds_a_truncated_object_of_an_unfinished_cache_by_its_shard_index(cache: Path) -> None:
    """No manifest holds the sizes: a feature shard proves itself whole by its crc32c-checked index, the
    small per-shard chunks by being read. Without reading a single feature chunk."""
    from cache_format.integrity import check_cache

    (cache / "manifest" / "zarr.json").unlink()
    assert not check_cache(str(cache)).damage
    for key in ("features/p4/c/2/0/0/0", "samples/quant/c/3/0", "instances/classes/c/1"):
        _damage(cache / key, "truncate")
    report = check_cache(str(cache))
    assert {d.key for d in report.damage} == {
        "features/p4/c/2/0/0/0",
        "samples/quant/c/3/0",
        "instances/classes/c/1",
    }, report.damage
    assert report.checked_levels == 0 and report.damaged_shards() == [1, 2, 3]
