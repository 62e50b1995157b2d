"""DeepSeek Sparse Attention (V3.2, dsv3_jax/dsa.py) against transformers 5.25's DeepseekV32ForCausalLM (PyTorch,
CPU, float32): tiny random V3.2 models saved with `save_pretrained`, loaded with `hf.load`, logits compared with
index_topk smaller than the sequence, so that the indexer's selection decides the result (a test that the
selection matters: the same weights with dense attention differ). Also: index_topk >= the length is dense MLA
exactly, the half-split RoPE and the top-k against numpy, config.json in V3.2's released form, and the decode
path refusing in one line (the indexer's key cache is not built yet)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_interop import max_diff, our_logits, randomize, ref, tokens_for, torch_logits  # noqa: F401

from dsv3_jax.cli import UserError
from dsv3_jax.config import ModelConfig
from dsv3_jax.dsa import rope_half, topk_keep
from dsv3_jax.interop import hf
from dsv3_jax.interop.hf_config import parse_config
from dsv3_jax.model import DeepSeekV3

TOL = 1e-4
# 16 indexer heads: a key every head's ReLU zeroes scores exactly 0, and ties would leave the top-k to each
# library's tie order (16 heads: probability ~2^-16 per key)
V32 = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
           qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
           n_group=4, topk_group=2, first_k_dense_replace=1, max_position_embeddings=128, index_topk=5,
           index_n_heads=16, index_head_dim=8)


def hf_v32(transformers, cfg: dict, seed: int):
    config = transformers.DeepseekV32Config(**cfg, attn_implementation="eager")
    return randomize(transformers.DeepseekV32ForCausalLM(config), seed).eval()


@pytest.mark.parametrize("topk", [5, 11])
def test_v32_logits_match_transformers(ref, tmp_path, topk):  # noqa: F811
    """index_topk 5 and 11 over 16 tokens, BF16-free float32; the loaded model's dense twin differs."""
    cfg_dict = dict(V32, index_topk=topk)
    model = hf_v32(ref, cfg_dict, seed=3)
    model.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "config.json"))["model_type"] == "deepseek_v32"
    tokens = tokens_for(cfg_dict["vocab_size"], seed=4)
    cfg, ours = hf.load(str(tmp_path))
    assert cfg.dsa and cfg.index_topk == topk and (cfg.index_n_heads, cfg.index_head_dim) == (16, 8)
    want = torch_logits(model, tokens)
    got = our_logits(ours, tokens)[0]
    assert max_diff(got, want) <= TOL * max(1.0, float(np.abs(want).max()))
    dense = _dense_twin(ours)  # the selection decides the result: without it the logits move
    assert max_diff(our_logits(dense, tokens)[0], want) > 100 * TOL


def _dense_twin(model):
    """The same weights in a dense-MLA model (index_topk 0: no indexer)."""
    import dataclasses

    cfg = dataclasses.replace(model.cfg, index_topk=0)
    dense = nnx.eval_shape(lambda: DeepSeekV3(cfg, rngs=nnx.Rngs(0)))
    want = nnx.state(dense)
    got = nnx.to_flat_state(nnx.state(model))
    keep = {path: v for path, v in got if "indexer" not in path}
    flat = [(path, keep[path]) for path, _ in nnx.to_flat_state(want)]
    nnx.update(dense, nnx.from_flat_state(flat))
    return dense


def test_topk_at_least_the_length_is_dense_mla_exactly(ref, tmp_path):  # noqa: F811
    model = hf_v32(ref, dict(V32, index_topk=16), seed=5)
    model.save_pretrained(tmp_path)
    _, ours = hf.load(str(tmp_path))
    tokens = tokens_for(V32["vocab_size"], seed=6)
    np.testing.assert_array_equal(our_logits(ours, tokens)[0], our_logits(_dense_twin(ours), tokens)[0])


