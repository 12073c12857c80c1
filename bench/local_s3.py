"""A real S3-protocol endpoint on this machine, for the tests and the benchmarks: moto's S3 server in a
child process on 127.0.0.1 (a free port), optionally behind a proxy that adds a fixed latency per request.

    with LocalS3() as s3:                       # moto server on 127.0.0.1:<free port>
        env = s3.env()                          # AWS_ENDPOINT_URL, dummy credentials, region, no real config
        s3.make_bucket("icd")
        with s3.latency_proxy(20.0) as slow:    # the same server, every request delayed by 20 ms
            slow.env()

Why a child process and not moto's in-process decorator: the code under test must talk HTTP to an
endpoint exactly as it would to AWS/MinIO/Ceph (botocore's endpoint resolution, aiohttp, range
requests, multipart uploads), from any process (DataLoader workers, `--num-gpus` ranks, CLI
subprocesses), and the server must not share the GIL with the process it measures.

The latency proxy (`python -m bench.local_s3 proxy ...`) is a plain TCP relay written with asyncio
(nothing off the shelf relays with an injected delay in a few lines without extra packages): every
chunk of bytes a client sends is held for `latency_ms` before it is forwarded. An S3 GET is one small
request chunk, so each request pays the delay once before the server sees it - a model of the
per-request first-byte latency of a remote object store (tens of ms for S3 across a region), not of
its bandwidth. Uploads of big objects pay it per 64 KiB chunk, so write through the direct endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ACCESS_KEY = "icd-local-test-key"
SECRET_KEY = "icd-local-test-secret"
REGION = "us-east-1"
_START_TIMEOUT_S = 60.0


def client_env(endpoint: str, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> dict[str, str]:
    """The standard AWS variables that point botocore (and so s3fs) at `endpoint`, isolated from any
    real AWS configuration on this machine (no config/credentials files, no instance metadata)."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


class _Child:
    """A server child process that prints one JSON line with its port, then serves until terminated."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> _Child:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.local_s3", *self.args],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = _read_line(self.proc, _START_TIMEOUT_S)
        if not line:
            self.stop()
            raise RuntimeError(f"`python -m bench.local_s3 {' '.join(self.args)}` did not start")
        self.port = int(json.loads(line)["port"])
        return self

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the child has used so far (Linux /proc), 0.0 if unknown."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (AttributeError, OSError, ValueError, IndexError):
            return 0.0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The child's first stdout line, or '' if it exits or stays silent for `timeout` seconds."""
    import selectors

    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return proc.stdout.readline().strip()


class _ServerInChild:
    """A local server in a child process: its endpoint, the client environment for it, start/stop."""

    _child: _Child

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._child.port}"

    def env(self) -> dict[str, str]:
        return client_env(self.endpoint)

    def cpu_seconds(self) -> float:
        return self._child.cpu_seconds()

    def start(self) -> Any:
        self._child.start()
        return self

    def stop(self) -> None:
        self._child.stop()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class LatencyProxy(_ServerInChild):
    """A TCP relay to an upstream endpoint that delays every client chunk by `latency_ms` (child process)."""

    def __init__(self, upstream_port: int, latency_ms: float) -> None:
        self.latency_ms = float(latency_ms)
        self._child = _Child(["proxy", "--upstream-port", str(upstream_port), "--latency-ms", str(latency_ms)])


class LocalS3(_ServerInChild):
    """moto's S3 server on 127.0.0.1:<free port> in a child process (in memory: gone when stopped)."""

    def __init__(self) -> None:
        self._child = _Child(["moto"])

    def filesystem(self) -> Any:
        """A fresh (uncached) synchronous s3fs filesystem talking to this server."""
        import s3fs

        return s3fs.S3FileSystem(
            endpoint_url=self.endpoint,
            key=ACCESS_KEY,
            secret=SECRET_KEY,
            skip_instance_cache=True,
            use_listings_cache=False,
        )

    def make_bucket(self, name: str) -> str:
        fs = self.filesystem()
        if not fs.exists(name):
            fs.mkdir(name)
        return name

    def latency_proxy(self, latency_ms: float) -> LatencyProxy:
        return LatencyProxy(self._child.port, latency_ms)


# --- the child processes ------------------------------------------------------------------------------
def _serve_moto() -> None:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    print(json.dumps({"port": server.get_host_and_port()[1]}), flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        server.stop()


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            if delay:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def _serve_proxy(upstream_port: int, latency_ms: float) -> None:
    delay = latency_ms / 1000.0

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", upstream_port)
        except OSError:
            client_w.close()
            return
        # Requests (client -> server) are delayed; responses flow back at once.
        await asyncio.gather(_relay(client_r, up_w, delay), _relay(up_r, client_w, 0.0))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.local_s3", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("moto", help='serve moto\'s S3 on 127.0.0.1:<free port>; prints {"port": N}')
    p = sub.add_parser("proxy", help="relay 127.0.0.1:<free port> -> upstream, delaying each request")
    p.add_argument("--upstream-port", type=int, required=True)
    p.add_argument("--latency-ms", type=float, default=0.0)
    args = ap.parse_args(argv)
    try:
        if args.what == "moto":
            _serve_moto()
        else:
            asyncio.run(_serve_proxy(args.upstream_port, args.latency_ms))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
