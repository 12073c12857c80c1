"""Commands never destroy what they were not asked to write (issue 20, items 1, 2 and 5): a repack
destination that is, contains or lies inside its source, or holds something that is not a cache, is
refused in one line with exit 2, and every byte that existed before is left as it was - on local
directories and on an object store (moto's S3 server). An `--overwrite` that fails mid-copy leaves the
old destination as it was too."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from cache_format import CacheWriter, LevelSpec, SampleMeta
from cache_format.cli import main as cache_cli
from cache_format.integrity import finish_cache
from cache_format.synthetic import fpn_like_features
from cache_format.verify import verify_cache

LEVELS = [LevelSpec("p3", 8, 6, 10, 10), LevelSpec("p4", 16, 6, 5, 5)]
BUCKET = "icd-targets"


def _write(url: str, encoding: str = "int8", n: int = 8) -> str:
    w = CacheWriter.create(
        url,
        num_samples=n,
        levels=LEVELS,
        encoding=encoding,
        shard_samples=2,
        tile=4,
        attributes={"dataset": {"name": "synthetic"}},
    )
    w.put_teacher_weights({"head.w": np.arange(12, dtype=np.float32).reshape(3, 4) + 1})
    for i in range(n):
        rng = np.random.default_rng(i)
        rh, rw = 80 - i, 60 + i
        w.write_sample(
            i,
            fpn_like_features(rng, LEVELS, rh, rw),
            SampleMeta(i, 0, 1.0, False, rh, rw),
            np.full((i % 2, 4), i, np.float32),
            np.full(i % 2, i, np.int64),
        )
    w.close()
    finish_cache(url)
    return url


def _tree(path: Path) -> dict[str, str]:
    """Every file under `path` (relative name -> sha256), directories included as names."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(path.rglob("*"))
    }


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    return Path(_write(str(tmp_path_factory.mktemp("made") / "cache")))


@pytest.fixture
def work(made: Path, tmp_path: Path) -> Path:
    """caches/x/src (a finished cache) with an unrelated file beside it; data/other_copy (a COCO-like
    dataset); caches/old (a cache to be replaced)."""
    shutil.copytree(made, tmp_path / "caches" / "x" / "src")
    (tmp_path / "caches" / "x" / "notes.txt").write_text("mine")
    shutil.copytree(made, tmp_path / "caches" / "old")
    data = tmp_path / "data" / "other_copy"
    (data / "annotations").mkdir(parents=True)
    (data / "annotations" / "instances_train.json").write_text('{"images": []}')
    for i in range(3):
        (data / f"{i:06d}.png").write_bytes(bytes([i]) * 32)
    return tmp_path


def _one_line_exit_2(argv: list[str], capsys, match: str) -> None:
    assert cache_cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("icd cache repack: error: ") and match in err.splitlines()[0], err
    assert len(err.strip().splitlines()) == 2 and "\n  fix: " in err and "overwrite=True" not in err, err


@pytest.mark.parametrize(
    "src,dst,match",
    [
        ("caches/x/src", "caches/x", "contains the source"),  # item 1: --overwrite deleted caches/x
        ("caches/x/src", "caches/x/src/inner", "lies inside the source"),  # item 5: written into the source
        ("caches/x/src", "caches/x/../x/src", "is the source"),
        ("caches/old", "data/other_copy", "holds something that is not an ICD teacher cache"),  # item 2
    ],
)
def test_repack_overwrite_refuses_a_destination_overlapping_its_source_or_not_a_cache(
    work: Path, capsys, src, dst, match
) -> None:
    before = _tree(work)
    _one_line_exit_2(["repack", str(work / src), str(work / dst), "--encoding", "fp16", "--overwrite"], capsys, match)
    assert _tree(work) == before


def test_repack_names_what_a_non_cache_destination_holds_and_advises_the_cli_flag(work: Path, capsys) -> None:
    assert cache_cli(["repack", str(work / "caches/old"), str(work / "data/other_copy"), "--encoding", "fp16"]) == 2
    assert "000000.png" in capsys.readouterr().err
    before = _tree(work)
    _one_line_exit_2(
        ["repack", str(work / "caches/x/src"), str(work / "caches/old"), "--encoding", "fp16"],
        capsys,
        "already holds a cache",
    )
    assert _tree(work) == before


