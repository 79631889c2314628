"""Latent inference vs full-CoT vs No-CoT decoding on the same questions (kava_jax.eval.decode).

Model: bench/train_step.py's small (default) or medium config with random weights and a random prj.
Questions: B (--batches, default 1 and 8) left-padded question blocks of Q 64 (lengths 40..63 + BOS).
  latent  `question <bot>` -> pass 0 + T Jacobi passes over M latents -> `<eot>` + " The answer is:"
          -> greedy answer of --answer-tokens tokens            (latent_generate, jacobi, M 24, T 3)
  CoT     question -> greedy CoT + prompt + answer + EOS of --cot-tokens tokens        (cot_generate)
  No-CoT  question ++ " The answer is:" -> greedy answer of --answer-tokens tokens     (nocot_generate)

A random model generates arbitrary tokens, so lengths are FORCED: EOS is set to an id that none of the
three decoders ever produces on these questions (checked: every row generates exactly max_new_tokens),
and max_new_tokens is --cot-tokens (default 60: a realistic CoT of ~50 tokens plus prompt, answer and
EOS) for CoT and --answer-tokens (default 4: answer + EOS) for latent and No-CoT.

Reported per method and batch size: forward passes per question (METHOD §6 count from DecodeResult),
token positions pushed through the blocks per question (padded shapes: the FLOP proxy), wall time per
question (batch wall time / B), generated tokens/s, KV bytes held when the answer starts; and the
latent-vs-CoT wall-time speed-up divided by the forward-pass ratio (1.0 = the saving in passes fully
realised in wall time). Methods are timed interleaved, --repeats rounds, medians and minima.

Reading it: a latent question pushes (Q+1+M) + T*M + (1+prompt) + (answer-1) = 169 token positions
through the blocks, a CoT question Q + (CoT-1) = 123: where the device is compute-bound (CPU, or any
device at large batch) latent decoding cannot realise the pass ratio; the pass ratio is the latency
argument for memory-/overhead-bound decoding (small batch, accelerators).

    python bench/inference.py [--size small] [--batches 1,8] [--cot-tokens 60] [--answer-tokens 4] [--repeats 7]
Writes bench/results/inference.json.
"""

from __future__ import annotations

import argparse

import common  # noqa: E402,F401  (first: sets JAX_PLATFORMS, puts the repository root on sys.path)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import train_step as ts  # noqa: E402
from common import interleave, print_table, time_call, write_json  # noqa: E402

from kava_jax.eval.decode import cot_generate, latent_generate, nocot_generate  # noqa: E402
from kava_jax.kava.student import init_prj  # noqa: E402
from kava_jax.models import init_params  # noqa: E402


def questions(batch: int, q_len: int, vocab: int, seed: int = 0):
    """Left-padded question blocks [B,Q] (BOS + 39..62 random ids) and their valid masks."""
    rng = np.random.default_rng(seed)
    ids = np.full((batch, q_len), ts.PAD, np.int32)
    valid = np.zeros((batch, q_len), bool)
    for b in range(batch):
        n = int(rng.integers(40, q_len + 1))  # valid tokens incl. BOS
        ids[b, q_len - n:] = [ts.BOS, *rng.integers(ts.FIRST_PLAIN, vocab - len(ts.SPECIALS), size=n - 1)]
        valid[b, q_len - n:] = True
    return ids, valid


def make_runners(params, mc, prj, ids, valid, *, m: int, t: int, eos: int, cot_tokens: int, answer_tokens: int):
    """{method: () -> DecodeResult} for fixed eos/lengths."""
    b = ids.shape[0]
    prefix = jnp.concatenate([ids, jnp.full((b, 1), ts.SPECIALS[0], jnp.int32)], axis=1)
    pvalid = jnp.concatenate([valid, jnp.ones((b, 1), bool)], axis=1)
    decode_kw = dict(eos_id=eos, pad_id=ts.PAD)
    return {
        "latent": lambda: latent_generate(params, mc, prj, prefix, pvalid, mode="jacobi", num_latents=m,
                                          num_iterations=t, latent_id=ts.SPECIALS[2], eot_id=ts.SPECIALS[1],
                                          prompt_ids=ts.PROMPT, max_new_tokens=answer_tokens, **decode_kw),
        "cot": lambda: cot_generate(params, mc, ids, valid, max_new_tokens=cot_tokens, prompt_ids=ts.PROMPT,
                                    **decode_kw),
        "nocot": lambda: nocot_generate(params, mc, ids, valid, prompt_ids=ts.PROMPT, max_new_tokens=answer_tokens,
                                        **decode_kw),
    }


def pick_eos(params, mc, prj, ids, valid, args) -> int:
    """An id none of the decoders produces on these questions (greedy tokens do not depend on eos_id
    until it is produced, so one run with a candidate shows which ids appear)."""
    candidate = ts.EOS
    for _ in range(8):
        runs = make_runners(params, mc, prj, ids, valid, m=args.m, t=args.t, eos=candidate,
                            cot_tokens=args.cot_tokens, answer_tokens=args.answer_tokens)
        seen = set()
        for fn in runs.values():
            seen |= set(np.asarray(fn().tokens).ravel().tolist())
        if candidate not in seen:
            return candidate
        reserved = {ts.PAD, ts.BOS, *ts.PROMPT, *ts.SPECIALS}
        candidate = next(i for i in range(mc.vocab_size) if i not in seen and i not in reserved)
    raise RuntimeError("could not find an EOS id the model never produces")


