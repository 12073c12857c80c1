"""`make test-compat`: the default test suite at both ends of the supported dependency ranges.

    python tools/test_compat.py [--ends oldest newest] [--venvs .compat] [--build-only] [-- PYTEST ARGS]

Each end gets its own virtual environment under `.compat/<end>` (git-ignored), built once and reused
while pyproject.toml and the end's pins are unchanged:
- oldest: the lower bound that pyproject.toml states for torch, torchvision and the libraries whose APIs
  the code leans on (numpy, zarr, numcodecs, dask, pycocotools), each installed exactly (`==` the
  bound); pip resolves everything else within pyproject's ranges.
- newest: the newest release of every dependency within pyproject's ranges (`--upgrade-strategy eager`).
The project is installed editable with its test extra, the installed versions are checked against the
end's pins, and `python -m pytest -q` (the default suite, as `make test`) runs in that venv. The ends
run one after another: the suite uses every core. Printed at the end and written to
`.compat/report.json`: per end the versions, the seconds the build and the suite took, the suite's
summary line; an end not run this time keeps its last entry there. Exit 0 only when every end run
passed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
# The distributions whose lower bounds the oldest end installs exactly, and whose versions every end
# reports (import names differ from distribution names only for PyYAML, which is not among them).
PINNED_AT_OLDEST = ("torch", "torchvision", "numpy", "zarr", "numcodecs", "dask", "pycocotools")
REPORTED = (*PINNED_AT_OLDEST, "fsspec", "pytest")
ENDS = ("oldest", "newest")
SUMMARY = re.compile(r"^=*\s*\d+ (passed|failed|error)", re.IGNORECASE)


def requirement(spec: str) -> tuple[str, str, str | None]:
    """'numcodecs[crc32c]>=0.15' -> ('numcodecs', '[crc32c]', '0.15'): name, extras, the `>=` bound."""
    match = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*(\[[^\]]*\])?\s*(.*)$", spec)
    if match is None:
        raise SystemExit(f"test_compat: cannot read the dependency {spec!r} in pyproject.toml")
    name, extras, rest = match.group(1), match.group(2) or "", match.group(3)
    lower = re.search(r">=\s*([0-9][^,;\s]*)", rest)
    return name.lower(), extras, lower.group(1) if lower else None


def oldest_pins(pyproject: dict[str, Any]) -> list[str]:
    """`name[extras]==lower bound` for every PINNED_AT_OLDEST dependency of pyproject.toml."""
    pins = {}
    for spec in pyproject["project"]["dependencies"]:
        name, extras, lower = requirement(spec)
        if name in PINNED_AT_OLDEST:
            if lower is None:
                raise SystemExit(f"test_compat: pyproject.toml states no lower bound (>=) for {name}: {spec!r}")
            pins[name] = f"{name}{extras}=={lower}"
    missing = [name for name in PINNED_AT_OLDEST if name not in pins]
    if missing:
        raise SystemExit(f"test_compat: pyproject.toml lists no dependency {', '.join(missing)}")
    return [pins[name] for name in PINNED_AT_OLDEST]


def pip_env() -> dict[str, str]:
    """The environment for pip and the suite: no machine-wide pip constraint, this repository first.

    A constraints file set for the whole machine (PIP_CONSTRAINT or a pip config file; some clusters cap
    torch this way) would silently swap an end for another version, so it is replaced by an empty one;
    the installed versions are checked against the pins afterwards either way.
    """
    env = dict(os.environ)
    env["PIP_CONSTRAINT"] = os.devnull
    env["PYTHONPATH"] = str(REPO)
    env.pop("VIRTUAL_ENV", None)
    return env


def run(cmd: Sequence[str], log: Path, env: dict[str, str]) -> tuple[int, float, str]:
    """Run `cmd` in the repository, echo and append its output to `log`; (exit code, seconds, summary)."""
    start, summary = time.perf_counter(), ""
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            out.write(line)
            if SUMMARY.match(line.strip()):
                summary = line.strip().strip("=").strip()
        code = proc.wait()
    return code, time.perf_counter() - start, summary


def installed_versions(python: Path, env: dict[str, str]) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        f"for name in {list(REPORTED)!r}:\n"
        "    try: out[name] = m.version(name)\n"
        "    except m.PackageNotFoundError: out[name] = None\n"
        "print(json.dumps(out))"
    )
    return json.loads(
        subprocess.run([str(python), "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    )


def same_version(installed: str | None, pin: str) -> bool:
    """'2.3.0' satisfies '==2.3' and '2.3.0+cpu' too (PEP 440: zero padding, local labels)."""
    if installed is None:
        return False

    def release(version: str) -> list[int]:
        parts = [int(p) for p in re.match(r"^(\d+(?:\.\d+)*)", version).group(1).split(".")]  # type: ignore[union-attr]
        while parts and parts[-1] == 0:
            parts.pop()
        return parts

    return release(installed) == release(pin)


def build(end: str, venv: Path, pyproject_text: str, env: dict[str, str], log: Path) -> tuple[float, list[str]]:
    """Create or update the end's venv; returns (seconds spent, the pins). Reused while its stamp matches."""
    pins = oldest_pins(tomllib.loads(pyproject_text)) if end == "oldest" else []
    stamp_path = venv / ".compat-stamp"
    stamp = {
        "pyproject_sha256": hashlib.sha256(pyproject_text.encode()).hexdigest(),
        "pins": pins,
        "python": platform.python_version(),
    }
    python = venv / "bin" / "python"
    if python.exists() and stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        print(f"test_compat: {end}: reusing {venv}", flush=True)
        return 0.0, pins
    start = time.perf_counter()
    if not python.exists():
        code, _, _ = run([sys.executable, "-m", "venv", str(venv)], log, env)
        if code:
            raise SystemExit(f"test_compat: creating the venv {venv} failed (see {log})")
    upgrade = ["--upgrade", "--upgrade-strategy", "eager"] if end == "newest" else []
    code, _, _ = run([str(python), "-m", "pip", "install", *upgrade, "-e", ".[test]", *pins], log, env)
    if code:
        raise SystemExit(f"test_compat: installing the {end} end failed (see {log}); its pins: {' '.join(pins)}")
    stamp_path.write_text(json.dumps(stamp))
    return time.perf_counter() - start, pins


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(prog="tools/test_compat.py", description=__doc__.splitlines()[0])
    parser.add_argument("--ends", nargs="+", choices=ENDS, default=list(ENDS))
    parser.add_argument("--venvs", type=Path, default=REPO / ".compat", help="where the venvs live (default .compat)")
    parser.add_argument("--build-only", action="store_true", help="build the venvs, run no test")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    pyproject_text = (REPO / "pyproject.toml").read_text()
    env = pip_env()
    args.venvs.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ends": {},
    }
    failed = []
    for end in args.ends:
        venv = args.venvs / end
        log = args.venvs / f"{end}.log"
        log.write_text("")
        build_s, pins = build(end, venv, pyproject_text, env, log)
        python = venv / "bin" / "python"
        versions = installed_versions(python, env)
        wrong = [pin for pin in pins if not same_version(versions.get(requirement(pin)[0]), pin.split("==")[1])]
        entry: dict[str, Any] = {"versions": versions, "pins": pins, "build_seconds": round(build_s, 1)}
        if wrong:
            entry["error"] = f"installed versions differ from the pins {wrong}: {versions}"
            failed.append(end)
        elif not args.build_only:
            print(
                f"test_compat: {end}: torch {versions['torch']}, torchvision {versions['torchvision']}: "
                f"python -m pytest -q {' '.join(pytest_args)}",
                flush=True,
            )
            code, seconds, summary = run([str(python), "-m", "pytest", "-q", *pytest_args], log, env)
            entry.update(suite_seconds=round(seconds, 1), suite_exit_code=code, summary=summary)
            if code:
                failed.append(end)
        entry["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        report["ends"][end] = entry
    # An end not run this time keeps its last entry (with its date): `--ends oldest` then `--ends newest`
    # leave one report of both.
    path = args.venvs / "report.json"
    earlier = json.loads(path.read_text()).get("ends", {}) if path.is_file() else {}
    report["ends"] = {**{k: v for k, v in earlier.items() if k not in report["ends"]}, **report["ends"]}
    path.write_text(json.dumps(report, indent=2) + "\n")
    print("\ntest_compat:")
    for end, entry in report["ends"].items():
        v = entry["versions"]
        others = ", ".join(f"{k} {v[k]}" for k in REPORTED if k not in ("torch", "torchvision"))
        state = entry.get("error") or (
            f"{entry.get('summary') or 'no summary'} in {entry['suite_seconds']:.0f} s"
            if "suite_seconds" in entry
            else "built"
        )
        print(
            f"  {end}: torch {v['torch']} / torchvision {v['torchvision']} ({others}); build "
            f"{entry['build_seconds']:.0f} s; {state}"
        )
    print(f"  report: {args.venvs / 'report.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
