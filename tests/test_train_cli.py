"""kava-train end to end, in subprocesses: training lowers the loss and checkpoints; an interrupted run
resumed with the same command ends bit-identical to an uninterrupted one; SIGTERM saves and exits 0.

Every run uses the same tiny shapes (configs/synthetic.py "quick": d 32, 2 layers, batch 8, M 4, T 1)
and a constant learning rate, so the compiled step is the same program in each subprocess and a
shared JAX compilation cache makes only the first run pay for compiling it (at XLA's CPU optimisation
level 0, which halves compile time). Two CPU devices per subprocess (the batch is sharded over data=2).
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from kava_jax.train.checkpoint import Checkpointer, load_trainable

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(tempfile.gettempdir()) / "kava_jax_test_compilation_cache"
COMMON = ["--config", str(ROOT / "configs" / "synthetic.py") + ":kava,quick",
          "--config.train.schedule=constant", "--config.train.warmup_frac=0.0", "--config.train.lr=0.01"]
TIMING = ("examples_per_s", "tokens_per_s", "steps_per_s", "model_flops_per_s")


def _command() -> list[str]:
    exe = Path(sys.executable).with_name("kava-train")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "kava_jax.train.loop"]


def _env() -> dict:
    env = dict(os.environ)
    # LLVM optimisation level 0 halves the CPU compile time; every run here uses the same flags.
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
                         "--xla_llvm_disable_expensive_passes=true",
               JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=os.environ.get("JAX_COMPILATION_CACHE_DIR", str(CACHE)),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _run(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    res = subprocess.run([*_command(), *COMMON, "--workdir", str(workdir), *extra], env=_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def _rows(workdir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    wd = tmp_path_factory.mktemp("straight")
    return wd, _run(wd)


def test_cli_trains_and_checkpoints(straight):
    wd, res = straight
    rows = _rows(wd)
    assert [r["step"] for r in rows] == list(range(2, 25, 2))  # log_every 2, 24 steps
    losses = np.array([r["loss"] for r in rows])
    assert np.all(np.isfinite(losses))
    assert losses[-3:].mean() < losses[:3].mean() - 0.3, losses  # the loss falls
    assert {"ce_teacher", "ce_student", "codi", "kv", "grad_norm", "lr"} <= set(rows[-1])
    assert rows[-1]["examples_per_s"] > 0 and rows[-1]["tokens_per_s"] > 0
    assert rows[-1]["model_flops_per_s"] > 0 and "mfu" not in rows[-1]  # no chip peak on CPU
    assert _steps(wd) == [16, 24]  # checkpoint_every 8, keep 2, and one at the end
    config = json.loads((wd / "config.json").read_text())
    assert config["kava"]["objective"] == "kava" and config["train"]["schedule"] == "constant"
    info = json.loads((wd / "run_info.json").read_text())
    assert info["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1} and info["total_steps"] == 24
    assert info["compile_seconds"]["compile"] > 0 and info["memory_per_device"]["argument"] > 0
    assert info["device_kind"] == "cpu" and info["flops_per_step"]["model"] > 0
    assert any(p.name.startswith("events.out.tfevents") for p in (wd / "tb").iterdir())
    assert (wd / "data" / "train.jsonl").exists() and (wd / "tokenizer" / "tokenizer.json").exists()
    assert "24/24" in res.stderr  # the progress bar


def test_interrupted_then_resumed_equals_straight(straight, tmp_path):
    wd_a, _ = straight
    first = _run(tmp_path, "--stop_at_step=12")
    assert "resumed from step" not in first.stderr
    assert _steps(tmp_path) == [8, 12]
    second = _run(tmp_path)  # the same command again
    assert "resumed from step 12" in second.stderr
    rows_a, rows_b = _rows(wd_a), _rows(tmp_path)
    strip = [[{k: v for k, v in r.items() if k not in TIMING} for r in rows] for rows in (rows_a, rows_b)]
    assert strip[0] == strip[1]  # every logged metric, bit for bit
    ta, sa = load_trainable(wd_a / "checkpoints")
    tb, sb = load_trainable(tmp_path / "checkpoints")
    assert sa == sb == 24
    import jax

    la, lb = jax.tree_util.tree_leaves_with_path(ta), jax.tree_util.tree_leaves_with_path(tb)
    assert [p for p, _ in la] == [p for p, _ in lb] and len(la) > 10
    for (path, x), (_, y) in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    assert not np.array_equal(np.asarray(ta["special_embed"]),
                              np.asarray(load_trainable(tmp_path / "checkpoints", 16)[0]["special_embed"]))


def test_sigterm_saves_and_exits_zero(tmp_path):
    log_path = tmp_path / "stderr.txt"
    cmd = [*_command(), *COMMON, "--workdir", str(tmp_path / "run"), "--config.train.num_steps=100000",
           "--config.train.checkpoint_every=100000"]
    with log_path.open("w") as err:
        proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        try:
            metrics = tmp_path / "run" / "metrics.jsonl"
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None:
                if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                    break
                time.sleep(0.2)
            assert proc.poll() is None, log_path.read_text()[-3000:]
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert rc == 0, log_path.read_text()[-3000:]
    wd = tmp_path / "run"
    last = _rows(wd)[-1]["step"]
    assert 4 <= last < 100000
    assert _steps(wd) == [last]  # saved at the step boundary after the signal
    assert "SIGTERM" in log_path.read_text()
    ck = Checkpointer(wd / "checkpoints")
    data = ck.read_json(last, "data")
    assert data["epoch"] * 32 + data["position"] == last  # 256 examples / batch 8 = 32 batches per epoch
    ck.close()


def test_init_from_merges_the_trained_run(straight, tmp_path):
    """A student started with model.init_from=<run> begins from that run's base + folded LoRA + trained
    special rows (and its trained prj); checked against a numpy fold of the checkpoint's LoRA leaves."""
    from flax import traverse_util

    from kava_jax.models import split_lora
    from kava_jax.sweep import load_module
    from kava_jax.train.setup import build_model, build_run, prepare_tokenizer, read_run_config

    wd_a, _ = straight
    trained, _ = load_trainable(wd_a / "checkpoints")
    cfg_a = read_run_config(str(wd_a))
    bundle = prepare_tokenizer(cfg_a, str(wd_a))
    mc_a, start_a, _ = build_model(cfg_a, bundle)  # what the straight run started from
    flat, lora = traverse_util.flatten_dict(start_a), traverse_util.flatten_dict(trained["lora"])
    expected = {}
    for k, v in flat.items():
        if k[-1] in ("lora_a", "lora_b"):
            continue
        v = np.asarray(v, np.float64)
        if k[-1] == "kernel" and k[:-1] + ("lora_a",) in lora:
            a, b = np.asarray(lora[k[:-1] + ("lora_a",)]), np.asarray(lora[k[:-1] + ("lora_b",)])
            n, r = a.shape[0], a.shape[-1]
            delta = np.einsum("lir,lro->lio", a.reshape(n, -1, r), b.reshape(n, r, -1)).reshape(v.shape)
            v = v + cfg_a.model.lora_alpha / cfg_a.model.lora_rank * delta
        expected[k] = v
    sp = bundle.specials
    expected[("embed", "embedding")][[sp.bot, sp.eot, sp.latent]] = np.asarray(trained["special_embed"])
    assert np.abs(np.asarray(trained["lora"]["layers"]["attn"]["q_proj"]["lora_b"])).max() > 0  # LoRA was trained

    cfg = load_module(ROOT / "configs" / "synthetic.py", "kava_test_cfg_synth2").get_config("pccot,quick")
    cfg.model.init_from = str(wd_a)
    cfg.seed = 3
    run = build_run(cfg, str(tmp_path), load_data=False, num_devices=8)
    base, new_lora = split_lora(run.params)
    got = traverse_util.flatten_dict(base)
    assert set(got) == set(expected)
    for k in expected:
        np.testing.assert_allclose(np.asarray(got[k]), expected[k], rtol=1e-5, atol=1e-6, err_msg="/".join(k))
    assert all(not np.any(np.asarray(v)) for k, v in traverse_util.flatten_dict(new_lora).items()
               if k[-1] == "lora_b")  # fresh LoRA for the student
    np.testing.assert_array_equal(np.asarray(run.trainable["special_embed"]), np.asarray(trained["special_embed"]))
    np.testing.assert_array_equal(np.asarray(run.trainable["prj"]["w1"]), np.asarray(trained["prj"]["w1"]))
    assert run.model_config.vocab_size == mc_a.vocab_size and run.objective.objective == "pccot"
