"""Tests of kava_jax.kava.losses against float64 numpy references written here."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kava_jax.kava.losses import codi_loss, cosine_similarity_metric, kv_loss, masked_cross_entropy

LOSS_TYPES = ("smooth_l1", "l1", "mse")


def np_dist(x, y, loss_type):
    r = np.asarray(x, np.float64) - np.asarray(y, np.float64)
    if loss_type == "l1":
        return np.abs(r)
    if loss_type == "mse":
        return r * r
    return np.where(np.abs(r) < 1, 0.5 * r * r, np.abs(r) - 0.5)


# ----------------------------------------------------------------------------- cross-entropy


def np_masked_ce(logits, targets, mask):
    logits = np.asarray(logits, np.float64)
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if mask[b, t]:
                row = logits[b, t]
                lse = np.log(np.sum(np.exp(row - row.max()))) + row.max()
                total += lse - row[targets[b, t]]
                count += 1
    return total / count if count else 0.0


def test_masked_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, size=(2, 5))
    mask = np.array([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], bool)
    targets_bad = np.where(mask, targets, 99)  # out-of-range ids at masked positions are ignored
    got = masked_cross_entropy(jnp.asarray(logits), jnp.asarray(targets_bad), jnp.asarray(mask))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), np_masked_ce(logits, targets, mask), rtol=1e-6)
    # bf16 logits: computed in f32 from the rounded values.
    lb = jnp.asarray(logits, jnp.bfloat16)
    got_b = masked_cross_entropy(lb, jnp.asarray(targets), jnp.asarray(mask))
    assert got_b.dtype == jnp.float32
    np.testing.assert_allclose(
        float(got_b), np_masked_ce(np.asarray(lb.astype(jnp.float32)), targets, mask), rtol=1e-5
    )


def test_masked_cross_entropy_empty_mask():
    logits = jnp.ones((2, 3, 4))
    targets = jnp.zeros((2, 3), jnp.int32)
    mask = jnp.zeros((2, 3), bool)
    assert float(masked_cross_entropy(logits, targets, mask)) == 0.0
    g = jax.grad(masked_cross_entropy)(logits, targets, mask)
    assert np.all(np.asarray(g) == 0.0)
    with pytest.raises(ValueError, match="mask"):
        masked_cross_entropy(logits, targets, jnp.zeros((2, 4), bool))


# ----------------------------------------------------------------------------- CODI


def np_codi(s, t, loss_type, layerwise_std, eps=1e-6, rows=None):
    s = np.asarray(s, np.float64)
    t = np.asarray(t, np.float64)
    if rows is not None:
        s, t = s[:, rows], t[:, rows]
    per_layer = []
    for l in range(s.shape[0]):
        sigma = (t[l].std() if layerwise_std else t.std()) + eps
        per_layer.append(np_dist(s[l] / sigma, t[l] / sigma, loss_type).mean())
    return float(np.mean(per_layer))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_codi_loss_matches_numpy(loss_type):
    rng = np.random.default_rng(1)
    # Layers with very different scales, so the two std modes differ.
    scale = np.array([0.5, 2.0, 8.0])[:, None, None]
    t = rng.normal(size=(3, 4, 6)) * scale
    s = t + rng.normal(size=(3, 4, 6)) * scale
    for layerwise in (True, False):
        got = codi_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                        loss_type=loss_type, layerwise_std=layerwise)
        np.testing.assert_allclose(float(got), np_codi(s, t, loss_type, layerwise), rtol=1e-5)
    a = float(codi_loss(jnp.asarray(s), jnp.asarray(t), loss_type=loss_type, layerwise_std=True))
    b = float(codi_loss(jnp.asarray(s), jnp.asarray(t), loss_type=loss_type, layerwise_std=False))
    assert abs(a - b) > 1e-3
    # Padding rows are excluded from distances and std; NaN there does not leak.
    rows = np.array([True, False, True, True])
    s_nan = s.copy()
    s_nan[:, 1] = np.nan
    got = codi_loss(jnp.asarray(s_nan, jnp.float32), jnp.asarray(t, jnp.float32), loss_type=loss_type,
                    example_valid=jnp.asarray(rows))
    np.testing.assert_allclose(float(got), np_codi(s, t, loss_type, True, rows=rows), rtol=1e-5)


def test_codi_loss_gradient_and_identity():
    rng = np.random.default_rng(2)
    t = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
    assert float(codi_loss(t, t)) == 0.0
    s = t + 0.3
    gs, gt = jax.grad(lambda a, b: codi_loss(a, b, loss_type="mse"), argnums=(0, 1))(s, t)
    assert np.all(np.asarray(gt) == 0.0)  # teacher is stop-gradient
    # mse with sigma_l: d/ds mean((s-t)^2/sigma^2) = 2 (s-t) / (sigma^2 · n_l · L)
    tn = np.asarray(t, np.float64)
    sig = tn.std(axis=(1, 2), keepdims=True) + 1e-6
    want = 2 * 0.3 / (sig**2 * 12 * 2) * np.ones_like(tn)
    np.testing.assert_allclose(np.asarray(gs), want, rtol=1e-4)
    with pytest.raises(ValueError, match="loss_type"):
        codi_loss(s, t, loss_type="huber")
    with pytest.raises(ValueError, match="teacher_hidden"):
        codi_loss(s, t[:, :2])


# ----------------------------------------------------------------------------- KV loss

L, B, M, K, H = 2, 2, 3, 2, 4


def np_kv(sk, sv, tk, tv, valid_lbkm, loss_type, layerwise_std, reduction, eps=1e-6):
    """Independent reference: explicit loop over (l, b, m, k) slots."""
    total = 0.0
    n_valid = 0
    for s, t in ((sk, tk), (sv, tv)):
        s = np.asarray(s, np.float64)
        t = np.asarray(t, np.float64)
        for l in range(L):
            vals = [t[l, b, m, k] for b in range(B) for m in range(M) for k in range(K)
                    if valid_lbkm[l, b, k, m]]
            sigma = (np.concatenate(vals).std() if vals else 0.0) + eps if layerwise_std else 1.0
            for b, m, k in itertools.product(range(B), range(M), range(K)):
                if valid_lbkm[l, b, k, m]:
                    total += np_dist(s[l, b, m, k] / sigma, t[l, b, m, k] / sigma, loss_type).sum()
                    n_valid += H
    n_valid //= 2  # counted for K and V
    if reduction == "mean":
        return 0.5 * total / max(n_valid, 1)
    return total / (2 * M * L * B * K * H)


def _kv_data(seed=3):
    rng = np.random.default_rng(seed)
    scale = np.array([1.0, 4.0])[:, None, None, None, None]
    tk, tv = (rng.normal(size=(L, B, M, K, H)) * scale for _ in range(2))
    sk = tk + rng.normal(size=tk.shape) * scale
    sv = tv + rng.normal(size=tv.shape) * 0.5 * scale
    valid = rng.random((L, B, K, M)) < 0.6  # [L, B, K, M]: note K != M
    valid[0, 0, 0] = True
    valid[1, 1] = False  # a fully masked (l, b)
    return [np.asarray(x, np.float32) for x in (sk, sv, tk, tv)], valid


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_kv_loss_matches_numpy(loss_type):
    (sk, sv, tk, tv), valid = _kv_data()
    for std, red in itertools.product((False, True), ("mean", "sum_2m")):
        got = kv_loss(*(jnp.asarray(x) for x in (sk, sv, tk, tv)), jnp.asarray(valid),
                      loss_type=loss_type, layerwise_std=std, reduction=red)
        want = np_kv(sk, sv, tk, tv, valid, loss_type, std, red)
        np.testing.assert_allclose(float(got), want, rtol=1e-5, err_msg=f"{loss_type} std={std} {red}")


def test_kv_loss_masked_slots_ignored_and_zero_gradient():
    (sk, sv, tk, tv), valid = _kv_data(4)
    elem = np.broadcast_to(valid.transpose(0, 1, 3, 2)[..., None], sk.shape)
    fn = jax.jit(functools.partial(kv_loss, loss_type="smooth_l1", layerwise_std=True, reduction="mean"))
    base = fn(sk, sv, tk, tv, valid)
    # Garbage (incl. NaN / inf) in masked slots changes nothing.
    junk = lambda x: np.where(elem, x, np.nan).astype(np.float32)  # noqa: E731
    tk_inf = np.where(elem, tk, np.inf).astype(np.float32)
    got = fn(junk(sk), junk(sv), tk_inf, junk(tv), valid)
    assert float(got) == pytest.approx(float(base), rel=1e-6)
    grads = jax.grad(fn, argnums=(0, 1, 2, 3))(junk(sk), junk(sv), tk_inf, junk(tv), valid)
    gk, gv, gtk, gtv = (np.asarray(g) for g in grads)
    assert np.all(np.isfinite(gk)) and np.all(np.isfinite(gv))
    assert np.all(gk[~elem] == 0.0) and np.all(gv[~elem] == 0.0)
    assert np.any(gk[elem] != 0.0) and np.any(gv[elem] != 0.0)
    assert np.all(gtk == 0.0) and np.all(gtv == 0.0)  # teacher is stop-gradient


def test_kv_loss_identical_and_edge_cases():
    (sk, sv, tk, tv), valid = _kv_data(5)
    for lt, std, red in itertools.product(LOSS_TYPES, (False, True), ("mean", "sum_2m")):
        assert float(kv_loss(tk, tv, tk, tv, valid, loss_type=lt, layerwise_std=std, reduction=red)) == 0.0
    none = np.zeros_like(valid)
    assert float(kv_loss(sk, sv, tk, tv, none)) == 0.0
    assert float(kv_loss(sk, sv, tk, tv, none, reduction="sum_2m", layerwise_std=True)) == 0.0
    # All valid: sum_2m equals mean (every slot counts in both).
    full = np.ones_like(valid)
    a = float(kv_loss(sk, sv, tk, tv, full, reduction="mean"))
    b = float(kv_loss(sk, sv, tk, tv, full, reduction="sum_2m"))
    assert a == pytest.approx(b, rel=1e-6) and a > 0
    with pytest.raises(ValueError, match="loss_type"):
        kv_loss(sk, sv, tk, tv, valid, loss_type="huber")
    with pytest.raises(ValueError, match="reduction"):
        kv_loss(sk, sv, tk, tv, valid, reduction="sum")
    with pytest.raises(ValueError, match="slot_valid"):
        kv_loss(sk, sv, tk, tv, valid.transpose(0, 1, 3, 2))
    with pytest.raises(ValueError, match="teacher_v"):
        kv_loss(sk, sv, tk, tv[:, :1], valid)


def test_cosine_similarity_metric():
    (sk, _, tk, _), valid = _kv_data(6)
    cos = []
    for l, b, m, k in itertools.product(range(L), range(B), range(M), range(K)):
        if valid[l, b, k, m]:
            x, y = sk[l, b, m, k].astype(np.float64), tk[l, b, m, k].astype(np.float64)
            cos.append(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
    got = cosine_similarity_metric(jnp.asarray(sk), jnp.asarray(tk), jnp.asarray(valid))
    np.testing.assert_allclose(float(got), np.mean(cos), rtol=1e-5)
    assert float(cosine_similarity_metric(tk, tk, valid)) == pytest.approx(1.0, abs=1e-6)
    assert float(cosine_similarity_metric(sk, tk, np.zeros_like(valid))) == 0.0
