"""Greedy decoders of kava_jax.eval.decode against repeated full forwards without a cache.

Reference: one jitted no-cache `forward` over a fixed [B, S_REF] window (inputs_embeds built by hand
from the embedding table, unfilled tail masked out) called once per generated token in a Python loop;
argmax at the last filled position; EOS / pad / counts re-derived here. For latent decoding the latent
input embeddings come from the student functions and the whole `question <bot>` + latents +
`<eot> prompt` + generated sequence is run from scratch. One decoder compile per static shape: the
special ids and the prompt are traced arrays, so changing eos between runs does not recompile.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kava_jax.eval import decode
from kava_jax.kava.student import apply_prj, init_prj
from kava_jax.models import abstract_params, forward, get_preset

CFG = get_preset("tiny", vocab_size=64, tie_word_embeddings=False)  # untied: outputs vary with context
PAD, BOS, EOS, BOT, EOT, LAT = 0, 1, 2, 61, 62, 63
PROMPT = (5, 6, 7)
B, Q, S_REF = 3, 6, 24
BYTES_PER_POS = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads, head dim 16, float32


@functools.cache
def _setup():
    rng = np.random.default_rng(0)
    # numpy-filled random params (no eager init compiles): norm scales 1, matrices N(0, 0.06^2) (3x the
    # usual init, so argmax margins are large and the next token depends on the context) and q/k
    # kernels N(0, 0.36^2) so attention is sharp and an off-by-one RoPE position changes the output.
    def fill(path, a):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.asarray(np.ones(a.shape, a.dtype))
        std = 0.36 if ("q_proj" in name or "k_proj" in name) else 0.06
        return jnp.asarray(rng.normal(0.0, std, a.shape).astype(a.dtype))

    params = jax.tree_util.tree_map_with_path(fill, abstract_params(CFG))
    prj = jax.jit(init_prj, static_argnums=1)(jax.random.key(1), CFG.hidden_size)
    ids = rng.integers(3, 60, (B, Q)).astype(np.int32)
    valid = np.ones((B, Q), bool)
    for b, n in enumerate((4, 6, 5)):  # left padding, different lengths
        valid[b, : Q - n] = False
        ids[b, : Q - n] = PAD
        ids[b, Q - n] = BOS
    return params, prj, ids, valid


@jax.jit
def _full(p, e, m):
    """No-cache forward over a fixed [B, S_REF] window: (logits, final hidden states)."""
    out = forward(p, CFG, inputs_embeds=e, attention_mask=m)
    return out.logits, out.hidden_states[-1]


_prj = jax.jit(apply_prj)


def _reference_greedy(params, prefix_emb, prefix_mask, *, eos, max_new):
    """Repeated full forwards (no cache) over [prefix ++ generated so far]."""
    table = np.asarray(params["embed"]["embedding"])
    b, p0, d = prefix_emb.shape
    assert p0 + max_new <= S_REF
    emb = np.zeros((b, S_REF, d), np.float32)
    mask = np.zeros((b, S_REF), bool)
    emb[:, :p0], mask[:, :p0] = prefix_emb, prefix_mask
    tokens = np.full((b, max_new), PAD, np.int32)
    count = np.zeros((b,), np.int32)
    done = np.zeros((b,), bool)
    for k in range(max_new):
        logits = np.asarray(_full(params, emb, mask)[0])
        nxt = logits[:, p0 + k - 1].argmax(-1)
        for r in range(b):
            if not done[r]:
                tokens[r, k] = nxt[r]
                count[r] += 1
                done[r] = nxt[r] == eos
        if done.all():
            break
        emb[:, p0 + k] = table[nxt]
        mask[:, p0 + k] = True
    return tokens, count


def _reference_latent_inputs(params, prj, prefix, pvalid, mode, m, t):
    """The inputs [B,M,D] of the pass that makes the final latent KV (METHOD §2), recomputed with
    full no-cache forwards over `question <bot>` ++ latent embeddings."""
    b, p = prefix.shape
    base = _embed(params, prefix)

    def final_hidden(lat):  # lat [B,j,D] -> final hidden states [B,p+j,D]
        j = lat.shape[1]
        emb = np.zeros((b, S_REF, CFG.hidden_size), np.float32)
        mask = np.zeros((b, S_REF), bool)
        emb[:, :p], emb[:, p:p + j] = base, lat
        mask[:, :p], mask[:, p:p + j] = pvalid, True
        return np.asarray(_full(params, emb, mask)[1])[:, :p + j]

    def proj(h):
        return np.asarray(_prj(prj, jnp.asarray(h)))

    if mode == "jacobi":
        e = np.broadcast_to(_embed(params, [LAT]), (b, m, CFG.hidden_size))  # pass 0: placeholders
        if t == 0:
            return e
        e = proj(final_hidden(e)[:, p - 1:p - 1 + m])  # e(0): hidden at <bot> and the first M-1 slots
        for _ in range(t - 1):  # passes 1..T-1 produce e(1)..e(T-1); pass T runs e(T-1)
            e = np.concatenate([e[:, :1], proj(final_hidden(e)[:, p:p + m - 1])], axis=1)
        return e
    inputs = [proj(final_hidden(np.zeros((b, 0, CFG.hidden_size), np.float32))[:, p - 1])]  # from <bot>
    for j in range(1, m):
        inputs.append(proj(final_hidden(np.stack(inputs, 1))[:, p + j - 1]))
    return np.stack(inputs, 1)


def _embed(params, ids):
    return np.asarray(params["embed"]["embedding"])[np.asarray(ids)]


def _first_prompt_end(tokens_row, count, prompt):
    k = len(prompt)
    for s in range(count - k + 1):
        if tuple(tokens_row[s:s + k]) == tuple(prompt):
            return s + k
    return count


def _pick_eos(tokens, count):
    """A token whose first occurrence in row 0 is at step >= 1 and that first appears elsewhere at a
    different step (or never), so rows must stop at different times."""
    def first(r, t):
        hits = np.flatnonzero(tokens[r, :count[r]] == t)
        return int(hits[0]) if hits.size else None

    for s in range(1, int(count[0])):
        t = int(tokens[0, s])
        if first(0, t) == s and t not in (PAD,) and any(first(r, t) != s for r in range(1, len(tokens))):
            return t, s
    pytest.fail(f"no usable eos candidate in {tokens}")


# ----------------------------------------------------------------------------------- CoT / no-CoT
def test_cot_matches_uncached_reference_and_eos_stops_rows_independently():
    params, _, ids, valid = _setup()
    n = 8
    run1 = decode.cot_generate(params, CFG, ids, valid, eos_id=EOS, pad_id=PAD, max_new_tokens=n, prompt_ids=PROMPT)
    ref_tok, ref_cnt = _reference_greedy(params, _embed(params, ids), valid, eos=EOS, max_new=n)
    np.testing.assert_array_equal(np.asarray(run1.tokens), ref_tok)
    np.testing.assert_array_equal(np.asarray(run1.num_generated), ref_cnt)
    assert len(set(ref_tok[:, :3].ravel().tolist())) > 3, "degenerate random model: test would be weak"

    # EOS = a token row 0 emits mid-way: row 0 stops there, the others at their own first hit.
    eos, step = _pick_eos(ref_tok, ref_cnt)
    run2 = decode.cot_generate(params, CFG, ids, valid, eos_id=eos, pad_id=PAD, max_new_tokens=n, prompt_ids=PROMPT)
    tok2, cnt2 = np.asarray(run2.tokens), np.asarray(run2.num_generated)
    assert cnt2[0] == step + 1
    for r in range(B):
        hits = np.flatnonzero(ref_tok[r, :ref_cnt[r]] == eos)
        stop = int(hits[0]) + 1 if hits.size else int(ref_cnt[r])
        assert cnt2[r] == stop, (r, cnt2, stop)
        np.testing.assert_array_equal(tok2[r, :stop], ref_tok[r, :stop])
        assert (tok2[r, stop:] == PAD).all()
    assert len(set(cnt2.tolist())) > 1
    np.testing.assert_array_equal(np.asarray(run2.forward_passes), 1 + cnt2)  # METHOD: 1 prefill + 1 per token
    ref2_tok, ref2_cnt = _reference_greedy(params, _embed(params, ids), valid, eos=eos, max_new=n)
    np.testing.assert_array_equal(tok2, ref2_tok)
    np.testing.assert_array_equal(cnt2, ref2_cnt)


def test_cot_kv_bytes_counts_up_to_generated_prompt():
    params, _, ids, valid = _setup()
    n = 8
    base = decode.cot_generate(params, CFG, ids, valid, eos_id=EOS, pad_id=PAD, max_new_tokens=n, prompt_ids=PROMPT)
    tok, cnt = np.asarray(base.tokens), np.asarray(base.num_generated)
    prompt = tuple(int(t) for t in tok[0, 2:5])  # a "prompt" row 0 generates at steps 2..4
    res = decode.cot_generate(params, CFG, ids, valid, eos_id=EOS, pad_id=PAD, max_new_tokens=n, prompt_ids=prompt)
    q = valid.sum(1)
    want = np.array([q[r] + _first_prompt_end(tok[r], cnt[r], prompt) for r in range(B)])
    assert want[0] <= q[0] + 5
    np.testing.assert_array_equal(np.asarray(res.kv_positions), want)
    np.testing.assert_array_equal(np.asarray(res.kv_bytes), want * BYTES_PER_POS)
    # the default counts tokens up to the prompt's end; without a match, all generated tokens
    np.testing.assert_array_equal(np.asarray(base.kv_positions),
                                  [q[r] + _first_prompt_end(tok[r], cnt[r], PROMPT) for r in range(B)])


def test_nocot_matches_reference_counts_and_kv():
    params, _, ids, valid = _setup()
    n = 5
    res = decode.nocot_generate(params, CFG, ids, valid, prompt_ids=PROMPT, eos_id=EOS, pad_id=PAD,
                                max_new_tokens=n)
    seq = np.concatenate([ids, np.broadcast_to(PROMPT, (B, 3))], 1)
    mask = np.concatenate([valid, np.ones((B, 3), bool)], 1)
    ref_tok, ref_cnt = _reference_greedy(params, _embed(params, seq), mask, eos=EOS, max_new=n)
    np.testing.assert_array_equal(np.asarray(res.tokens), ref_tok)
    np.testing.assert_array_equal(np.asarray(res.num_generated), ref_cnt)
    np.testing.assert_array_equal(np.asarray(res.forward_passes), 1 + ref_cnt)
    np.testing.assert_array_equal(np.asarray(res.kv_bytes), (valid.sum(1) + 3) * BYTES_PER_POS)


# ----------------------------------------------------------------------------------- latent
@pytest.mark.parametrize("mode,m,t", [("jacobi", 3, 2), ("sequential", 2, 0)])
def test_latent_matches_uncached_reference(mode, m, t):
    params, prj, ids, valid = _setup()
    n = 5
    prefix = np.concatenate([ids, np.full((B, 1), BOT, np.int32)], 1)
    pvalid = np.concatenate([valid, np.ones((B, 1), bool)], 1)
    kw = dict(mode=mode, num_latents=m, num_iterations=t, latent_id=LAT, eot_id=EOT, prompt_ids=PROMPT, pad_id=PAD,
              max_new_tokens=n)
    res = decode.latent_generate(params, CFG, prj, prefix, pvalid, eos_id=EOS, **kw)

    lat = _reference_latent_inputs(params, prj, prefix, pvalid, mode, m, t)
    seg = np.broadcast_to((EOT, *PROMPT), (B, 4))
    emb = np.concatenate([_embed(params, prefix), lat, _embed(params, seg)], 1)
    mask = np.concatenate([pvalid, np.ones((B, m + 4), bool)], 1)
    ref_tok, ref_cnt = _reference_greedy(params, emb, mask, eos=EOS, max_new=n)
    np.testing.assert_array_equal(np.asarray(res.tokens), ref_tok)
    np.testing.assert_array_equal(np.asarray(res.num_generated), ref_cnt)

    # METHOD §6 counts and KV held (question + <bot> + M).
    pre = 1 + (t if mode == "jacobi" else m) + 1
    np.testing.assert_array_equal(np.asarray(res.forward_passes), pre + ref_cnt - 1)
    np.testing.assert_array_equal(np.asarray(res.kv_positions), valid.sum(1) + 1 + m)
    np.testing.assert_array_equal(np.asarray(res.kv_bytes), (valid.sum(1) + 1 + m) * BYTES_PER_POS)

    # EOS mid-answer: rows stop independently, same tokens before, pad after (no recompile: eos is traced).
    eos, step = _pick_eos(ref_tok, ref_cnt)
    res2 = decode.latent_generate(params, CFG, prj, prefix, pvalid, eos_id=eos, **kw)
    ref2_tok, ref2_cnt = _reference_greedy(params, emb, mask, eos=eos, max_new=n)
    np.testing.assert_array_equal(np.asarray(res2.tokens), ref2_tok)
    np.testing.assert_array_equal(np.asarray(res2.num_generated), ref2_cnt)
    assert ref2_cnt[0] == step + 1 and (ref2_tok[0, step + 1:] == PAD).all()
    np.testing.assert_array_equal(np.asarray(res2.forward_passes), pre + ref2_cnt - 1)


def test_count_formulas():
    n = np.array([1, 4])
    np.testing.assert_array_equal(decode.latent_forward_passes("jacobi", 24, 3, n), [5, 8])  # 1+3+1+(n-1)
    np.testing.assert_array_equal(decode.latent_forward_passes("sequential", 6, 3, n), [8, 11])  # 1+6+1+(n-1)
    assert decode.kv_bytes_per_position(CFG) == BYTES_PER_POS
    assert decode.kv_bytes_per_position(get_preset("llama3.2-1b", dtype="bfloat16")) == 2 * 16 * 8 * 64 * 2
    with pytest.raises(ValueError, match="latent mode"):
        decode.latent_forward_passes("nope", 1, 1, n)


# ----------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    params, prj, ids, valid = _setup()
    common = dict(eos_id=EOS, pad_id=PAD, max_new_tokens=4)
    with pytest.raises(ValueError, match="valid mask"):
        decode.cot_generate(params, CFG, ids, valid[:, 1:], **common)
    bad_valid = valid.copy()
    bad_valid[1, -1] = False
    with pytest.raises(ValueError, match="last position must be valid"):
        decode.cot_generate(params, CFG, ids, bad_valid, **common)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decode.cot_generate(params, CFG, ids, valid, eos_id=EOS, pad_id=PAD, max_new_tokens=0)
    with pytest.raises(ValueError, match="eos_id"):
        decode.nocot_generate(params, CFG, ids, valid, prompt_ids=PROMPT, eos_id=64, pad_id=PAD, max_new_tokens=2)
    bad_ids = ids.copy()
    bad_ids[2, -1] = 99
    with pytest.raises(ValueError, match="outside"):
        decode.cot_generate(params, CFG, bad_ids, valid, **common)
    with pytest.raises(ValueError, match="mode"):
        decode.latent_generate(params, CFG, prj, ids, valid, mode="pcc", num_latents=2, num_iterations=1,
                               latent_id=LAT, eot_id=EOT, prompt_ids=PROMPT, **common)