def test_half_split_rope_and_topk_by_hand():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 2, 3, 6)).astype(np.float32)  # rotate the first 4 of 6 channels
    ang = rng.normal(size=(1, 2, 2))
    got = np.asarray(rope_half(jnp.asarray(x), jnp.cos(ang), jnp.sin(ang), 4))
    c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    want = np.concatenate([x[..., 0:2] * c - x[..., 2:4] * s, x[..., 2:4] * c + x[..., 0:2] * s, x[..., 4:]], -1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    scores = jnp.asarray([[[3.0, 1.0, 2.0, 9.0], [0.5, 4.0, 4.5, 1.0]]])  # [1, 2, 4]
    valid = jnp.asarray([[[True, True, True, False], [True, True, True, True]]])
    keep = np.asarray(topk_keep(scores, valid, 2))
    assert keep.tolist() == [[[True, False, True, False], [False, True, True, False]]]


def test_released_v32_config_and_bad_fields():
    """V3.2's config.json as released (the indexer fields, no rope_interleave, layer types) parses; each missing
    or inconsistent field gets one line naming it."""
    released = dict(V32, architectures=["DeepseekV32ForCausalLM"], model_type="deepseek_v32", index_topk=2048,
                    num_nextn_predict_layers=1, rope_theta=10000, routed_scaling_factor=2.5, norm_topk_prob=True,
                    mlp_layer_types=["dense", "sparse", "sparse"],
                    layer_types=["indexed_attention"] * 3, mlp_bias=False, qk_head_dim=12, head_dim=4)
    cfg = parse_config(released).model
    assert cfg.index_topk == 2048 and cfg.num_nextn_predict_layers == 1
    for change, match in ((dict(index_topk=None), "index_topk"), (dict(model_type="deepseek_v4"), "model_type"),
                          (dict(mlp_layer_types=["sparse"] * 3), "mlp_layer_types"),
                          (dict(layer_types=["full_attention"] * 3), "layer_types")):
        d = {k: v for k, v in {**released, **change}.items() if v is not None}
        with pytest.raises(UserError, match=match):
            parse_config(d)
    with pytest.raises(UserError, match="unknown field"):  # a V3 config.json does not carry the indexer's fields
        parse_config(dict(V32, model_type="deepseek_v3"))


def test_engine_greedy_equals_the_full_forward_with_sparse_attention(ref, tmp_path):  # noqa: F811
    """The paged engine keeps each layer's indexer key beside the latent and selects the exact top-k at every
    chunked-prefill and decode step: its greedy tokens equal greedy by repeated full forwards (the reference,
    tests/reference/decoding.py), with index_topk 5 below every prompt's length, staggered arrivals and a prefix
    hit (the indexer keys of shared pages are reused with them); the dense twin's differ."""
    from dsv3_jax.infer.engine import Engine

    from reference import decoding

    model = hf_v32(ref, V32, seed=7)
    model.save_pretrained(tmp_path)
    _, ours = hf.load(str(tmp_path))
    rng = np.random.default_rng(8)
    prompts = [rng.integers(2, V32["vocab_size"], n).tolist() for n in (7, 13, 21)]
    prompts.append(prompts[2][:12] + [5, 6, 7])  # shares 3 full pages with the third: a prefix hit
    want = decoding.greedy(ours, prompts, 8)
    eng = Engine(ours, page_size=4, max_batch=4, max_batch_tokens=16, max_prefill_chunk=6, pages=40, decode_steps=2,
                 cache_dtype=jnp.float32, max_seq_len=40)
    ids = [eng.submit(p, 8, stop_ids=()) for p in prompts[:3]]
    for _ in range(6):  # staggered: the fourth arrives while the others decode
        eng.step()
    ids.append(eng.submit(prompts[3], 8, stop_ids=()))
    eng.run()
    assert [eng.result(i).output for i in ids] == want
    assert eng.result(ids[3]).prefix_hit_tokens == 12
    assert decoding.greedy(_dense_twin(ours), prompts, 8) != want
    with pytest.raises(UserError, match="paged_attention='jnp'"):
        Engine(ours, page_size=4, max_batch=2, max_batch_tokens=8, pages=20, max_seq_len=40, paged_attention="pallas")

    # the indexer keys held as E4M3 with a per-token scale: greedy equals the full forward whose indexer keys are
    # rounded the same way (the rounding checked against numpy in test_fp8_index_keys_by_hand)
    from dsv3_jax import dsa
    from dsv3_jax.infer.memory_plan import cache_bytes_per_token
    from dsv3_jax.infer.paged_cache import quantize_keys

    fp8 = Engine(ours, page_size=4, max_batch=4, max_batch_tokens=16, max_prefill_chunk=6, pages=40, decode_steps=2,
                 cache_dtype=jnp.float32, max_seq_len=40, index_fp8=True)
    ids = [fp8.submit(p, 8, stop_ids=()) for p in prompts]
    fp8.run()
    keys = dsa.Indexer.keys

    def rounded(self, x, cos, sin):
        q, scale = quantize_keys(keys(self, x, cos, sin))
        return (q.astype(jnp.float32) * scale).astype(x.dtype)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dsa.Indexer, "keys", rounded)
        jax.clear_caches()  # the reference's jitted forward is traced again, with the rounded keys
        rounded_want = decoding.greedy(ours, prompts, 8)
    jax.clear_caches()
    assert [fp8.result(i).output for i in ids] == rounded_want
    per_layer = {k: v // ours.cfg.num_hidden_layers for k, v in cache_bytes_per_token(fp8.pools).items()}
    R, dr, Dh = ours.cfg.kv_lora_rank, ours.cfg.qk_rope_head_dim, ours.cfg.index_head_dim
    assert per_layer["main"] == (R + dr) * 4 + Dh + 4  # float32 latent and rope key, E4M3 key and its scale
    assert cache_bytes_per_token(eng.pools)["main"] // ours.cfg.num_hidden_layers == (R + dr + Dh) * 4


def test_fp8_index_keys_by_hand():
    """quantize_keys against numpy: the scale is amax / 448 per token, every value within E4M3's half-step
    (2^-4 relative, or 2^-9 of the scale near zero); the V3.2 memory plan per token and layer: 1,408 bytes in BF16,
    1,284 with FP8 keys."""
    from dsv3_jax.infer.memory_plan import serving_plan
    from dsv3_jax.infer.paged_cache import quantize_keys

    k = np.random.default_rng(0).normal(size=(3, 5, 128)).astype(np.float32)
    k *= np.array([1e-3, 1.0, 50.0], np.float32)[:, None, None]
    q, scale = quantize_keys(jnp.asarray(k))
    assert q.dtype == jnp.float8_e4m3fn and scale.shape == (3, 5, 1)
    np.testing.assert_allclose(np.asarray(scale)[..., 0], np.abs(k).max(-1) / 448, rtol=1e-6)
    back = np.asarray(q, np.float32) * np.asarray(scale)
    assert np.all(np.abs(back - k) <= np.maximum(np.abs(k) * 2.0**-4, np.asarray(scale) * 2.0**-9) + 1e-12)
    from dsv3_jax import sharding
    from dsv3_jax.infer.paged_cache import bytes_per_token

    v32 = ModelConfig(index_topk=2048)  # V3.2: V3 671B with the indexer (64 heads of 128), 61 layers
    assert [bytes_per_token(v32, 2, index_fp8=f) for f in (False, True)] == [1408 * 61, 1284 * 61]
    tiny = ModelConfig(**{k: v for k, v in V32.items() if k != "num_key_value_heads"})
    sizes = {a: 1 for a in sharding.MESH_AXES}
    plans = [serving_plan(tiny, sizes, fp8_block=(128, 128), keep_fp8=False, hbm_bytes=2**30, index_fp8=f)
             for f in (False, True)]  # the plan counts the indexer's keys (without them: (16 + 4) x 2 x 3)
    assert [p["cache_bytes_per_token"] for p in plans] == [(16 + 4 + 8) * 2 * 3, ((16 + 4) * 2 + 8 + 4) * 3]


def _sparse_mla(topk, attention, block=5):
    import dataclasses

    from dsv3_jax import runtime
    from dsv3_jax.config import ModelConfig
    from dsv3_jax.mla import MLA

    from reference import build

    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=8, kv_lora_rank=8,
                      qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, num_nextn_predict_layers=0,
                      index_topk=topk, index_n_heads=8, index_head_dim=8, rope_scaling=None, dtype="float32",
                      initializer_range=0.3)
    rt = dataclasses.replace(runtime.resolve(attention=attention), attention_block=block)
    return build(lambda r: MLA(cfg, rngs=r, runtime=rt), seed=1)


