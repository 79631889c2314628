"""Sweep expansion: override dicts -> runs with distinct names and exact CLI flags.

An *override dict* maps dotted config keys to values, e.g. ``{"kava.lam": 0.1, "seed": 1}``; one
dict is one run. An *axis* is a list of override dicts. Sweep files (``configs/sweeps/*.py``) build
their list of runs from axes and return it from ``get_sweep(arg=None)``:

    product(axis("kava.kv_loss_type", ["l1", "mse"]), axis("kava.alpha_kv", [1.0, 2.0]))   # 4 runs
    zip_(axis("kava.num_latents", [12, 24]), axis("kava.num_iterations", [2, 3]))          # 2 runs
    chain([{"kava.compression": "crop"}], axis("kava.lam", [0.0, 1.0]))                    # 3 runs

A run reaches `kava-train` as ``--config.<key>=<value>`` flags (`to_cli_flags`), which ml_collections'
`config_flags` parses back with the field's own type: bools, ints, floats, strings, tuples (as
Python literals) and, on fields made overridable by `make_overridable`, None.

Nothing here touches JAX: it is host-side bookkeeping for `launch/sweep.py` and the config files.
"""

from __future__ import annotations

import ast
import copy
import difflib
import hashlib
import importlib.util
import itertools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import ml_collections
from ml_collections import config_dict

__all__ = [
    "Overrides",
    "axis",
    "product",
    "zip_",
    "chain",
    "expand",
    "apply_overrides",
    "run_name",
    "to_cli_flags",
    "make_overridable",
    "parse_arg",
    "load_module",
]

Overrides = dict[str, Any]

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_SLUG_BAD = re.compile(r"[^A-Za-z0-9.=+-]+")
_SCALARS = (bool, int, float, str, type(None))


# ----------------------------------------------------------------------------------- building sweeps


def _check_value(key: str, value: Any) -> None:
    """Values must survive `to_cli_flags` -> config_flags: scalars, None, (nested) tuples, dicts."""
    if isinstance(value, _SCALARS):
        return
    if isinstance(value, tuple):
        for v in value:
            _check_value(key, v)
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"override {key!r}: dict keys must be strings, got {k!r}")
            _check_value(f"{key}.{k}", v)
        return
    if isinstance(value, list):
        raise ValueError(f"override {key!r}: lists cannot be passed as config flags; use a tuple: {tuple(value)!r}")
    raise ValueError(f"override {key!r}: unsupported value type {type(value).__name__} ({value!r})")


def _check_overrides(ov: Any, where: str) -> Overrides:
    if not isinstance(ov, Mapping):
        raise ValueError(f"{where}: expected a dict of {{dotted.key: value}}, got {type(ov).__name__} ({ov!r})")
    out: Overrides = {}
    for key, value in ov.items():
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(f"{where}: bad config key {key!r} (expected dotted identifiers like 'kava.lam')")
        _check_value(key, value)
        out[key] = value
    return out


def _check_axis(ax: Any, where: str) -> list[Overrides]:
    if isinstance(ax, Mapping) or isinstance(ax, (str, bytes)) or not isinstance(ax, Iterable):
        raise ValueError(f"{where}: an axis is a list of override dicts, got {type(ax).__name__} ({ax!r})")
    return [_check_overrides(ov, f"{where}[{i}]") for i, ov in enumerate(ax)]


def _merge(parts: Sequence[Overrides], where: str) -> Overrides:
    out: Overrides = {}
    for part in parts:
        clash = sorted(set(out) & set(part))
        if clash:
            raise ValueError(f"{where}: key(s) {clash} are set by more than one axis")
        out.update(part)
    return out


def axis(key: str, values: Iterable[Any]) -> list[Overrides]:
    """One axis over one key: axis("seed", [0, 1]) == [{"seed": 0}, {"seed": 1}]."""
    return _check_axis([{key: v} for v in values], f"axis({key!r})")


def product(*axes: Sequence[Overrides]) -> list[Overrides]:
    """Cartesian product of axes (the last axis varies fastest); the axes must set disjoint keys."""
    checked = [_check_axis(a, f"product axis {i}") for i, a in enumerate(axes)]
    return [_merge(combo, "product") for combo in itertools.product(*checked)]


