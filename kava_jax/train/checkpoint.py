"""Checkpoints of a run: an orbax CheckpointManager over <workdir>/checkpoints (no pickle anywhere).

Each step directory holds three items:
  state   the TrainState (step, trainable, opt_state, rng), orbax StandardSave (tensorstore/OCDBT)
  data    the data-iterator state {"epoch", "position", ...} (JSON)
  config  the resolved run config (JSON), so a checkpoint says what produced it

`Checkpointer.save` is asynchronous (device arrays are copied to host before it returns, so the
state may be donated right after); `wait()` blocks until the write is committed. Only the newest
`keep` steps are kept.

`restore_latest(abstract_state)` restores into an abstract TrainState whose leaves are
ShapeDtypeStructs carrying shardings, newest step first:
* a step whose files are missing or unreadable (a partial / corrupted write) is reported with
  logging.warning naming its directory, moved aside to "<step>.corrupt-<time>" and the previous step
  is tried; if every step is unreadable a RuntimeError lists them all;
* a step that is readable but does not match the abstract state (different tree, shapes or dtypes,
  e.g. a changed model or LoRA config) raises ValueError naming the checkpoint directory and the
  differing leaves: resuming it would be wrong, so nothing falls back silently.
Steps still being written (orbax's "*.orbax-checkpoint-tmp-*" directories of a killed run) are never
listed, so they are skipped without a warning.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

__all__ = ["Checkpointer", "CheckpointMismatchError", "load_trainable"]


class CheckpointMismatchError(ValueError):
    """A readable checkpoint whose tree does not match what the run expects."""


def _names(path) -> tuple[str, ...]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def _leaf_table(tree: Any) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_names(p): (tuple(int(d) for d in leaf.shape), str(jax.numpy.dtype(leaf.dtype))) for p, leaf in leaves}


def _compare(saved: dict, wanted: dict, limit: int = 8) -> list[str]:
    """Human-readable differences between two leaf tables (empty when they match)."""
    missing = sorted(k for k in wanted if k not in saved)
    extra = sorted(k for k in saved if k not in wanted)
    bad = sorted(k for k in wanted if k in saved and saved[k] != wanted[k])
    out = []

    def fmt(keys):
        shown = ", ".join("/".join(k) for k in keys[:limit])
        return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")

    if missing:
        out.append(f"not in the checkpoint: {fmt(missing)}")
    if extra:
        out.append(f"only in the checkpoint: {fmt(extra)}")
    if bad:
        out.append("different shape/dtype: " + "; ".join(
            f"{'/'.join(k)} saved {saved[k][0]} {saved[k][1]} vs expected {wanted[k][0]} {wanted[k][1]}"
            for k in bad[:limit]) + (f"; ... ({len(bad)} in all)" if len(bad) > limit else ""))
    return out


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


class Checkpointer:
    """Save / restore TrainStates with their data-iterator state and run config.

    Args:
      directory: checkpoint root (local path or gs://...), created if needed.
      keep: number of newest steps kept (train.keep_checkpoints).
      async_save: write in a background thread (call `wait()` before exiting).
    """

    def __init__(self, directory: str | epath.PathLike, *, keep: int = 3, async_save: bool = True):
        if int(keep) < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}")
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()})

    # ------------------------------------------------------------------------------ save
    def save(self, step: int, state: Any, data_state: Mapping[str, Any], config_json: Mapping[str, Any] | str,
             *, wait: bool = False) -> None:
        """Saves `state` (a TrainState pytree of jax.Arrays) as step `step` (async unless wait=True).

        data_state: JSON-able iterator state; config_json: the resolved config as a dict or JSON string.
        A step that already exists is replaced.
        """
        step = int(step)
        if any(_is_key(x) for x in jax.tree.leaves(state)):
            raise ValueError("Checkpointer.save: the state holds a typed PRNG key; store jax.random.key_data(key)")
        config = json.loads(config_json) if isinstance(config_json, str) else dict(config_json)
        if step in self._manager.all_steps():
            self._manager.wait_until_finished()
            self._manager.delete(step)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state)),
                                  config=ocp.args.JsonSave(config))
        self._manager.save(step, args=args, force=True)
        if wait:
            self.wait()

    def wait(self) -> None:
        """Blocks until every pending save is committed."""
        self._manager.wait_until_finished()

    # ------------------------------------------------------------------------------ queries
    def steps(self) -> list[int]:
        """Committed steps, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(int(step))

    def read_json(self, step: int, item: str = "config") -> dict:
        """The JSON item ("config" or "data") of a step."""
        out = self._manager.restore(int(step), args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
        return dict(out[item])

    # ------------------------------------------------------------------------------ restore
    def _check_tree(self, step: int, abstract_state: Any) -> None:
        """Raises CheckpointMismatchError when the step's saved tree differs from abstract_state;
        other exceptions (unreadable metadata) propagate."""
        meta = self._manager.item_metadata(step)["state"]
        if meta is None:
            raise FileNotFoundError(f"no readable state metadata in {self.step_dir(step)}")
        tree = getattr(meta, "tree", meta)
        problems = _compare(_leaf_table(tree), _leaf_table(abstract_state))
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {self.step_dir(step)} does not match this run's train state ("
                + "; ".join(problems) + "). The config changed since it was written (model, LoRA, "
                "objective or optimizer settings); use a new workdir or restore the old config.")

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state, data_state) of `step`. abstract_state: TrainState of ShapeDtypeStructs with shardings.

        Raises CheckpointMismatchError for a tree/shape/dtype mismatch; anything else (missing or
        damaged files) propagates as raised by orbax / tensorstore.
        """
        step = int(step)
        self._check_tree(step, abstract_state)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except ValueError as e:
            msg = str(e)
            if "do not match" in msg or "Structure mismatch" in msg or "not compatible with the stored" in msg:
                raise CheckpointMismatchError(f"checkpoint {self.step_dir(step)}: {msg}") from e
            raise
        return out["state"], dict(out["data"] or {})

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, int] | None:
        """(state, data_state, step) of the newest readable step, or None when there is no checkpoint.

        Unreadable steps are reported (logging.warning naming the step directory), moved aside and
        skipped; a tree mismatch raises CheckpointMismatchError; RuntimeError if no step is readable.
        """
        self.wait()
        steps = self.steps()
        if not steps:
            return None
        failures = []
        for step in reversed(steps):
            try:
                state, data = self.restore(step, abstract_state)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 -- any read failure of one step means a damaged step
                failures.append(f"{self.step_dir(step)}: {type(e).__name__}: {str(e)[:300]}")
                log.warning("checkpoint %s is corrupt or incomplete (%s: %s); moving it aside and trying the "
                            "previous one", self.step_dir(step), type(e).__name__, str(e)[:300])
                self._move_aside(step)
                continue
            if failures:
                log.warning("restored checkpoint %s instead of the newer damaged one(s)", self.step_dir(step))
            return state, data, step
        raise RuntimeError(f"no readable checkpoint in {self.directory}: " + " | ".join(failures))

    def _move_aside(self, step: int) -> None:
        """Renames a damaged step dir to '<step>.corrupt-<unix time>' (process 0) so it is not listed again."""
        src = self.step_dir(step)
        if jax.process_index() == 0 and src.exists():
            src.rename(self.directory / f"{step}.corrupt-{int(time.time())}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"kava_checkpoint_move_aside_{step}")
        self._manager.reload()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_trainable(directory: str | epath.PathLike, step: int | None = None,
                   sharding: jax.sharding.Sharding | None = None) -> tuple[dict, int]:
    """(trainable tree, step) from a run's checkpoint directory, without its optimizer state.

    step: the step to read (default: the newest readable one; damaged newer steps are skipped with a
    warning, as in `restore_latest`, but not moved). sharding: where the arrays go (default: the first
    local device). Shapes and dtypes come from the checkpoint's own metadata.
    """
    directory = epath.Path(directory)
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
                                    item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                                   "data": ocp.JsonCheckpointHandler(),
                                                   "config": ocp.JsonCheckpointHandler()})
    steps = sorted(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    if step is not None and int(step) not in steps:
        raise FileNotFoundError(f"no step {step} in {directory} (steps: {steps})")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    failures = []
    for s in ([int(step)] if step is not None else list(reversed(steps))):
        try:
            tree = manager.item_metadata(s)["state"]
            tree = getattr(tree, "tree", tree)
            if "trainable" not in tree:
                raise CheckpointMismatchError(f"{directory / str(s)} holds no 'trainable' entry")
            target = {"trainable": jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), tree["trainable"])}
            restore_args = jax.tree.map(
                lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), target)
            out = manager.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                target, restore_args=restore_args, partial_restore=True)))
            manager.close()
            return dict(out["state"]["trainable"]), s
        except CheckpointMismatchError:
            raise
        except Exception as e:  # noqa: BLE001 -- a damaged step; try the previous one
            log.warning("checkpoint %s is unreadable (%s: %s); trying the previous one", directory / str(s),
                        type(e).__name__, str(e)[:300])
            failures.append(f"{directory / str(s)}: {type(e).__name__}")
    manager.close()
    raise RuntimeError(f"no readable checkpoint in {directory}: " + " | ".join(failures))
