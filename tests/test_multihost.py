"""Multi-host training for real, on one machine: two processes with 4 fake CPU devices each join one
jax.distributed job (CPU collectives over gloo, coordinator on a free loopback port) and train through
the real `train(config, workdir)` with config.distributed=True as one 8-device mesh. A single-process
8-device run of the same config (same seed, same global batch) runs alongside; their per-step losses
and metrics agree to ~1e-6, only process 0 writes metrics / TensorBoard / progress, both processes
write their shards of each checkpoint, and the checkpoints restore to the single-process run's weights.

The workers are tests/multihost_worker.py. Objective: configs/synthetic.py "kava,quick" (4 steps: teacher,
R-KV compression, Jacobi latent student, LoRA); KAVA_MULTIHOST_OBJECTIVE=cot trains the plain CoT
model instead, a smaller program that compiles in about half the time.
Every wait has a deadline; on any failure all workers are killed and their stderr tails are shown.
Also: fast checks of kava_jax.train.distributed's settings resolution and its errors.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kava_jax.train.checkpoint import Checkpointer, load_trainable
from kava_jax.train.distributed import distributed_args, initialize_distributed

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multihost_worker.py"
OBJECTIVE = os.environ.get("KAVA_MULTIHOST_OBJECTIVE", "kava")
STEPS = 4
DEADLINE_S = 420  # whole job; the connect timeout below makes a missing peer fail much sooner
TIMING = {"examples_per_s", "tokens_per_s", "steps_per_s", "model_flops_per_s"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no output)"


class _Worker:
    def __init__(self, name: str, tmp: Path, workdir: Path, devices: int, env: dict, distributed: bool):
        self.name, self.out, self.err = name, tmp / f"{name}.json", tmp / f"{name}.stderr"
        cmd = [sys.executable, str(WORKER), "--workdir", str(workdir), "--out", str(self.out), "--devices",
               str(devices), "--steps", str(STEPS), "--objective", OBJECTIVE]
        cmd += ["--distributed"] if distributed else []
        self._err_fh = self.err.open("w")
        self.start, self.seconds = time.perf_counter(), None
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=self._err_fh,
                                     start_new_session=True)

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is not None and self.seconds is None:
            self.seconds = time.perf_counter() - self.start
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)

    def close(self) -> None:
        self._err_fh.close()


def _run_all(workers: list[_Worker], deadline_s: float) -> None:
    """Waits for every worker; on a failure or the deadline kills them all and fails with their stderr."""
    end = time.monotonic() + deadline_s
    problem = None
    try:
        while [w.poll() for w in workers].count(None):
            bad = [w for w in workers if w.poll() not in (None, 0)]
            if bad:
                problem = f"{bad[0].name} exited with {bad[0].proc.returncode}"
                break
            if time.monotonic() > end:
                problem = f"deadline of {deadline_s:.0f} s passed"
                break
            time.sleep(0.5)
        if problem is None:
            bad = [w for w in workers if w.proc.returncode != 0 or not w.out.exists()]
            if bad:
                problem = f"{bad[0].name} exited with {bad[0].proc.returncode} (result file: {bad[0].out.exists()})"
    finally:
        for w in workers:
            w.kill()
            w.close()
    if problem is not None:
        tails = "\n".join(f"----- {w.name} (rc {w.proc.returncode}) stderr tail -----\n{_tail(w.err)}" for w in workers)
        pytest.fail(f"multi-host run failed: {problem}\n{tails}", pytrace=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    base = dict(os.environ)
    for k in [k for k in base if k.startswith(("KAVA_COORDINATOR", "KAVA_NUM_PROCESSES", "KAVA_PROCESS_ID",
                                               "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))]:
        del base[k]
    base.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT) + os.pathsep + base.get("PYTHONPATH", ""),
                TOKENIZERS_PARALLELISM="false")
    multi_wd, ref_wd = tmp / "multi", tmp / "single"
    port = _free_port()
    workers = [
        _Worker(f"process{i}", tmp, multi_wd, 4,
                {**base, "KAVA_COORDINATOR": f"127.0.0.1:{port}", "KAVA_NUM_PROCESSES": "2",
                 "KAVA_PROCESS_ID": str(i), "KAVA_DISTRIBUTED_TIMEOUT": "90"}, distributed=True)
        for i in range(2)]
    workers.append(_Worker("single", tmp, ref_wd, 8, base, distributed=False))
    _run_all(workers, DEADLINE_S)
    print(f"\nmulti-host test ({OBJECTIVE}, run side by side): " + ", ".join(f"{w.name} {w.seconds:.1f} s"
                                                                           for w in workers))
    results = {w.name: json.loads(w.out.read_text()) for w in workers}
    stderr = {w.name: w.err.read_text(errors="replace") for w in workers}
    return {"multi": multi_wd, "single": ref_wd, "results": results, "stderr": stderr}


def _rows(workdir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _assert_metrics_close(a: dict, b: dict, where: str) -> None:
    keys = set(a) - TIMING
    assert keys == set(b) - TIMING, where
    for k in sorted(keys):
        if isinstance(a[k], float):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=f"{where}: {k}")
        else:
            assert a[k] == b[k], f"{where}: {k}"


# -------------------------------------------------------------------------------- the two-process run
def test_two_processes_form_one_8_device_mesh(runs):
    res = runs["results"]
    for i in range(2):
        r = res[f"process{i}"]
        assert (r["process_index"], r["process_count"], r["device_count"], r["local_device_count"]) == (i, 2, 8, 4)
        assert r["cpu_collectives"] == "gloo"
    assert (res["single"]["process_count"], res["single"]["device_count"]) == (1, 8)
    info = json.loads((runs["multi"] / "run_info.json").read_text())
    assert info["processes"] == 2 and info["devices"] == 8
    assert info["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1} and info["batch_size"] == 8


def test_loss_equals_single_process_run(runs):
    multi, single = _rows(runs["multi"]), _rows(runs["single"])
    assert [r["step"] for r in multi] == [r["step"] for r in single] == list(range(1, STEPS + 1))
    for a, b in zip(multi, single, strict=True):
        _assert_metrics_close(a, b, f"step {a['step']}")
    losses = np.array([r["loss"] for r in multi])
    assert np.all(np.isfinite(losses)) and np.ptp(losses) > 1e-3  # it trains: the loss moves
    res = runs["results"]
    r0, r1 = res["process0"]["result"], res["process1"]["result"]
    assert {k: v for k, v in r0.items() if k not in TIMING | {"compile_seconds"}} == \
        {k: v for k, v in r1.items() if k not in TIMING | {"compile_seconds"}}  # both hold the same metrics
    np.testing.assert_allclose(r0["loss"], res["single"]["result"]["loss"], rtol=1e-5)
    assert r0["step"] == STEPS and not r0["preempted"]


def test_only_process_0_writes_logs(runs):
    wd = runs["multi"]
    assert len(_rows(wd)) == STEPS  # one row per step: a second writer would duplicate them
    assert len(list((wd / "tb").glob("events.out.tfevents.*"))) == 1
    multi_cfg = json.loads((wd / "config.json").read_text())
    single_cfg = json.loads((runs["single"] / "config.json").read_text())
    assert multi_cfg.pop("distributed") is True and single_cfg.pop("distributed") is False
    assert multi_cfg == single_cfg
    bar = f"{STEPS}/{STEPS}"  # tqdm's final count: only process 0 shows the progress bar
    assert bar in runs["stderr"]["process0"] and bar not in runs["stderr"]["process1"]


def test_checkpoints_written_by_both_and_restorable(runs):
    ckpt_dir, ref_dir = runs["multi"] / "checkpoints", runs["single"] / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["2", "4"]  # every 2 steps, no leftover tmp dirs
    for step in ("2", "4"):
        d = ckpt_dir / step
        assert (d / "commit_success.txt").exists() and (d / "state" / "commit_success.txt").exists()
        for i in range(2):  # each process wrote its own shards and array metadata
            assert (d / "state" / "array_metadatas" / f"process_{i}").is_file()
            assert any((d / "state" / f"ocdbt.process_{i}").rglob("*")), f"step {step}: nothing from process {i}"
    ck, ref = Checkpointer(ckpt_dir), Checkpointer(ref_dir)
    try:
        for step in (2, 4):
            assert ck.read_json(step, "data") == ref.read_json(step, "data")
            assert ck.read_json(step, "data")["position"] == step
    finally:
        ck.close()
        ref.close()
    for step in (2, 4):
        got, s = load_trainable(ckpt_dir, step)
        want, _ = load_trainable(ref_dir, step)
        assert s == step
        flat_got = dict(zip(*_flat(got), strict=True))
        flat_want = dict(zip(*_flat(want), strict=True))
        assert flat_got.keys() == flat_want.keys() and flat_got
        for k in flat_got:
            # Adam moves every weight by ~lr (1e-2) per step whatever its gradient's size, so float noise in
            # a near-zero gradient shows at ~1e-6 absolute; a wrong gradient would be off by ~1e-2.
            np.testing.assert_allclose(np.asarray(flat_got[k]), np.asarray(flat_want[k]), rtol=1e-5, atol=1e-5,
                                       err_msg=f"step {step} {k}")


def _flat(tree) -> tuple[list[str], list]:
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [jax.tree_util.keystr(p) for p, _ in leaves], [x for _, x in leaves]


# -------------------------------------------------------------------------------- settings resolution
def test_distributed_args_from_env():
    env = {"KAVA_COORDINATOR": "127.0.0.1:1234", "KAVA_NUM_PROCESSES": "2", "KAVA_PROCESS_ID": "1"}
    a = distributed_args(None, env)
    assert (a.coordinator_address, a.num_processes, a.process_id, a.initialization_timeout) == \
        ("127.0.0.1:1234", 2, 1, 300) and a.explicit
    jax_env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "0",
               "KAVA_DISTRIBUTED_TIMEOUT": "30"}
    a = distributed_args(None, jax_env)
    assert (a.coordinator_address, a.num_processes, a.process_id, a.initialization_timeout) == \
        ("10.0.0.2:8476", 4, 0, 30)
    # nothing set: everything left to JAX's cluster detection (TPU pods)
    a = distributed_args(None, {})
    assert (a.coordinator_address, a.num_processes, a.process_id) == (None, None, None) and not a.explicit
    # a config field wins over the environment
    cfg = {"coordinator_address": "h:9", "num_processes": 3, "process_id": 2}
    a = distributed_args(cfg, env)
    assert (a.coordinator_address, a.num_processes, a.process_id) == ("h:9", 3, 2)


@pytest.mark.parametrize("env, match", [
    ({"KAVA_COORDINATOR": "h:1", "KAVA_NUM_PROCESSES": "2"}, "KAVA_NUM_PROCESSES is set but process_id"),
    ({"KAVA_COORDINATOR": "h:1", "KAVA_PROCESS_ID": "0"}, "KAVA_PROCESS_ID is set but num_processes"),
    ({"KAVA_NUM_PROCESSES": "2", "KAVA_PROCESS_ID": "0"}, "no coordinator address"),
    ({"KAVA_COORDINATOR": "h:1", "KAVA_NUM_PROCESSES": "2", "KAVA_PROCESS_ID": "2"}, "must be < num_processes 2"),
    ({"KAVA_COORDINATOR": "h:1", "KAVA_NUM_PROCESSES": "two", "KAVA_PROCESS_ID": "0"}, "KAVA_NUM_PROCESSES: expected"),
    ({"KAVA_COORDINATOR": "h:1", "KAVA_NUM_PROCESSES": "0", "KAVA_PROCESS_ID": "0"}, "KAVA_NUM_PROCESSES: expected"),
    ({"KAVA_COORDINATOR": "localhost", "KAVA_NUM_PROCESSES": "1", "KAVA_PROCESS_ID": "0"}, "expected 'host:port'"),
    ({"KAVA_PROCESS_ID": "0", "JAX_PROCESS_ID": "1"}, "conflicting process_id"),
    ({"KAVA_DISTRIBUTED_TIMEOUT": "soon"}, "KAVA_DISTRIBUTED_TIMEOUT"),
])
def test_distributed_args_errors(env, match):
    with pytest.raises(ValueError, match=match):
        distributed_args(None, env)


def test_initialize_after_backend_started_says_so():
    import jax

    jax.devices()  # this pytest process's backend is running
    env = {"KAVA_COORDINATOR": f"127.0.0.1:{_free_port()}", "KAVA_NUM_PROCESSES": "1", "KAVA_PROCESS_ID": "0",
           "JAX_PLATFORMS": "cpu"}
    with pytest.raises(RuntimeError, match="before any JAX computation"):
        initialize_distributed(None, environ=env)
    assert not jax.distributed.is_initialized()