def zip_(*axes: Sequence[Overrides]) -> list[Overrides]:
    """Element-wise merge of equally long axes (disjoint keys)."""
    checked = [_check_axis(a, f"zip_ axis {i}") for i, a in enumerate(axes)]
    lengths = [len(a) for a in checked]
    if len(set(lengths)) > 1:
        raise ValueError(f"zip_: axes must have equal lengths, got {lengths}")
    return [_merge(combo, "zip_") for combo in zip(*checked, strict=True)]


def chain(*axes: Sequence[Overrides]) -> list[Overrides]:
    """Concatenation of axes (runs of the first, then of the second, ...)."""
    return [ov for i, a in enumerate(axes) for ov in _check_axis(a, f"chain axis {i}")]


def _canonical(ov: Overrides) -> str:
    """Order-independent text of an override dict (the identity of a run)."""
    return json.dumps({k: repr(ov[k]) for k in sorted(ov)}, sort_keys=True)


def expand(sweep: Any) -> list[Overrides]:
    """The runs of a sweep: a list of override dicts (what `get_sweep` returns) or a single dict.

    Checks every key and value, and that no two runs are equal or share a `run_name`.
    Returns plain dicts (copies) in order.
    """
    runs = [_check_overrides(sweep, "sweep")] if isinstance(sweep, Mapping) else _check_axis(sweep, "sweep")
    if not runs:
        raise ValueError("sweep: no runs (empty list)")
    seen: dict[str, int] = {}
    names: dict[str, int] = {}
    for i, ov in enumerate(runs):
        c = _canonical(ov)
        if c in seen:
            raise ValueError(f"sweep: runs {seen[c]} and {i} are identical: {ov!r}")
        seen[c] = i
        name = run_name(ov)
        if name in names:
            raise ValueError(f"sweep: runs {names[name]} and {i} map to the same run name {name!r}")
        names[name] = i
    return [dict(ov) for ov in runs]


# ------------------------------------------------------------------------------------ configs


