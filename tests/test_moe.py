"""DeepSeekMoE: the router against a numpy port of REFERENCE section 3 and constructed hand cases; the
expert layouts (dense one-hot, gathered, ragged_dot, padded blocks) against a numpy one-hot reference
and against each other in gradients; the block layout's invariants; the MoE module (routed + shared)
against numpy; expert counts; the balance loss; the router bias staying out of the optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dsv3_jax.experts import (
    LocalExperts,
    block_layout,
    experts_blocks,
    experts_dense,
    experts_gathered,
    experts_ragged,
    gathers,
)
from dsv3_jax.moe import MoE, RouterBias, balance_loss, route

from reference import build, tiny_config, tiny_runtime, to_numpy
from reference import numpy_ref as ref


def _route_cfg(E, K, G, TG, **kw):
    return tiny_config(n_routed_experts=E, num_experts_per_tok=K, n_group=G, topk_group=TG, **kw)


def _sorted_pairs(w, idx):
    """Sort each token's (expert, weight) pairs by expert id so that top-k order does not matter."""
    w, idx = np.asarray(w), np.asarray(idx)
    o = np.argsort(idx, axis=1)
    return np.take_along_axis(w, o, 1), np.take_along_axis(idx, o, 1)


# ----------------------------------------------------------------------------- router

ROUTE_CASES = [  # (E, K, n_group, topk_group)
    (8, 2, 4, 2), (16, 4, 4, 2), (16, 3, 8, 3), (32, 8, 8, 4), (12, 3, 3, 2), (8, 2, 1, 1), (16, 4, 4, 4),
    (64, 6, 8, 3),
]


@pytest.mark.parametrize("E, K, G, TG", ROUTE_CASES)
@pytest.mark.parametrize("norm", [True, False])
def test_route_matches_numpy(E, K, G, TG, norm):
    cfg = _route_cfg(E, K, G, TG, norm_topk_prob=norm, routed_scaling_factor=1.7)
    rng = np.random.default_rng(E * 100 + K * 10 + G)
    N = 64
    scores = ref.sigmoid(rng.normal(size=(N, E)) * 2).astype(np.float32)
    bias = rng.normal(0, 0.15, size=E).astype(np.float32)
    w, idx = jax.jit(lambda s, b: route(s, b, cfg))(scores, bias)
    assert w.shape == (N, K) and idx.shape == (N, K)
    assert w.dtype == jnp.float32 and idx.dtype == jnp.int32
    want_w, want_idx = ref.route(scores, bias, k=K, n_group=G, topk_group=TG, routed_scaling_factor=1.7,
                                 norm_topk_prob=norm)
    gw, gi = _sorted_pairs(w, idx)
    rw, ri = _sorted_pairs(want_w, want_idx)
    np.testing.assert_array_equal(gi, ri)
    np.testing.assert_allclose(gw, rw, rtol=1e-6)
    # Distinct experts per token, all inside the kept groups.
    assert all(len(set(r)) == K for r in np.asarray(idx))
    if norm:
        np.testing.assert_allclose(np.asarray(w).sum(-1), 1.7, rtol=1e-6)


def test_bias_selects_but_weights_use_original_scores():
    cfg = _route_cfg(4, 2, 1, 1, routed_scaling_factor=2.5)
    s = np.array([[0.9, 0.8, 0.3, 0.2]], np.float32)
    b = np.array([0.0, 0.0, 0.7, 0.0], np.float32)  # biased: [0.9, 0.8, 1.0, 0.2] -> experts {2, 0}
    w, idx = route(jnp.asarray(s), jnp.asarray(b), cfg)
    gw, gi = _sorted_pairs(w, idx)
    np.testing.assert_array_equal(gi, [[0, 2]])
    # From the ORIGINAL scores 0.9 and 0.3: 2.5 * [0.75, 0.25]  (biased would give 2.5 * [0.9, 1.0] / 1.9).
    np.testing.assert_allclose(gw, [[1.875, 0.625]], rtol=1e-6)
    # Without the bias the selection is {0, 1}.
    _, gi0 = _sorted_pairs(*route(jnp.asarray(s), jnp.zeros(4), cfg))
    np.testing.assert_array_equal(gi0, [[0, 1]])