def _tables(model, B, T):
    from dsv3_jax.rope import rope_tables

    return rope_tables(model.cfg, jnp.broadcast_to(jnp.arange(T), (B, T)))


@pytest.mark.parametrize("topk", [6, 30])
def test_blockwise_sparse_form_equals_the_plain_form(topk):
    """attention='blockwise' runs sparse attention block by block in the latent form (dsa.sparse_latent_attention):
    over T = 24 in blocks of 5 with index_topk 6 (and 30 >= T: dense), its output and every gradient equal the plain
    form's (the [T, T] top-k mask over the expanded heads, the same weights)."""
    plain, blocks = _sparse_mla(topk, "einsum"), _sparse_mla(topk, "blockwise")
    B, T = 2, 24
    x = jnp.asarray(np.random.default_rng(2).normal(size=(B, T, 16)), jnp.float32)
    cos, sin = _tables(plain, B, T)

    @nnx.jit
    def grads(m):
        return nnx.grad(lambda m, x: (m(x, cos, sin) ** 2).sum(), argnums=(0, 1))(m, x)

    forward = nnx.jit(lambda m: m(x, cos, sin))
    np.testing.assert_allclose(np.asarray(forward(blocks)), np.asarray(forward(plain)), rtol=1e-5, atol=1e-5)
    (gp, gxp), (gb, gxb) = grads(plain), grads(blocks)
    np.testing.assert_allclose(np.asarray(gxb), np.asarray(gxp), rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(gp)), jax.tree.leaves(nnx.state(gb)), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


