"""The same `pccot` / `kava` train step in PyTorch + transformers: the opponent of bench/train_step.py.

Written as a careful PyTorch user would (the public PCCoT code's structure): `LlamaForCausalLM`
(sdpa attention), whole batch at once, a `DynamicCache` for the student prefix and the latent
passes, no per-example or per-layer Python loops in the math (the only loops are over the T Jacobi
passes and over the cache's layer list to read/build it), full fine-tuning, `torch.optim.AdamW`
(foreach) with global-norm clipping, float32, `torch.set_num_threads(2)`.

Loss, term by term as `kava_jax.kava.objective.kava_loss` (METHOD §2-4):
* teacher: one forward over question ++ CoT ++ answer (positions cumsum(valid) - 1), token-mean CE;
  detached targets: block outputs 1..L at the distillation token, CoT K/V from the cache, and the
  answer-side queries (recomputed from each layer's input hidden state: input_layernorm, q_proj, RoPE);
* student: pass 0 over `question <bot> <latent>xM`, prj of the final hidden states at <bot> and the
  first M-1 latents; T Jacobi passes of the M embeddings on a fresh DynamicCache holding the
  `question <bot>` prefix; answer block on top of the prefix + pass-T latent KV; token-mean CE;
* CODI: smooth-L1 at the distillation token per layer, divided by that layer's teacher std;
* kava only: R-KV compression (importance from max-pooled GQA logits, factored redundancy, top-M by
  stable sort, kept indices in time order) and L_KV = 1/2 (d(K_s, K_t) + d(V_s, V_t)) with layer-wise std.

`main()` first asserts that the torch loss equals ours (|diff| <= 1e-4 relative) on identical weights
(our params written with `kava_jax.hf_io.save_pretrained`, loaded with `from_pretrained`), the same
batch and the same prj, then times JAX and torch steps interleaved (bench/common.interleave) and
reports medians, minima and the torch/JAX time ratio.

    python bench/torch_reference.py [--sizes small,medium] [--objectives pccot,kava] [--repeats 5]
                                    [--threads 2 | --threads 1 (pins JAX and torch to one core)] [--tag T]
    python bench/torch_reference.py --components [--threads 1]   # model parts fwd+bwd, JAX vs torch
Writes bench/results/torch_reference.json.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import common  # noqa: E402,F401  (first: sets JAX_PLATFORMS, puts the repository root on sys.path)
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import DynamicCache, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from kava_jax import hf_io  # noqa: E402
from kava_jax.kava.objective import ObjectiveConfig, kava_loss  # noqa: E402
from kava_jax.models import ModelConfig  # noqa: E402

NUM_THREADS = 2


# ---------------------------------------------------------------------------------------------- model
class Prj(torch.nn.Module):
    """Linear(D,D) -> GELU (exact) -> Linear(D,D) -> LayerNorm(D, eps 1e-5), as kava_jax apply_prj."""

    def __init__(self, d: int):
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(d, d), torch.nn.Linear(d, d)
        self.ln = torch.nn.LayerNorm(d, eps=1e-5)

    def forward(self, x):
        return self.ln(self.l2(F.gelu(self.l1(x))))


def prj_from_jax(prj: dict, d: int) -> Prj:
    """Our prj dict (w1 [D,D] in->out, b1, w2, b2, ln_scale, ln_bias) as a torch module."""
    m = Prj(d)
    t = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in prj.items()}
    with torch.no_grad():
        m.l1.weight.copy_(t["w1"].T)
        m.l1.bias.copy_(t["b1"])
        m.l2.weight.copy_(t["w2"].T)
        m.l2.bias.copy_(t["b2"])
        m.ln.weight.copy_(t["ln_scale"])
        m.ln.bias.copy_(t["ln_bias"])
    return m


def torch_model_from_params(params: dict, mc: ModelConfig, special_ids=None, special_embed=None,
                            attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """Our decoder params -> HF LlamaForCausalLM (float32) via save_pretrained / from_pretrained.

    special_ids / special_embed [n, D]: embedding rows to overwrite (our trainable `special_embed`)."""
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as d:
        hf_io.save_pretrained(d, mc, params)
        model = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation=attn_implementation)
    if special_embed is not None:
        with torch.no_grad():
            model.model.embed_tokens.weight[torch.as_tensor(special_ids)] = torch.from_numpy(
                np.array(special_embed, np.float32))
    return model


def torch_batch(batch: dict) -> dict[str, torch.Tensor]:
    """numpy/JAX batch (BATCH_KEYS) -> torch tensors (ids int64, masks bool)."""
    out = {}
    for k, v in batch.items():
        a = np.asarray(v)
        out[k] = torch.from_numpy(a.astype(np.int64) if a.dtype.kind in "iu" else a.copy())
    return out


# ---------------------------------------------------------------------------------------------- losses
def masked_ce(logits, targets, mask):
    """Token-mean CE over mask: logits [B,T,V], targets/mask [B,T]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = torch.gather(logp, -1, torch.where(mask, targets, 0)[..., None])[..., 0]
    return -(tok * mask).sum() / mask.sum().clamp(min=1)


