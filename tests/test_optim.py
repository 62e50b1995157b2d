"""Tests for dsv3_jax.train.optim: schedules at hand-computed steps, the batch ramp, the
weight-decay mask on a real NNX module, and one AdamW step against a numpy re-implementation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dsv3_jax.train.optim import (
    batch_size_at,
    decay_mask,
    lr_schedule,
    make_optimizer,
    step_schedule,
)

PEAK, W, C, D, R = 2.2e-4, 100, 50, 200, 0.1


# ---------------------------------------------------------------------------- lr schedule


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.0),
        (50, PEAK / 2),  # warmup midpoint
        (99, PEAK * 99 / 100),
        (100, PEAK),  # end of warmup
        (125, PEAK),  # constant
        (149, PEAK),
        (150, PEAK),  # start of cosine: cos(0) = 1
        (250, PEAK * (R + (1 - R) / 2)),  # cosine midpoint
        (200, PEAK * (R + (1 - R) * 0.5 * (1 + math.cos(math.pi * 0.25)))),
        (350, PEAK * R),  # end of decay
        (10_000, PEAK * R),  # after the end: floor
    ],
)
def test_lr_schedule_values(step, expected):
    sched = lr_schedule(PEAK, W, C, D, final_ratio=R)
    np.testing.assert_allclose(float(sched(step)), expected, rtol=1e-6, atol=1e-12)


def test_lr_schedule_jit_and_zero_phases():
    sched = lr_schedule(PEAK, W, C, D, final_ratio=R)
    steps = jnp.array([0, 50, 125, 250, 400])
    got = jax.jit(jax.vmap(sched))(steps)
    want = [sched(int(s)) for s in steps]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    # No warmup / no constant phase: starts at peak and decays immediately.
    s0 = lr_schedule(1.0, 0, 0, 10, final_ratio=0.0)
    np.testing.assert_allclose(float(s0(0)), 1.0)
    np.testing.assert_allclose(float(s0(5)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(s0(10)), 0.0, atol=1e-7)
    # No decay phase: drops straight to the floor.
    s1 = lr_schedule(1.0, 0, 5, 0, final_ratio=0.1)
    np.testing.assert_allclose([float(s1(4)), float(s1(5))], [1.0, 0.1], rtol=1e-6)
    with pytest.raises(ValueError):
        lr_schedule(1.0, -1, 0, 0)
    with pytest.raises(ValueError):
        lr_schedule(1.0, 1, 0, 0, final_ratio=1.5)


# ---------------------------------------------------------------------------- step schedule


def test_step_schedule_boundaries():
    gamma = step_schedule([0.001, 0.0], [1000])
    lam = step_schedule([0.3, 0.1], [500])
    assert float(gamma(0)) == pytest.approx(0.001)
    assert float(gamma(999)) == pytest.approx(0.001)
    assert float(gamma(1000)) == 0.0
    assert float(gamma(1001)) == 0.0
    assert float(lam(499)) == pytest.approx(0.3)
    assert float(lam(500)) == pytest.approx(0.1)

    three = step_schedule([1.0, 2.0, 3.0], [10, 20])
    got = jax.jit(jax.vmap(three))(jnp.array([0, 9, 10, 19, 20, 10**6]))
    np.testing.assert_array_equal(np.asarray(got), [1, 1, 2, 2, 3, 3])

    const = step_schedule([7.0], [])
    assert float(jax.jit(const)(123)) == 7.0


def test_step_schedule_bad_lengths():
    with pytest.raises(ValueError, match="len"):
        step_schedule([0.3, 0.1], [])
    with pytest.raises(ValueError, match="len"):
        step_schedule([0.3], [10])
    with pytest.raises(ValueError, match="increasing"):
        step_schedule([1.0, 2.0, 3.0], [20, 10])


# ---------------------------------------------------------------------------- batch ramp


def test_batch_size_ramp():
    # 3072 -> 15360 over 100 steps: +122.88 per step.
    assert batch_size_at(0, 3072, 15360, 100) == 3072
    assert batch_size_at(50, 3072, 15360, 100) == 9216  # midpoint, exact
    assert batch_size_at(1, 3072, 15360, 100) == 3195  # 3194.88 rounds to 3195
    assert batch_size_at(100, 3072, 15360, 100) == 15360
    assert batch_size_at(10**6, 3072, 15360, 100) == 15360
    # Multiples: 3194.88 -> nearest multiple of 64 is 3200 (50 * 64).
    assert batch_size_at(1, 3072, 15360, 100, multiple_of=64) == 3200
    assert batch_size_at(25, 3072, 15360, 100, multiple_of=64) % 64 == 0
    # 4 -> 12 over 8 steps, multiple_of 8: 5 -> 8 (never below), 10 = 1.25*8 -> 8,
    # 12 = 1.5*8 -> 16 (halves round up).
    assert batch_size_at(1, 4, 12, 8, multiple_of=8) == 8
    assert batch_size_at(6, 4, 12, 8, multiple_of=8) == 8
    assert batch_size_at(8, 4, 12, 8, multiple_of=8) == 16
    # never below multiple_of
    assert batch_size_at(0, 1, 100, 10, multiple_of=16) == 16
    # no ramp
    assert batch_size_at(0, 3072, 15360, 0) == 15360
    assert batch_size_at(5, 3072, 15360, -1) == 15360
    with pytest.raises(ValueError):
        batch_size_at(0, 1, 2, 3, multiple_of=0)


# ---------------------------------------------------------------------------- decay mask


class _Norm(nnx.Module):
    def __init__(self, d):
        self.scale = nnx.Param(jnp.ones((d,)))


class _Tiny(nnx.Module):
    def __init__(self, rngs):
        self.norm = _Norm(4)
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (4, 3)))
        self.out_bias = nnx.Param(jnp.zeros((3,)))
        # A "stacked layers" norm weight: 2-D but still a norm weight.
        self.stacked = _Norm(4)
        self.stacked.scale = nnx.Param(jnp.ones((2, 4)))
        self.lin = nnx.Linear(3, 2, use_bias=True, rngs=rngs)
        self.counter = nnx.BatchStat(jnp.zeros(()))  # not a Param: filtered out


def _loss(model, x):
    h = model.norm.scale * x
    h = h @ model.kernel + model.out_bias
    h = model.lin(h)
    return jnp.sum(h**2) + jnp.sum(model.stacked.scale**2)


def test_decay_mask_on_nnx_state():
    model = _Tiny(nnx.Rngs(0))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    mask = decay_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    m = nnx.to_pure_dict(mask)
    assert m["norm"]["scale"] is False
    assert m["stacked"]["scale"] is False
    assert m["kernel"] is True
    assert m["out_bias"] is False
    assert m["lin"]["kernel"] is True
    assert m["lin"]["bias"] is False
    # Same answer via nnx.state and on a plain nested dict.
    assert nnx.to_pure_dict(decay_mask(nnx.state(model, nnx.Param))) == m
    plain = nnx.to_pure_dict(params)
    assert decay_mask(plain) == m
    # Stacked / listed layers: integer keys are skipped when naming a leaf.
    assert decay_mask({"layers": [{"scale": 1.0, "w": 2.0}]}) == {"layers": [{"scale": False, "w": True}]}


# ---------------------------------------------------------------------------- AdamW step


def _np_adamw_step(params, grads, mask, *, lr, b1, b2, eps, wd, clip, t=1):
    """One AdamW update from zero moments, written out in numpy (float64)."""
    gnorm = math.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in grads.values()))
    factor = 1.0 if (not clip or gnorm < clip) else clip / gnorm
    out = {}
    for k, p in params.items():
        p = np.asarray(p, np.float64)
        g = np.asarray(grads[k], np.float64) * factor
        m = (1 - b1) * g
        v = (1 - b2) * g * g
        mhat = m / (1 - b1**t)
        vhat = v / (1 - b2**t)
        upd = mhat / (np.sqrt(vhat) + eps) + (wd * p if mask[k] else 0.0)
        out[k] = p - lr * upd
    return out, gnorm


@pytest.mark.parametrize("grad_scale", [0.01, 10.0])  # clipping inactive / active
def test_adamw_step_matches_numpy(grad_scale):
    rng = np.random.default_rng(0)
    params = {
        "kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
        "scale": jnp.asarray(1 + 0.1 * rng.normal(size=(3,)), jnp.float32),
        "proj_bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
    }
    grads = {k: jnp.asarray(grad_scale * rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
    kw = dict(peak_lr=1e-2, warmup_steps=0, constant_steps=10, decay_steps=10)
    tx, sched = make_optimizer(**kw, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, updates)

    mask = {"kernel": True, "scale": False, "proj_bias": False}
    want, gnorm = _np_adamw_step(params, grads, mask, lr=float(sched(0)), b1=0.9, b2=0.95, eps=1e-8, wd=0.1, clip=1.0)
    assert (gnorm > 1.0) == (grad_scale > 1.0)
    for k in params:
        np.testing.assert_allclose(np.asarray(new[k]), want[k], rtol=2e-6, atol=1e-7, err_msg=k)
    # Decay actually matters for the kernel (and only for it): the step differs from wd=0.
    tx0, _ = make_optimizer(**kw, weight_decay=0.0, clip_norm=1.0)
    new0 = optax.apply_updates(params, tx0.update(grads, tx0.init(params), params)[0])
    assert not np.allclose(np.asarray(new0["kernel"]), np.asarray(new["kernel"]))
    np.testing.assert_array_equal(np.asarray(new0["scale"]), np.asarray(new["scale"]))
    np.testing.assert_array_equal(np.asarray(new0["proj_bias"]), np.asarray(new["proj_bias"]))


def test_optimizer_with_nnx_optimizer_and_mu_dtype():
    model = _Tiny(nnx.Rngs(1))
    tx, _ = make_optimizer(
        peak_lr=1e-2, warmup_steps=0, constant_steps=5, decay_steps=5, clip_norm=None, mu_dtype=jnp.bfloat16
    )
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    x = jnp.ones((2, 4))

    @nnx.jit
    def train_step(model, opt, x):
        grads = nnx.grad(_loss)(model, x)
        opt.update(model, grads)

    train_step(model, opt, x)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert not np.allclose(before["kernel"], after["kernel"])
    mus = [l for l in jax.tree.leaves(opt.opt_state) if hasattr(l, "dtype") and l.dtype == jnp.bfloat16]
    assert mus, "mu_dtype=bfloat16 should store the first moment in bf16"
