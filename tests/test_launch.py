"""launch/: shell syntax, tpu_vm.sh --dry-run for every subcommand (gcloud is never called), the job
script that `run` ships (executed here with a fake tmux and a fake trainer), and launch/sweep.py."""

import base64
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from kava_jax import sweep as sw

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu_vm.sh"
GC = ["gcloud", "compute", "tpus"]
Z = ["--zone=us-west4-a", "--project=proj-1"]


@pytest.fixture
def sandbox(tmp_path):
    """PATH with a fake `gcloud` that leaves a marker if it is ever called, and a clean HOME."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "gcloud_called"
    (bin_dir / "gcloud").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (bin_dir / "gcloud").chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    # no KAVA_* defaults from the caller, and never the caller's tmux server (TMUX names its socket)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAVA_") and k not in ("TMUX", "TMUX_PANE")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", HOME=str(home))
    yield dict(env=env, marker=marker, bin=bin_dir, home=home, tmp=tmp_path)
    assert not marker.exists(), "gcloud was called"


def tpu(sandbox, *args, check=True):
    r = subprocess.run(["bash", str(TPU), *args], env=sandbox["env"], capture_output=True, text=True, timeout=30)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def commands(out: str) -> list[list[str]]:
    return [shlex.split(line) for line in out.splitlines() if line.strip() and not line.startswith("#")]


def test_shell_syntax():
    scripts = sorted((REPO / "launch").glob("*.sh"))
    assert {p.name for p in scripts} >= {"tpu_vm.sh", "env.sh"}
    for p in scripts:
        r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, f"{p}: {r.stderr}"
    head = TPU.read_text().splitlines()[:5]
    assert any(line.strip() == "set -euo pipefail" for line in head)


def test_usage_and_bad_input(sandbox):
    r = tpu(sandbox, check=False)
    assert r.returncode == 2 and "usage: launch/tpu_vm.sh" in r.stdout
    assert "usage" in tpu(sandbox, "--help").stdout
    r = tpu(sandbox, "reboot", "--dry-run", check=False)
    assert r.returncode == 2 and "unknown command 'reboot'" in r.stderr
    r = tpu(sandbox, "create", "--dry-run", "--zone", "z", check=False)
    assert r.returncode == 2 and "--name" in r.stderr
    r = tpu(sandbox, "create", "--dry-run", "--name", "n", check=False)
    assert r.returncode == 2 and "--zone" in r.stderr
    r = tpu(sandbox, "create", "--dry-run", "--name", "n", "--zone", "z", "--bogus", check=False)
    assert r.returncode == 2 and "unknown option '--bogus'" in r.stderr


def test_create_status_delete_dry_run(sandbox):
    base = ["--dry-run", "--name", "kv", "--zone=us-west4-a", "--project", "proj-1"]
    out = commands(tpu(sandbox, "create", *base, "--type", "v5litepod-16", "--spot").stdout)
    assert out == [GC + ["queued-resources", "create", "kv-qr", *Z, "--node-id=kv", "--accelerator-type=v5litepod-16",
                         "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]]
    out = commands(tpu(sandbox, "create", *base, "--no-queued", "--runtime=tpu-ubuntu2204-base").stdout)
    assert out == [GC + ["tpu-vm", "create", "kv", *Z, "--accelerator-type=v5litepod-8",
                         "--version=tpu-ubuntu2204-base"]]
    out = commands(tpu(sandbox, "status", *base).stdout)
    assert out == [GC + ["queued-resources", "describe", "kv-qr", *Z], GC + ["tpu-vm", "describe", "kv", *Z]]
    assert commands(tpu(sandbox, "delete", *base).stdout) == [
        GC + ["queued-resources", "delete", "kv-qr", *Z, "--force", "--quiet"]]
    assert commands(tpu(sandbox, "delete", *base, "--no-queued").stdout) == [
        GC + ["tpu-vm", "delete", "kv", *Z, "--quiet"]]
    # environment variables instead of flags; no project -> gcloud's default (no --project)
    env = dict(sandbox["env"], KAVA_TPU_NAME="e1", KAVA_TPU_ZONE="eu-x", KAVA_TPU_TYPE="v4-32")
    r = subprocess.run(["bash", str(TPU), "create", "--dry-run"], env=env, capture_output=True, text=True)
    assert commands(r.stdout) == [GC + ["queued-resources", "create", "e1-qr", "--zone=eu-x", "--node-id=e1",
                                        "--accelerator-type=v4-32", "--runtime-version=v2-alpha-tpuv5-lite"]]


def _ssh(cmd, worker):
    assert cmd[:6] == GC + ["tpu-vm", "ssh", "kv"] and cmd[6:8] == Z and cmd[8] == f"--worker={worker}"
    assert cmd[9].startswith("--command=") and len(cmd) == 10
    return cmd[9][len("--command="):]


def test_push_setup_logs_stop_ssh_dry_run(sandbox):
    base = ["--dry-run", "--name", "kv", "--zone", "us-west4-a", "--project", "proj-1"]
    git, scp, ssh = commands(tpu(sandbox, "push", *base).stdout)
    assert git[:4] == ["git", "-C", str(REPO), "archive"]
    archive = git[git.index("-o") + 1]
    assert scp == GC + ["tpu-vm", "scp", archive, "kv:kava-jax-push.tar.gz", *Z, "--worker=all"]
    assert 'tar -xzf ~/kava-jax-push.tar.gz -C "$HOME/kava-jax"' in _ssh(ssh, "all")

    (setup,) = commands(tpu(sandbox, "setup", *base, "--venv", "/opt/kv").stdout)
    remote = _ssh(setup, "all")
    assert "python3 -m venv /opt/kv" in remote and "/opt/kv/bin/pip install -q -e \"$HOME/kava-jax\"'[tpu]'" in remote

    (logs,) = commands(tpu(sandbox, "logs", *base, "--lines", "50").stdout)
    assert _ssh(logs, "0") == "tail -n 50 -F ~/kava-logs/latest.log"
    (logs,) = commands(tpu(sandbox, "logs", *base, "--no-follow", "--worker=3").stdout)
    assert _ssh(logs, "3") == "tail -n 200 ~/kava-logs/latest.log"

    (stop,) = commands(tpu(sandbox, "stop", *base, "--grace", "60").stdout)
    remote = _ssh(stop, "all")
    assert "pkill -TERM -g" in remote and "'kava-train'" in remote and "seq 1 60" in remote
    assert "tmux kill-session -t kava" in remote

    (ssh,) = commands(tpu(sandbox, "ssh", *base, "--", "nproc").stdout)
    assert _ssh(ssh, "all").endswith("; nproc")


TRAIN_ARGS = ["--config=configs/llama32_1b_gsm8k_aug.py:pccot", "--workdir=gs://bkt/kava/lam=0.1_x-abc123",
              "--config.model.lora_targets=('q', 'k')", "--config.model.hf_path=/m/it's $HOME \"x\""]


def _fake_tools(sandbox, session_running=False):
    b = sandbox["bin"]
    (b / "tmux").write_text(
        "#!/bin/bash\n"
        f'case "$1" in has-session) exit {0 if session_running else 1};;\n'
        '  new-session) bash -c "${@: -1}";;\n  *) exit 9;;\nesac\n')
    (b / "kava-train").write_text(
        f'#!/bin/bash\nfor a in "$@"; do printf "%s\\n" "$a"; done > {sandbox["tmp"]}/argv\necho trained\n')
    for f in ("tmux", "kava-train"):
        (b / f).chmod(0o755)


def test_run_ships_a_job_that_resumes_in_tmux(sandbox):
    """The --command of `run`, executed by bash as the worker would (fake tmux runs the session at once)."""
    _fake_tools(sandbox)
    out = tpu(sandbox, "run", "--dry-run", "--name", "kv", "--zone", "us-west4-a", "--project", "proj-1",
              "--remote-dir", str(REPO), "--", *TRAIN_ARGS).stdout
    (cmd,) = commands(out)
    remote = _ssh(cmd, "all")
    job = base64.b64decode(re.search(r"echo ([A-Za-z0-9+/=]+) \| base64 -d", remote).group(1)).decode()
    assert "source launch/env.sh" in job and "# job script" in out
    assert "rm " not in job and "gsutil" not in job  # never touches the workdir: rerunning resumes
    r = subprocess.run(["bash", "-c", remote], env=sandbox["env"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    argv = (sandbox["tmp"] / "argv").read_text().splitlines()
    assert argv == TRAIN_ARGS + ["--config.distributed=True"]
    logs = sandbox["home"] / "kava-logs"
    log = (logs / "lam=0.1_x-abc123.log").read_text()
    assert "trained" in log and "exit code 0" in log
    assert (logs / "latest.log").resolve() == (logs / "lam=0.1_x-abc123.log").resolve()

    _fake_tools(sandbox, session_running=True)
    r = subprocess.run(["bash", "-c", remote], env=sandbox["env"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 3 and "tmux session kava is running" in r.stderr


def _remote_of(out: str) -> str:
    (cmd,) = commands(out)
    return cmd[-1][len("--command="):]


@pytest.mark.skipif(shutil.which("tmux") is None or shutil.which("pkill") is None, reason="needs tmux and pkill")
def test_run_then_stop_with_real_tmux(sandbox):
    """run starts the job in a (private) tmux server; stop SIGTERMs only the trainer, which saves and
    exits, and the session ends; a second run is refused while the first is alive."""
    trainer = sandbox["bin"] / "kava-train"
    trainer.write_text("#!/bin/bash\ntrap 'echo saving; echo saved; exit 0' TERM\necho started\n"
                       "while true; do sleep 0.1; done\n")
    trainer.chmod(0o755)
    env = dict(sandbox["env"], TMUX_TMPDIR=str(sandbox["tmp"]))
    common = ["--dry-run", "--name", "kv", "--zone", "z", "--remote-dir", str(REPO)]
    run_remote = _remote_of(tpu(sandbox, "run", *common, "--", "--config=c.py", "--workdir=gs://b/r1").stdout)
    stop_remote = _remote_of(tpu(sandbox, "stop", *common, "--grace", "20").stdout)
    log = sandbox["home"] / "kava-logs" / "r1.log"
    try:
        assert subprocess.run(["bash", "-c", run_remote], env=env, timeout=30).returncode == 0
        for _ in range(100):
            if log.exists() and "started" in log.read_text():
                break
            time.sleep(0.05)
        again = subprocess.run(["bash", "-c", run_remote], env=env, capture_output=True, text=True, timeout=30)
        assert again.returncode == 3
        r = subprocess.run(["bash", "-c", stop_remote], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "stopped" in r.stdout
        text = log.read_text()
        assert "saved" in text and "exit code 0" in text
        assert subprocess.run(["tmux", "has-session", "-t", "kava"], env=env, capture_output=True).returncode != 0
    finally:
        subprocess.run(["tmux", "kill-server"], env=env, capture_output=True)  # the private server only


def test_run_checks_its_arguments(sandbox):
    base = ["run", "--dry-run", "--name", "kv", "--zone", "z"]
    r = tpu(sandbox, *base, check=False)
    assert r.returncode == 2 and "after '--'" in r.stderr
    r = tpu(sandbox, *base, "--", "--config=configs/base.py", check=False)
    assert r.returncode == 2 and "no --workdir" in r.stderr
    r = tpu(sandbox, *base, "--", "--config=configs/base.py", "--workdir=/tmp/w", check=False)
    assert r.returncode == 2 and "not a gs:// path" in r.stderr
    r = tpu(sandbox, *base, "--", "--workdir=gs://b/w", check=False)
    assert r.returncode == 2 and "no --config" in r.stderr
    out = tpu(sandbox, *base, "--allow-local-workdir", "--no-distributed", "--",
              "--config=configs/base.py", "--workdir", "/tmp/w").stdout
    assert "kava-train" in out and "distributed" not in out
    out = tpu(sandbox, *base, "--program", "kava-eval", "--", "--workdir=gs://b/w").stdout
    assert "kava-eval" in out and "distributed" not in out


# ------------------------------------------------------------------------------- launch/sweep.py


def sweep_py(*args, env=None, check=True):
    r = subprocess.run([sys.executable, str(REPO / "launch" / "sweep.py"), *args], capture_output=True, text=True,
                       cwd=REPO, timeout=60, env=env)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def _flag(cmd, name):
    return next(a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}="))


def test_sweep_dry_run_prints_one_command_per_run(tmp_path):
    out = sweep_py("--sweep", "configs/sweeps/eviction.py", "--workdir_root", str(tmp_path / "root"),
                   "--dry-run").stdout
    cmds = commands(out)
    assert len(cmds) == 5 and all(c[0] == "kava-train" for c in cmds)
    workdirs = [_flag(c, "workdir") for c in cmds]
    assert len(set(workdirs)) == 5 and all(w.startswith(f"{tmp_path}/root/eviction/") for w in workdirs)
    assert not (tmp_path / "root").exists()  # dry run: nothing created
    # each printed command parses (as kava-train would) to the base config plus that run's overrides
    runs = sw.expand(sw.load_module(REPO / "configs/sweeps/eviction.py").get_sweep())
    base = sw.load_module(REPO / "configs/llama32_1b_gsm8k_aug.py").get_config()
    for cmd, run in zip(cmds, runs, strict=True):
        argv = [a if not a.startswith("--config=") else f"--config={REPO}/{a.split('=', 1)[1]}" for a in cmd]
        argv = [a for a in argv if not a.startswith("--workdir")]
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file("config", default=None, flag_values=fv, lock_config=True, sys_argv=argv)
        fv(argv)
        assert fv.config.to_dict() == sw.apply_overrides(base, run).to_dict()


def test_sweep_dry_run_tpu_and_args():
    out = sweep_py("--sweep", "configs/sweeps/seeds.py", "--workdir_root", "gs://b/s", "--tpu", "kava-{i}",
                   "--arg", "codi", "--sweep_arg", "n=4", "--dry-run", "--tpu_flag=--zone=eu-x",
                   "--", "--config.train.log_every=7").stdout
    cmds = commands(out)
    assert len(cmds) == 4
    for i, c in enumerate(cmds):
        sep = c.index("--")
        assert c[:sep] == ["bash", "launch/tpu_vm.sh", "run", f"--name=kava-{i}", "--zone=eu-x"]
        assert c[sep + 1:] == ["--config=configs/llama32_1b_gsm8k_aug.py:codi",
                               f"--workdir=gs://b/s/seeds-codi/{sw.run_name({'seed': i})}", f"--config.seed={i}",
                               "--config.train.log_every=7"]
    r = sweep_py("--sweep", "configs/sweeps/seeds.py", "--workdir_root", "gs://b/s", "--tpu", "a,b", "--dry-run",
                 check=False)
    assert r.returncode != 0 and "3 runs but --tpu names 2 slice(s)" in r.stderr
    r = sweep_py("--sweep", "configs/sweeps/seeds.py", "--workdir_root", "/local", "--tpu", "a,b,c", "--dry-run",
                 check=False)
    assert r.returncode != 0 and "gs://" in r.stderr
    out = sweep_py("--sweep", "configs/sweeps/seeds.py", "--workdir_root", "gs://b/s", "--tpu", "a,b",
                   "--only", "1,2", "--dry-run").stdout
    assert [_flag(c, "config.seed") for c in commands(out)] == ["1", "2"]


def test_sweep_local_runs_each_run_in_turn(tmp_path):
    log = tmp_path / "calls"
    trainer = tmp_path / "fake-train"
    trainer.write_text(f'#!/bin/bash\necho "$*" >> {log}\n[[ "$*" != *seed=1* ]]\n')
    trainer.chmod(0o755)
    args = ["--sweep", "configs/sweeps/seeds.py", "--workdir_root", str(tmp_path / "w"), "--local",
            "--trainer", str(trainer)]
    r = sweep_py(*args, check=False)
    assert r.returncode == 1 and "failed with exit code 1" in r.stderr
    assert len(log.read_text().splitlines()) == 2  # stopped after the failing run 1
    log.unlink()
    r = sweep_py(*args, "--keep-going", check=False)
    calls = log.read_text().splitlines()
    assert r.returncode == 1 and len(calls) == 3 and "2 of 3 run(s) succeeded" in r.stdout
    assert [c.split("--config.seed=")[1] for c in calls] == ["0", "1", "2"]
