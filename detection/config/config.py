"""Configuration: a dict-like, attribute-access config tree on PyYAML with `_BASE_` and `KEY VALUE` overrides.

Why not yacs: it is unmaintained and has no `_BASE_` inheritance; what detectron2 users rely on here
(`_BASE_`, overrides from the command line, a clear error for a misspelt key) is small enough to keep in
one module. Every key must exist in `detection.config.defaults.DEFAULTS`, except the user dataset names under
`DATASETS.CATALOG`, which are free-form.
"""

from __future__ import annotations

import ast
import copy
import difflib
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from cache_format.errors import environment_error
from detection.config.defaults import DEFAULTS
from detection.errors import UserError

BASE_KEY = "_BASE_"
# Dotted keys whose children are free-form (user-chosen names); their values are not type-checked here.
FREE_FORM_KEYS = frozenset({"DATASETS.CATALOG"})


class CfgNode(dict):
    """A config node: a dict whose keys are also attributes; `freeze()` makes the whole tree read-only."""

    def __init__(self, init: Mapping[str, Any] | None = None, key_path: str = "") -> None:
        super().__init__()
        object.__setattr__(self, "_frozen", False)
        object.__setattr__(self, "_key_path", key_path)
        for key, value in (init or {}).items():
            self[key] = value

    # -- dict / attribute access ------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key '{self._full(name)}'") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __setitem__(self, key: str, value: Any) -> None:
        if self.__dict__.get("_frozen", False):
            raise AttributeError(f"cannot set '{self._full(key)}': the config is frozen (call cfg.defrost() first)")
        if isinstance(value, Mapping) and not isinstance(value, CfgNode):
            value = CfgNode(value, key_path=self._full(key))
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        if self.__dict__.get("_frozen", False):
            raise AttributeError(f"cannot delete '{self._full(key)}': the config is frozen")
        super().__delitem__(key)

    def __delattr__(self, name: str) -> None:
        del self[name]

    def _full(self, key: str) -> str:
        prefix = self.__dict__.get("_key_path", "")
        return f"{prefix}.{key}" if prefix else str(key)

    # pickling (DDP workers, DataLoader workers) and deepcopy must carry the frozen flag and key path
    def __reduce__(self):  # type: ignore[override]
        return (_rebuild_node, (self.to_dict(), self.__dict__.get("_key_path", ""), self.is_frozen()))

    def __deepcopy__(self, memo: dict) -> CfgNode:
        return _rebuild_node(copy.deepcopy(self.to_dict(), memo), self._key_path, self.is_frozen())

    # -- state ------------------------------------------------------------------------------------
    def freeze(self) -> CfgNode:
        """Make this node and every child read-only; assignments then raise AttributeError."""
        self._set_frozen(True)
        return self

    def defrost(self) -> CfgNode:
        self._set_frozen(False)
        return self

    def is_frozen(self) -> bool:
        return bool(self.__dict__.get("_frozen", False))

    def _set_frozen(self, frozen: bool) -> None:
        object.__setattr__(self, "_frozen", frozen)
        for value in self.values():
            if isinstance(value, CfgNode):
                value._set_frozen(frozen)

    def clone(self) -> CfgNode:
        """A deep copy (unfrozen state is preserved as is)."""
        return copy.deepcopy(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists (tuples become lists), ready for YAML or JSON."""
        return {k: _to_plain(v) for k, v in self.items()}

    def dump(self) -> str:
        """The config as YAML text that `merge_from_file` reads back to an equal config."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    # -- merging ----------------------------------------------------------------------------------
    def merge_from_file(self, path: str | os.PathLike) -> CfgNode:
        """Merge a YAML file (and its `_BASE_` chain, resolved relative to each file) into this config.

        On any error the config is left unchanged.
        """
        self._check_mutable()
        work = self.clone()
        _merge_file_into(work, Path(path), stack=())
        self._replace_contents(work)
        return self

    def merge_from_list(self, opts: Sequence[str] | None) -> CfgNode:
        """Merge `["KEY", "VALUE", ...]` command-line overrides; values are parsed as YAML scalars/lists.

        On any error the config is left unchanged.
        """
        self._check_mutable()
        opts = list(opts or [])
        if len(opts) % 2 != 0:
            raise UserError(
                f"config overrides must come in KEY VALUE pairs, got {len(opts)} tokens: {opts}",
                "give a value after every key, e.g. `SOLVER.MAX_ITER 100 MODEL.DEVICE cpu`",
            )
        work = self.clone()
        for key, raw in zip(opts[0::2], opts[1::2]):
            if not isinstance(key, str) or not key:
                raise UserError(
                    f"config override key {key!r} is not a dotted key name", "use keys such as SOLVER.BASE_LR"
                )
            _set_dotted(work, key, raw, source="command line")
        self._replace_contents(work)
        return self

    def merge_from_dict(self, values: Mapping[str, Any], source: str = "dict") -> CfgNode:
        """Merge a nested mapping with the same checks as a config file (used by tests and tools)."""
        self._check_mutable()
        work = self.clone()
        _merge_mapping(work, values, prefix="", source=source)
        self._replace_contents(work)
        return self

    def _check_mutable(self) -> None:
        if self.is_frozen():
            raise AttributeError("cannot merge into a frozen config (call cfg.defrost() first)")

    def _replace_contents(self, other: CfgNode) -> None:
        dict.clear(self)
        for key, value in other.items():
            self[key] = value


def _rebuild_node(data: dict, key_path: str, frozen: bool) -> CfgNode:
    node = CfgNode(data, key_path=key_path)
    if frozen:
        node.freeze()
    return node


def _to_plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


# -- file loading ----------------------------------------------------------------------------------
def _load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(
            f"config file not found: {path}",
            "check the --config-file path (relative paths are resolved from the current directory, "
            "_BASE_ paths from the file that names them)",
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(
            f"config file {path} is not valid YAML{where}: {problem}", "fix the YAML syntax at that position"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(
            f"config file {path} must hold a mapping of KEY: value, got {type(data).__name__}",
            "write the config as nested `KEY: value` lines, e.g. `SOLVER:\\n  MAX_ITER: 100`",
        )
    return data


def _merge_file_into(cfg: CfgNode, path: Path, stack: tuple[Path, ...]) -> None:
    resolved = path.resolve()
    if resolved in stack:
        chain = " -> ".join(str(p) for p in (*stack, resolved))
        raise UserError(
            f"_BASE_ cycle in config files: {chain}",
            "remove the _BASE_ entry that points back to a file already in the chain",
        )
    data = _load_yaml(path)
    bases = data.pop(BASE_KEY, None)
    if bases is not None:
        if isinstance(bases, str):
            bases = [bases]
        if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
            raise UserError(
                f"_BASE_ in {path} must be a file path or a list of paths, got {bases!r}",
                "write e.g. `_BASE_: ../Base-RetinaNet.yaml`",
            )
        for base in bases:
            base_path = Path(os.path.expanduser(base))
            if not base_path.is_absolute():
                base_path = path.parent / base_path
            _merge_file_into(cfg, base_path, (*stack, resolved))
    _merge_mapping(cfg, data, prefix="", source=str(path))


# -- key checks and value parsing ------------------------------------------------------------------
def _all_keys(node: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        full = f"{prefix}.{key}" if prefix else key
        keys.append(full)
        if isinstance(value, Mapping) and full not in FREE_FORM_KEYS:
            keys.extend(_all_keys(value, full))
    return keys


def _unknown_key(full_key: str, source: str) -> UserError:
    valid = _all_keys(DEFAULTS)
    close = difflib.get_close_matches(full_key, valid, n=3, cutoff=0.6)
    if not close:  # a misplaced leaf (right name, wrong section) is also worth suggesting
        leaf = full_key.rsplit(".", 1)[-1]
        close = [k for k in valid if k.rsplit(".", 1)[-1] == leaf][:3]
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return UserError(
        f"unknown config key '{full_key}' (from {source})",
        f"{hint}every valid key is listed in detection/config/defaults.py",
    )


def _is_free_form(prefix: str) -> bool:
    return any(prefix == k or prefix.startswith(k + ".") for k in FREE_FORM_KEYS)


def _merge_mapping(cfg: CfgNode, values: Mapping[str, Any], prefix: str, source: str) -> None:
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key == BASE_KEY:
            raise UserError(
                f"_BASE_ may only appear at the top level of a config file ({source})",
                "move _BASE_ to the first line of the file",
            )
        if _is_free_form(prefix):
            cfg[key] = copy.deepcopy(value)
            continue
        if key not in cfg:
            raise _unknown_key(full, source)
        current = cfg[key]
        if isinstance(current, CfgNode):
            if full in FREE_FORM_KEYS and value is None:
                continue
            if not isinstance(value, Mapping):
                raise UserError(
                    f"config key '{full}' (from {source}) is a section, got the value {value!r}",
                    f"give the keys inside it, e.g. `{full}.<KEY> VALUE`, or a mapping in YAML",
                )
            _merge_mapping(current, value, full, source)
        else:
            cfg[key] = _coerce(full, value, current, source)


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def _coerce(full_key: str, value: Any, default: Any, source: str, raw: str | None = None) -> Any:
    """Check that `value` may replace `default`; int -> float and tuple -> list are widened."""
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        if value is None:  # `WEIGHTS:` with nothing after it in YAML means "empty"
            return ""
        if raw is not None and not isinstance(value, (list, dict)):
            return raw  # e.g. `OUTPUT_DIR 2024`: the user meant the text
    elif isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            if default:  # element types follow the default's first element
                return [_coerce(f"{full_key}[{i}]", v, default[0], source) for i, v in enumerate(value)]
            return list(value)
        if value is not None and not isinstance(value, Mapping):
            # a single value for a list key, e.g. `INPUT.MIN_SIZE_TRAIN 640` or `DATASETS.TRAIN synth_train`
            return _coerce(full_key, [value], default, source)
    elif default is None:
        return value
    shown = raw if raw is not None else value
    expected = _type_name(default)
    article = "an" if expected[0] in "aeiou" else "a"
    raise UserError(
        f"config key '{full_key}' (from {source}) expects {article} {expected} "
        f"(current value {default!r}), got {shown!r} ({_type_name(value)})",
        f"give {article} {expected} value for {full_key}",
    )


def _parse_override(raw: Any) -> Any:
    """detectron2-style value parsing: YAML first (numbers, bools, [lists]), then Python literals."""
    if not isinstance(raw, str):
        return raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        try:  # "(640, 672)" as detectron2 users write tuples
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            pass
    return value


def _set_dotted(cfg: CfgNode, key: str, raw: Any, source: str) -> None:
    parts = key.split(".")
    node: CfgNode = cfg
    prefix = ""
    for i, part in enumerate(parts[:-1]):
        full = ".".join(parts[: i + 1])
        if _is_free_form(prefix):
            break
        if part not in node:
            raise _unknown_key(key, source)
        child = node[part]
        if not isinstance(child, CfgNode):
            raise _unknown_key(key, source)
        node, prefix = child, full
    value = _parse_override(raw)
    consumed = len(prefix.split(".")) if prefix else 0
    rest = parts[consumed:]
    if _is_free_form(prefix):
        # DATASETS.CATALOG.<name>[.<field>]: create the path as given
        for part in rest[:-1]:
            if not isinstance(node.get(part), CfgNode):
                node[part] = {}
            node = node[part]
        node[rest[-1]] = value
        return
    leaf = rest[-1]
    if leaf not in node:
        raise _unknown_key(key, source)
    current = node[leaf]
    if isinstance(current, CfgNode):
        if not isinstance(value, Mapping):
            raise UserError(
                f"config key '{key}' (from {source}) is a section, got the value {raw!r}",
                f"set a key inside it, e.g. `{key}.<KEY> VALUE`",
            )
        _merge_mapping(current, value, key, source)
        return
    node[leaf] = _coerce(key, value, current, source, raw=raw if isinstance(raw, str) else None)


# -- public helpers --------------------------------------------------------------------------------
def get_cfg() -> CfgNode:
    """A fresh, unfrozen deep copy of the default config tree."""
    return CfgNode(copy.deepcopy(DEFAULTS))


def setup_cfg(
    config_file: str | os.PathLike | None, opts: Sequence[str] | None = None, freeze: bool = False
) -> CfgNode:
    """Defaults, then the config file (with its _BASE_ chain), then KEY VALUE overrides: what every CLI does."""
    cfg = get_cfg()
    if config_file:
        cfg.merge_from_file(config_file)
    if opts:
        cfg.merge_from_list(list(opts))
    if freeze:
        cfg.freeze()
    return cfg


def save_config(cfg: CfgNode, output_dir: str | os.PathLike | None = None) -> Path:
    """Write `<output_dir>/config.yaml` (default: cfg.OUTPUT_DIR) atomically, so a crash never leaves half a file."""
    out = Path(output_dir if output_dir is not None else cfg.OUTPUT_DIR)
    target = out / "config.yaml"
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".yaml.tmp", dir=out)
    except OSError as exc:  # a read-only or full disk, a file in the way: say so before any work starts
        error = environment_error(exc, f"writing {target} (OUTPUT_DIR)", UserError)
        if error is None:
            raise
        raise error from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(cfg.dump())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a config is meant to be shared
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target