def block_tokens(method: str, args) -> int:
    """Token positions one question pushes through the decoder blocks (padded shapes, what is computed)."""
    p = len(ts.PROMPT)
    if method == "latent":
        return (args.q + 1 + args.m) + args.t * args.m + (1 + p) + (args.answer_tokens - 1)
    if method == "cot":
        return args.q + (args.cot_tokens - 1)
    return args.q + p + (args.answer_tokens - 1)


def run_batch(params, mc, prj, batch: int, args) -> dict:
    ids_np, valid_np = questions(batch, args.q, mc.vocab_size)
    ids, valid = jnp.asarray(ids_np), jnp.asarray(valid_np)
    eos = pick_eos(params, mc, prj, ids, valid, args)
    runs = make_runners(params, mc, prj, ids, valid, m=args.m, t=args.t, eos=eos, cot_tokens=args.cot_tokens,
                        answer_tokens=args.answer_tokens)
    results, first_s = {}, {}
    for name, fn in runs.items():  # compiled by pick_eos (same static shapes): first_s is a warm call
        first_s[name] = time_call(fn, jax.block_until_ready)
        results[name] = jax.tree.map(np.asarray, fn())
        want = args.cot_tokens if name == "cot" else args.answer_tokens
        if not (results[name].num_generated == want).all():
            raise AssertionError(f"{name}: generation length not forced: {results[name].num_generated}")
    stats = interleave({k: (lambda fn=fn: time_call(fn, jax.block_until_ready)) for k, fn in runs.items()},
                       args.repeats)
    rows = []
    for name, res in results.items():
        s = stats[name]
        n_gen = float(res.num_generated.mean())
        passes = float(res.forward_passes.mean())
        rows.append({"batch": batch, "method": name, "passes/question": passes, "generated/question": n_gen,
                     "block tokens/question": block_tokens(name, args),
                     "ms/question": 1e3 * s["median"] / batch, "ms/question best": 1e3 * s["min"] / batch,
                     "batch_median_s": s["median"], "batch_min_s": s["min"], "tokens/s": batch * n_gen / s["median"],
                     "ms/pass (batch)": 1e3 * s["median"] / passes, "KV bytes/question": float(res.kv_bytes.mean()),
                     "KV positions": float(res.kv_positions.mean())})
    by = {r["method"]: r for r in rows}
    pass_ratio = by["cot"]["passes/question"] / by["latent"]["passes/question"]
    speedup = stats["cot"]["median"] / stats["latent"]["median"]
    speedup_best = stats["cot"]["min"] / stats["latent"]["min"]
    summary = {"batch": batch, "eos_id": eos, "pass_ratio_cot_over_latent": pass_ratio,
               "block_token_ratio_cot_over_latent": by["cot"]["block tokens/question"]
               / by["latent"]["block tokens/question"],
               "wall_speedup_latent_vs_cot": speedup, "wall_speedup_best": speedup_best,
               "realised_fraction": speedup / pass_ratio, "realised_fraction_best": speedup_best / pass_ratio,
               "kv_ratio_cot_over_latent": by["cot"]["KV bytes/question"] / by["latent"]["KV bytes/question"],
               "latent_over_nocot_wall": stats["latent"]["median"] / stats["nocot"]["median"],
               "warm_first_call_s": first_s}
    return {"rows": rows, "summary": summary}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=sorted(ts.SIZES))
    ap.add_argument("--batches", default="1,8", help="batch sizes (questions decoded together)")
    ap.add_argument("--q", type=int, default=64)
    ap.add_argument("--m", type=int, default=24)
    ap.add_argument("--t", type=int, default=3)
    ap.add_argument("--cot-tokens", type=int, default=60)
    ap.add_argument("--answer-tokens", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    load_before = ts.load_average()
    mc = ts.model_config(args.size)
    key = jax.random.key(0)
    params = init_params(mc, key)
    prj = init_prj(jax.random.fold_in(key, 1), mc.hidden_size)
    rows, summaries = [], []
    for batch in [int(x) for x in args.batches.split(",")]:
        out = run_batch(params, mc, prj, batch, args)
        rows += out["rows"]
        summaries.append(out["summary"])
    load_after = ts.load_average()
    title = (f"decoding, {args.size} config, Q {args.q}, M {args.m}, T {args.t}; forced lengths: CoT "
             f"{args.cot_tokens} new tokens, latent/No-CoT answer {args.answer_tokens} (EOS = an id never produced); "
             f"load {load_before} -> {load_after}")
    table = print_table(rows, ["batch", "method", "passes/question", "block tokens/question", "ms/question",
                               "ms/question best", "tokens/s", "ms/pass (batch)", "KV bytes/question"], title)
    for sm in summaries:
        print(f"B {sm['batch']}: latent vs CoT: pass ratio {sm['pass_ratio_cot_over_latent']:.2f}, block-token "
              f"ratio {sm['block_token_ratio_cot_over_latent']:.2f}, wall speed-up "
              f"{sm['wall_speedup_latent_vs_cot']:.2f} (best {sm['wall_speedup_best']:.2f}), realised fraction "
              f"{sm['realised_fraction']:.2f} (best {sm['realised_fraction_best']:.2f})")
    payload = {"bench": "inference", "args": vars(args), "rows": rows, "summaries": summaries, "table": table,
               "load_before": load_before, "load_after": load_after, "jax": jax.__version__}
    write_json("inference" + (f"_{args.tag}" if args.tag else ""), payload)
    return payload


if __name__ == "__main__":
    main()
