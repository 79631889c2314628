"""`kava-eval`: evaluate trained runs (one or several workdirs) on one or several eval sets.

    kava-eval --workdir /tmp/run [--workdir /tmp/run_seed1 ...] [--datasets synthetic,gsm8k]
              [--step N] [--limit 200] [--method auto] [--config configs/x.py]

Each workdir holds the run's config.json, tokenizer and checkpoints (written by kava-train). The
method follows the run's objective (cot → full-CoT decoding, nocot → direct answer, codi/pccot/kava →
latent decoding with the run's M, T and latent mode) unless --method says otherwise. With several
workdirs (seeds), the table shows mean ± std over them. Writes eval_results.json (into the single
workdir, or --output) and prints a table: method, dataset, accuracy, mean forward passes, mean
generated tokens, KV bytes, seconds per question. `--config` (optional) takes its `eval` section
(datasets, limit, batch_size, max_answer_tokens, max_cot_tokens) as defaults.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["evaluate_workdir", "aggregate", "format_table", "main", "run", "method_for"]

RESULTS_FILE = "eval_results.json"
METHOD_CHOICES = ("auto", "cot", "nocot", "latent")


def method_for(objective: str) -> str:
    """The decoding method that matches a training objective."""
    return {"cot": "cot", "nocot": "nocot"}.get(objective, "latent")


def _label(objective: str, method: str) -> str:
    return objective if method == method_for(objective) else f"{objective}->{method}"


def evaluate_workdir(workdir: str, datasets: list[str], *, step: int | None = None, limit: int | None = None,
                     method: str = "auto", batch_size: int | None = None, max_answer_tokens: int | None = None,
                     max_cot_tokens: int | None = None, sources: dict[str, str] | None = None,
                     progress: bool = True) -> list[dict[str, Any]]:
    """One result row per dataset for the trained model in `workdir` (latest checkpoint unless `step`).

    `sources` maps a dataset name to a local file / hub name; "synthetic" defaults to the run's own
    synthetic test split (<workdir>/data).
    """
    from kava_jax.data.evalsets import load_eval_set
    from kava_jax.eval.evaluate import evaluate
    from kava_jax.train.setup import DATA_DIR, load_trained

    if method not in METHOD_CHOICES:
        raise ValueError(f"--method must be one of {METHOD_CHOICES}, got {method!r}")
    trained = load_trained(workdir, step)
    cfg, obj = trained.config, trained.objective
    chosen = method_for(obj.objective) if method == "auto" else method
    if chosen == "latent" and obj.objective not in ("kava", "pccot", "codi"):
        raise ValueError(f"--method latent needs a latent student; {workdir} trained objective {obj.objective!r}")
    sources = dict(sources or {})
    rows = []
    for name in datasets:
        src = sources.get(name)
        if name == "synthetic" and src is None:
            src = str(Path(workdir) / DATA_DIR)
            if not Path(src).exists():
                raise FileNotFoundError(f"{workdir}: no synthetic data dir {src}; pass a source for 'synthetic'")
        items = load_eval_set(name, src, limit=limit)
        res = evaluate(chosen, trained.params, trained.model_config, trained.prj, trained.bundle.tokenizer,
                       trained.bundle.specials, items, q_len=trained.layout.q_len,
                       latent_mode="sequential" if obj.objective == "codi" else obj.latent_mode,
                       num_latents=obj.num_latents, num_iterations=obj.num_iterations,
                       prompt_ids=trained.layout.prompt_ids, truncate=True,
                       batch_size=int(batch_size or cfg.eval.batch_size),
                       max_answer_tokens=int(max_answer_tokens or cfg.eval.max_answer_tokens),
                       max_cot_tokens=int(max_cot_tokens or cfg.eval.max_cot_tokens), progress=progress)
        row = {**res.summary(), "workdir": str(workdir), "step": trained.step, "objective": obj.objective,
               "decoding": chosen, "method": _label(obj.objective, chosen), "dataset": name}
        row["examples"] = [dict(question=p.question, gold=p.gold, text=p.text, pred=p.pred, correct=p.correct)
                           for p in res.predictions[:5]]
        rows.append(row)
        log.info("%s %s: accuracy %.4f, %.2f passes", workdir, name, res.accuracy, res.mean_forward_passes)
    return rows


_NUMERIC = ("accuracy", "mean_forward_passes", "mean_generated_tokens", "mean_kv_bytes", "seconds_per_question")


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups rows by (method, dataset): mean and std (over workdirs / seeds) of every numeric field."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["dataset"]), []).append(r)
    out = []
    for (method, dataset), rs in groups.items():
        agg: dict[str, Any] = {"method": method, "dataset": dataset, "runs": len(rs),
                               "num_items": rs[0]["num_items"]}
        for k in _NUMERIC:
            vals = [float(r[k]) for r in rs]
            agg[k] = statistics.fmean(vals)
            agg[k + "_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        out.append(agg)
    return out


def format_table(agg_rows: list[dict[str, Any]]) -> str:
    """Plain-text table; accuracy in %, ± std when several runs were pooled."""
    cols = ["method", "dataset", "n", "accuracy %", "fwd passes", "gen tokens", "KV bytes", "s/question"]
    lines = []
    for r in agg_rows:
        pm = r["runs"] > 1
        acc = f"{100 * r['accuracy']:.1f}" + (f" ± {100 * r['accuracy_std']:.1f}" if pm else "")
        lines.append([r["method"], r["dataset"], str(r["num_items"]), acc, f"{r['mean_forward_passes']:.2f}",
                      f"{r['mean_generated_tokens']:.2f}", f"{r['mean_kv_bytes']:.0f}",
                      f"{r['seconds_per_question']:.4f}"])
    widths = [max(len(c), *(len(row[i]) for row in lines)) if lines else len(c) for i, c in enumerate(cols)]
    text = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)),
            "  ".join("-" * w for w in widths)]
    text += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in lines]
    return "\n".join(text)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_multi_string("workdir", None, "Run workdir(s) written by kava-train (several = seeds).")
    config_flags.DEFINE_config_file("config", None, "Optional config file whose `eval` section gives defaults.",
                                    lock_config=False)
    flags.DEFINE_list("datasets", None, "Eval sets: synthetic, gsm8k, gsm_hard, svamp, multiarith.")
    flags.DEFINE_multi_string("source", [], "NAME=PATH_OR_HUB_ID: where to read an eval set from.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.DEFINE_integer("limit", None, "Evaluate only the first N items of each set.")
    flags.DEFINE_enum("method", "auto", list(METHOD_CHOICES), "Decoding method (auto: from the objective).")
    flags.DEFINE_integer("batch_size", None, "Eval batch size.")
    flags.DEFINE_string("output", None, "Where to write the JSON (default: <workdir>/eval_results.json).")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    flags.mark_flag_as_required("workdir")
    return flags.FLAGS


def main(argv) -> None:
    from absl import flags

    if len(argv) > 1:
        raise SystemExit(f"kava-eval: unexpected arguments {argv[1:]}")
    fl = flags.FLAGS
    ev = fl.config.eval if fl.config is not None else None
    datasets = fl.datasets or (list(ev.datasets) if ev is not None else ["synthetic"])
    limit = fl.limit if fl.limit is not None else (ev.limit if ev is not None else None)
    sources = {}
    for s in fl.source:
        if "=" not in s:
            raise SystemExit(f"kava-eval: --source must be NAME=PATH, got {s!r}")
        k, v = s.split("=", 1)
        sources[k] = v
    rows = []
    for wd in fl.workdir:
        rows += evaluate_workdir(wd, datasets, step=fl.step, limit=limit, method=fl.method,
                                 batch_size=fl.batch_size or (ev.batch_size if ev is not None else None),
                                 sources=sources, progress=fl.progress)
    agg = aggregate(rows)
    table = format_table(agg)
    print(table, flush=True)
    out = Path(fl.output) if fl.output else Path(fl.workdir[0]) / RESULTS_FILE
    if len(fl.workdir) > 1 and not fl.output:
        out = Path(fl.workdir[0]).parent / RESULTS_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": rows, "aggregate": agg, "table": table}, indent=2, default=str))
    print(f"wrote {out}", flush=True)


def run() -> None:
    from absl import app

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    _define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
