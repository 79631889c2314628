"""The training loop and the `kava-train` CLI.

    kava-train --config configs/synthetic.py:kava,quick --workdir /tmp/run [--config.train.lr=1e-3 ...]
    python -m kava_jax.train.loop --config ... --workdir ...

`train(config, workdir)` (also the library entry point used by the demo and notebooks):
1. `train.distributed.initialize_distributed(config)` when config.distributed; validate the config; build the run
   (train/setup.py: tokenizer, model, trainable / frozen trees, data); write <workdir>/config.json.
2. Mesh from config.mesh, optimizer, train step; lower + compile it once ahead of time on abstract
   arguments (compile time and per-device memory analysis logged and written to run_info.json).
3. Restore the newest readable checkpoint (<workdir>/checkpoints) if there is one: the train state
   AND the data iterator position, so a restarted command continues exactly where the killed one
   stopped (same batches, same RNG, same metrics).
4. Steps: each host builds its rows of the global batch, `to_global` assembles the sharded arrays,
   the compiled step runs. Every train.log_every steps (and at the last step) the step's metrics go
   to <workdir>/metrics.jsonl and TensorBoard (<workdir>/tb), and the progress bar shows loss,
   examples/s, tokens/s (valid teacher tokens) and the ETA. Throughput rows also carry
   model_flops_per_s (the analytic `train.flops` count of the step, `StepFlops.model`, over wall time)
   and, on a TPU whose peak is in `train.flops.CHIPS`, "mfu" (shown in the bar too). A checkpoint is written every
   train.checkpoint_every steps and at the end. With train.eval_every set (single-process runs), the
   model is also decoded greedily on config.eval.datasets (config.eval.limit items each; "synthetic"
   = the run's own test split) every eval_every steps and at the end; accuracy and forward passes go
   to the same metrics file as "eval/<set>/<metric>" rows. With eval_every None the loop does not
   evaluate (run kava-eval on the workdir).
5. SIGTERM (e.g. TPU preemption): the loop finishes the current step, saves a checkpoint and returns
   normally (the CLI exits 0); rerunning the command resumes.
Only process 0 writes logs, metrics, config.json and the progress bar; every process takes part in
checkpointing (orbax coordinates them).

`--stop_at_step N` ends the run after global step N (with a checkpoint) without changing the
schedule, which still follows train.num_steps: a planned interruption (tests, time-boxed jobs).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from typing import Any

import jax
import numpy as np
from etils import epath

log = logging.getLogger(__name__)

__all__ = ["train", "main", "run", "total_train_steps", "throughput"]

METRICS_FILE = "metrics.jsonl"
RUN_INFO_FILE = "run_info.json"


def total_train_steps(config, steps_per_epoch: int) -> int:
    """train.num_steps when set, else train.num_epochs x steps per epoch."""
    if config.train.num_steps:
        return int(config.train.num_steps)
    return int(config.train.num_epochs) * int(steps_per_epoch)


class _Preemption:
    """SIGTERM -> a flag the loop reads at step boundaries (agreed on by all hosts)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def install(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def should_stop(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.requested))
        return bool(np.max(flags))


