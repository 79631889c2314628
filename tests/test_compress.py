"""Teacher KV compression (kava_jax.kava.compress) against plain numpy loop references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kava_jax.kava import compress as C

L, B, S, K, H, N, A = 2, 3, 7, 2, 8, 4, 4  # N // K = 2 query heads per KV group


# ----------------------------------------------------------------------------- numpy references


def ref_importance(q, k, qv, kv):
    l_, b_, a_, n_, h_ = q.shape
    s_, k_ = k.shape[2], k.shape[3]
    g = n_ // k_
    out = np.zeros((l_, b_, k_, s_), np.float64)
    for l in range(l_):
        for b in range(b_):
            keys = [i for i in range(s_) if kv[b, i]]
            queries = [a for a in range(a_) if qv[b, a]]
            for kh in range(k_):
                if not keys or not queries:
                    continue
                acc = np.zeros(s_)
                for a in queries:
                    logit = np.full(s_, -np.inf)
                    for i in keys:
                        logit[i] = max(
                            float(np.dot(q[l, b, a, n], k[l, b, i, kh])) / np.sqrt(h_)
                            for n in range(n_)
                            if n // g == kh
                        )
                    e = np.array(
                        [np.exp(logit[i] - logit[keys].max()) if kv[b, i] else 0.0 for i in range(s_)]
                    )
                    acc += e / e.sum()
                out[l, b, kh] = acc / len(queries)
    return out


def ref_redundancy(k, kv):
    l_, b_, s_, k_, _ = k.shape
    out = np.zeros((l_, b_, k_, s_), np.float64)
    for l in range(l_):
        for b in range(b_):
            keys = [i for i in range(s_) if kv[b, i]]
            if not keys:
                continue
            for kh in range(k_):
                unit = {}
                for i in keys:
                    x = k[l, b, i, kh].astype(np.float64)
                    nrm = np.linalg.norm(x)
                    unit[i] = x / nrm if nrm > 0 else x
                neg_mean = {i: -np.mean([unit[i] @ unit[j] for j in keys]) for i in keys}
                mx = max(neg_mean.values())
                den = sum(np.exp(v - mx) for v in neg_mean.values())
                for i in keys:
                    out[l, b, kh, i] = np.exp(neg_mean[i] - mx) / den
    return out


def ref_select(scores, kv, m):
    l_, b_, k_, s_ = scores.shape
    idx = np.zeros((l_, b_, k_, m), np.int64)
    ok = np.zeros((l_, b_, k_, m), bool)
    for l in range(l_):
        for b in range(b_):
            for kh in range(k_):
                cand = sorted((i for i in range(s_) if kv[b, i]), key=lambda i: (-scores[l, b, kh, i], i))
                kept = sorted(cand[:m])
                idx[l, b, kh, : len(kept)] = kept
                ok[l, b, kh, : len(kept)] = True
    return idx, ok


def ref_gather(x, idx):
    l_, b_, _, k_, h_ = x.shape
    m = idx.shape[-1]
    out = np.zeros((l_, b_, m, k_, h_), x.dtype)
    for l in range(l_):
        for b in range(b_):
            for kh in range(k_):
                for j in range(m):
                    out[l, b, j, kh] = x[l, b, idx[l, b, kh, j], kh]
    return out


def np_rope(x, positions, inv_freq):
    """HF rotate-half RoPE, written independently: rotate pair (d, d + H/2) by angle pos*inv_freq[d]."""
    out = np.empty_like(x)
    half = x.shape[-1] // 2
    for b in range(x.shape[1]):
        for s in range(x.shape[2]):
            for d in range(half):
                t = positions[b, s] * inv_freq[d]
                c, sn = np.cos(t), np.sin(t)
                x1, x2 = x[:, b, s, :, d], x[:, b, s, :, d + half]
                out[:, b, s, :, d] = x1 * c - x2 * sn
                out[:, b, s, :, d + half] = x2 * c + x1 * sn
    return out


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(L, B, A, N, H)).astype(np.float32)
    k = rng.normal(size=(L, B, S, K, H)).astype(np.float32)
    v = rng.normal(size=(L, B, S, K, H)).astype(np.float32)
    # CoT lengths differ per item (7, 4, 2); item 1 has no valid query.
    kv = np.arange(S)[None, :] < np.array([[7], [4], [2]])
    qv = np.array([[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1]], bool)
    return q, k, v, qv, kv


# ----------------------------------------------------------------------------- scores


def test_importance_matches_numpy(data):
    q, k, _, qv, kv = data
    got = np.asarray(C.importance(jnp.asarray(q), jnp.asarray(k), jnp.asarray(qv), jnp.asarray(kv)))
    assert got.shape == (L, B, K, S) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref_importance(q, k, qv, kv), atol=1e-5, rtol=1e-5)
    assert np.all(got.transpose(1, 3, 0, 2)[~kv] == 0)  # invalid keys score 0
    assert np.all(got[:, 1] == 0)  # no valid query -> zeros, no NaN
    np.testing.assert_allclose(got[:, [0, 2]].sum(-1), 1.0, atol=1e-5)


def test_importance_uses_max_pool_not_mean():
    # One KV group with 2 query heads: head 0 likes key 0 mildly, head 1 likes key 1 strongly.
    k = np.zeros((1, 1, 2, 1, 2), np.float32)
    k[0, 0, 0, 0] = [1, 0]
    k[0, 0, 1, 0] = [0, 1]
    q = np.zeros((1, 1, 1, 2, 2), np.float32)
    q[0, 0, 0, 0] = [3, 0]
    q[0, 0, 0, 1] = [0, 5]
    got = np.asarray(
        C.importance(jnp.asarray(q), jnp.asarray(k), jnp.ones((1, 1), bool), jnp.ones((1, 2), bool))
    )
    # max-pooled logits (3, 5) / sqrt(2)
    e = np.exp(np.array([3.0, 5.0]) / np.sqrt(2))
    np.testing.assert_allclose(got[0, 0, 0], e / e.sum(), rtol=1e-6)


@pytest.mark.parametrize("method", ["factored", "matrix"])
def test_redundancy_matches_numpy(data, method):
    _, k, _, _, kv = data
    k = k.copy()
    k[0, 0, 3, 1] = 0.0  # a zero key must not produce NaN
    got = np.asarray(C.redundancy(jnp.asarray(k), jnp.asarray(kv), method=method))
    assert got.shape == (L, B, K, S) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref_redundancy(k, kv), atol=1e-6, rtol=1e-5)
    assert np.all(got.transpose(1, 3, 0, 2)[~kv] == 0)


@pytest.mark.parametrize("chunk", [1, 3, 7, 9])
def test_redundancy_chunked_equals_dense(data, chunk):
    _, k, _, _, kv = data
    dense = np.asarray(C.redundancy(jnp.asarray(k), jnp.asarray(kv), method="matrix"))
    chunked = np.asarray(C.redundancy(jnp.asarray(k), jnp.asarray(kv), chunk_size=chunk, method="matrix"))
    np.testing.assert_allclose(chunked, dense, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- select / gather


@pytest.mark.parametrize("m", [1, 3, 5, 9])
def test_select_matches_numpy(m):
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 3, size=(L, B, K, S)).astype(np.float32)  # many ties
    kv = np.zeros((B, S), bool)
    kv[0] = True
    kv[1, [1, 2, 5]] = True  # non-prefix pattern, 3 valid
    kv[2, :2] = True
    scores[:, 1, :, 0] = 100.0  # a padded position with the best score is never chosen
    idx, ok = C.select(jnp.asarray(scores), jnp.asarray(kv), m)
    idx, ok = np.asarray(idx), np.asarray(ok)
    assert idx.shape == ok.shape == (L, B, K, m) and idx.dtype == np.int32 and ok.dtype == bool
    ridx, rok = ref_select(scores, kv, m)
    np.testing.assert_array_equal(ok, rok)
    np.testing.assert_array_equal(idx, ridx)
    assert np.all(kv[np.arange(B)[None, :, None, None], idx][ok])  # only valid positions
    assert np.all(idx[~ok] == 0)
    assert np.all(np.diff(idx, axis=-1)[ok[..., 1:]] > 0)  # strictly ascending over the valid slots
    assert np.all(ok[..., :-1] >= ok[..., 1:])  # valid slots first


def test_select_ties_go_to_lower_position():
    scores = jnp.zeros((1, 1, 1, 6))
    kv = jnp.array([[False, True, True, True, True, True]])
    idx, ok = C.select(scores, kv, 3)
    np.testing.assert_array_equal(np.asarray(idx)[0, 0, 0], [1, 2, 3])
    assert bool(np.all(ok))


def test_gather_matches_numpy(data):
    _, k, _, _, _ = data
    rng = np.random.default_rng(2)
    idx = rng.integers(0, S, size=(L, B, K, 4)).astype(np.int32)
    got = np.asarray(C.gather(jnp.asarray(k), jnp.asarray(idx)))
    np.testing.assert_array_equal(got, ref_gather(k, idx))


# ----------------------------------------------------------------------------- RoPE


def test_unrotate_inverts_numpy_rope(data):
    _, k, _, _, _ = data
    rng = np.random.default_rng(3)
    positions = rng.integers(0, 500, size=(B, S))
    inv_freq = (10000.0 ** (-np.arange(0, H, 2) / H)).astype(np.float32)
    rotated = np_rope(k.astype(np.float64), positions, inv_freq.astype(np.float64)).astype(np.float32)
    assert np.abs(rotated - k).max() > 0.1
    back = np.asarray(C.unrotate_keys(jnp.asarray(rotated), jnp.asarray(positions), jnp.asarray(inv_freq)))
    np.testing.assert_allclose(back, k, atol=2e-4)


# ----------------------------------------------------------------------------- eviction modes


def _one(k_rows, kv_row=None):
    """[S, H] key rows -> k [1, 1, S, 1, H] and key_valid [1, S]."""
    k = jnp.asarray(np.asarray(k_rows, np.float32)[None, None, :, None, :])
    s = k.shape[2]
    kv = jnp.ones((1, s), bool) if kv_row is None else jnp.asarray([kv_row])
    return k, kv


def test_cosine_mode_evicts_duplicates():
    k, kv = _one([[1, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]])
    out = C.compress_teacher_kv(k, k * 2, None, None, kv, m=3, mode="cosine")
    # distinct keys 2 and 4 kept, one copy of the triplicated key (ties -> lowest position 0)
    np.testing.assert_array_equal(np.asarray(out.idx)[0, 0, 0], [0, 2, 4])
    np.testing.assert_array_equal(np.asarray(out.k)[0, 0, :, 0], np.asarray(k)[0, 0, [0, 2, 4], 0])
    np.testing.assert_array_equal(np.asarray(out.v), 2 * np.asarray(out.k))  # V uses the same indices


def test_crop_mode_keeps_first_valid():
    k, kv = _one(np.eye(5), [False, True, True, True, True])
    out = C.compress_teacher_kv(k, k, None, None, kv, m=2, mode="crop")
    np.testing.assert_array_equal(np.asarray(out.idx)[0, 0, 0], [1, 2])
    k, kv = _one(np.eye(5), [True, False, False, False, False])
    out = C.compress_teacher_kv(k, k, None, None, kv, m=2, mode="crop")
    np.testing.assert_array_equal(np.asarray(out.idx)[0, 0, 0], [0, 0])
    np.testing.assert_array_equal(np.asarray(out.slot_valid)[0, 0, 0], [True, False])


def _attention_case():
    k, kv = _one([[1, 0], [0, 1], [-1, 0], [0, -1], [0, -2]], [True, True, True, True, False])
    q = jnp.asarray(np.array([[0.0, -6.0], [-4.0, 0.0]], np.float32)[None, None, :, None, :])  # [1,1,2,1,2]
    return k, kv, q, jnp.ones((1, 2), bool)


def test_attention_mode_keeps_attended_keys():
    k, kv, q, qv = _attention_case()
    out = C.compress_teacher_kv(k, k, q, qv, kv, m=2, mode="attention")
    # query 0 attends key 3, query 1 attends key 2; padded key 4 would win query 0 if it were not masked
    np.testing.assert_array_equal(np.asarray(out.idx)[0, 0, 0], [2, 3])
    np.testing.assert_allclose(
        np.asarray(out.scores), ref_importance(*map(np.asarray, (q, k, qv, kv))), atol=1e-6
    )


def test_rkv_mode_combines_scores(data):
    q, k, v, qv, kv = data
    lam = 0.3
    out = C.compress_teacher_kv(*map(jnp.asarray, (k, v, q, qv, kv)), m=3, lam=lam, mode="rkv")
    want = lam * ref_importance(q, k, qv, kv) + (1 - lam) * ref_redundancy(k, kv)
    np.testing.assert_allclose(np.asarray(out.scores), want, atol=1e-5)
    ridx, rok = ref_select(np.asarray(out.scores), kv, 3)
    np.testing.assert_array_equal(np.asarray(out.idx), ridx)
    np.testing.assert_array_equal(np.asarray(out.slot_valid), rok)
    np.testing.assert_array_equal(np.asarray(out.k), ref_gather(k, ridx))
    np.testing.assert_array_equal(np.asarray(out.v), ref_gather(v, ridx))
    assert out.k.shape == (L, B, 3, K, H) and out.idx.shape == (L, B, K, 3)


def test_pre_rope_unrotates_for_redundancy_and_gather(data):
    q, k, v, qv, kv = data
    positions = np.tile(np.arange(10, 10 + S), (B, 1))
    inv_freq = (10000.0 ** (-np.arange(0, H, 2) / H)).astype(np.float32)
    rotated = np_rope(k.astype(np.float64), positions, inv_freq.astype(np.float64)).astype(np.float32)
    lam = 0.5
    out = C.compress_teacher_kv(
        *map(jnp.asarray, (rotated, v, q, qv, kv)), m=3, lam=lam, pre_rope=True,
        key_positions=jnp.asarray(positions), inv_freq=jnp.asarray(inv_freq),
    )  # fmt: skip
    want = lam * ref_importance(q, rotated, qv, kv) + (1 - lam) * ref_redundancy(k, kv)
    np.testing.assert_allclose(np.asarray(out.scores), want, atol=1e-5)
    ridx, _ = ref_select(np.asarray(out.scores), kv, 3)
    np.testing.assert_allclose(np.asarray(out.k), ref_gather(k, ridx), atol=2e-5)


# ----------------------------------------------------------------------------- errors, jit, gradients


def test_bad_arguments_raise(data):
    q, k, v, qv, kv = map(jnp.asarray, data)
    with pytest.raises(ValueError, match="mode"):
        C.compress_teacher_kv(k, v, q, qv, kv, m=2, mode="h2o")
    with pytest.raises(ValueError, match="lam"):
        C.compress_teacher_kv(k, v, q, qv, kv, m=2, lam=1.5)
    with pytest.raises(ValueError, match="^m:"):
        C.compress_teacher_kv(k, v, q, qv, kv, m=0)
    with pytest.raises(ValueError, match="pre_rope"):
        C.compress_teacher_kv(k, v, q, qv, kv, m=2, pre_rope=True)
    with pytest.raises(ValueError, match="key_valid"):
        C.compress_teacher_kv(k, v, q, qv, kv[:, :3], m=2)
    with pytest.raises(ValueError, match="queries"):
        C.compress_teacher_kv(k, v, q[..., :3, :], qv, kv, m=2)
    with pytest.raises(ValueError, match="query_valid"):
        C.importance(q, k, qv[:, :2], kv)
    with pytest.raises(ValueError, match="v:"):
        C.compress_teacher_kv(k, v[:, :1], q, qv, kv, m=2)
    with pytest.raises(ValueError, match="chunk_size"):
        C.redundancy(k, kv, chunk_size=0, method="matrix")
    with pytest.raises(ValueError, match="method"):
        C.redundancy(k, kv, method="sparse")


def test_jit_does_not_retrace(data):
    q, k, v, qv, kv = map(jnp.asarray, data)
    traces = []

    @functools.partial(jax.jit, static_argnames=("m",))
    def run(k, v, q, qv, kv, m):
        traces.append(1)
        return C.compress_teacher_kv(k, v, q, qv, kv, m=m, chunk_size=3)

    a = run(k, v, q, qv, kv, m=3)
    b = run(k + 1.0, v * 2, q - 1.0, ~qv, kv[:, ::-1], m=3)
    jax.block_until_ready((a, b))
    assert len(traces) == 1
    np.testing.assert_array_equal(
        np.asarray(a.idx), np.asarray(C.compress_teacher_kv(k, v, q, qv, kv, m=3).idx)
    )


def test_outputs_have_no_gradient(data):
    q, k, v, qv, kv = map(jnp.asarray, data)

    def loss(k, v, q):
        out = C.compress_teacher_kv(k, v, q, qv, kv, m=3)
        return jnp.sum(out.k**2) + jnp.sum(out.v**2) + jnp.sum(out.scores**2)

    grads = jax.grad(loss, argnums=(0, 1, 2))(k, v, q)
    for g in grads:
        assert g.shape and not np.any(np.asarray(g))