def test_group_limit_changes_selection():
    # 4 groups of 2. Top-2 sums: g0 = 0.95+0.10 = 1.05, g1 = 0.90+0.85 = 1.75, g2 = 0.80+0.79 = 1.59, g3 = 0.30.
    # Keep g1, g2 -> experts {2, 3}. With n_group=1: global top-2 = {0, 2}. (A max-based group score
    # would keep g0 (0.95) and also give {0, 2}, so this also pins "sum of the top 2".)
    s = np.array([[0.95, 0.10, 0.90, 0.85, 0.80, 0.79, 0.20, 0.10]], np.float32)
    grouped = route(jnp.asarray(s), jnp.zeros(8), _route_cfg(8, 2, 4, 2, routed_scaling_factor=2.5))
    flat = route(jnp.asarray(s), jnp.zeros(8), _route_cfg(8, 2, 1, 1, routed_scaling_factor=2.5))
    gw, gi = _sorted_pairs(*grouped)
    fw, fi = _sorted_pairs(*flat)
    np.testing.assert_array_equal(gi, [[2, 3]])
    np.testing.assert_array_equal(fi, [[0, 2]])
    np.testing.assert_allclose(gw, [[2.5 * 0.90 / 1.75, 2.5 * 0.85 / 1.75]], rtol=1e-6)
    np.testing.assert_allclose(fw, [[2.5 * 0.95 / 1.85, 2.5 * 0.90 / 1.85]], rtol=1e-6)
    # The group choice uses the BIASED scores: lifting expert 7 makes g3 win over g2.
    b = np.zeros(8, np.float32)
    b[7] = 1.5  # g3 = 0.30 + 1.5 = 1.80 -> keep g3, g1; top-2 of sc among {2,3,6,7}: 7 (1.6), 2 (0.9)
    bw, bi = _sorted_pairs(*route(jnp.asarray(s), jnp.asarray(b), _route_cfg(8, 2, 4, 2, routed_scaling_factor=2.5)))
    np.testing.assert_array_equal(bi, [[2, 7]])
    np.testing.assert_allclose(bw, [[2.5 * 0.9 / 1.0, 2.5 * 0.1 / 1.0]], rtol=1e-6)


# ----------------------------------------------------------------------------- expert layouts


def _expert_inputs(N=24, D=8, F=6, E=8, K=3, skewed=False, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)).astype(np.float32)
    if skewed:  # every token picks the same experts
        idx = np.tile(np.array([5, 2, 7])[:K], (N, 1)).astype(np.int32)
    else:
        idx = np.stack([rng.permutation(E)[:K] for _ in range(N)]).astype(np.int32)
    w = rng.uniform(0.1, 1.0, size=(N, K)).astype(np.float32)
    wg = rng.normal(0, 0.4, size=(E, D, F)).astype(np.float32)
    wu = rng.normal(0, 0.4, size=(E, D, F)).astype(np.float32)
    wd = rng.normal(0, 0.4, size=(E, F, D)).astype(np.float32)
    return x, idx, w, wg, wu, wd


IMPLS = {
    "dense": experts_dense,
    "gathered": experts_gathered,
    "ragged": experts_ragged,
    "block1": lambda *a: experts_blocks(*a, block=1),
    "block3": lambda *a: experts_blocks(*a, block=3),
    "block4": lambda *a: experts_blocks(*a, block=4),
    "block_big": lambda *a: experts_blocks(*a, block=40),  # > N: larger than any expert's group
    # the CPU form: the GEMMs as a loop over the blocks that hold rows (skewed: most blocks empty, skipped)
    "block3_loop": lambda *a: experts_blocks(*a, block=3, loop=True),
    "block_big_loop": lambda *a: experts_blocks(*a, block=40, loop=True),
}


