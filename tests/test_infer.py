"""Inference pieces: the model's absorbed-MLA latent cache (prefill + decode, teacher-forced, against the full
forward), absorbed attention against expanded attention and numpy, cache sizes, sampling (filtering, speculative
sampling's distribution), and bfloat16 decoding through the engine. The engine's generation (batching, stops,
seeded sampling, MTP speculation, sharding, errors) is tested in test_engine.py, against the full forward.

Models are small random DeepSeek-V3s (tests/reference: 1 dense + 2 MoE layers, YaRN, 8 experts in 4
groups) drawn with std 0.2, so logits are large and wrong variants change tokens. Tolerance for logits
(float32 model, matmul precision 'highest', conftest.py): |got - want| <= 1e-4 * (|want| + max |want|).
Token sequences must match exactly.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.infer.engine import Engine
from dsv3_jax.infer.memory_plan import cache_bytes_per_token, mha_cache_bytes_per_token
from dsv3_jax.infer.paged_cache import bytes_per_token
from dsv3_jax.infer.sampling import filter_logits, verify_draft
from dsv3_jax.mla import MLA, LatentCache
from dsv3_jax.model import DeepSeekV3, with_runtime
from dsv3_jax.rope import rope_tables

from reference import build, decoding, tiny_config, tiny_runtime, to_numpy
from reference import numpy_ref as ref


def close(got, want, rel=1e-4):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel * np.abs(want).max())


def draftable_model(seed=0, alpha=0.3, **cfg):
    """A random model whose MTP module is a usable (imperfect) draft model, so that speculative decoding
    both accepts and rejects: attention and FFN outputs are scaled by `alpha`, which makes the main model
    close to a bigram model logits(t_{i+1}) ~ head(norm(Emb(t_i))); the MTP module then passes Emb(t_{i+1})
    straight through (eh_proj = [I; 0], unit enorm, the main model's final norm), predicting t_{i+2} by the
    same bigram table. The residual attention/FFN terms make the two disagree now and then."""
    cfg = tiny_config(num_nextn_predict_layers=1, **cfg)
    m = build(lambda r: DeepSeekV3(cfg, rngs=r, runtime=tiny_runtime()), seed=seed, std=0.2)
    for blk in (m.dense_layers, m.moe_layers, m.mtp[0].block):
        blk.attn.wo.kernel[...] *= alpha
        ffn = blk.ffn
        for w in ((ffn.w_down, ffn.shared.down.kernel) if blk.is_moe else (ffn.down.kernel,)):
            w[...] *= alpha
    mtp, D = m.mtp[0], cfg.hidden_size
    mtp.eh_proj.kernel[...] = jnp.concatenate([jnp.eye(D), jnp.zeros((D, D))], axis=0)
    mtp.enorm.scale[...] = jnp.ones((D,))
    mtp.norm.scale[...] = m.norm.scale[...]
    return m


@pytest.fixture(scope="module")
def model():
    return draftable_model()


# ----------------------------------------------------------------------------- cache vs full forward


def test_cached_prefill_and_decode_match_full_forward():
    """Right-padded prefill (rows of 6 and 3 tokens) + one-token absorbed decode steps, teacher-forced, give
    the full forward's logits at every position, for the main model and for the MTP module; the pad slots
    written by prefill are masked, then overwritten."""
    cfg = tiny_config(num_nextn_predict_layers=1)
    m = build(lambda r: DeepSeekV3(cfg, rngs=r, runtime=tiny_runtime()), seed=5, std=0.2)
    B, T, lens, S = 2, 20, np.array([6, 3]), 32
    toks = jax.random.randint(jax.random.key(1), (B, T), 2, cfg.vocab_size)
    full_logits, full_mtp = decoding.logits(m, toks)
    nxt = jnp.concatenate([toks[:, 1:], jnp.zeros((B, 1), toks.dtype)], axis=1)  # t_{i+1}, 0 past the end
    graphdef, state = nnx.split(m)
    decode_graphdef = nnx.split(with_runtime(m, tiny_runtime(moe_impl="dense")))[0]

    @jax.jit
    def prefill(state, tokens, next_tokens):
        mm = nnx.merge(graphdef, state)
        cache = mm.init_cache(B, S, jnp.float32, mtp=True)
        logits, h, cache = mm.prefill(tokens, cache)
        mtp_logits, cache = mm.mtp_prefill(h, next_tokens, cache)
        return logits, mtp_logits, cache

    @jax.jit
    def decode(state, cache, tokens, next_tokens, positions):
        mm = nnx.merge(decode_graphdef, state)
        logits, h, cache = mm.decode(tokens, positions, cache)
        mtp_logits, cache = mm.mtp_decode(h, next_tokens, positions, cache)
        return logits, mtp_logits, cache

    P0 = int(lens.max())
    logits, mtp_logits, cache = prefill(state, toks[:, :P0], nxt[:, :P0])
    got = {(b, p): (logits[b, p], mtp_logits[b, p]) for b in range(B) for p in range(lens[b])}
    rows = np.arange(B)
    for j in range(T - P0):
        pos = lens + j  # row b decodes its own next position
        logits, mtp_logits, cache = decode(state, cache, toks[rows, pos][:, None], nxt[rows, pos][:, None],
                                           jnp.asarray(pos)[:, None])
        for b in range(B):
            got[(b, pos[b])] = (logits[b, 0], mtp_logits[b, 0])
    for b in range(B):
        n = max(p for bb, p in got if bb == b) + 1
        assert n >= T - 3
        close(np.stack([got[(b, p)][0] for p in range(n)]), full_logits[b, :n])
        close(np.stack([got[(b, p)][1] for p in range(n)]), full_mtp[0][b, :n])
    assert float(jnp.abs(full_logits).mean()) > 0.5  # logits discriminate


# ----------------------------------------------------------------------------- absorbed attention


ABS_CFG = dict(num_attention_heads=3, qk_nope_head_dim=4, v_head_dim=6, kv_lora_rank=8, qk_rope_head_dim=8)


def _kv_shaped(jaxpr, B, S, N, dims) -> list:
    """Shapes in a jaxpr (recursively) that look like expanded keys/values: [B, S, N, d] for d in dims."""
    found = []

    def walk(jp):
        for eqn in jp.eqns:
            for v in eqn.outvars:
                shape = tuple(getattr(v.aval, "shape", ()))
                if len(shape) == 4 and shape[0] == B and set(shape[1:3]) == {S, N} and shape[3] in dims:
                    found.append(shape)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else (param,):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)

    walk(jaxpr.jaxpr)
    return found


def test_absorbed_attention_equals_expanded():
    """MLA.decode (W_UK absorbed into the query, W_UV into the output, attention over the latent cache only)
    equals the training path and the float64 numpy multi-head attention, for a 5-token then a 3-token chunk;
    its jaxpr never forms a [B, S, N, dn] key or [B, S, N, dv] value, while the training path's does."""
    cfg = tiny_config(**ABS_CFG)
    mla = build(lambda r: MLA(cfg, rngs=r), seed=4)
    B, T, S = 2, 8, 11
    x = jnp.asarray(np.random.default_rng(0).normal(size=(B, T, cfg.hidden_size)), jnp.float32)
    cos, sin = rope_tables(cfg, jnp.broadcast_to(jnp.arange(T), (B, T)))
    expanded = nnx.jit(lambda m, x, c, s: m(x, c, s))(mla, x, cos, sin)
    want = ref.mla(np.asarray(x), to_numpy(mla), cfg)

    def chunk(m, cache, a, b):
        pos = jnp.broadcast_to(jnp.arange(a, b), (B, b - a))
        c, s = rope_tables(cfg, pos)
        return m.decode(x[:, a:b], c, s, cache, pos)

    cache = LatentCache.zeros(cfg, B, S, jnp.float32)
    out1, cache = nnx.jit(chunk, static_argnums=(2, 3))(mla, cache, 0, 5)
    out2, cache = nnx.jit(chunk, static_argnums=(2, 3))(mla, cache, 5, 8)
    absorbed = jnp.concatenate([out1, out2], axis=1)
    close(absorbed, expanded, 1e-5)
    close(absorbed, want, 1e-5)
    assert np.abs(want).mean() > 0.1
    # the cache holds exactly the normalised latent and roped k_pe of each token (slots >= T untouched)
    c_ref, k_ref = ref.mla_latent(np.asarray(x), to_numpy(mla), cfg)
    close(cache.c_kv[:, :T], c_ref, 1e-5)
    close(cache.k_pe[:, :T], k_ref, 1e-5)
    assert not np.any(np.asarray(cache.c_kv[:, T:]))

    N, dims = cfg.num_attention_heads, (cfg.qk_nope_head_dim, cfg.v_head_dim)
    decode_jaxpr = jax.make_jaxpr(lambda c: chunk(mla, c, 5, 8))(LatentCache.zeros(cfg, B, S, jnp.float32))
    assert _kv_shaped(decode_jaxpr, B, S, N, dims) == []
    xs = jnp.zeros((B, S, cfg.hidden_size))
    cs, ss = rope_tables(cfg, jnp.broadcast_to(jnp.arange(S), (B, S)))
    train_jaxpr = jax.make_jaxpr(lambda x: mla(x, cs, ss))(xs)
    assert _kv_shaped(train_jaxpr, B, S, N, dims)  # the check does see expanded K/V when they exist


def test_cache_bytes_per_token(model):
    """The cache holds only c_kv [R] and k_pe [dr] per token per layer: (R + dr) * layers * itemsize bytes for
    the main model; the MTP layer's cache (speculative decoding) is counted separately, (R + dr) * itemsize.
    The engine's page pools hold the same per token (and `paged_cache.bytes_per_token` sizes them so)."""
    cfg = model.cfg
    per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    for dtype in (jnp.float32, jnp.bfloat16):
        cache = jax.eval_shape(lambda dtype=dtype: model.init_cache(3, 40, dtype, mtp=True))
        itemsize = jnp.dtype(dtype).itemsize
        got = cache_bytes_per_token(cache)
        assert got == {"main": per_layer * cfg.num_hidden_layers * itemsize, "mtp": per_layer * itemsize}
        leaves = jax.tree_util.tree_leaves_with_path(cache)
        assert sorted({jax.tree_util.keystr(p[-1:]) for p, _ in leaves}) == [".c_kv", ".k_pe"]
        total = sum(np.prod(a.shape) * a.dtype.itemsize for _, a in leaves)
        assert total == 3 * 40 * (got["main"] + got["mtp"])
        assert mha_cache_bytes_per_token(cfg, itemsize) == (
            cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers * itemsize)
        pools = Engine(model, page_size=4, pages=8, cache_dtype=dtype, speculative=True).pools
        assert cache_bytes_per_token(pools) == got
        assert bytes_per_token(cfg, itemsize, mtp=True) == got["main"] + got["mtp"]
    assert jax.eval_shape(lambda: model.init_cache(1, 8)).mtp is None  # no MTP cache unless speculating


# ----------------------------------------------------------------------------- sampling


def _filter_numpy(logits, temperature, top_k, top_p, min_p=0.0):
    """Reference: temperature, then top-k, then top-p over the renormalised survivors, then min-p (a token
    stays if its probability is at least min_p times the largest)."""
    out = np.array(logits, np.float64) / temperature
    for row in out:
        order = np.argsort(-row, kind="stable")
        if top_k > 0:
            row[order[top_k:]] = -np.inf
        p = np.exp(row - row.max())
        p /= p.sum()
        cum = np.cumsum(p[order])
        n_keep = int(np.searchsorted(cum, top_p) + 1)  # smallest prefix with mass >= top_p
        row[order[n_keep:]] = -np.inf
        p = np.exp(row - row.max())
        row[p < min_p] = -np.inf  # (p relative to the largest, which is 1 here)
    return out


CASES = [(1.0, 0, 0.9, 0.0), (0.7, 0, 0.5, 0.0), (1.3, 5, 0.8, 0.0), (1.0, 3, 1.0, 0.0), (1.0, 0, 1.0, 0.0),
         (2.0, 0, 0.01, 0.0), (1.0, 0, 1.0, 0.1), (0.8, 8, 0.95, 0.05)]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", CASES)
def test_filter_logits_against_numpy(temperature, top_k, top_p, min_p):
    logits = np.random.default_rng(top_k + int(100 * top_p)).normal(scale=2.0, size=(4, 40)).astype(np.float32)
    got = np.asarray(jax.jit(filter_logits)(jnp.asarray(logits), jnp.float32(temperature), jnp.int32(top_k),
                                            jnp.float32(top_p), jnp.float32(min_p)))
    want = _filter_numpy(logits, temperature, top_k, top_p, min_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    kept = ~np.isinf(want)
    close(got[kept], want[kept], 1e-6)
    if top_p < 1.0 or top_k or min_p:
        assert np.isinf(want).any()  # the case filters something


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [CASES[2], CASES[6], CASES[7]])
def test_sampled_frequencies_follow_the_filtered_distribution(temperature, top_k, top_p, min_p):
    """The engine's per-row sampler (steps.sample_rows: each row its own seed and filters), 20,000 rows with
    seeds 0..19999 over one row of logits: only the tokens the numpy reference keeps are ever drawn, and the
    counts pass a chi-square test against its probabilities (statistic below df + 6 sqrt(2 df), about the
    1e-6 tail; fixed seeds, so the outcome is fixed)."""
    from dsv3_jax.infer.steps import sample_rows

    n = 20_000
    row = np.random.default_rng(1).normal(scale=1.5, size=(1, 24)).astype(np.float32)
    want = _filter_numpy(row, temperature, top_k, top_p, min_p)[0]
    p = np.exp(want - want.max())
    p /= p.sum()
    full = lambda x, dt: jnp.full((n,), x, dt)  # noqa: E731
    knobs = (full(temperature, jnp.float32), full(top_k, jnp.int32), full(top_p, jnp.float32),
             full(min_p, jnp.float32))
    drawn = np.asarray(jax.jit(sample_rows)(jnp.arange(n), jnp.zeros(n, jnp.int32),
                                            jnp.broadcast_to(jnp.asarray(row), (n, 24)), knobs))
    counts = np.bincount(drawn, minlength=24)
    kept = p > 0
    assert counts[~kept].sum() == 0 and kept.sum() > 2, counts
    expected = n * p[kept]
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    df = int(kept.sum()) - 1
    assert chi2 < df + 6 * np.sqrt(2 * df), (chi2, df)


def test_speculative_sampling_keeps_the_target_distribution():
    """verify_draft: drafts d ~ q accepted with prob min(1, p(d)/q(d)), else resampled from max(p - q, 0):
    the emitted tokens are distributed as p, and the acceptance rate is sum_v min(p_v, q_v)."""
    n, rng = 200_000, np.random.default_rng(0)
    p = rng.dirichlet(np.ones(6)).astype(np.float32)
    q = rng.dirichlet(np.ones(6)).astype(np.float32)
    k_draft, k_verify = jax.random.split(jax.random.key(0))
    draft = jax.random.categorical(k_draft, jnp.log(jnp.asarray(q)), shape=(n,)).astype(jnp.int32)
    P, Q = jnp.broadcast_to(jnp.asarray(p), (n, 6)), jnp.broadcast_to(jnp.asarray(q), (n, 6))
    accepted, tokens = jax.jit(verify_draft)(k_verify, P, Q, draft)
    freq = np.bincount(np.asarray(tokens), minlength=6) / n
    sigma = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) < 5 * sigma + 1e-4), (freq, p)
    assert abs(float(accepted.mean()) - np.minimum(p, q).sum()) < 0.01
    assert np.abs(freq - q).max() > 0.02  # q itself would fail the first check


