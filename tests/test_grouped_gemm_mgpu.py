"""The 'mgpu' expert layout on CPU: its custom VJP's wiring against a float64 per-group reference (with reference
kernels of the Mosaic GPU kernels' signatures), the kernels lowered for CUDA (three Mosaic GPU calls for a
forward and backward), the layout in `LocalExperts` against 'dense', and its refusal off a GPU. The kernels
themselves run only on a Hopper GPU (`benchmarks/grouped_gemm.py` checks them against float64 there)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import grouped_gemm_mgpu, runtime
from dsv3_jax.cli import UserError
from dsv3_jax.experts import LocalExperts

SIZES = np.array([5, 0, 9, 2], np.int32)  # an empty group included; 16 rows


def _per_group(x, w, sizes, dy):
    """float64 numpy: y, dx, dw of y[rows of g] = x[rows of g] @ w[g] under cotangent dy."""
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    y, dx, dw = np.zeros((x.shape[0], w.shape[2])), np.zeros_like(x), np.zeros_like(w)
    start = 0
    for g, n in enumerate(sizes):
        r = slice(start, start + n)
        y[r], dx[r], dw[g] = x[r] @ w[g], dy[r] @ w[g].T, x[r].T @ dy[r]
        start += n
    return y, dx, dw


def test_custom_vjp_matches_a_per_group_reference():
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (16, 8))
    w = jax.random.normal(k[1], (4, 8, 12))
    dy = jax.random.normal(k[2], (16, 12))
    gemm = grouped_gemm_mgpu.make_grouped_gemm(grouped_gemm_mgpu.reference_kernels())
    y, vjp = jax.vjp(lambda x, w: gemm(x, w, jnp.asarray(SIZES)), x, w)
    dx, dw = vjp(dy)
    for got, want in zip((y, dx, dw), _per_group(x, w, SIZES, dy)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_kernels_lower_for_cuda(monkeypatch):
    """Forward and backward lower for CUDA on this CPU machine: three Mosaic GPU kernel calls (y, dx, dw) and no
    other dot (so nothing fell back to XLA's ragged_dot)."""
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    class OnH100:  # the weight-gradient kernel sizes its grid by the first device's SM count (132 on an H100)
        def __getattr__(self, name):
            return getattr(jax, name)

        def devices(self):
            return [type("Device", (), {"core_count": 132})()]

    monkeypatch.setattr(transposed_ragged_dot_mgpu, "jax", OnH100())
    gemm = grouped_gemm_mgpu.grouped_gemm_mgpu()
    x = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((4, 256, 128), jnp.bfloat16)
    sizes = jax.ShapeDtypeStruct((4,), jnp.int32)

    def step(x, w, sizes, dy):
        y, vjp = jax.vjp(lambda x, w: gemm(x, w, sizes), x, w)
        return y, vjp(dy)

    text = jax.jit(step).trace(x, w, sizes, jax.ShapeDtypeStruct((512, 128), jnp.bfloat16)).lower(
        lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "stablehlo.custom_call" in line and "mosaic_gpu" in line]
    assert len(calls) == 3, [c[:200] for c in calls]
    assert "chlo.ragged_dot" not in text and "stablehlo.ragged_dot" not in text and "stablehlo.dot_general" not in text


def test_mgpu_layout_matches_dense(monkeypatch):
    """LocalExperts('mgpu') routes rows through the grouped GEMM (here with the reference kernels): output and
    gradients equal the dense reference layout's."""
    monkeypatch.setattr(grouped_gemm_mgpu, "grouped_gemm_mgpu",
                        lambda: grouped_gemm_mgpu.make_grouped_gemm(grouped_gemm_mgpu.reference_kernels()))
    N, D, F, E, K = 12, 8, 6, 4, 2
    k = jax.random.split(jax.random.key(1), 6)
    x = jax.random.normal(k[0], (N, D))
    idx = jax.random.randint(k[1], (N, K), 0, E)
    w = jax.nn.softmax(jax.random.normal(k[2], (N, K)))
    wg, wu = (jax.random.normal(kk, (E, D, F)) / np.sqrt(D) for kk in k[3:5])
    wd = jax.random.normal(k[5], (E, F, D)) / np.sqrt(F)

    def loss(impl, x, wg, wu, wd):
        y, _ = LocalExperts(impl)(x, idx, w, wg, wu, wd)
        return jnp.sum(y * jnp.cos(y))

    got = jax.value_and_grad(lambda *a: loss("mgpu", *a), argnums=(0, 1, 2, 3))(x, wg, wu, wd)
    want = jax.value_and_grad(lambda *a: loss("dense", *a), argnums=(0, 1, 2, 3))(x, wg, wu, wd)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_mgpu_is_refused_off_a_gpu():
    if runtime.platform() == "gpu":
        pytest.skip("a GPU backend accepts it")
    with pytest.raises(UserError, match="moe_impl='mgpu'.*Hopper"):
        runtime.resolve(moe_impl="mgpu")