@pytest.mark.parametrize("skewed", [False, True], ids=["random", "skewed"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_expert_layouts_match_numpy(impl, skewed):
    x, idx, w, wg, wu, wd = _expert_inputs(skewed=skewed)
    got = jax.jit(IMPLS[impl])(x, idx, w, wg, wu, wd)
    assert got.shape == x.shape and got.dtype == jnp.float32
    want = ref.experts_onehot(x, idx, w, wg, wu, wd)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("skewed", [False, True], ids=["random", "skewed"])
def test_expert_layout_gradients_agree(skewed):
    args = _expert_inputs(N=12, skewed=skewed, seed=3)
    ct = np.random.default_rng(9).normal(size=args[0].shape).astype(np.float32)

    def grads(fn):
        loss = lambda x, w, wg, wu, wd: jnp.sum(fn(x, jnp.asarray(args[1]), w, wg, wu, wd) * ct)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(args[0], *args[2:])

    base = grads(experts_dense)
    # d loss / d w[n, k] = <ct_n, SwiGLU_{idx[n,k]}(x_n)>: check the dense path itself against numpy.
    x, idx, w, wg, wu, wd = args
    per_k = np.stack([np.einsum("nd,nd->n", ct, np.stack([ref.swiglu(x[n], wg[e], wu[e], wd[e])
                                                          for n, e in enumerate(idx[:, k])])) for k in range(3)], 1)
    np.testing.assert_allclose(np.asarray(base[1]), per_k, rtol=1e-5, atol=1e-5)
    # (the loop's backward is written by hand, `experts._block_loop_bwd`: against autodiff of the dense einsums)
    for name in ("gathered", "ragged", "block1", "block4", "block_big", "block3_loop", "block_big_loop"):
        g = grads(IMPLS[name])
        for a, b, what in zip(g, base, ("x", "w", "w_gate", "w_up", "w_down")):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                       atol=1e-5 * np.abs(np.asarray(b)).max(), err_msg=f"{name}: d/d{what}")


def test_block_loop_sums_bfloat16_weight_gradients_in_float32():
    """bf16 weights over many blocks per expert: the loop's weight gradients (one block at a time, summed per
    expert) stay as close to the float32 ones as the batched einsum's single dot does; a bf16 running sum drifts
    (relative error ~0.012-0.016 here against ~0.006)."""
    x, idx, w, wg, wu, wd = _expert_inputs(N=256, D=8, F=6, E=4, K=2, seed=5)
    idx = np.stack([np.zeros(256), np.ones(256)], 1).astype(np.int32)  # 2 experts, 128 blocks of 2 rows each
    ct = np.random.default_rng(2).normal(size=x.shape).astype(np.float32)

    def weight_grads(fn, dtype):
        loss = lambda *ws: jnp.sum(fn(jnp.asarray(x, dtype), jnp.asarray(idx), jnp.asarray(w), *ws) * ct)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*(jnp.asarray(a, dtype) for a in (wg, wu, wd)))

    want = weight_grads(lambda *a: experts_blocks(*a, block=2), jnp.float32)
    for loop in (False, True):
        got = weight_grads(lambda *a, loop=loop: experts_blocks(*a, block=2, loop=loop), jnp.bfloat16)
        for g, r in zip(got, want):
            assert g.dtype == jnp.bfloat16
            r = np.asarray(r)[:2]
            err = np.abs(np.asarray(g, np.float32)[:2] - r).max() / np.abs(r).max()
            assert err < 0.01, (loop, err)


def test_block_layouts_take_zero_rows():
    x, idx, w, wg, wu, wd = _expert_inputs()
    for loop in (False, True):
        y = jax.jit(lambda *a, loop=loop: experts_blocks(*a, block=4, loop=loop))(x[:0], idx[:0], w[:0], wg, wu, wd)
        assert y.shape == (0, x.shape[1])


