"""`icd cache verify`: read every committed chunk in parallel (dask) and name each bad sample/level.

Reading goes through CacheReader, so it checks exactly what a training run relies on: every chunk's
crc32c (and each shard index's), the per-sample content checksums, record sanity and the valid shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import dask

from cache_format.errors import CacheError, StoreAccessError
from cache_format.reader import CacheReader
from cache_format.remote import default_workers
from cache_format.schema import COL


@dataclass
class Problem:
    sample: int | None
    level: str
    message: str

    def __str__(self) -> str:
        where = f"sample {self.sample}" if self.sample is not None else "cache"
        return f"{where} level {self.level}: {self.message}"


@dataclass
class VerifyReport:
    url: str
    num_samples: int
    committed: int
    checked_chunks: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = (f"{self.url}: {self.committed}/{self.num_samples} samples committed, "
                f"{self.checked_chunks} sample-levels checked, {len(self.problems)} problem(s)")
        return "\n".join([head] + [f"  BAD {p}" for p in self.problems])


def _problem_text(exc: Exception) -> str:
    text = getattr(exc, "problem", None) or str(exc)
    return text.split(": ", 1)[1] if text.startswith("cache ") and ": " in text else text


def _check_shard(reader: CacheReader, shard: int) -> tuple[int, list[Problem]]:
    rng = reader.layout.shard_range(shard)
    problems: list[Problem] = []
    try:
        rows = reader.records(rng.start, rng.stop)
    except StoreAccessError:
        raise  # an outage or refused access is not damage: the whole run stops (exit 2)
    except CacheError as exc:
        return 0, [Problem(i, "records", _problem_text(exc)) for i in rng]
    checked = 0
    for i in rng:
        if rows[i - rng.start, COL["committed"]] != 1.0:
            continue
        for name in reader.level_names:
            checked += 1
            try:
                reader.read_level(i, name)
            except StoreAccessError:
                raise
            except CacheError as exc:
                problems.append(Problem(i, name, _problem_text(exc)))
        try:
            reader.read_instances(i)
        except StoreAccessError:
            raise
        except CacheError as exc:
            problems.append(Problem(i, "instances", _problem_text(exc)))
    return checked, problems


def verify_cache(url: str, workers: int | None = None) -> VerifyReport:
    """Check every committed sample of the cache at `url`; never raises for corrupt data (reports it)."""
    reader = CacheReader(url)
    committed = reader.committed()
    report = VerifyReport(reader.url, reader.num_samples, int(committed.sum()))
    tasks = [dask.delayed(_check_shard)(reader, s) for s in range(reader.layout.num_shards)]
    workers = workers or default_workers(url)
    results = dask.compute(*tasks, scheduler="threads", num_workers=workers) if tasks else []
    for checked, problems in results:
        report.checked_chunks += checked
        report.problems.extend(problems)
    if reader.has_teacher_weights():
        try:
            reader.teacher_weights()
        except StoreAccessError:
            raise
        except CacheError as exc:
            report.problems.append(Problem(None, "teacher_weights", _problem_text(exc)))
    return report
