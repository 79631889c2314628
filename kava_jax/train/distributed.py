"""Starting `jax.distributed` for multi-host runs (config.distributed=True).

`initialize_distributed(config)` must run before anything touches a JAX backend (no jax.devices(),
no arrays). Where the coordinator and the process's rank come from, first match wins per field:

  1. config fields `coordinator_address`, `num_processes`, `process_id`, when the config has them;
  2. environment: KAVA_COORDINATOR (or KAVA_COORDINATOR_ADDRESS), KAVA_NUM_PROCESSES, KAVA_PROCESS_ID,
     or JAX's names JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (a KAVA_ and a JAX_
     variable for the same field must agree);
  3. JAX's own cluster detection (Cloud TPU pods, SLURM, Open MPI, Kubernetes), which needs none of
     the above: on a TPU pod `--config.distributed=True` alone is enough.

Note: `jax.distributed.initialize()` without arguments reads only JAX_COORDINATOR_ADDRESS (and
JAX_LOCAL_DEVICE_IDS) from the environment; it does NOT read JAX_NUM_PROCESSES / JAX_PROCESS_ID,
so a hand-started run outside a detected cluster (e.g. two local processes) needs this helper.

CPU: when the CPU backend may be used (JAX_PLATFORMS unset or naming cpu), cross-process CPU
collectives are set to gloo (`jax_cpu_collectives_implementation`) unless
JAX_CPU_COLLECTIVES_IMPLEMENTATION chooses another; without them a multi-process CPU computation
cannot all-reduce. (Fake CPU devices per process: XLA_FLAGS=--xla_force_host_platform_device_count=N
must be in the environment before JAX starts.)

KAVA_DISTRIBUTED_TIMEOUT (seconds, default 300) bounds how long a process waits for the others to
connect; a missing peer then fails with JAX's error instead of hanging forever.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax

log = logging.getLogger(__name__)

__all__ = ["DistributedArgs", "distributed_args", "initialize_distributed"]

# field -> environment variables that may carry it (all that are set must agree)
ENV_VARS = {
    "coordinator_address": ("KAVA_COORDINATOR", "KAVA_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("KAVA_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("KAVA_PROCESS_ID", "JAX_PROCESS_ID"),
}
TIMEOUT_VAR = "KAVA_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class DistributedArgs:
    """Arguments for jax.distributed.initialize; None = left to JAX's cluster detection."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    initialization_timeout: int

    @property
    def explicit(self) -> bool:
        """True when the coordinator and rank were given (no cluster detection needed)."""
        return None not in (self.coordinator_address, self.num_processes, self.process_id)


def _config_value(config: Any, field: str) -> Any:
    if config is None:
        return None
    try:
        return config.get(field) if hasattr(config, "get") else getattr(config, field, None)
    except (AttributeError, KeyError):
        return None


def _int(value: Any, where: str, minimum: int) -> int:
    try:
        out = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{where}: expected an integer >= {minimum}, got {value!r}") from None
    if out < minimum:
        raise ValueError(f"{where}: expected an integer >= {minimum}, got {out}")
    return out


def _address(value: Any, where: str) -> str:
    addr = str(value).strip()
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{where}: expected 'host:port' (e.g. 10.0.0.2:8476 or 127.0.0.1:12345), got {value!r}")
    return addr


def distributed_args(config: Any = None, environ: Mapping[str, str] | None = None) -> DistributedArgs:
    """Resolves the coordinator address, process count and process id (see the module docstring).

    Pure: reads only `config` and `environ` (default os.environ). Raises ValueError naming the
    config field / environment variable for a malformed or conflicting value, for only one of
    num_processes / process_id given, or for process_id >= num_processes.
    """
    env = os.environ if environ is None else environ
    found: dict[str, tuple[Any, str]] = {}
    for field, names in ENV_VARS.items():
        value = _config_value(config, field)
        if value is not None:
            found[field] = (value, f"config.{field}")
            continue
        hits = [(n, env[n]) for n in names if env.get(n, "").strip()]
        if hits:
            parse = _address if field == "coordinator_address" else (lambda v, w: _int(v, w, 0))
            parsed = {n: parse(v, n) for n, v in hits}
            if len(set(parsed.values())) > 1:
                raise ValueError(f"conflicting {field} in the environment: "
                                 + ", ".join(f"{n}={v!r}" for n, v in hits))
            found[field] = (hits[0][1], hits[0][0])
    addr = _address(*found["coordinator_address"]) if "coordinator_address" in found else None
    num = _int(*found["num_processes"], 1) if "num_processes" in found else None
    pid = _int(*found["process_id"], 0) if "process_id" in found else None
    if (num is None) != (pid is None):
        given, missing = ("num_processes", "process_id") if pid is None else ("process_id", "num_processes")
        raise ValueError(f"{found[given][1]} is set but {missing} is not (set config.{missing} or one of "
                         f"{', '.join(ENV_VARS[missing])}); give both, or neither to let JAX detect the cluster")
    if num is not None and pid >= num:
        raise ValueError(f"process_id {pid} ({found['process_id'][1]}) must be < num_processes {num} "
                         f"({found['num_processes'][1]})")
    if num is not None and addr is None:
        raise ValueError(f"num_processes / process_id are set ({found['num_processes'][1]}, "
                         f"{found['process_id'][1]}) but no coordinator address: set config.coordinator_address "
                         f"or one of {', '.join(ENV_VARS['coordinator_address'])} to process 0's 'host:port'")
    timeout = _int(env.get(TIMEOUT_VAR, DEFAULT_TIMEOUT_S), TIMEOUT_VAR, 1)
    return DistributedArgs(addr, num, pid, timeout)


def _cpu_possible(environ: Mapping[str, str]) -> bool:
    platforms = jax.config.jax_platforms or environ.get("JAX_PLATFORMS", "")
    names = {p.strip().lower() for p in str(platforms or "").split(",") if p.strip()}
    return not names or "cpu" in names


def initialize_distributed(config: Any = None, *, environ: Mapping[str, str] | None = None) -> bool:
    """Starts jax.distributed for this process (no-op when it is already started).

    Call it first thing in a multi-host program, before any JAX computation or jax.devices().
    Returns True if this call initialised it, False if it already was. Raises ValueError for bad
    settings (see `distributed_args`) and RuntimeError when a JAX backend is already running.
    """
    env = os.environ if environ is None else environ
    if jax.distributed.is_initialized():
        return False
    args = distributed_args(config, env)
    if _cpu_possible(env) and not env.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        if jax.config.jax_cpu_collectives_implementation != "gloo":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info("jax.distributed.initialize(coordinator=%s, num_processes=%s, process_id=%s)%s",
             args.coordinator_address, args.num_processes, args.process_id,
             "" if args.explicit else " (the rest from JAX's cluster detection)")
    try:
        jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                                   process_id=args.process_id, initialization_timeout=args.initialization_timeout)
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise RuntimeError("initialize_distributed: a JAX backend is already running in this process; call it "
                               "before any JAX computation or jax.devices() (first thing in main)") from e
        raise
    except ValueError as e:
        raise ValueError(f"jax.distributed.initialize could not find its settings ({e}); outside a detected "
                         f"cluster (Cloud TPU, SLURM, Open MPI, Kubernetes) set "
                         f"{ENV_VARS['coordinator_address'][0]}, {ENV_VARS['num_processes'][0]} and "
                         f"{ENV_VARS['process_id'][0]} (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                         "JAX_PROCESS_ID)") from e
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