def _walk(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    """(holder, leaf name) of dotted `key`, or KeyError naming the missing part and close matches."""
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "the config"
        if not isinstance(node, ml_collections.ConfigDict):
            raise KeyError(f"unknown config key {key!r}: {where} is a {type(node).__name__}, not a section")
        if part not in node:
            close = difflib.get_close_matches(part, list(node.keys()), n=3)
            hint = f"; did you mean {', '.join(repr('.'.join(parts[:i] + [c])) for c in close)}?" if close else ""
            raise KeyError(f"unknown config key {key!r}: no field {part!r} in {where}{hint}")
        if i == len(parts) - 1:
            return node, part
        node = node[part]
    raise AssertionError("unreachable")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A deep copy of `config` with the dotted overrides set (the input is not changed).

    Raises KeyError naming an unknown key (with close matches) and ValueError naming a key whose
    value does not fit the field's type. New keys are never added, locked config or not.
    """
    ov = _check_overrides(overrides, "overrides")
    out = copy.deepcopy(config)
    for key, value in ov.items():
        holder, leaf = _walk(out, key)
        if isinstance(value, Mapping) and isinstance(holder[leaf], ml_collections.ConfigDict):
            value = ml_collections.ConfigDict(dict(value))
        try:
            holder[leaf] = value
        except (TypeError, ValueError) as e:
            raise ValueError(f"config key {key!r}: cannot set {value!r}: {e}") from e
    return out


def make_overridable(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Turns every None leaf into an untyped placeholder (in place; returns `config`).

    config_flags refuses `--config.a=...` on a field whose value is None (its type is NoneType).
    A `FieldReference(None, field_type=object)` instead accepts any Python literal from the command
    line (`5`, `'/path'`, `None`); a string that is not a literal stays a string.
    """
    for key, value in list(config.items(preserve_field_references=True)):
        if isinstance(value, ml_collections.ConfigDict):
            make_overridable(value)
        elif value is None:
            config[key] = config_dict.FieldReference(None, field_type=object)
    return config


def _field_type(config: ml_collections.ConfigDict | None, key: str) -> type | None:
    if config is None:
        return None
    holder, leaf = _walk(config, key)
    return holder.get_type(leaf)


def _flag_value(key: str, value: Any, ftype: type | None) -> str:
    literal = ftype is object  # an untyped placeholder: config_flags parses it with ast.literal_eval
    if value is None:
        if ftype is not None and not literal:
            raise ValueError(
                f"to_cli_flags: {key!r} has type {ftype.__name__}; None can only be passed to a field whose "
                "default is None (see make_overridable)")
        return "None"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        if literal and not isinstance(_literal(text), float):
            raise ValueError(f"to_cli_flags: {key!r}={value!r} cannot be written as a literal")
        return text
    if isinstance(value, str):
        if literal:
            return repr(value)
        if ftype is tuple:  # a 1-tuple of one string is what TupleParser makes of a bare string
            return repr((value,))
        return value
    if isinstance(value, Mapping):
        return repr({k: v for k, v in value.items()})
    return repr(value)  # tuples: TupleParser / literal_eval


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (SyntaxError, ValueError):
        return text


def to_cli_flags(overrides: Mapping[str, Any], config: ml_collections.ConfigDict | None = None,
                 *, prefix: str = "config") -> list[str]:
    """argv entries `--config.<key>=<value>` that config_flags parses back to exactly `overrides`.

    Each entry is ONE argv element (for subprocess); join with `shlex.join` for a shell line.
    With `config` (the base the flags will apply to) keys are checked and values are written for
    the field's type: a string for an untyped placeholder (None default) is written as a quoted
    literal, None is refused for typed fields. Without `config` strings are written verbatim
    (right for str fields; a str that looks like a literal, e.g. "3", would change type on an
    untyped field).
    """
    ov = _check_overrides(overrides, "overrides")
    out = []
    for key, value in ov.items():
        ftype = _field_type(config, key)
        out.append(f"--{prefix}.{key}={_flag_value(key, value, ftype)}")
    return out


def _slug_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "+".join(_slug_value(v) for v in value) or "empty"
    if isinstance(value, Mapping):
        return "+".join(f"{k}.{_slug_value(v)}" for k, v in value.items()) or "empty"
    return str(value)


def run_name(overrides: Mapping[str, Any], max_len: int = 64) -> str:
    """A short filesystem- and gs://-safe slug that identifies a run, e.g. 'lam=0.1_compression=rkv-5f3c1a'.

    Readable part: `leaf=value` per key (last component of the dotted key), joined by '_', cut to
    `max_len`; then a 6-hex digest of the full, order-independent overrides, so distinct override
    dicts get distinct names. {} gives 'base'.
    """
    ov = _check_overrides(overrides, "overrides")
    if not ov:
        return "base"
    readable = "_".join(f"{k.rsplit('.', 1)[-1]}={_slug_value(v)}" for k, v in ov.items())
    readable = _SLUG_BAD.sub("_", readable).strip("_.")[:max_len].rstrip("_.")
    digest = hashlib.sha1(_canonical(ov).encode()).hexdigest()[:6]
    return f"{readable}-{digest}"


# --------------------------------------------------------------------------------- small helpers


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """`get_config(arg)` / `get_sweep(arg)` strings: "a=1,b=x,flag" -> typed fields.

    Each default's type decides how its value is read (bool: 'flag' alone or flag=true/false; int;
    float; str). Unknown names raise ValueError listing the known ones.
    """
    out = ml_collections.ConfigDict(dict(defaults))
    for item in (s.strip() for s in (arg or "").split(",")):
        if not item:
            continue
        name, _, raw = item.partition("=")
        if name not in defaults:
            raise ValueError(f"unknown arg {name!r} in {arg!r}; known: {sorted(defaults)}")
        kind = type(defaults[name])
        try:
            if kind is bool:
                if raw.lower() not in ("", "true", "1", "false", "0"):
                    raise ValueError(raw)
                value = raw.lower() in ("", "true", "1")
            elif not raw:
                raise ValueError("empty value")
            else:
                value = kind(raw) if defaults[name] is not None else raw
        except ValueError as e:
            raise ValueError(f"arg {name!r}: cannot read {raw!r} as {kind.__name__} ({e})") from e
        out[name] = value
    return out


def load_module(path: str | Path, name: str | None = None) -> ModuleType:
    """Imports a Python file by path (config and sweep files live outside the package)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    mod_name = name or "kava_cfg_" + re.sub(r"\W", "_", str(path.resolve()))
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
