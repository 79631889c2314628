"""Device mesh and logical-axis sharding rules (DESIGN.md "Sharding").

Mesh axes are ("data", "fsdp", "tensor"), sizes from the `mesh` config section with at most one -1
(inferred from the device count), Auto axis types (GSPMD propagates everything not pinned here).

Params carry logical axis names (`param_logical_axes`, e.g. ('layers', 'embed', 'heads', 'head_dim'));
a rules table maps each logical name to mesh axes. A dimension whose size does not divide the product
of its mesh axes' sizes is replicated instead, with one log line per param. Nothing here touches
concrete arrays, so the same code works for the devices of a TPU topology description
(`jax.experimental.topologies`) that this host cannot run on.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kava_jax.models import ModelConfig, param_logical_axes

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# (logical axis name, mesh axes or None). Earlier entries win, so extra rules are prepended.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("seq", None),
    ("latent", None),
    ("head_dim", None),
    ("norm", None),
    ("lora", None),
)

_LOGGED: set = set()


# ----------------------------------------------------------------------------------------- mesh
def _field(cfg: Any, name: str) -> Any:
    if isinstance(cfg, Mapping):
        if name not in cfg:
            raise ValueError(f"mesh.{name}: missing from the mesh config")
        return cfg[name]
    if not hasattr(cfg, name):
        raise ValueError(f"mesh.{name}: missing from the mesh config")
    return getattr(cfg, name)


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes from a mesh config (ConfigDict, dict or object), one -1 inferred.

    Raises ValueError naming the field for a non-integer or < 1 size (other than -1), for two or more
    -1 fields, and when the sizes do not multiply to `num_devices`.
    """
    sizes = {}
    for name in MESH_AXES:
        v = _field(mesh_cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"mesh.{name}: must be an int (>= 1, or -1 to infer), got {v!r}")
        v = int(v)
        if v != -1 and v < 1:
            raise ValueError(f"mesh.{name}: must be >= 1 or -1 (inferred), got {v}")
        sizes[name] = v
    inferred = [n for n in MESH_AXES if sizes[n] == -1]
    if len(inferred) > 1:
        raise ValueError(f"mesh.{' and mesh.'.join(inferred)}: only one mesh axis may be -1 (inferred), "
                         f"got {sizes}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if inferred:
        name = inferred[0]
        if num_devices % fixed:
            others = ", ".join(f"mesh.{n}={sizes[n]}" for n in MESH_AXES if n != name)
            raise ValueError(f"mesh.{name}=-1 cannot be inferred: {num_devices} devices are not divisible by "
                             f"{others} (product {fixed})")
        sizes[name] = num_devices // fixed
    elif fixed != num_devices:
        desc = " x ".join(f"mesh.{n}={sizes[n]}" for n in MESH_AXES)
        raise ValueError(f"mesh sizes {desc} = {fixed} do not match the {num_devices} devices; "
                         "set one of mesh.data / mesh.fsdp / mesh.tensor to -1 to infer it")
    return tuple(sizes[n] for n in MESH_AXES)


def make_mesh(mesh_cfg: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") Mesh with Auto axis types over `devices` (default jax.devices()).

    Devices are laid out with `mesh_utils.create_device_mesh` (topology-aware on TPU) and fall back to
    their given order when that refuses the shape.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError, KeyError):
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# ---------------------------------------------------------------------------------------- rules
def resolve_rules(rules: Sequence[Sequence[Any]] | None = None) -> dict[str, tuple[str, ...]]:
    """{logical name: tuple of mesh axes} from `rules` (pairs, taking precedence) + DEFAULT_RULES.

    A rule's mesh part is None (replicate), one axis name or a sequence of axis names.
    """
    out: dict[str, tuple[str, ...]] = {}
    for i, rule in enumerate(list(rules or ()) + list(DEFAULT_RULES)):
        if isinstance(rule, str) or len(rule) != 2:
            raise ValueError(f"mesh.rules[{i}]: each rule must be a (logical_name, mesh_axes) pair, got {rule!r}")
        name, axes = rule
        if not isinstance(name, str):
            raise ValueError(f"mesh.rules[{i}]: logical name must be a string, got {name!r}")
        if axes is None:
            axes = ()
        elif isinstance(axes, str):
            axes = (axes,)
        axes = tuple(axes)
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ValueError(f"mesh.rules[{i}] ({name!r}): unknown mesh axes {bad}; mesh axes are {MESH_AXES}")
        out.setdefault(name, axes)
    return out


def spec_for(logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
             rules: Sequence[Sequence[Any]] | dict | None = None, name: str = "array") -> P:
    """Mesh PartitionSpec for one array of `shape` with logical axis names `logical` (None: replicate).

    A mesh axis already used by an earlier dimension, or a dimension that its mesh axes do not divide,
    leaves that dimension replicated (logged once per `name`). Unknown logical names raise ValueError.
    """
    table = rules if isinstance(rules, dict) else resolve_rules(rules)
    shape = tuple(int(s) for s in shape)
    if logical is None:
        return P(*([None] * len(shape)))
    logical = tuple(logical)
    if len(logical) != len(shape):
        raise ValueError(f"{name}: logical axes {logical} do not match its rank (shape {shape})")
    used: set[str] = set()
    out: list[Any] = []
    for dim, (lname, size) in enumerate(zip(logical, shape, strict=True)):
        if lname is None:
            out.append(None)
            continue
        if lname not in table:
            raise ValueError(f"{name}: logical axis {lname!r} has no sharding rule; known: {sorted(table)} "
                             "(add one via mesh.rules)")
        axes = tuple(a for a in table[lname] if a not in used)
        if not axes:
            out.append(None)
            continue
        n = math.prod(mesh.shape[a] for a in axes)
        if size % n:
            key = (name, shape, logical, tuple(mesh.shape.items()))
            if key not in _LOGGED:
                _LOGGED.add(key)
                log.info("sharding: %s dim %d (%r, size %d) does not divide mesh axes %s (size %d); replicated",
                         name, dim, lname, size, axes, n)
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return P(*out)


def rules_list(rules: Sequence[Sequence[Any]] | None = None) -> list[tuple[str, Any]]:
    """The resolved rules as flax `logical_axis_rules` pairs: (name, None | axis | tuple of axes)."""
    return [(k, None if not v else v[0] if len(v) == 1 else v) for k, v in resolve_rules(rules).items()]


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Sequence[Sequence[Any]] | None = None):
    """Context for tracing a sharded computation: sets `mesh` as the abstract mesh and the logical
    rules as flax's `logical_axis_rules`, so activation constraints written in the model as
    `nn.with_logical_constraint(x, ("batch", None, None))` pin x [B,T,D] to the batch axes (they are
    no-ops outside this context). Without such constraints GSPMD may propagate FSDP weight shardings
    ('embed' -> fsdp) into the activations and replicate the batch dimension instead."""
    import flax.linen as nn

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules_list(rules)):
        yield