def test_blockwise_sparse_form_holds_no_square_array():
    """At T = 64 (index_topk 6, blocks of 5) the gradient program of the blockwise form holds no [T, T] array; the
    plain form's does (the check can fail)."""
    from test_blockwise_attention import _subjaxprs

    T = 64
    x = jnp.zeros((1, T, 16), jnp.float32)

    def square(jx):
        return any(list(getattr(v.aval, "shape", ())).count(T) >= 2 for e in jx.eqns for v in e.outvars) or any(
            square(sub) for e in jx.eqns for sub in _subjaxprs(e))

    def program(model):
        cos, sin = _tables(model, 1, T)
        gd, st = nnx.split(model)
        return jax.make_jaxpr(jax.grad(lambda st, x: nnx.merge(gd, st)(x, cos, sin).sum(), argnums=(0, 1)))(st, x)

    assert not square(program(_sparse_mla(6, "blockwise")).jaxpr)
    assert square(program(_sparse_mla(6, "einsum")).jaxpr)


def test_v32_checkpoints_save_and_load_with_the_indexer(ref, tmp_path):  # noqa: F811
    """hf.save writes a V3.2 directory transformers loads back to the same logits (float32, the indexer's weights
    included, config.json deepseek_v32); the FP8 save stores the indexer's wq_b and wk as E4M3 blocks and keeps
    weights_proj and the key norm in full precision, and the FP8 directory loads to transformers' logits on its
    tensors dequantised by torch."""
    import torch
    from test_interop import read_all, torch_dequantize, write_dir

    model = hf_v32(ref, V32, seed=9)
    model.save_pretrained(tmp_path / "src")
    cfg, ours = hf.load(str(tmp_path / "src"))
    hf.save(ours, cfg, str(tmp_path / "f32"), mtp=False)
    config = json.load(open(tmp_path / "f32" / "config.json"))
    assert config["model_type"] == "deepseek_v32" and config["index_topk"] == V32["index_topk"]
    back = ref.DeepseekV32ForCausalLM.from_pretrained(str(tmp_path / "f32"), attn_implementation="eager").eval()
    tokens = tokens_for(V32["vocab_size"], seed=10)
    assert max_diff(torch_logits(back, tokens), torch_logits(model, tokens)) <= 1e-5
    hf.save(ours, cfg, str(tmp_path / "fp8"), fp8=True, mtp=False)
    q8 = read_all(tmp_path / "fp8")
    ix = "model.layers.1.self_attn.indexer."
    assert q8[ix + "wq_b.weight"].dtype == torch.float8_e4m3fn and ix + "wq_b.weight_scale_inv" in q8
    assert q8[ix + "wk.weight"].dtype == torch.float8_e4m3fn
    assert q8[ix + "weights_proj.weight"].dtype == torch.float32 and q8[ix + "k_norm.bias"].dtype == torch.float32
    _, ours8 = hf.load(str(tmp_path / "fp8"))
    assert ours8.cfg.dsa
    # the reference for the FP8 directory: transformers on its tensors dequantised here by torch
    deq = {k: (torch_dequantize(v, q8[k + "_scale_inv"]) if v.dtype == torch.float8_e4m3fn else v)
           for k, v in q8.items() if not k.endswith("_scale_inv")}
    config8 = json.load(open(tmp_path / "fp8" / "config.json"))
    config8.pop("quantization_config")
    write_dir(tmp_path / "deq", deq, config8)
    back8 = ref.DeepseekV32ForCausalLM.from_pretrained(str(tmp_path / "deq"), attn_implementation="eager").eval()
    assert max_diff(our_logits(ours8, tokens)[0], torch_logits(back8, tokens)) <= TOL * 10


def test_dsa_costs_by_hand_and_in_the_dry_run(capsys):
    """The per-token attention FLOPs and cache bytes the dry run prints for a V3.2 config, by hand at V3.2's sizes
    (128 heads, R 512, dr 64; indexer 64 x 128; top 2,048) at context 4,096."""
    from dsv3_jax.flops import attention_costs
    from dsv3_jax.train.plan import dry_run

    v32 = ModelConfig(index_topk=2048)
    a = attention_costs(v32, 4096)
    assert a["dense_attn_flops"] == 2 * 128 * 4096 * (512 + 64 + 512)
    assert a["sparse_attn_flops"] == 2 * 128 * 2048 * 1088 + 2 * 64 * 4096 * 128 + 2 * 64 * 4096
    assert a["dense_cache_bytes_read"] == 4096 * 576 * 2
    assert a["sparse_cache_bytes_read"] == (2048 * 576 + 4096 * 128) * 2
    counts = dry_run(v32)
    assert counts["dsa_cache_bytes_per_token_layer"] == (576 + 128) * 2
    assert "attention FLOPs 1.141e+09 -> 6.381e+08" in capsys.readouterr().out