def test_repack_overwrite_replaces_a_cache_and_a_failed_one_leaves_it_as_it_was(work: Path, capsys) -> None:
    src, old = work / "caches" / "x" / "src", work / "caches" / "old"
    assert cache_cli(["repack", str(src), str(old), "--encoding", "fp16", "--overwrite"]) == 0
    assert verify_cache(str(old)).ok and "fp16" in (old / "zarr.json").read_text()
    before = _tree(work)
    _flip(src / "features" / "p3" / "c" / "3" / "0" / "0" / "0")  # found mid-copy, after shards 0-2
    before_src = _tree(src)
    assert cache_cli(["repack", str(src), str(old), "--encoding", "int8", "--overwrite"]) == 2
    after = _tree(work)
    assert {k: v for k, v in after.items() if not k.startswith("caches/x/src")} == {
        k: v for k, v in before.items() if not k.startswith("caches/x/src")
    }
    assert _tree(src) == before_src and not list((work / "caches").glob(".*"))  # no staging copy left


@pytest.fixture(scope="module")
def s3(local_s3):
    with pytest.MonkeyPatch.context() as mp:
        for key, value in local_s3.env().items():
            mp.setenv(key, value)
        local_s3.make_bucket(BUCKET)
        yield local_s3


def _objects(s3, prefix: str) -> dict[str, bytes]:
    fs = s3.filesystem()
    fs.invalidate_cache()
    return {key: fs.cat_file(key) for key in sorted(fs.find(f"{BUCKET}/{prefix}"))}


def test_repack_on_s3_refuses_overlap_and_non_caches_and_keeps_the_old_copy_on_failure(s3, made: Path, capsys) -> None:
    fs = s3.filesystem()
    src, url = f"{BUCKET}/s3x/src", f"s3://{BUCKET}/s3x"
    fs.put(str(made), src, recursive=True)
    fs.pipe_file(f"{BUCKET}/s3x/notes.txt", b"mine")
    fs.pipe_file(f"{BUCKET}/data/other/annotations/instances_train.json", b"{}")
    _write(f"{url}/old", encoding="fp16")
    before = _objects(s3, "")
    _one_line_exit_2(["repack", f"{url}/src", url, "--encoding", "fp16", "--overwrite"], capsys, "contains the source")
    _one_line_exit_2(["repack", f"{url}/src", f"{url}/src/in", "--encoding", "fp16"], capsys, "lies inside the source")
    _one_line_exit_2(
        ["repack", f"{url}/src", f"s3://{BUCKET}/data/other", "--encoding", "fp16", "--overwrite"],
        capsys,
        "not an ICD teacher cache",
    )
    assert _objects(s3, "") == before
    key = f"{src}/features/p3/c/3/0/0/0"
    blob = bytearray(fs.cat_file(key))
    blob[len(blob) // 2] ^= 0xFF
    fs.pipe_file(key, bytes(blob))
    old = _objects(s3, "s3x/old")
    assert cache_cli(["repack", f"{url}/src", f"{url}/old", "--encoding", "int8", "--overwrite"]) == 2
    assert "the destination was not touched" in capsys.readouterr().err
    assert _objects(s3, "s3x/old") == old


def test_an_interrupted_creation_holding_a_foreign_file_is_not_started_over(tmp_path: Path, monkeypatch) -> None:
    """Starting an interrupted creation over clears its location: only when nothing but the creation's own
    names is there (a file put there since makes it 'other', which dump and repack refuse)."""
    import cache_format.writer as writer_module
    from cache_format.state import CREATING, OTHER, store_state

    class Killed(BaseException):
        pass

    def die(*args, **kwargs):
        raise Killed()

    url = tmp_path / "c"
    monkeypatch.setattr(writer_module, "create_arrays", die)
    with pytest.raises(Killed):
        CacheWriter.create(str(url), num_samples=4, levels=LEVELS, encoding="fp16", shard_samples=2, tile=4)
    monkeypatch.undo()
    assert store_state(str(url)) == CREATING
    (url / "notes.txt").write_text("mine")
    assert store_state(str(url)) == OTHER
