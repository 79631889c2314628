"""`kava-demo`, the main job: a CPU-sized reproduction of the paper's main table, offline, from nothing.

    kava-demo [--workdir kava_demo] [--quick] [--traces equation,nl] [--methods nocot,codi,pccot,kava]
              [--workers N] [--sequential]

For each trace style (equation-only `<<a+b=c>>` steps, and natural-language sentences):
1. generate synthetic GSM8k-style problems and build an offline tokenizer (configs/synthetic.py);
2. train a tiny backbone with the `cot` objective (full fine-tuning): the stand-in for the
   pretrained instruct model the paper starts from;
3. from that backbone, train with LoRA (as the paper does) the `nocot`, `codi`, `pccot` and `kava`
   students;
4. evaluate the CoT teacher and every student on held-out problems (greedy decoding; accuracy and
   forward passes counted as METHOD §6).
Runs are single-threaded worker processes, one per CPU core (tiny models use one core best): both
CoT backbones first, then each student as soon as its backbone is done, longest first. Results:
<workdir>/demo_results.json, demo_tables.md (Table 1: accuracy by method × trace; Table 2: forward
passes), demo_plot.png (accuracy against forward passes), one workdir per run, logs in <workdir>/logs.
Rerunning the same command resumes: finished runs are reused, interrupted ones continue.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TRACES = ("equation", "nl")
STUDENTS = ("nocot", "codi", "pccot", "kava")
METHOD_ORDER = ("cot", "nocot", "codi", "pccot", "kava")
LABELS = {"cot": "CoT (teacher)", "nocot": "No-CoT", "codi": "CODI", "pccot": "PCCoT", "kava": "KaVa"}

# Training budgets (steps of batch 32) per trace; --quick uses configs/synthetic.py's own "quick" sizes.
# CoT learning on this task is a sharp transition at ~18-30 k examples (equations; DEMO_NOTES.md) and
# NL traces need more; a latent student step costs ~2x a CoT step. Sized so the default run takes
# about 18 minutes on 2 idle cores (measured per-run times: README, "Results on this machine").
BUDGETS = {
    "equation": {"cot": 1500, "nocot": 200, "student": 350},
    "nl": {"cot": 1700, "nocot": 200, "student": 350},
}
EVAL_LIMIT = 300


def _configs_dir() -> Path:
    here = Path(__file__).resolve().parents[1] / "configs"
    if not (here / "synthetic.py").exists():
        raise FileNotFoundError(
            f"kava-demo needs the repository's configs/ folder (looked for {here / 'synthetic.py'}); "
            "install with `pip install -e .` from a clone of the repository")
    return here


def demo_config(method: str, trace: str, quick: bool, init_from: str | None = None):
    """The run config of one demo run (configs/synthetic.py plus the demo's budgets)."""
    from kava_jax.sweep import load_module

    synthetic = load_module(_configs_dir() / "synthetic.py", "kava_configs_synthetic")
    c = synthetic.get_config(",".join([method, trace] + (["quick"] if quick else [])))
    if method != "cot":
        # Every student starts from the CoT backbone and trains LoRA adapters (the paper's set-up).
        c.model.init_from = init_from
        c.train.mode = "lora"
        if not quick:
            c.train.num_steps = BUDGETS[trace]["nocot" if method == "nocot" else "student"]
            c.train.lr = 2e-3
            c.train.warmup_frac = 30 / c.train.num_steps
    elif not quick:
        c.train.num_steps = BUDGETS[trace]["cot"]
        c.train.warmup_frac = 50 / c.train.num_steps
    c.train.checkpoint_every = max(int(c.train.num_steps) // 2, 1)
    c.train.eval_every = None
    return c


def _say(trace: str, msg: str) -> None:
    print(f"[{trace}] {msg}", flush=True)


def run_job(workdir: Path, trace: str, method: str, quick: bool, eval_limit: int) -> dict[str, Any]:
    """Trains (or resumes) and evaluates one (trace, method) run; returns its eval row with timings.

    The row is also written to <workdir>/<trace>/<method>/demo_row.json; a rerun with the same steps and
    eval limit reuses it instead of evaluating again. Students need the trace's `cot` run finished."""
    wd = workdir / trace / method
    cfg = demo_config(method, trace, quick, init_from=str(workdir / trace / "cot"))
    limit = None if quick else eval_limit
    row_file = wd / "demo_row.json"
    if row_file.exists():
        row = json.loads(row_file.read_text())
        if row.get("num_steps") == int(cfg.train.num_steps) and row.get("eval_limit") == limit:
            _say(trace, f"{LABELS[method]}: finished earlier, reusing {row_file}")
            return row
    from kava_jax.eval.run import evaluate_workdir
    from kava_jax.train.loop import train

    t0 = time.time()
    _say(trace, f"{LABELS[method]}: training {cfg.train.num_steps} steps (batch {cfg.train.batch_size}, "
                f"{cfg.train.mode}) in {wd}")
    final = train(cfg, str(wd))
    t_train = time.time() - t0
    if final.get("preempted"):
        _say(trace, f"{LABELS[method]}: interrupted (SIGTERM) after saving a checkpoint; rerun to resume")
        raise SystemExit(143)
    _say(trace, f"{LABELS[method]}: trained in {t_train:.0f} s, final loss {final.get('loss', float('nan')):.4f}")
    t0 = time.time()
    row = evaluate_workdir(str(wd), ["synthetic"], limit=limit, progress=False)[0]
    t_eval = time.time() - t0
    row.pop("examples", None)
    row.update(train_seconds=t_train, eval_seconds=t_eval, final_train_metrics=final,
               num_steps=int(cfg.train.num_steps), eval_limit=limit)
    row_file.write_text(json.dumps(row, indent=2, default=str))
    _say(trace, f"{LABELS[method]}: accuracy {100 * row['accuracy']:.1f} % on {row['num_items']} held-out "
                f"problems, {row['mean_forward_passes']:.2f} forward passes (eval {t_eval:.0f} s)")
    return row


def run_trace(workdir: Path, trace: str, methods: tuple[str, ...], quick: bool, eval_limit: int) -> dict[str, Any]:
    """Every method of one trace style in this process, CoT first; returns {"trace", "runs": {method: row}}."""
    order = ("cot",) + tuple(m for m in methods if m != "cot")
    return {"trace": trace, "runs": {m: run_job(workdir, trace, m, quick, eval_limit) for m in order}}


# ------------------------------------------------------------------------------------------ report
def tables(results: dict[str, dict], traces: tuple[str, ...]) -> str:
    """Markdown Table 1 (accuracy %) and Table 2 (forward passes per question)."""
    methods = [m for m in METHOD_ORDER if any(m in results[t]["runs"] for t in traces)]

    def table(title, field, fmt):
        head = "| method | " + " | ".join(traces) + " |"
        sep = "|---|" + "---|" * len(traces)
        rows = []
        for m in methods:
            cells = []
            for t in traces:
                r = results[t]["runs"].get(m)
                cells.append(fmt(r[field]) if r else "–")
            rows.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
        return "\n".join([f"**{title}**", "", head, sep, *rows])

    t1 = table("Table 1: accuracy on held-out synthetic problems (%)", "accuracy", lambda v: f"{100 * v:.1f}")
    t2 = table("Table 2: forward passes per question (METHOD §6)", "mean_forward_passes", lambda v: f"{v:.2f}")
    return t1 + "\n\n" + t2 + "\n"


def plot(results: dict[str, dict], traces: tuple[str, ...], path: Path) -> Path:
    """Accuracy against forward passes, one marker per method, one colour per trace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    markers = {"cot": "*", "nocot": "x", "codi": "s", "pccot": "^", "kava": "o"}
    colours = {"equation": "tab:blue", "nl": "tab:orange"}
    for t in traces:
        for m, r in results[t]["runs"].items():
            ax.scatter(r["mean_forward_passes"], 100 * r["accuracy"], marker=markers.get(m, "o"), s=70,
                       color=colours.get(t, "gray"), label=f"{LABELS[m]} ({t})")
            ax.annotate(LABELS[m], (r["mean_forward_passes"], 100 * r["accuracy"]), textcoords="offset points",
                        xytext=(5, 4), fontsize=7, color=colours.get(t, "gray"))
    ax.set_xscale("log")
    ax.set_xlabel("forward passes per question (log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("kava-demo: accuracy vs forward passes")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ driver
def _worker_env(quick: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    flags = env.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in flags:
        flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    if quick and "xla_backend_optimization_level" not in flags:
        # --quick is compile-bound (a few dozen steps per run): cheaper codegen, ~4x faster compiles.
        flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env["XLA_FLAGS"] = flags.strip()
    env["PYTHONUNBUFFERED"] = "1"
    return env


# Relative cost of a run (NL traces are longer; a latent student step ~2x a CoT step): longest first.
_COST = {"cot": 4.0, "kava": 2.2, "pccot": 2.1, "codi": 2.0, "nocot": 1.0}


def schedule_order(traces, methods) -> list[tuple[str, str]]:
    """(trace, method) jobs, longest expected first: each trace's CoT backbone, then every student."""
    jobs = [(t, "cot") for t in traces] + [(t, m) for t in traces for m in methods if m != "cot"]
    return sorted(jobs, key=lambda j: -_COST.get(j[1], 1.0) * (1.5 if j[0] == "nl" else 1.0))


def _run_workers(workdir: Path, traces, methods, quick, eval_limit, workers: int) -> dict[str, dict]:
    """Runs the jobs as single-threaded worker processes, `workers` at a time; a student starts as soon
    as its trace's CoT backbone is done. Worker lines are streamed; logs go to <workdir>/logs/."""
    import selectors
    import signal

    pending = schedule_order(traces, methods)
    done: set[tuple[str, str]] = set()
    failed: list[tuple[str, str]] = []
    running: dict[Any, tuple[tuple[str, str], subprocess.Popen, Any]] = {}
    (workdir / "logs").mkdir(exist_ok=True)
    sel = selectors.DefaultSelector()
    stopping = []

    def on_sigterm(signum, frame):
        stopping.append(True)
        for _, p, _ in running.values():
            p.send_signal(signal.SIGTERM)  # each worker checkpoints and exits

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        while pending or running:
            ready = [j for j in pending if j[1] == "cot" or (j[0], "cot") in done]
            blocked = [j for j in pending if (j[0], "cot") in failed]
            for j in blocked:
                pending.remove(j)
                failed.append(j)
            while ready and len(running) < workers and not stopping:
                job = ready.pop(0)
                pending.remove(job)
                trace, method = job
                log = open(workdir / "logs" / f"{trace}_{method}.log", "w")  # noqa: SIM115 - closed below
                cmd = [sys.executable, "-m", "kava_jax.demo", "--worker", f"{trace}:{method}", "--workdir",
                       str(workdir), "--eval_limit", str(eval_limit)] + (["--quick"] if quick else [])
                p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=_worker_env(quick))
                running[p.stdout] = (job, p, log)
                sel.register(p.stdout, selectors.EVENT_READ)
            if stopping and not running:
                break
            for key, _ in sel.select(timeout=1.0):
                line = key.fileobj.readline()
                if line:
                    print(line, end="", flush=True)
                    continue
                sel.unregister(key.fileobj)
                job, p, log = running.pop(key.fileobj)
                p.wait()
                log.close()
                if p.returncode == 0:
                    done.add(job)
                else:
                    failed.append(job)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stopping:
        print("kava-demo: SIGTERM — the running jobs saved checkpoints; rerun the same command to resume",
              flush=True)
        raise SystemExit(143)
    if failed:
        tails = "\n".join(f"--- {workdir / 'logs' / f'{t}_{m}.log'} (last lines) ---\n"
                          + "".join((workdir / "logs" / f"{t}_{m}.log").read_text().splitlines(True)[-15:])
                          for t, m in failed if (workdir / "logs" / f"{t}_{m}.log").exists())
        names = ", ".join(f"{t}/{m}" for t, m in failed)
        raise SystemExit(f"kava-demo: run(s) {names} failed (students of a failed CoT run are skipped)\n{tails}")
    return {t: {"trace": t, "runs": {m: json.loads((workdir / t / m / "demo_row.json").read_text())
                                     for m in ("cot",) + tuple(methods)}} for t in traces}


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="kava-demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="kava_demo", help="where runs, tables and the plot go")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in a few minutes (CI, Colab)")
    ap.add_argument("--traces", default=",".join(TRACES), help="comma list of trace styles (equation, nl)")
    ap.add_argument("--methods", default=",".join(STUDENTS), help="students to train (nocot, codi, pccot, kava)")
    ap.add_argument("--eval_limit", type=int, default=EVAL_LIMIT, help="held-out problems per evaluation")
    ap.add_argument("--workers", type=int, default=None,
                    help="single-threaded runs at a time (default: the CPU count, at most 8)")
    ap.add_argument("--sequential", action="store_true", help="run everything one after another in this process")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "trace:method", one job
    args = ap.parse_args(argv)
    traces = tuple(t for t in args.traces.split(",") if t)
    methods = tuple(m for m in args.methods.split(",") if m)
    for t in traces:
        if t not in TRACES:
            ap.error(f"--traces: unknown trace {t!r} (known: {', '.join(TRACES)})")
    for m in methods:
        if m not in STUDENTS:
            ap.error(f"--methods: unknown method {m!r} (known: {', '.join(STUDENTS)})")
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    if args.worker:
        trace, method = args.worker.split(":")
        return run_job(workdir, trace, method, args.quick, args.eval_limit)
    workers = args.workers or min(os.cpu_count() or 1, 8)
    if workers < 1:
        ap.error(f"--workers must be >= 1, got {workers}")

    t0 = time.time()
    print(f"kava-demo: {'quick' if args.quick else 'default'} run of {', '.join(traces)} × "
          f"CoT + {', '.join(methods)} in {workdir}", flush=True)
    if args.sequential or workers == 1:
        results = {t: run_trace(workdir, t, methods, args.quick, args.eval_limit) for t in traces}
    else:
        results = _run_workers(workdir, traces, methods, args.quick, args.eval_limit, workers)
    wall = time.time() - t0
    md = tables(results, traces)
    md += f"\nWall time: {wall / 60:.1f} min ({'quick' if args.quick else 'default'} settings).\n"
    (workdir / "demo_tables.md").write_text(md)
    png = plot(results, traces, workdir / "demo_plot.png")
    payload = {"quick": args.quick, "traces": traces, "methods": ("cot",) + methods, "wall_seconds": wall,
               "workers": 1 if args.sequential else workers,
               "results": results}
    (workdir / "demo_results.json").write_text(json.dumps(payload, indent=2, default=str))
    print("\n" + md, flush=True)
    print("Files:", flush=True)
    for p in [workdir / "demo_results.json", workdir / "demo_tables.md", png]:
        print(f"  {p}", flush=True)
    for t in traces:
        print(f"  {workdir / t}/{{cot,{','.join(methods)}}}  (run workdirs; kava-eval --workdir ... re-evaluates)",
              flush=True)
    return payload


def run() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    main()


if __name__ == "__main__":
    run()