# ----------------------------------------------------------------------------- bfloat16


def test_bfloat16_generation_runs_on_cpu_and_tracks_the_full_forward():
    """A bf16 model (bf16 latent cache) decodes through the engine on XLA:CPU (whose DotThunk cannot run some
    bf16 x bf16 -> f32 dots, e.g. the absorbed attention at these shapes); speculative greedy still equals plain
    greedy; the model's cached logits, teacher-forced over those tokens, follow the bf16 full forward to bf16
    accuracy and their argmax is the engine's tokens."""
    from dsv3_jax.config import ModelConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                      num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                      qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                      topk_group=1, first_k_dense_replace=1, dtype="bfloat16", num_nextn_predict_layers=1)
    m = build(lambda r: DeepSeekV3(cfg, rngs=r), std=0.02)  # drawn from numpy: no eager init to compile
    prompts = [[3, 7, 11, 5], [9, 2]]
    plain, spec = ([c.tokens for c in Engine.for_batch(m, 2, 16, speculative=s).generate(prompts, 8, stop_tokens=())]
                   for s in (False, True))
    assert plain == spec and all(len(t) == 8 for t in plain)
    prompt, out = prompts[0], plain[0]
    full = nnx.jit(lambda m, t: m(t).logits)(m, jnp.asarray([prompt + out[:-1]]))[0, len(prompt) - 1:]
    cache = m.init_cache(1, 64)
    logits, _, cache = nnx.jit(lambda m, t, c: m.prefill(t, c))(m, jnp.asarray([prompt]), cache)
    steps = [logits[0, -1]]
    decode = nnx.jit(lambda m, t, p, c: m.decode(t, p, c))  # one compilation for every step
    for i, t in enumerate(out[:-1]):
        lg, _, cache = decode(m, jnp.asarray([[t]]), jnp.asarray([[len(prompt) + i]]), cache)
        steps.append(lg[0, 0])
    got, want = np.asarray(jnp.stack(steps), np.float32), np.asarray(full, np.float32)
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()
    assert (got.argmax(-1) == np.asarray(out)).all()