def _keystr(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def logical_shardings(logical_specs_tree: Any, abstract_tree: Any, mesh: Mesh,
                      rules: Sequence[Sequence[Any]] | None = None) -> Any:
    """Tree of NamedSharding (structure of `abstract_tree`, whose leaves have `.shape`).

    `logical_specs_tree` has a logical PartitionSpec / tuple of names / None at each leaf position of
    `abstract_tree` (as `param_logical_axes` returns).
    """
    table = resolve_rules(rules)

    def one(path, leaf, logical):
        return NamedSharding(mesh, spec_for(logical, leaf.shape, mesh, table, _keystr(path)))

    return jax.tree_util.tree_map_with_path(one, abstract_tree, logical_specs_tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_shardings(batch_abstract: Any, mesh: Mesh, rules: Sequence[Sequence[Any]] | None = None) -> Any:
    """NamedSharding per batch array: leading (batch) dim over the `batch` rule's axes, the rest replicated."""
    table = resolve_rules(rules)

    def one(path, leaf):
        logical = ("batch",) + (None,) * (len(leaf.shape) - 1) if leaf.shape else None
        return NamedSharding(mesh, spec_for(logical, leaf.shape, mesh, table, "batch/" + _keystr(path)))

    return jax.tree_util.tree_map_with_path(one, batch_abstract)


# ----------------------------------------------------------------- logical axes of the train trees
_PRJ_AXES = {"w1": ("embed", None), "w2": ("embed", None)}


def _model_axes_lookup(model_config: ModelConfig) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(param_logical_axes(model_config))


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def params_logical_axes(tree: Any, model_config: ModelConfig) -> Any:
    """Logical specs for a tree of decoder params (base, LoRA-only or full), matched by path."""
    lookup = _model_axes_lookup(model_config)

    def one(path, leaf):
        key = _path_names(path)
        if key not in lookup:
            raise ValueError(f"params_logical_axes: {'/'.join(key)} is not a parameter of this model config")
        return lookup[key]

    return jax.tree_util.tree_map_with_path(one, tree)


def trainable_logical_axes(trainable: Any, model_config: ModelConfig) -> dict[str, Any]:
    """Logical specs for the trainable tree of `kava.objective.init_trainable`.

    lora / params: the model's own logical axes; prj w1/w2 [D,D]: ('embed', None), its vectors
    replicated; special_embed [n_special, D]: replicated (a few rows).
    """
    out: dict[str, Any] = {}
    for key, sub in trainable.items():
        if key in ("lora", "params"):
            out[key] = params_logical_axes(sub, model_config)
        elif key == "prj":
            out[key] = {k: _PRJ_AXES.get(k) for k in sub}
        elif key == "special_embed":
            out[key] = None
        else:
            raise ValueError(f"trainable_logical_axes: unknown trainable entry {key!r} "
                             "(expected lora, params, prj, special_embed)")
    return out


def opt_state_shardings(opt_state_abstract: Any, params_shardings: Any, params_abstract: Any,
                        mesh: Mesh) -> Any:
    """Shardings for an optimizer state: each leaf whose path ends with a param's path (and has that
    param's shape) takes the param's sharding (Adam mu / nu etc.); everything else (counts, injected
    hyper-parameters) is replicated."""
    flat_sh = {_path_names(p): s for p, s in jax.tree_util.tree_leaves_with_path(params_shardings)}
    flat_ab = {_path_names(p): a.shape for p, a in jax.tree_util.tree_leaves_with_path(params_abstract)}
    lengths = sorted({len(k) for k in flat_sh}, reverse=True)
    rep = replicated(mesh)

    def one(path, leaf):
        names = _path_names(path)
        for n in lengths:
            if n <= len(names) and names[-n:] in flat_sh and tuple(flat_ab[names[-n:]]) == tuple(leaf.shape):
                return flat_sh[names[-n:]]
        if getattr(leaf, "ndim", 0):
            log.info("sharding: optimizer state leaf %s %s matches no param; replicated", _keystr(path), leaf.shape)
        return rep

    return jax.tree_util.tree_map_with_path(one, opt_state_abstract)


def describe_shardings(tree: Any) -> dict[str, str]:
    """{path: str(PartitionSpec)} of a NamedSharding tree, for logs and tests."""
    return {_keystr(p): str(s.spec) for p, s in jax.tree_util.tree_leaves_with_path(tree)}


__all__ = ["MESH_AXES", "DEFAULT_RULES", "mesh_shape", "make_mesh", "resolve_rules", "rules_list",
           "activation_sharding", "spec_for",
           "logical_shardings", "replicated", "batch_shardings", "params_logical_axes",
           "trainable_logical_axes", "opt_state_shardings", "describe_shardings"]
