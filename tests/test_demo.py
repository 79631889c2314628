"""`kava-demo --quick` end to end, and `kava-eval` on the runs it leaves (subprocesses, as a user runs them)."""

import json
import subprocess
import sys

import pytest

from kava_jax.demo import METHOD_ORDER, STUDENTS, TRACES, schedule_order


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "kava_jax.demo", "--quick", "--workdir", str(wd)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"kava-demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return wd, proc.stdout


def test_demo_quick_writes_tables_plot_and_every_result(demo_dir):
    wd, stdout = demo_dir
    res = json.loads((wd / "demo_results.json").read_text())
    assert tuple(res["traces"]) == TRACES
    for trace in TRACES:
        runs = res["results"][trace]["runs"]
        assert set(runs) == set(METHOD_ORDER), f"{trace}: {sorted(runs)}"
        for method, row in runs.items():
            assert 0.0 <= row["accuracy"] <= 1.0, (trace, method)
            assert row["mean_forward_passes"] >= 2, (trace, method)
            assert row["num_items"] > 0
        # METHOD §6: latent students need far fewer passes than CoT decoding of the same problems.
        assert runs["kava"]["mean_forward_passes"] < runs["cot"]["mean_forward_passes"]
    png = wd / "demo_plot.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tables = (wd / "demo_tables.md").read_text()
    assert "Table 1" in tables and "Table 2" in tables and "KaVa" in tables
    assert "Table 1" in stdout and str(png) in stdout


def test_demo_rerun_reuses_every_finished_run(demo_dir):
    wd, _ = demo_dir
    before = json.loads((wd / "demo_results.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "kava_jax.demo", "--quick", "--workdir", str(wd)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished earlier, reusing") == len(TRACES) * len(METHOD_ORDER)
    after = json.loads((wd / "demo_results.json").read_text())
    assert after["results"] == before["results"]


def test_schedule_starts_backbones_first_then_longest_students():
    order = schedule_order(TRACES, STUDENTS)
    assert order[:2] == [("nl", "cot"), ("equation", "cot")]
    assert sorted(order[2:]) == sorted((t, m) for t in TRACES for m in STUDENTS)
    assert order[2] == ("nl", "kava") and order[-1] == ("equation", "nocot")


def test_kava_eval_cli_pools_workdirs_into_mean_and_std(demo_dir, tmp_path):
    wd, _ = demo_dir
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, "-m", "kava_jax.eval.run", "--workdir", str(wd / "equation" / "kava"),
         "--workdir", str(wd / "nl" / "kava"), "--datasets", "synthetic", "--limit", "8", "--output", str(out),
         "--noprogress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert len(res["runs"]) == 2
    (agg,) = res["aggregate"]
    assert agg["method"] == "kava" and agg["runs"] == 2 and agg["num_items"] == 8
    assert "±" in proc.stdout and "fwd passes" in proc.stdout


def test_kava_eval_rejects_a_latent_method_for_a_cot_run(demo_dir):
    wd, _ = demo_dir
    proc = subprocess.run([sys.executable, "-m", "kava_jax.eval.run", "--workdir", str(wd / "equation" / "cot"),
                           "--method", "latent", "--limit", "4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "latent student" in proc.stderr
