"""bench/cache_io.py's object-storage section: samples/s reading one cache from local disk and from a
real S3 endpoint on this machine (moto's server, bench/local_s3.py), directly and behind a proxy that
adds a fixed latency to every request, one sample at a time and a batch at a time.

What is compared, on the same samples and the same bytes (the S3 copy is an upload of the local cache):
- "per sample": `reader.read_sample(i)` for each sample in turn, the access pattern of a DataLoader
  that asks for one item after the other; every request waits for the one before it.
- "batch of B": `reader.read_samples(batch)` as stage two's DistillDataset.__getitems__ issues it: the
  records of every shard touched, then every (sample, level) region and every sample's instances, are
  requested concurrently, so a batch pays a few request latencies instead of several per sample.

Honest caveats, printed with the table: moto is a Python server on the same 2 cores as the reader, so
its own CPU time is part of every S3 number (a real endpoint's is not), and loopback has no bandwidth
limit; the proxy adds latency per request (first byte), not a bandwidth cap.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

BUCKET = "icd-bench"
ENCODINGS = (("fp16", "zstd"), ("int8", "zstd"))


def _read_rate(url: str, n: int, batch: int | None, repeats: int) -> tuple[float, float]:
    """(best samples/s wall, that run's client CPU seconds) reading samples 0..n-1 of `url`."""
    from cache_format import CacheReader

    best = (0.0, math.inf)
    for _ in range(repeats):
        reader = CacheReader(url)  # fresh: no records block cached from an earlier pass
        w0, c0 = time.perf_counter(), time.process_time()
        if batch is None:
            for i in range(n):
                reader.read_sample(i)
        else:
            for lo in range(0, n, batch):
                reader.read_samples(range(lo, min(n, lo + batch)))
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if n / wall > best[0]:
            best = (n / wall, cpu)
    return best


def _use_endpoint(env: dict[str, str]) -> None:
    """Point this process's S3 clients at another endpoint (botocore reads AWS_ENDPOINT_URL when a
    client is created; fsspec caches filesystem instances, so drop them)."""
    import s3fs

    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()


def object_storage_section(write_cache: Any, n: int, fp32_mb_per_sample: float, workdir: Path, quick: bool,
                           latencies_ms: tuple[float, ...] = (20.0, 100.0)) -> dict[str, Any]:
    """Rows of samples/s per (encoding, store, access pattern); `write_cache(url, enc, comp)` writes the
    benchmark's samples to a new cache at `url`."""
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as exc:
        return {"skipped": f"needs s3fs and moto[server] (pip install -e '.[test]'): {exc}"}
    from bench.local_s3 import LocalS3, client_env

    saved = {k: os.environ.get(k) for k in client_env('')}
    batch = min(8, n)
    repeats = 1 if quick else 2
    rows = []
    with LocalS3() as s3:
        s3.make_bucket(BUCKET)
        stores: list[tuple[str, dict[str, str], Any]] = [("s3 local endpoint (moto)", s3.env(), None)]
        proxies = [s3.latency_proxy(ms).start() for ms in latencies_ms]
        stores += [(f"s3 + {p.latency_ms:g} ms/request", p.env(), p) for p in proxies]
        try:
            for enc, comp in ENCODINGS:
                local = workdir / f"s3bench_{enc}"
                write_cache(str(local), enc, comp)
                s3.filesystem().put(str(local), f"{BUCKET}/{enc}", recursive=True)  # the same bytes
                url = f"s3://{BUCKET}/{enc}"
                per_mode: dict[str, float] = {}
                for mode, b in (("per sample", None), (f"batch of {batch}", batch)):
                    rate, cpu = _read_rate(str(local), n, b, repeats)
                    per_mode[mode] = rate
                    rows.append(_row(enc, comp, "local disk (warm)", mode, rate, cpu, n, fp32_mb_per_sample, rate))
                    for name, env, _ in stores:
                        _use_endpoint(env)
                        r, c = _read_rate(url, n, b, repeats)
                        rows.append(_row(enc, comp, name, mode, r, c, n, fp32_mb_per_sample, per_mode[mode]))
        finally:
            for p in proxies:
                p.stop()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    for r in rows:  # the batched path against the per-sample path of the same store
        same = [o for o in rows if o["encoding"] == r["encoding"] and o["store"] == r["store"]
                and o["access"] == "per sample"]
        r["x_per_sample_same_store"] = r["samples_per_s"] / same[0]["samples_per_s"]
    return {
        "config": {"samples": n, "batch": batch, "repeats": repeats, "latencies_ms": list(latencies_ms),
                   "note": "moto runs on the same cores as the reader (its CPU is inside every s3 number); "
                           "the proxy delays each request by the stated latency, no bandwidth limit"},
        "rows": rows,
    }


def _row(enc: str, comp: str, store: str, access: str, rate: float, cpu: float, n: int, mb: float,
         local_rate: float) -> dict[str, Any]:
    return {"encoding": enc, "compressor": comp, "store": store, "access": access,
            "samples_per_s": rate, "fp32_mb_per_s": rate * mb, "client_cpu_s_per_sample": cpu / n,
            "x_local_disk_same_access": rate / local_rate}


def table(section: dict[str, Any]) -> str:
    if "rows" not in section:
        return f"object storage: skipped ({section.get('skipped')})"
    head = (f"{'encoding':<10}{'store':<30}{'access':<14}{'samples/s':>10}{'fp32 MB/s':>10}"
            f"{'x local':>9}{'x per-sample':>13}")
    lines = [head, "-" * len(head)]
    for r in section["rows"]:
        lines.append(f"{r['encoding'] + '@' + r['compressor']:<10}{r['store']:<30}{r['access']:<14}"
                     f"{r['samples_per_s']:>10.2f}{r['fp32_mb_per_s']:>10.0f}{r['x_local_disk_same_access']:>9.2f}"
                     f"{r['x_per_sample_same_store']:>13.2f}")
    cfg = section["config"]
    lines.append(f"{cfg['samples']} samples, batch {cfg['batch']}; 'x local' = over local disk with the same access "
                 f"pattern; 'x per-sample' = the batch path over one-sample-at-a-time on the same store. {cfg['note']}.")
    return "\n".join(lines)