def test_dense_gathers_the_chosen_experts_for_a_few_rows():
    """'dense' on fewer token-expert rows than experts (2 tokens x 3 of 8) runs the gathered layout, on more the
    one-hot one; both against numpy."""
    x, idx, w, wg, wu, wd = _expert_inputs()
    assert gathers(x[:2], idx[:2], wg) and not gathers(x, idx, wg)
    for n in (2, 24):
        got = jax.jit(LocalExperts("dense"))(x[:n], idx[:n], w[:n], wg, wu, wd)[0]
        want = ref.experts_onehot(x[:n], idx[:n], w[:n], wg, wu, wd)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _check_layout(idx, E, b):
    dest, block_expert, nb = block_layout(jnp.asarray(idx), E, b)
    dest, block_expert = np.asarray(dest), np.asarray(block_expert)
    flat = np.asarray(idx).reshape(-1)
    M = flat.size
    assert isinstance(nb, int) and nb == -(-(M + E * (b - 1)) // b)
    assert block_expert.shape == (nb,) and dest.shape == (M,)
    assert len(np.unique(dest)) == M, "two rows share a slot"
    assert dest.min() >= 0 and dest.max() < nb * b
    np.testing.assert_array_equal(block_expert[dest // b], flat)  # each row sits in a block of its expert
    used = int(sum(-(-c // b) for c in np.bincount(flat, minlength=E)))
    assert used <= nb
    # Rows of one expert keep their (token, k) order inside the expert's blocks.
    for e in range(E):
        d = dest[flat == e]
        assert np.all(np.diff(d) > 0)
    return used, nb


@pytest.mark.parametrize("b", [1, 2, 4, 7, 64])
def test_block_layout_random_and_skewed(b):
    E = 8
    rng = np.random.default_rng(b)
    idx = np.stack([rng.permutation(E)[:3] for _ in range(20)])
    _check_layout(idx, E, b)
    _check_layout(np.tile([1, 4, 6], (20, 1)), E, b)  # all tokens to the same 3 experts
    _check_layout(np.zeros((5, 1), np.int64), E, b)  # a single expert


def test_block_layout_worst_case_is_tight():
    # Every expert holds 1 (mod 4) rows: counts [5, 1, 1, 1, 1, 1, 1, 1], M = 12, blocks used 2 + 7 = 9,
    # static bound ceil((12 + 8 * 3) / 4) = 9: the bound is reached, never exceeded.
    idx = np.array([0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7])[:, None]
    used, nb = _check_layout(idx, 8, 4)
    assert used == nb == 9


# ----------------------------------------------------------------------------- the MoE module


def _moe_setup(seed=0, B=3, T=8, run=None, **kw):
    cfg = tiny_config(**kw)
    moe = build(lambda r: MoE(cfg, rngs=r, runtime=tiny_runtime(**(run or {}))), seed=seed)
    x = np.random.default_rng(seed + 1).normal(size=(B, T, cfg.hidden_size)).astype(np.float32)
    return cfg, moe, x


@pytest.mark.parametrize("impl, shared", [("dense", 1), ("ragged", 1), ("blocks", 1), ("blocks", 0), ("blocks", 2)])
def test_moe_module_matches_numpy(impl, shared):
    cfg, moe, x = _moe_setup(seed=shared, n_shared_experts=shared, run=dict(moe_impl=impl, moe_block_size=3))
    p = to_numpy(moe)
    assert np.abs(p["bias"]).max() > 0.05  # a bias that matters
    assert ("shared" in p) == (shared > 0)
    y, stats = nnx.jit(lambda m, x: m(x))(moe, jnp.asarray(x))
    counts, bal, dropped = stats.counts, stats.balance, stats.dropped
    assert float(dropped) == 0.0
    want_y, want_counts, want_bal = ref.moe(x, p, cfg)
    assert y.shape == x.shape and counts.shape == (cfg.n_routed_experts,) and bal.shape == ()
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-5, atol=1e-5 * np.abs(want_y).max())
    np.testing.assert_array_equal(np.asarray(counts), want_counts)  # numpy bincount of the routed ids
    assert float(counts.sum()) == 3 * 8 * cfg.num_experts_per_tok
    np.testing.assert_allclose(float(bal), want_bal, rtol=1e-5)
    if shared:  # the shared expert contributes (so dropping it would be caught)
        sh = p["shared"]
        only_shared = ref.swiglu(x, sh["gate"]["kernel"], sh["up"]["kernel"], sh["down"]["kernel"])
        assert np.abs(only_shared).max() > 0.1 * np.abs(want_y).max()


def test_moe_bias_changes_routing_not_weights():
    """Zeroing the bias changes the module output (it selects), so it is really used in __call__."""
    cfg, moe, x = _moe_setup(seed=4, run=dict(moe_impl="dense"))
    f = nnx.jit(lambda m, x: (lambda y, s: (y, s.counts))(*m(x)))
    y1, c1 = f(moe, jnp.asarray(x))
    moe.bias[...] = jnp.zeros_like(moe.bias[...])
    y0, c0 = f(moe, jnp.asarray(x))
    assert not np.array_equal(np.asarray(c0), np.asarray(c1))
    p = to_numpy(moe)
    np.testing.assert_allclose(np.asarray(y0), ref.moe(x, p, cfg)[0], rtol=1e-5, atol=1e-5)


def test_balance_loss_matches_numpy_and_hand_value():
    rng = np.random.default_rng(0)
    B, T, E, K = 3, 10, 8, 2
    s = ref.sigmoid(rng.normal(size=(B, T, E))).astype(np.float32)
    idx = np.stack([np.stack([rng.permutation(E)[:K] for _ in range(T)]) for _ in range(B)]).astype(np.int32)
    got = balance_loss(jnp.asarray(s), jnp.asarray(idx), E)
    np.testing.assert_allclose(float(got), ref.balance_loss(s, idx, E), rtol=1e-6)
    # Hand value: E = 4, K = 2, every token picks {0, 1}, constant scores [0.8, 0.6, 0.4, 0.2]:
    # f = 4 / (2T) * T = 2 for experts 0, 1 (0 otherwise); P = s / 2.0 -> L = 2 * (0.4 + 0.3) = 1.4.
    T2 = 5
    s2 = np.tile(np.array([0.8, 0.6, 0.4, 0.2], np.float32), (1, T2, 1))
    idx2 = np.tile(np.array([0, 1], np.int32), (1, T2, 1))
    np.testing.assert_allclose(float(balance_loss(jnp.asarray(s2), jnp.asarray(idx2), 4)), 1.4, rtol=1e-6)
    # Perfect balance with uniform scores gives exactly 1.
    idx3 = np.array([[[0, 1], [2, 3]]], np.int32)
    np.testing.assert_allclose(float(balance_loss(jnp.full((1, 2, 4), 0.5), jnp.asarray(idx3), 4)), 1.0, rtol=1e-6)
    # Gradient flows through P only (f is a count): dL/ds[b,t,j] = (f_j - sum_i f_i s'_i) / (S_t T B).
    g = np.asarray(jax.grad(lambda s_: balance_loss(s_, jnp.asarray(idx), E))(jnp.asarray(s)))
    f = np.stack([E / (K * T) * np.bincount(idx[b].ravel(), minlength=E) for b in range(B)])  # [B, E]
    S = s.astype(np.float64).sum(-1, keepdims=True)  # [B, T, 1]
    sp = s / S
    want = (f[:, None, :] - (f[:, None, :] * sp).sum(-1, keepdims=True)) / (S * T * B)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)


def test_router_bias_is_not_a_param_and_optimizer_leaves_it():
    cfg, moe, x = _moe_setup(seed=5, run=dict(moe_impl="dense"))
    params = nnx.state(moe, nnx.Param)
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
    assert "router" in names and "w_gate" in names
    assert not any("bias" in n for n in names)
    assert isinstance(moe.bias, RouterBias) and not isinstance(moe.bias, nnx.Param)
    assert len(nnx.to_flat_state(nnx.state(moe, RouterBias))) == 1

    bias0 = np.asarray(moe.bias[...]).copy()
    router0 = np.asarray(moe.router[...]).copy()
    wg0 = np.asarray(moe.w_gate[...]).copy()
    opt = nnx.Optimizer(moe, optax.sgd(1.0), wrt=nnx.Param)

    def loss(m):
        y, stats = m(jnp.asarray(x))
        return jnp.mean(y ** 2) + stats.balance

    grads = nnx.jit(nnx.grad(loss))(moe)
    grad_names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(grads)}
    assert not any("bias" in n for n in grad_names)
    opt.update(moe, grads)
    np.testing.assert_array_equal(np.asarray(moe.bias[...]), bias0)
    assert np.abs(np.asarray(moe.router[...]) - router0).max() > 1e-6
    assert np.abs(np.asarray(moe.w_gate[...]) - wg0).max() > 1e-6
    # sgd(1.0): new = old - grad, exactly.
    np.testing.assert_allclose(np.asarray(moe.router[...]), router0 - np.asarray(grads["router"][...]), rtol=1e-6)