class _Writer:
    """metrics.jsonl + TensorBoard on process 0 (no-ops elsewhere)."""

    def __init__(self, workdir: epath.Path, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = workdir / METRICS_FILE
        self.tb = None
        if not enabled:
            return
        if self.path.exists():  # resume: drop rows a killed run logged after its last checkpoint
            rows = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            keep = [ln for ln in rows if json.loads(ln).get("step", 0) <= start_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tb"), purge_step=start_step + 1 if start_step else None)
        except Exception as e:  # noqa: BLE001 -- TensorBoard is optional (e.g. an unsupported filesystem)
            log.warning("TensorBoard disabled: %s", e)

    def write(self, step: int, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps({"step": step, **row}, sort_keys=True) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"train/{k}", v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def throughput(steps: int, examples: int, tokens: int, seconds: float, model_flops_per_step: float,
               device_kind: str | None, n_devices: int) -> dict[str, float]:
    """Rates over one logging interval of `steps` global steps in `seconds` of wall time.

    examples / tokens: global counts in the interval; model_flops_per_step: `StepFlops.model` of the
    global batch. Returns examples_per_s, tokens_per_s, steps_per_s, model_flops_per_s, plus "mfu"
    (model FLOPs over the chips' bf16 peak) when `device_kind` is a TPU in `train.flops.CHIPS`."""
    from kava_jax.train.flops import mfu

    seconds = max(float(seconds), 1e-9)
    out = {"examples_per_s": examples / seconds, "tokens_per_s": tokens / seconds, "steps_per_s": steps / seconds,
           "model_flops_per_s": steps * float(model_flops_per_step) / seconds}
    if steps > 0:
        u = mfu(model_flops_per_step, seconds / steps, device_kind, n_devices)
        if u is not None:
            out["mfu"] = u
    return out


def _config_json(config) -> str:
    return config.to_json_best_effort(sort_keys=True, indent=2)


def _write_config(workdir: epath.Path, config_json: str) -> None:
    path = workdir / "config.json"
    if path.exists():
        old, new = json.loads(path.read_text()), json.loads(config_json)
        if old != new:
            def flat(d, pre=""):
                out = {}
                for k, v in d.items():
                    out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {f"{pre}{k}": v})
                return out

            fo, fn = flat(old), flat(new)
            diff = sorted(k for k in set(fo) | set(fn) if fo.get(k) != fn.get(k))
            log.warning("config differs from the one in %s (%s); the new one is written", path, ", ".join(diff))
    path.write_text(config_json + "\n")


def _final_from_metrics(workdir: epath.Path) -> dict:
    path = workdir / METRICS_FILE
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    return dict(rows[-1]) if rows else {}


def _make_evaluator(config, run, data_dir: str | None):
    """fn(state, frozen) -> {"eval/<set>/<metric>": value} for the in-loop evals (train.eval_every), or
    None when they are off. Greedy decoding (kava_jax.eval.evaluate) of config.eval.datasets, each cut to
    config.eval.limit items; "synthetic" is the run's own synthetic test split. Method: cot for the cot
    objective, nocot for nocot, latent otherwise. Single-process runs only (kava-eval covers pods)."""
    if config.train.eval_every is None:
        return None
    if jax.process_count() > 1:
        log.warning("train.eval_every: in-loop evaluation runs on single-process jobs only; run kava-eval on the "
                    "workdir instead")
        return None
    from kava_jax.data.evalsets import load_eval_set
    from kava_jax.eval.evaluate import evaluate
    from kava_jax.kava.objective import model_params

    sets = {}
    for name in config.eval.datasets:
        if name == "synthetic" and data_dir is None:
            log.warning("eval: skipping 'synthetic' (the training data is not synthetic)")
            continue
        sets[name] = load_eval_set(name, data_dir if name == "synthetic" else None, limit=config.eval.limit)
    obj = run.objective
    method = {"cot": "cot", "nocot": "nocot"}.get(obj.objective, "latent")
    merge = jax.jit(lambda t, f: model_params(t, f, obj))

    def evaluator(state, frozen) -> dict[str, float]:
        params = merge(state.trainable, frozen)
        out = {}
        for name, items in sets.items():
            res = evaluate(method, params, run.model_config, state.trainable.get("prj", {}), run.tokenizer,
                           run.specials, items, q_len=run.layout.q_len,
                           latent_mode="sequential" if obj.objective == "codi" else obj.latent_mode,
                           num_latents=obj.num_latents, num_iterations=obj.num_iterations,
                           prompt_ids=run.layout.prompt_ids, truncate=run.layout.truncate,
                           batch_size=int(config.eval.batch_size), max_answer_tokens=int(config.eval.max_answer_tokens),
                           max_cot_tokens=int(config.eval.max_cot_tokens), progress=False)
            out.update({f"eval/{name}/accuracy": res.accuracy, f"eval/{name}/forward_passes": res.mean_forward_passes,
                        f"eval/{name}/items": res.num_items})
        return out

    return evaluator


def train(config, workdir: str, *, stop_at_step: int | None = None) -> dict[str, Any]:
    """Trains (or resumes) the run of `config` in `workdir`; returns the last logged metrics
    (loss terms, grad_norm, lr, step, examples_per_s, ...) plus "preempted" and "compile_seconds"."""
    from kava_jax.data.pipeline import BatchIterator, abstract_batch, host_rows, to_global
    from kava_jax.train.checkpoint import Checkpointer
    from kava_jax.train.flops import config_step_flops
    from kava_jax.train.optim import make_optimizer
    from kava_jax.train.setup import CHECKPOINT_DIR, build_run
    from kava_jax.train.sharding import make_mesh
    from kava_jax.train.state import abstract_train_state, create_train_state
    from kava_jax.train.step import compile_train_step, make_train_step

    if config.distributed:
        from kava_jax.train.distributed import initialize_distributed

        initialize_distributed(config)
    is_main = jax.process_index() == 0
    wd = epath.Path(workdir)
    t_setup = time.perf_counter()
    run = build_run(config, str(workdir))
    log.info("setup (tokenizer, model, data) took %.1f s", time.perf_counter() - t_setup)
    if is_main:  # the data summary: what was loaded, dropped (per reason) and how long the blocks are
        print(f"data: {run.record_stats.summary()}\nexamples: {run.examples.summary()}", file=sys.stderr, flush=True)
    config_json = _config_json(config)
    if is_main:
        wd.mkdir(parents=True, exist_ok=True)
        _write_config(wd, config_json)

    B = int(config.train.batch_size)
    mesh = make_mesh(config.mesh)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    batch_abstract = abstract_batch(run.layout, B)
    probe = BatchIterator(run.examples, run.layout, B, seed=int(config.seed), process_index=0, process_count=1)
    total = total_train_steps(config, probe.steps_per_epoch)
    end = total if stop_at_step is None else min(total, int(stop_at_step))
    optimizer = make_optimizer(config.train, total)
    step_fn = make_train_step(run.objective, optimizer, int(config.train.grad_accum))
    state_abstract = abstract_train_state(run.trainable, optimizer)
    frozen_abstract = jax.eval_shape(lambda x: x, run.frozen)
    cs = compile_train_step(step_fn, mesh, state_abstract, frozen_abstract, batch_abstract, rules,
                            model_config=run.model_config)
    compile_seconds = sum(cs.seconds.values())
    log.info("compiled the train step in %.1f s; memory per device: %s", compile_seconds, cs.memory)

    rows = host_rows(cs.shardings.batch["teacher_ids"], B)
    it = BatchIterator(run.examples, run.layout, B, seed=int(config.seed), rows=rows)
    ckpt = Checkpointer(wd / CHECKPOINT_DIR, keep=int(config.train.keep_checkpoints))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state_abstract,
                          cs.shardings.state)
    restored = ckpt.restore_latest(target)
    if restored is not None:
        state, data_state, start = restored
        it.restore(data_state)
        log.info("resumed from step %d (epoch %d, batch %d of %d)", start, it.epoch, it.position, it.steps_per_epoch)
    else:
        start = 0
        # Place the (host-identical) trainable tree on the mesh first: arrays restored from an earlier
        # run (init_from) arrive committed to one device.
        trainable = jax.device_put(run.trainable, cs.shardings.state.trainable)
        state = jax.jit(lambda t: create_train_state(t, optimizer, run.state_rng),
                        out_shardings=cs.shardings.state)(trainable)
    frozen = jax.device_put(run.frozen, cs.shardings.frozen)
    examples_summary = run.examples.summary()
    step_flops = config_step_flops(config, run.model_config, run.objective)
    device_kind = jax.devices()[0].device_kind
    n_params = {"trainable": int(sum(np.prod(x.shape) for x in jax.tree.leaves(run.trainable))),
                "frozen": int(sum(np.prod(x.shape) for x in jax.tree.leaves(run.frozen)))}
    del run.params, run.trainable, run.frozen
    if is_main:
        info = {"mesh": dict(mesh.shape), "devices": jax.device_count(), "processes": jax.process_count(),
                "total_steps": total, "steps_per_epoch": it.steps_per_epoch, "batch_size": B,
                "compile_seconds": cs.seconds, "memory_per_device": cs.memory, "params": n_params,
                "device_kind": device_kind, "flops_per_step": {"model": step_flops.model,
                                                               "executed": step_flops.executed},
                "setup_seconds": time.perf_counter() - t_setup, "data": examples_summary}
        (wd / RUN_INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
        log.info("run: %d steps (%d per epoch), batch %d, mesh %s, params %s", total, it.steps_per_epoch, B,
                 dict(mesh.shape), n_params)

    if start >= end:
        log.info("nothing to do: checkpoint step %d >= end step %d", start, end)
        ckpt.close()
        return {**_final_from_metrics(wd), "preempted": False, "compile_seconds": compile_seconds}

    data_dir = str(wd / "data") if config.data.source == "synthetic" else None
    if data_dir is not None and not (wd / "data").exists():  # gs:// workdir: the local copy
        from kava_jax.train.setup import prepare_synthetic_data

        data_dir = str(prepare_synthetic_data(config, str(workdir)))
    evaluator = _make_evaluator(config, run, data_dir)
    eval_every = int(config.train.eval_every or 0)
    writer = _Writer(wd, start, is_main)
    stop = _Preemption()
    stop.install()
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, disable=not is_main, dynamic_ncols=True, mininterval=1.0,
               desc=f"{config.kava.objective}", file=sys.stderr)
    last: dict[str, Any] = {}
    preempted = False
    log_every, ckpt_every = int(config.train.log_every), int(config.train.checkpoint_every)
    t_last, step_last, tokens = time.perf_counter(), start, 0
    step = start
    try:
        while step < end:
            batch = next(it)
            tokens += int(batch["teacher_valid"].sum()) * jax.process_count()
            state, metrics = cs.compiled(state, frozen, to_global(batch, cs.shardings.batch, B))
            step += 1
            bar.update(1)
            stopping = stop.should_stop()
            if step % log_every == 0 or step == end or stopping:
                vals = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                rates = throughput(step - step_last, (step - step_last) * B, tokens, now - t_last, step_flops.model,
                                   device_kind, jax.device_count())
                t_last, step_last, tokens = now, step, 0
                last = {**vals, **rates, "epoch": it.epoch}
                writer.write(step, last)
                shown = {"mfu": f"{rates['mfu']:.1%}"} if "mfu" in rates else {}
                bar.set_postfix(loss=f"{vals['loss']:.4f}", ex_s=f"{rates['examples_per_s']:.0f}",
                                tok_s=f"{rates['tokens_per_s']:.0f}", **shown, refresh=False)
                if not np.isfinite(vals["loss"]):
                    raise FloatingPointError(f"loss is {vals['loss']} at step {step}; stopping (last good "
                                             f"checkpoint: {ckpt.latest_step()})")
            if evaluator is not None and (step % eval_every == 0 or step == end) and not stopping:
                t_eval = time.perf_counter()
                evals = evaluator(state, frozen)
                writer.write(step, evals)
                last.update(evals)
                log.info("step %d eval (%.1f s): %s", step, time.perf_counter() - t_eval,
                         ", ".join(f"{k} {v:.4g}" for k, v in evals.items()))
                t_last = time.perf_counter()  # keep eval time out of the throughput numbers
            if step % ckpt_every == 0 or step == end or stopping:
                ckpt.save(step, state, it.state(), config_json)
            if stopping:
                preempted = True
                log.warning("SIGTERM: saved a checkpoint at step %d; exiting (rerun the command to resume)", step)
                break
    finally:
        bar.close()
        stop.uninstall()
        ckpt.close()
        writer.close()
    return {**last, "step": step, "preempted": preempted, "compile_seconds": compile_seconds}


# ------------------------------------------------------------------------------------------ CLI
def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    if "workdir" not in flags.FLAGS:
        config_flags.DEFINE_config_file("config", None, "run config file (configs/*.py[:arg])", lock_config=True)
        flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, config.json); reused to resume")
        flags.DEFINE_integer("stop_at_step", None, "stop (with a checkpoint) after this global step; the schedule "
                             "still follows train.num_steps")
        flags.mark_flags_as_required(["config", "workdir"])
    return flags.FLAGS


def main(argv) -> None:
    if len(argv) > 1:
        raise SystemExit(f"kava-train: unexpected arguments {argv[1:]}")
    flags = _define_flags()
    config = flags.config
    if config.distributed:
        from kava_jax.train.distributed import initialize_distributed

        initialize_distributed(config)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every checkpoint step at INFO via absl
    if jax.process_index() != 0:
        logging.getLogger().setLevel(logging.WARNING)
    out = train(config, flags.workdir, stop_at_step=flags.stop_at_step)
    if jax.process_index() == 0:
        shown = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in out.items()}
        log.info("final: %s", json.dumps(shown, sort_keys=True))


def run() -> None:
    """Console entry point `kava-train`."""
    from absl import app

    _define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