def smooth_l1(x, y):
    return F.smooth_l1_loss(x, y, reduction="none", beta=1.0)


def codi(student_h, teacher_h, eps=1e-6):
    """student/teacher [L,B,D]; teacher detached; sigma_l = population std over (B, D) of layer l."""
    t = teacher_h.detach()
    sigma = t.std(dim=(1, 2), unbiased=False, keepdim=True) + eps
    return smooth_l1(student_h / sigma, t / sigma).mean(dim=(1, 2)).mean()


def masked_softmax(x, valid):
    x = x.masked_fill(~valid, float("-inf"))
    mx = x.amax(-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = torch.exp(x - mx) * valid
    den = e.sum(-1, keepdim=True)
    return e / torch.where(den > 0, den, torch.ones_like(den))


def compress(k, v, q, q_valid, k_valid, m: int, lam: float = 0.1):
    """R-KV: k/v [L,B,K,S,H] post-RoPE CoT keys/values, q [L,B,N,A,H] answer queries, q_valid [B,A],
    k_valid [B,S]. Returns (k_t, v_t [L,B,K,M,H], slot_valid [L,B,K,M])."""
    L, B, K, S, H = k.shape
    N = q.shape[2]
    qg = q.reshape(L, B, K, N // K, q.shape[3], H)
    logits = torch.einsum("lbkgah,lbksh->lbkgas", qg, k).amax(dim=3) / math.sqrt(H)  # [L,B,K,A,S]
    probs = masked_softmax(logits, k_valid[None, :, None, None, :])
    qv = q_valid.float()[None, :, None, :, None]
    imp = (probs * qv).sum(3) / q_valid.sum(-1).float().clamp(min=1)[None, :, None, None]  # [L,B,K,S]
    kn = k * torch.rsqrt((k * k).sum(-1, keepdim=True).clamp(min=1e-24))
    vf = k_valid.float()
    total = torch.einsum("lbkjh,bj->lbkh", kn, vf)
    sums = torch.einsum("lbkih,lbkh->lbki", kn, total)
    red = masked_softmax(-sums / vf.sum(-1).clamp(min=1)[None, :, None, None], k_valid[None, :, None, :])
    score = lam * imp + (1 - lam) * red
    valid = k_valid[None, :, None, :].expand(L, B, K, S)
    key = torch.where(valid, score, torch.full_like(score, -1.0))  # scores are >= 0; invalid rank last
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :m]
    n_valid = valid.sum(-1, keepdim=True)
    rank = torch.arange(m)
    order = torch.where(rank < n_valid, order, torch.full_like(order, S))
    idx = torch.sort(order, dim=-1).values
    slot_valid = idx < S
    idx = torch.where(slot_valid, idx, torch.zeros_like(idx))
    gi = idx[..., None].expand(L, B, K, m, H)
    return torch.gather(k, 3, gi), torch.gather(v, 3, gi), slot_valid


def kv_loss(sk, sv, tk, tv, slot_valid, eps=1e-6):
    """L_KV (smooth-L1, layer-wise std, mean over valid elements): all [L,B,K,M,H], slot_valid [L,B,K,M]."""
    w = slot_valid[..., None].float().expand_as(sk)
    n = w.sum().clamp(min=1)

    def one(s, t):
        t = (t.detach() * w)
        cnt = w.sum(dim=(1, 2, 3, 4), keepdim=True).clamp(min=1)
        mean = t.sum(dim=(1, 2, 3, 4), keepdim=True) / cnt
        sigma = torch.sqrt((((t - mean) * w) ** 2).sum(dim=(1, 2, 3, 4), keepdim=True) / cnt) + eps
        return (smooth_l1(s * w / sigma, t / sigma) * w).sum()

    return 0.5 * (one(sk, tk) + one(sv, tv)) / n


def _cache_from(prefix):
    cache = DynamicCache()
    for i, (k, v) in enumerate(prefix):
        cache.update(k, v, i)
    return cache


def _positions(mask):
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def torch_loss(model: LlamaForCausalLM, prj: Prj, batch: dict, *, objective: str, cot_len: int, num_latents: int,
               num_iterations: int, latent_id: int, alpha_codi: float = 10.0, alpha_kv: float = 1.0,
               lam: float = 0.1):
    """Scalar loss and metrics dict (see the module docstring). batch: `torch_batch` output."""
    if objective not in ("pccot", "kava"):
        raise ValueError(f"objective must be 'pccot' or 'kava', got {objective!r}")
    cfg = model.config
    n_heads, n_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    m = num_latents
    # ---- teacher
    ids, valid = batch["teacher_ids"], batch["teacher_valid"]
    b, s = ids.shape
    r = batch["answer_valid"].shape[1]
    q_len = s - cot_len - r
    pos_t = _positions(valid)
    out_t = model(input_ids=ids, attention_mask=valid.long(), position_ids=pos_t, use_cache=True,
                  output_hidden_states=True)
    ce_t = masked_ce(out_t.logits, batch["teacher_targets"], batch["teacher_loss_mask"])
    rows = torch.arange(b)
    hs_t = out_t.hidden_states  # L+1 of [B,S,D]: embeddings, block outputs, last one final-normed
    t_distill = torch.stack(hs_t[1:])[:, rows, batch["teacher_distill_idx"]].detach()  # [L,B,D]
    # ---- student: pass 0
    p_ids, p_valid = batch["student_prefix_ids"], batch["student_prefix_valid"]
    p = p_ids.shape[1]
    ids0 = torch.cat([p_ids, torch.full((b, m), latent_id, dtype=p_ids.dtype)], 1)
    mask0 = torch.cat([p_valid, torch.ones(b, m, dtype=torch.bool)], 1)
    out0 = model.model(input_ids=ids0, attention_mask=mask0.long(), position_ids=_positions(mask0), use_cache=True)
    e = prj(out0.last_hidden_state[:, p - 1:p - 1 + m])
    prefix = [(lay.keys[:, :, :p], lay.values[:, :, :p]) for lay in out0.cache.layers]
    lat_pos = p_valid.long().sum(-1, keepdim=True) + torch.arange(m)
    cache = out0.cache  # T = 0: the placeholder pass's latent KV
    for it in range(num_iterations):  # the T Jacobi passes (sequential by definition)
        cache = _cache_from(prefix)
        o = model.model(inputs_embeds=e, attention_mask=mask0.long(), position_ids=lat_pos, cache=cache,
                        use_cache=True).last_hidden_state
        if it < num_iterations - 1:
            e = torch.cat([e[:, :1], prj(o[:, :-1])], 1)
    latent_kv = [(lay.keys[:, :, p:p + m], lay.values[:, :, p:p + m]) for lay in cache.layers]
    # ---- student: answer segment on prefix + latent KV
    a_mask = torch.cat([mask0, batch["student_answer_valid"]], 1)
    out_a = model(input_ids=batch["student_answer_ids"], attention_mask=a_mask.long(),
                  position_ids=_positions(a_mask)[:, p + m:], cache=cache, use_cache=True, output_hidden_states=True)
    ce_s = masked_ce(out_a.logits, batch["student_answer_targets"], batch["student_answer_loss_mask"])
    s_distill = torch.stack(out_a.hidden_states[1:])[:, rows, batch["student_distill_idx"]]
    codi_l = codi(s_distill, t_distill)
    loss = ce_t + ce_s + alpha_codi * codi_l
    metrics = {"ce_teacher": ce_t.detach(), "ce_student": ce_s.detach(), "codi": codi_l.detach()}
    if objective == "kava":
        with torch.no_grad():
            layers = out_t.cache.layers
            cot = slice(q_len, q_len + cot_len)
            tk = torch.stack([lay.keys[:, :, cot] for lay in layers])  # [L,B,K,C,H]
            tv = torch.stack([lay.values[:, :, cot] for lay in layers])
            ans = slice(q_len + cot_len, s)
            # answer-side post-RoPE queries: input_layernorm -> q_proj -> RoPE on each layer's input
            h_in = torch.stack(hs_t[:-1])[:, :, ans]  # [L,B,R,D] inputs of blocks 0..L-1
            dec = model.model.layers
            w_ln = torch.stack([lay.input_layernorm.weight for lay in dec])[:, None, None]
            w_q = torch.stack([lay.self_attn.q_proj.weight for lay in dec])  # [L, N*H, D]
            var = h_in.pow(2).mean(-1, keepdim=True)
            hn = w_ln * (h_in * torch.rsqrt(var + cfg.rms_norm_eps))
            q = torch.einsum("lbrd,lnd->lbrn", hn, w_q).reshape(*h_in.shape[:3], n_heads, hd).transpose(2, 3)
            cos, sin = model.model.rotary_emb(q, pos_t[:, ans])  # [B,R,H]
            cos, sin = cos[None, :, None], sin[None, :, None]
            half = hd // 2
            q = q * cos + torch.cat([-q[..., half:], q[..., :half]], -1) * sin  # [L,B,N,R,H]
            k_t, v_t, slot_valid = compress(tk, tv, q, batch["answer_valid"], batch["cot_valid"], m, lam)
        sk = torch.stack([k for k, _ in latent_kv])  # [L,B,K,M,H]
        sv = torch.stack([v for _, v in latent_kv])
        kvl = kv_loss(sk, sv, k_t, v_t, slot_valid)
        loss = loss + alpha_kv * kvl
        metrics["kv"] = kvl.detach()
    assert n_kv == latent_kv[0][0].shape[1]
    metrics["loss"] = loss.detach()
    return loss, metrics


# ---------------------------------------------------------------------------------------------- step
class TorchStep:
    """One full fine-tuning step: zero_grad, loss, backward, clip_grad_norm_(1.0), AdamW (foreach)."""

    def __init__(self, model, prj, batch, **loss_kw):
        self.model, self.prj, self.batch, self.loss_kw = model, prj, batch, loss_kw
        self.params = [p for p in list(model.parameters()) + list(prj.parameters()) if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.01, foreach=True)
        model.train()  # no dropout in a Llama config; kept for form
        self.metrics = None
        self.cpu_s: list[float] = []

    def run(self):
        self.opt.zero_grad(set_to_none=True)
        loss, self.metrics = torch_loss(self.model, self.prj, self.batch, **self.loss_kw)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.opt.step()
        return loss.detach()

    def timed(self) -> float:
        """Wall seconds of one step; appends the process CPU seconds of the step to `cpu_s`."""
        c0, t0 = time.process_time(), time.perf_counter()
        self.run()
        wall = time.perf_counter() - t0
        self.cpu_s.append(time.process_time() - c0)
        return wall


def loss_kwargs(oc: ObjectiveConfig) -> dict:
    return dict(objective=oc.objective, cot_len=oc.cot_len, num_latents=oc.num_latents,
                num_iterations=oc.num_iterations, latent_id=oc.special_ids[2], alpha_codi=oc.alpha_codi,
                alpha_kv=oc.alpha_kv, lam=oc.lam)


def check_compatible(oc: ObjectiveConfig) -> None:
    """The reference implements the defaults only; refuse anything else loudly."""
    want = dict(latent_mode="jacobi", use_prj=True, student_ce_weight=1.0, teacher_ce_weight=1.0,
                codi_loss_type="smooth_l1", kv_loss_type="smooth_l1", layerwise_std=True, kv_reduction="mean",
                compression="rkv", pre_rope=False)
    bad = {k: getattr(oc, k) for k, v in want.items() if getattr(oc, k) != v}
    if bad or oc.objective not in ("pccot", "kava") or oc.model.lora.rank:
        raise ValueError(f"torch reference supports pccot/kava full fine-tuning with default settings; got {bad}, "
                         f"objective {oc.objective!r}, lora rank {oc.model.lora.rank}")


def build_torch_step(params: dict, trainable: dict, oc: ObjectiveConfig, batch: dict) -> TorchStep:
    """A TorchStep on the weights of our full-mode `trainable` (params, special_embed, prj)."""
    check_compatible(oc)
    model = torch_model_from_params(params, oc.model, oc.special_ids, trainable["special_embed"])
    prj = prj_from_jax(trainable["prj"], oc.model.hidden_size)
    return TorchStep(model, prj, torch_batch(batch), **loss_kwargs(oc))


def parity(trainable: dict, frozen: dict, oc: ObjectiveConfig, batch: dict) -> dict:
    """Our loss (jitted kava_loss) vs the torch loss on the same weights and batch (no update)."""
    check_compatible(oc)
    ours_loss, ours_m = jax.jit(lambda t, f, b: kava_loss(t, f, b, oc))(trainable, frozen, batch)
    model = torch_model_from_params(trainable["params"], oc.model, oc.special_ids, trainable["special_embed"])
    prj = prj_from_jax(trainable["prj"], oc.model.hidden_size)
    with torch.no_grad():
        tl, tm = torch_loss(model, prj, torch_batch(batch), **loss_kwargs(oc))
    out = {"jax": float(ours_loss), "torch": float(tl)}
    for k in ("ce_teacher", "ce_student", "codi", "kv"):
        if k in tm:
            out[f"{k}_jax"], out[f"{k}_torch"] = float(ours_m[k]), float(tm[k])
    out["abs_diff"] = abs(out["jax"] - out["torch"])
    out["rel_diff"] = out["abs_diff"] / max(abs(out["jax"]), 1e-12)
    return out


# ---------------------------------------------------------------------------------------------- components
def components(size: str, repeats: int, seed: int = 0) -> list[dict]:
    """Forward+backward of model parts, JAX (the library's modules) vs torch (HF modules / ATen), on the
    teacher shape [B 8, T 136] of `size`, interleaved. Isolates the decoder core from the KaVa objective:
      lm        full decoder + masked CE, grads of all params   (kava_jax.models.forward vs LlamaForCausalLM)
      mlp       one SwiGLU block on [B,T,D]                     (layers.MLP vs LlamaMLP)
      attention one attention block on [B,T,D] incl. projections and RoPE, causal
                                                                (layers.Attention vs q/k/v/o Linear + RoPE + sdpa)
      attention core (softmax(QK^T)V only, GQA, causal)         (layers.attention_weights + the PV einsum of
                                                                 layers.Attention vs sdpa(enable_gqa))
      attention core, jax.nn.dot_product_attention               (an alternative formulation, for comparison)
    Returns rows {part, jax_median_s, torch_median_s, torch/jax}."""
    import jax.numpy as jnp
    import train_step as ts
    from common import interleave, time_call

    from kava_jax.models import forward, init_params, rope_inv_freq
    from kava_jax.models.layers import MLP, Attention, attention_weights

    mc = ts.model_config(size)
    b, t, d = 8, 136, mc.hidden_size
    n, kh, h = mc.num_heads, mc.num_kv_heads, mc.head_dim
    params = init_params(mc, jax.random.key(seed))
    model = torch_model_from_params(params, mc)
    rng = np.random.default_rng(seed)
    ids = rng.integers(7, mc.vocab_size, size=(b, t)).astype(np.int32)
    x_np = rng.standard_normal((b, t, d)).astype(np.float32)
    q_np = rng.standard_normal((b, t, n, h)).astype(np.float32)
    k_np = rng.standard_normal((b, t, kh, h)).astype(np.float32)
    v_np = rng.standard_normal((b, t, kh, h)).astype(np.float32)
    causal = jnp.tril(jnp.ones((t, t), bool))[None].repeat(b, 0)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    inv_freq = rope_inv_freq(mc)
    layer0 = jax.tree.map(lambda a: a[0], params["layers"])
    jx, jq, jk, jv, jids = (jnp.asarray(a) for a in (x_np, q_np, k_np, v_np, ids))
    targets = jnp.roll(jids, -1, axis=1)

    def j_lm(p):
        logits = forward(p, mc, jids).logits
        logp = jax.nn.log_softmax(logits, -1)
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))

    def j_mlp(p, x):
        return jnp.sum(MLP(mc).apply({"params": p}, x) ** 2)

    empty = jnp.zeros((b, 0, kh, h), jnp.float32)

    def j_attn(p, x):
        out = Attention(mc).apply({"params": p}, x, empty, empty, pos, causal, inv_freq)[0]
        return jnp.sum(out ** 2)

    def j_core(q, k, v):
        probs = attention_weights(q, k, causal)
        out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v)  # as layers.Attention
        return jnp.sum(out ** 2)

    def j_dpa(q, k, v):
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        return jnp.sum(out ** 2)

    fns = {
        "lm": (jax.jit(jax.grad(j_lm)), (params,)),
        "mlp": (jax.jit(jax.grad(j_mlp, argnums=(0, 1))), (layer0["mlp"], jx)),
        "attention": (jax.jit(jax.grad(j_attn, argnums=(0, 1))), (layer0["attn"], jx)),
        "attention core": (jax.jit(jax.grad(j_core, argnums=(0, 1, 2))), (jq, jk, jv)),
        "attention core, jax.nn.dot_product_attention": (jax.jit(jax.grad(j_dpa, argnums=(0, 1, 2))), (jq, jk, jv)),
    }
    # ---- torch twins
    tl0 = model.model.layers[0]
    tx = torch.from_numpy(x_np).requires_grad_(True)
    tq = torch.from_numpy(q_np.transpose(0, 2, 1, 3).copy()).requires_grad_(True)
    tk = torch.from_numpy(k_np.transpose(0, 2, 1, 3).copy()).requires_grad_(True)
    tv = torch.from_numpy(v_np.transpose(0, 2, 1, 3).copy()).requires_grad_(True)
    tids = torch.from_numpy(ids.astype(np.int64))
    ttargets = torch.roll(tids, -1, 1)
    cos, sin = model.model.rotary_emb(tx, torch.arange(t)[None])

    def t_lm():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=tids).logits
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ttargets.reshape(-1)).backward()

    def t_mlp():
        tl0.zero_grad(set_to_none=True)
        tx.grad = None
        (tl0.mlp(tx) ** 2).sum().backward()

    def rope(a):
        half = h // 2
        return a * cos[:, None] + torch.cat([-a[..., half:], a[..., :half]], -1) * sin[:, None]

    def t_attn():
        at = tl0.self_attn
        at.zero_grad(set_to_none=True)
        tx.grad = None
        q = rope(at.q_proj(tx).view(b, t, n, h).transpose(1, 2))
        k = rope(at.k_proj(tx).view(b, t, kh, h).transpose(1, 2))
        v = at.v_proj(tx).view(b, t, kh, h).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        (at.o_proj(o.transpose(1, 2).reshape(b, t, n * h)) ** 2).sum().backward()

    def t_core():
        for a in (tq, tk, tv):
            a.grad = None
        (F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True) ** 2).sum().backward()

    tfns = {"lm": t_lm, "mlp": t_mlp, "attention": t_attn, "attention core": t_core}
    contenders = {}
    for name, (f, a) in fns.items():
        jax.block_until_ready(f(*a))
        contenders[f"jax {name}"] = (lambda f=f, a=a: time_call(lambda: f(*a), jax.block_until_ready))
        if name in tfns:
            tfns[name]()
            contenders[f"torch {name}"] = (lambda g=tfns[name]: time_call(g))
    stats = interleave(contenders, repeats)
    rows = []
    for name in fns:
        j = stats[f"jax {name}"]
        row = {"part": name, "jax_median_ms": 1e3 * j["median"], "jax_min_ms": 1e3 * j["min"]}
        if f"torch {name}" in stats:
            tt = stats[f"torch {name}"]
            row.update(torch_median_ms=1e3 * tt["median"], torch_min_ms=1e3 * tt["min"],
                       **{"torch/jax": tt["median"] / j["median"], "torch/jax (min)": tt["min"] / j["min"]})
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    import train_step as ts
    from common import interleave, print_table, write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small,medium")
    ap.add_argument("--objectives", default="pccot,kava")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tol", type=float, default=1e-4, help="max relative loss difference")
    ap.add_argument("--threads", type=int, default=NUM_THREADS,
                    help="torch threads; 1 also pins the whole process (JAX too) to one core")
    ap.add_argument("--tag", default="")
    ap.add_argument("--components", action="store_true",
                    help="only the model-part comparison (lm / mlp / attention fwd+bwd, see `components`)")
    args = ap.parse_args(argv)
    if args.threads == 1:  # before JAX creates its CPU client: both libraries then run on one core
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(args.threads)
    lay = ts.PEER_LAYOUT
    load_before = ts.load_average()
    if args.components:
        rows = []
        for size in args.sizes.split(","):
            rows += [{"size": size, **r} for r in components(size, args.repeats)]
        table = print_table(rows, ["size", "part", "jax_median_ms", "jax_min_ms", "torch_median_ms", "torch_min_ms",
                                   "torch/jax", "torch/jax (min)"],
                            f"forward+backward of model parts, B 8 T 136, torch threads {args.threads}, cores "
                            f"{sorted(os.sched_getaffinity(0))}; load {load_before} -> {ts.load_average()}")
        payload = {"bench": "torch_reference_components", "rows": rows, "table": table, "load_before": load_before,
                   "load_after": ts.load_average(), "torch_threads": args.threads,
                   "cores": sorted(os.sched_getaffinity(0))}
        write_json("components" + (f"_{args.tag}" if args.tag else ""), payload)
        return payload

    parities, contenders, meta, steps = {}, {}, {}, {}
    for size in args.sizes.split(","):
        for obj in args.objectives.split(","):
            jb = ts.build_step(size, obj, "full", lay)
            trainable0 = jax.tree.map(np.asarray, jb.state.trainable)  # copy before the donated steps
            par = parity(jb.state.trainable, jb.frozen, jb.obj_cfg, jb.batch)
            parities[f"{size}/{obj}"] = par
            print(f"parity {size}/{obj}: jax {par['jax']:.6f} torch {par['torch']:.6f} rel {par['rel_diff']:.2e}",
                  flush=True)
            if par["rel_diff"] > args.tol:
                raise AssertionError(f"torch reference loss differs from ours for {size}/{obj}: {par}")
            tstep = build_torch_step(trainable0["params"], trainable0, jb.obj_cfg, jb.batch)
            for _ in range(args.warmup):
                jax.block_until_ready(jb.run())
                tstep.run()
            contenders[f"jax {size}/{obj}"] = jb.timed
            contenders[f"torch {size}/{obj}"] = tstep.timed
            steps[size + "/" + obj] = (jb, tstep)
            meta[f"{size}/{obj}"] = dict(flops=ts.plan_flops(jb.obj_cfg, lay, "full"),
                                         jax_compile_s=jb.seconds["lower"] + jb.seconds["compile"])
    stats = interleave(contenders, args.repeats)
    load_after = ts.load_average()
    rows = []
    for key, mt in meta.items():
        j, t = stats[f"jax {key}"], stats[f"torch {key}"]
        size = key.split("/")[0]
        rows.append({"config": key, "jax_median_s": j["median"], "jax_min_s": j["min"], "torch_median_s": t["median"],
                     "torch_min_s": t["min"], "torch/jax (median)": t["median"] / j["median"],
                     "torch/jax (min)": t["min"] / j["min"], "jax GFLOP/s": mt["flops"] / j["median"] / 1e9,
                     "torch GFLOP/s": mt["flops"] / t["median"] / 1e9, "peer_s": ts.PEER_STEP_S[size],
                     "jax_compile_s": mt["jax_compile_s"], "n": j["n"],
                     "jax_cpu_s": float(np.median(steps[key][0].cpu_s)),
                     "torch_cpu_s": float(np.median(steps[key][1].cpu_s))})
    table = print_table(rows, ["config", "jax_median_s", "jax_min_s", "torch_median_s", "torch_min_s",
                               "torch/jax (median)", "torch/jax (min)", "jax GFLOP/s", "torch GFLOP/s", "jax_cpu_s",
                               "torch_cpu_s"],
                        f"JAX vs PyTorch {torch.__version__} train step (interleaved, {args.repeats} rounds, "
                        f"torch threads {args.threads}, cores {sorted(os.sched_getaffinity(0))}); "
                        f"load {load_before} -> {load_after}")
    payload = {"bench": "torch_reference", "layout": vars(lay) if hasattr(lay, "__dict__") else str(lay),
               "parity": parities, "rows": rows, "table": table, "load_before": load_before,
               "load_after": load_after, "torch": torch.__version__, "torch_threads": args.threads,
               "cores": sorted(os.sched_getaffinity(0)), "jax": jax.__version__}
    write_json("torch_reference" + (f"_{args.tag}" if args.tag else ""), payload)
    return payload


if __name__ == "__main__":
    main()
