"""The whole DeepSeek-V3 forward (1 dense + 2 MoE layers, MTP depth 2) against a numpy forward built
layer by layer from the module's weights; causality of logits and MTP logits; MTP depth dependence;
output shapes; expert counts; the three MoE layouts; the layer scan against per-layer application;
parameter counts of the 671B config against a hand formula."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import Block, DeepSeekV3, ModelOutput, abstract_model, mtp_valid_mask, param_counts, with_runtime
from dsv3_jax.rope import rope_tables
from dsv3_jax.stack import scan_blocks

from reference import build, tiny_config, tiny_runtime, to_numpy
from reference import numpy_ref as ref

B, T = 2, 10


def assert_close(got, want, rel=2e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel * np.abs(want).max())


def jitted_forward(model, moe_impl=None):
    if moe_impl is not None:  # the same parameters under the tiny runtime with another expert layout
        model = with_runtime(model, tiny_runtime(moe_impl=moe_impl))
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, tok: nnx.merge(graphdef, st)(tok))
    return lambda tok: fwd(state, jnp.asarray(tok))


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config()
    model = build(lambda r: DeepSeekV3(cfg, rngs=r, runtime=tiny_runtime()), seed=0)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    fwd = jitted_forward(model)
    return cfg, model, to_numpy(model), tokens, fwd, fwd(tokens)


def test_forward_matches_numpy(setup):
    cfg, model, p, tokens, fwd, out = setup
    want = ref.forward(tokens, p, cfg)
    assert np.abs(want["logits"]).mean() > 0.3  # logits large enough for wrong variants to show
    assert_close(out.logits, want["logits"])
    assert len(out.mtp_logits) == len(want["mtp_logits"]) == 2
    for got_k, want_k in zip(out.mtp_logits, want["mtp_logits"]):
        assert_close(got_k, want_k)
    np.testing.assert_array_equal(np.asarray(out.expert_counts), want["counts"])
    np.testing.assert_allclose(float(out.balance_loss), want["balance"], rtol=1e-5)


def test_numpy_forward_is_discriminating(setup):
    """Plausible MTP mistakes give clearly different numbers, so the comparison above can fail."""
    cfg, model, p, tokens, fwd, out = setup
    scale = np.abs(np.asarray(out.mtp_logits[0])).max()
    # [h ; emb] instead of [emb ; h]: swap the halves of eh_proj's input rows.
    swapped = jax.tree.map(np.copy, p)
    D = cfg.hidden_size
    for k in (0, 1):
        w = swapped["mtp"][k]["eh_proj"]["kernel"]
        swapped["mtp"][k]["eh_proj"]["kernel"] = np.concatenate([w[D:], w[:D]], axis=0)
    bad = ref.forward(tokens, swapped, cfg)["mtp_logits"][0]
    assert np.abs(bad - np.asarray(out.mtp_logits[0])).max() > 0.05 * scale
    # Embedding of token i+1 vs token i (an off-by-one shift) also differs.
    shifted = np.concatenate([tokens[:, -1:], tokens[:, :-1]], axis=1)
    off = ref.forward(shifted, p, cfg)["mtp_logits"][0][:, 1:]
    assert np.abs(off - np.asarray(out.mtp_logits[0])[:, :-1]).max() > 0.05 * scale


def test_output_shapes_and_counts(setup):
    cfg, model, p, tokens, fwd, out = setup
    assert isinstance(out, ModelOutput)
    V, E, K = cfg.vocab_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    chex.assert_shape(out.logits, (B, T, V))
    chex.assert_type(out.logits, jnp.float32)
    assert isinstance(out.mtp_logits, tuple)
    chex.assert_shape(list(out.mtp_logits), (B, T, V))
    chex.assert_type(list(out.mtp_logits), jnp.float32)
    # 2 MoE layers in the main stack, then one MoE block per MTP depth.
    chex.assert_shape(out.expert_counts, (cfg.num_moe_layers + cfg.num_nextn_predict_layers, E))
    chex.assert_type(out.expert_counts, jnp.float32)
    chex.assert_shape(out.balance_loss, ())
    np.testing.assert_array_equal(np.asarray(out.expert_counts).sum(-1), B * T * K)
    chex.assert_tree_all_finite(out)
    np.testing.assert_array_equal(np.asarray(mtp_valid_mask(T, 2)), np.arange(T) < T - 2)


@pytest.mark.parametrize("j", [0, 3, 6, 9])
def test_causality(setup, j):
    cfg, model, p, tokens, fwd, out = setup
    changed = tokens.copy()
    changed[:, j] = (changed[:, j] + 7) % cfg.vocab_size
    new = fwd(changed)
    lg, lg2 = np.asarray(out.logits), np.asarray(new.logits)
    np.testing.assert_allclose(lg2[:, :j], lg[:, :j], rtol=0, atol=1e-6)
    assert np.abs(lg2[:, j] - lg[:, j]).max() > 1e-3  # ...and the change is seen at j
    for k, (a, b) in enumerate(zip(out.mtp_logits, new.mtp_logits), start=1):
        a, b = np.asarray(a), np.asarray(b)
        # depth k at position i reads tokens <= i + k: positions < j - k are untouched
        lo = max(j - k, 0)
        np.testing.assert_allclose(b[:, :lo], a[:, :lo], rtol=0, atol=1e-6, err_msg=f"depth {k}")
        if j - k >= 0:  # depth dependence: position j - k sees token j through the embedding
            assert np.abs(b[:, j - k] - a[:, j - k]).max() > 1e-3, f"depth {k} position {j - k}"


def test_mtp_depth_dependence(setup):
    """mtp_logits[0] at i changes when token i+1 changes while the main logits at i do not."""
    cfg, model, p, tokens, fwd, out = setup
    i = 4
    changed = tokens.copy()
    changed[:, i + 1] = (changed[:, i + 1] + 3) % cfg.vocab_size
    new = fwd(changed)
    np.testing.assert_allclose(np.asarray(new.logits)[:, i], np.asarray(out.logits)[:, i], atol=1e-6)
    assert np.abs(np.asarray(new.mtp_logits[0])[:, i] - np.asarray(out.mtp_logits[0])[:, i]).max() > 1e-3
    # depth 2 at i - 1 reads token i + 1 too; depth 2 at i - 2 does not.
    d2, d2n = np.asarray(out.mtp_logits[1]), np.asarray(new.mtp_logits[1])
    assert np.abs(d2n[:, i - 1] - d2[:, i - 1]).max() > 1e-3
    np.testing.assert_allclose(d2n[:, : i - 1], d2[:, : i - 1], atol=1e-6)


@pytest.mark.parametrize("impl", ["dense", "ragged"])
def test_moe_impls_agree(setup, impl):
    cfg, model, p, tokens, fwd, out = setup  # `out` used the config's 'blocks' layout (block size 4)
    other = jitted_forward(model, impl)(tokens)
    assert_close(other.logits, out.logits, rel=1e-5)
    for a, b in zip(other.mtp_logits, out.mtp_logits):
        assert_close(a, b, rel=1e-5)
    np.testing.assert_array_equal(np.asarray(other.expert_counts), np.asarray(out.expert_counts))


@pytest.mark.parametrize("remat", [False, True])
def test_scan_equals_layer_by_layer(setup, remat):
    cfg, model, p, tokens, fwd, out = setup
    stack = model.moe_layers
    L = cfg.num_moe_layers
    x = jnp.asarray(np.random.default_rng(2).normal(size=(B, T, cfg.hidden_size)), jnp.float32)
    cos, sin = rope_tables(cfg, jnp.broadcast_to(jnp.arange(T), (B, T)))
    stack = with_runtime(model, tiny_runtime(moe_impl="dense")).moe_layers
    got = nnx.jit(lambda s, x: scan_blocks(s, x, cos, sin, remat=remat))(stack, x)

    stacked = nnx.to_pure_dict(nnx.state(stack))
    layers = []
    dense = tiny_runtime(moe_impl="dense")
    for i in range(L):  # a fresh, unstacked Block holding layer i's slice of every parameter
        blk = nnx.eval_shape(lambda: Block(cfg, moe=True, rngs=nnx.Rngs(0), runtime=dense))
        st = nnx.state(blk)
        nnx.replace_by_pure_dict(st, jax.tree.map(lambda a, i=i: a[i], stacked))
        nnx.update(blk, st)
        layers.append(blk)

    @nnx.jit
    def one_by_one(layers, x):
        cs, bs = [], []
        for blk in layers:
            x, stats = blk(x, cos, sin)
            cs.append(stats.counts)
            bs.append(stats.balance)
        return x, jnp.stack(cs), jnp.stack(bs)

    want = one_by_one(layers, x)
    assert_close(got[0], want[0], rel=1e-5)
    np.testing.assert_array_equal(np.asarray(got[1].counts), np.asarray(want[1]))
    np.testing.assert_allclose(np.asarray(got[1].balance), np.asarray(want[2]), rtol=1e-5)
    # The layers really differ (a scan that reused layer 0 would be caught).
    assert np.abs(np.asarray(layers[0].attn.wo.kernel[...]) - np.asarray(layers[1].attn.wo.kernel[...])).max() > 0


def test_dense_only_model_with_mtp_matches_numpy():
    cfg = tiny_config(num_hidden_layers=2, first_k_dense_replace=2, num_nextn_predict_layers=1, q_lora_rank=None)
    model = build(lambda r: DeepSeekV3(cfg, rngs=r, runtime=tiny_runtime()), seed=3)
    assert model.moe_layers is None
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (B, 7)).astype(np.int32)
    out = jitted_forward(model)(tokens)
    want = ref.forward(tokens, to_numpy(model), cfg)
    assert_close(out.logits, want["logits"])
    assert_close(out.mtp_logits[0], want["mtp_logits"][0])
    assert out.expert_counts.shape == (0, cfg.n_routed_experts)
    assert float(out.balance_loss) == 0.0


# ----------------------------------------------------------------------------- parameter counts


def hand_counts(c: ModelConfig) -> dict:
    """Parameter counts from REFERENCE sizes (section 1), written out term by term."""
    D, V, N = c.hidden_size, c.vocab_size, c.num_attention_heads
    dn, dr, dv, R, Q = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank, c.q_lora_rank
    E, F, I, S = c.n_routed_experts, c.moe_intermediate_size, c.intermediate_size, c.n_shared_experts
    if Q is None:
        q = D * N * (dn + dr)  # q_proj
    else:
        q = D * Q + Q + Q * N * (dn + dr)  # q_a_proj, q_a_layernorm, q_b_proj
    attn = q + D * (R + dr) + R + R * N * (dn + dv) + N * dv * D  # kv_a_proj_with_mqa, kv_a_layernorm, kv_b, o
    block_norms = 2 * D  # input_layernorm, post_attention_layernorm
    dense_ffn = 3 * D * I
    experts = E * 3 * D * F
    shared = 3 * D * (F * S)
    router = D * E  # gate.weight (the correction bias is not a parameter)
    moe_ffn = experts + shared + router
    embedding, head, final_norm = V * D, D * V, D
    dense_block = attn + block_norms + dense_ffn
    moe_block = attn + block_norms + moe_ffn
    main = embedding + head + final_norm + c.num_dense_layers * dense_block + c.num_moe_layers * moe_block
    mtp_one = 2 * D * D + 3 * D + (moe_block if c.has_moe else dense_block)  # eh_proj, enorm/hnorm/norm, block
    active = main - c.num_moe_layers * experts + c.num_moe_layers * experts * c.num_experts_per_tok // E
    return {"params_total": main, "params_mtp": c.num_nextn_predict_layers * mtp_one, "params_active": active}


def test_param_counts_671b():
    cfg = ModelConfig()
    got = param_counts(abstract_model(cfg))
    assert got["params_total"] == 671_026_404_352
    assert got["params_mtp"] == 11_610_067_968
    hand = hand_counts(cfg)
    assert hand["params_total"] == 671_026_404_352 and hand["params_mtp"] == 11_610_067_968
    assert got == hand
    assert 37.0e9 < got["params_active"] < 38.0e9  # "37B activated"
    # On disk the MTP layer also stores its own copy of embedding and head: 671.0B + 13.5B = 684.5B ("685B").
    on_disk = got["params_total"] + got["params_mtp"] + 2 * cfg.vocab_size * cfg.hidden_size
    assert abs(on_disk - 685e9) < 1e9


def test_param_counts_q_lora_none_and_tiny():
    cfg = ModelConfig(q_lora_rank=None)
    got = param_counts(abstract_model(cfg))
    assert got == hand_counts(cfg)
    assert got["params_total"] == 671_026_404_352 - 61 * (7168 * 1536 + 1536 + 1536 * 128 * 192 - 7168 * 128 * 192)
    for c in (tiny_config(), tiny_config(q_lora_rank=None, n_shared_experts=2),
              tiny_config(num_hidden_layers=2, first_k_dense_replace=2)):
        assert param_counts(abstract_model(c)) == hand_counts(c), c
