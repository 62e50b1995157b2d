"""The paged-attention kernel (dsv3_jax/infer/paged_attention.py, Pallas in interpret mode on CPU) against a
numpy reference written here, the jnp gather read against the same reference, the kernel's lowering for CUDA
(Triton) and TPU (Mosaic), and the engine's greedy tokens with the kernel against the full forward's
(test_engine's `alone`: greedy by repeated full forwards, tests/reference/decoding.py)."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_engine import GREEDY, NEW, PROMPTS, alone, engine, model  # noqa: F401  (shared fixtures)
from test_fp8 import _abstract_gpu

from dsv3_jax.infer.paged_attention import paged_attention


def numpy_reference(q_abs, q_pe, c_pool, pe_pool, table, positions, scale, layer):
    """Row by row, token by token: the slots 0..position of the row, each read from its page."""
    q_abs, q_pe = np.asarray(q_abs, np.float64), np.asarray(q_pe, np.float64)
    c, pe = np.asarray(c_pool, np.float64)[layer], np.asarray(pe_pool, np.float64)[layer]
    G = c.shape[1]
    out = np.zeros(q_abs.shape)
    for b in range(q_abs.shape[0]):
        for t in range(q_abs.shape[1]):
            n = positions[b][t] + 1
            if n <= 0:
                continue
            slots = np.arange(n)
            keys_c = c[table[b][slots // G], slots % G]  # [n, R]
            keys_pe = pe[table[b][slots // G], slots % G]
            s = scale * (q_abs[b, t] @ keys_c.T + q_pe[b, t] @ keys_pe.T)  # [N, n]
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, t] = (p / p.sum(-1, keepdims=True)) @ keys_c
    return out


def _case(dtype, seed=0):
    """Pools in `dtype`; queries in f32 on CPU (what the model's core does there: XLA:CPU has no bf16 x bf16 ->
    f32 dot), in `dtype` elsewhere."""
    rng = np.random.default_rng(seed)
    L, P, G, R, dr, B, T, N, M = 2, 12, 16, 64, 16, 4, 2, 4, 3
    table = np.zeros((B, M), np.int32)
    table[:3] = rng.permutation(np.arange(1, P))[:3 * M].reshape(3, M)  # scattered pages
    # row 3 is a padding row: every entry the trash page
    positions = np.array([[5, 6], [30, 31], [46, 47], [-1, -1]], np.int32)  # 1, 2 and 3 pages; padding
    arr = lambda *s: jnp.asarray(rng.normal(size=s), dtype)  # noqa: E731
    qdt = jnp.float32 if jax.default_backend() == "cpu" else dtype
    return (arr(B, T, N, R).astype(qdt), arr(B, T, N, dr).astype(qdt), arr(L, P, G, R), arr(L, P, G, dr),
            jnp.asarray(table), jnp.asarray(positions))


@pytest.mark.parametrize("impl,backend", [("jnp", "auto"), ("pallas", "triton"), ("pallas", "mosaic_tpu")])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_paged_attention_matches_numpy(impl, backend, dtype):
    args = _case(dtype)
    for layer in (0, 1):
        want = numpy_reference(*args, scale=0.125, layer=layer)
        kw = {} if impl == "jnp" else {"backend": backend, "block_q": 4}  # 2 row blocks per row
        got = np.asarray(paged_attention(*args, scale=0.125, layer=layer, impl=impl, **kw))
        tol = 2e-5 if dtype == jnp.float32 else 3e-2
        np.testing.assert_allclose(got[:3], want[:3], rtol=tol, atol=tol)  # row 3 is padding: unread
        assert np.isfinite(got).all()


def test_the_kernel_on_a_mesh_runs_each_devices_rows_and_heads():
    """Under a mesh (data 2 x tensor 2 of the 8 fake devices) the kernel runs in its own shard_map (rows over the
    batch axes, heads over 'tensor': a Pallas kernel cannot be partitioned by XLA), and equals numpy."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dsv3_jax import sharding

    args = _case(jnp.float32, seed=1)
    mesh = sharding.make_mesh(dict(data=2, tensor=2), jax.devices()[:4])
    rows = NamedSharding(mesh, P("data"))
    placed = [jax.device_put(a, rows if i in (0, 1, 4, 5) else NamedSharding(mesh, P())) for i, a in enumerate(args)]
    f = jax.jit(lambda *a: paged_attention(*a, scale=0.125, layer=1, impl="pallas", backend="triton", block_q=4))
    with jax.set_mesh(mesh):
        got = np.asarray(f(*placed))
        assert "shard_map" in str(jax.make_jaxpr(f)(*placed))
    want = numpy_reference(*args, scale=0.125, layer=1)
    np.testing.assert_allclose(got[:3], want[:3], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_paged_attention_kernel_lowers_for_accelerators(platform):
    """At V3's sizes (128 heads, R 512, dr 64, pages of 64, bf16), stacked pools of 3 layers."""
    S = jax.ShapeDtypeStruct
    B, T, N, R, dr, L, P, G, M = 4, 2, 128, 512, 64, 3, 100, 64, 8
    args = (S((B, T, N, R), jnp.bfloat16), S((B, T, N, dr), jnp.bfloat16), S((L, P, G, R), jnp.bfloat16),
            S((L, P, G, dr), jnp.bfloat16), S((B, M), jnp.int32), S((B, T), jnp.int32), S((), jnp.int32))
    backend = "triton" if platform == "cuda" else "mosaic_tpu"

    def f(q_abs, q_pe, c, pe, table, positions, layer):
        return paged_attention(q_abs, q_pe, c, pe, table, positions, scale=0.1, layer=layer, impl="pallas",
                               backend=backend, interpret=False)

    with _abstract_gpu() if platform == "cuda" else contextlib.nullcontext():
        text = jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert ("__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") in text


def test_engine_with_the_kernel_equals_each_prompt_alone(model, alone):  # noqa: F811
    eng = engine(model, page_size=16, pages=16, paged_attention="pallas")
    assert eng.runtime.paged_attention == "pallas"
    ids = [eng.submit(p, NEW, stop_ids=()) for p in PROMPTS[:3]]
    eng.step()
    ids += [eng.submit(p, NEW, stop_ids=()) for p in PROMPTS[3:]]
    eng.run()
    assert [eng.result(i).output for i in ids] == alone
    assert GREEDY.temperature == 0
