"""FP8-resident weights (dsv3_jax/fp8/resident.py) against the dequantised model.

One small FP8 checkpoint (dims 160/200/136/144/132: none a multiple of 128, so every weight has partial
blocks) is written by `hf.save(fp8=True)` and loaded three ways: dequantised (the reference: float32
weights = e4m3 x scale), kept FP8 with weight-only GEMMs, kept FP8 with W8A8 GEMMs. Weight-only must equal
the reference to float32 rounding; W8A8 must equal a second code path, the FP8 *training* GEMMs
(`Runtime.fp8`, which re-quantise the dequantised float32 weights: the same blocks and scales) to float32
rounding, and stay within a stated bound of the reference.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import runtime, sharding
from dsv3_jax.cli import UserError
from dsv3_jax.config import ModelConfig
from dsv3_jax.data.bpe import EOS_ID
from dsv3_jax.fp8 import gemm as fp8_gemm
from dsv3_jax.fp8 import quant, resident
from dsv3_jax.infer.engine import Engine
from dsv3_jax.infer.memory_plan import device_bytes, serving_plan
from dsv3_jax.infer.sampling import SamplingParams
from dsv3_jax.interop import convert, hf
from dsv3_jax.interop import layout as L
from dsv3_jax.interop import safetensors_io as st
from dsv3_jax.model import DeepSeekV3

from reference import decoding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(vocab_size=320, hidden_size=160, intermediate_size=200, moe_intermediate_size=136,
                  num_hidden_layers=3, num_attention_heads=2, q_lora_rank=144, kv_lora_rank=132, qk_nope_head_dim=64,
                  qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                  first_k_dense_replace=1, n_group=2, topk_group=1, num_nextn_predict_layers=1, dtype="float32",
                  param_dtype="float32", initializer_range=0.02)
TOKENS = (jnp.arange(48).reshape(2, 24) * 37 + 5) % CFG.vocab_size
W8A8_BOUND = 0.1  # max |logit diff| / max |logit| of W8A8 against the dequantised model (measured: 0.055 on
#                   the all-dense variant of CFG; the trained demo model: benchmarks/fp8_resident.py)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The FP8 checkpoint (with a tokenizer) and the same model saved in float32."""
    from dsv3_jax.data import bpe

    d = tmp_path_factory.mktemp("resident")
    model = DeepSeekV3(CFG, rngs=nnx.Rngs(3))
    texts = ["FP8 blocks of 128 by 128 values share one scale.", "The latent cache keeps 576 values a token."]
    tok = bpe.train_tokenizer(texts * 20, vocab_size=CFG.vocab_size)
    hf.save(model, None, str(d / "fp8"), fp8=True, tokenizer=tok)
    hf.save(model, None, str(d / "f32"), tokenizer=tok)
    return d


@pytest.fixture(scope="module")
def loaded(ckpt):
    return {"deq": hf.load(str(ckpt / "fp8"))[1],
            "weight_only": hf.load(str(ckpt / "fp8"), keep_fp8=True, fp8_mode="weight_only")[1],
            "w8a8": hf.load(str(ckpt / "fp8"), keep_fp8=True)[1]}


@pytest.fixture(scope="module")
def logits(loaded):
    return {k: np.asarray(forward(m)) for k, m in loaded.items()}


def test_weight_only_gemm_equals_the_dequantised_product():
    x = jax.random.normal(jax.random.PRNGKey(0), (48, 200))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 150, 200))
    qw = resident.quantize_weight(w)
    deq = np.asarray(qw.q, np.float32) * np.repeat(np.repeat(np.asarray(qw.s), 128, 1), 128, 2)[:, :150, :200]
    groups = jnp.array([2, 0, 1])
    want = np.einsum("nrk,nck->nrc", np.asarray(x, np.float64).reshape(3, 16, 200), deq[np.asarray(groups)])
    for impl in ("dequant", "blocked", "pallas"):  # pallas runs interpreted on CPU
        got = fp8_gemm.gemm(x, None, qw.q, qw.s, groups=groups, group_rows=16, out_dtype=jnp.float32, impl=impl)
        assert rel(got.reshape(3, 16, 150), want) < 1e-6, impl
        plain = fp8_gemm.gemm(x, None, qw.q[1], qw.s[1], out_dtype=jnp.float32, impl=impl)
        assert rel(plain, np.asarray(x, np.float64) @ deq[1].T) < 1e-6, impl
    with pytest.raises(TypeError, match="scales"):
        fp8_gemm.gemm(qw.q[0], None, qw.q[1], qw.s[1])


def test_keep_fp8_holds_the_checkpoint_bytes_as_stored(ckpt, loaded):
    """Every projection is the checkpoint's own e4m3 bytes (reshaped, never re-quantised) with its scales;
    everything else equals the dequantised load."""
    tensors = st.SafetensorsDir(str(ckpt / "fp8"))
    m = loaded["w8a8"]
    q = m.moe_layers.attn.wq_b.kernel[...]  # [L, N, dn + dr, Q]
    assert q.dtype == jnp.float8_e4m3fn and q.shape == (2, 2, 96, 144)
    stored = tensors.read_raw("model.layers.2.self_attn.q_b_proj.weight")  # [N * (dn + dr), Q]
    np.testing.assert_array_equal(np.asarray(q[1]).reshape(192, 144).view(np.uint8), stored.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(m.moe_layers.attn.wq_b.kernel_scale[1]),
                                  tensors.read_raw("model.layers.2.self_attn.q_b_proj.weight_scale_inv"))
    w_down = np.asarray(m.moe_layers.ffn.w_down[0, 3])  # [D, F], the checkpoint's [out, in]
    np.testing.assert_array_equal(w_down.view(np.uint8),
                                  tensors.read_raw("model.layers.1.mlp.experts.3.down_proj.weight").view(np.uint8))
    deq = loaded["deq"]
    assert m.lm_head[...].dtype == jnp.float32 and m.moe_layers.ffn.router[...].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(m.lm_head[...]), np.asarray(deq.lm_head[...]))
    np.testing.assert_array_equal(np.asarray(m.mtp[0].eh_proj.kernel[...]), np.asarray(deq.mtp[0].eh_proj.kernel[...]))
    # The dequantised reference is exactly these blocks times their scales.
    w = resident.QWeight(jnp.asarray(stored), m.moe_layers.attn.wq_b.kernel_scale[1]).dequantize()
    np.testing.assert_array_equal(np.asarray(w).reshape(192, 144),
                                  np.asarray(deq.moe_layers.attn.wq_b.kernel[1]).reshape(144, 192).T)


def test_float_checkpoint_is_quantised_on_load(ckpt, loaded):
    """keep_fp8 on a float32 directory gives the blocks the FP8 writer stores: q = e4m3(w / s), s = amax / 448."""
    _, m = hf.load(str(ckpt / "f32"), keep_fp8=True)
    w = st.SafetensorsDir(str(ckpt / "f32")).read_raw("model.layers.0.mlp.up_proj.weight")  # [200, 160]
    q, s = np.asarray(m.dense_layers.ffn.up.kernel[0], np.float32), np.asarray(m.dense_layers.ffn.up.kernel_scale[0])
    blocks = np.pad(np.abs(w), ((0, 56), (0, 96))).reshape(2, 128, 2, 128).max(axis=(1, 3))
    np.testing.assert_allclose(s, np.maximum(blocks, 1e-4) / 448, rtol=1e-6)
    assert np.abs(q).max() == 448
    np.testing.assert_allclose(q * np.repeat(np.repeat(s, 128, 0), 128, 1)[:200, :160], w, rtol=2**-4, atol=1e-7)
    for a, b in zip(jax.tree.leaves(nnx.state(m)), jax.tree.leaves(nnx.state(loaded["w8a8"]))):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def test_weight_only_equals_the_dequantised_model(logits):
    assert rel(logits["weight_only"], logits["deq"]) < 1e-5


def test_w8a8_equals_the_fp8_recipe_and_stays_near_the_dequantised_model(ckpt, logits, tmp_path):
    _, recipe = hf.load(str(ckpt / "fp8"), runtime=runtime.resolve(fp8=True))  # W8A8 of the training GEMMs
    # Equal up to float32 rounding, which can move an activation across an e4m3 rounding boundary now and then
    assert rel(logits["w8a8"], np.asarray(forward(recipe))) < 1e-3
    # Against the dequantised model: activation quantisation changes the numbers. On this random MoE model a
    # token whose routing flips (a near-tie of router scores) moves by ~0.2; the others stay within the bound.
    per_token = np.abs(logits["w8a8"] - logits["deq"]).max(-1) / np.abs(logits["deq"]).max()
    assert 1e-2 < np.median(per_token) < W8A8_BOUND and (per_token < W8A8_BOUND).mean() >= 0.9
    # Without a router (all layers dense) the bound holds for every logit.
    dense = CFG.replace(first_k_dense_replace=CFG.num_hidden_layers)
    hf.save(DeepSeekV3(dense, rngs=nnx.Rngs(3)), None, str(tmp_path / "dense"), fp8=True)
    ref = np.asarray(forward(hf.load(str(tmp_path / "dense"))[1]))
    got = np.asarray(forward(hf.load(str(tmp_path / "dense"), keep_fp8=True)[1]))
    assert 1e-2 < rel(got, ref) < W8A8_BOUND


def test_every_expert_layout_agrees(ckpt, logits):
    """dense and blocks on one device, and expert parallelism (padded and ragged dispatch) on 4 devices."""
    mesh = sharding.make_mesh({"expert": 2, "data": 2})
    for rt in (runtime.resolve(moe_impl="dense"), runtime.resolve(mesh=mesh, expert_dispatch="padded"),
               runtime.resolve(mesh=mesh, expert_dispatch="ragged")):
        _, m = hf.load(str(ckpt / "fp8"), keep_fp8=True, fp8_mode="weight_only", runtime=rt,
                       mesh=rt.mesh)
        assert rel(forward(m), logits["weight_only"]) < 1e-5, rt.describe()
    bad = runtime.resolve(mesh=sharding.make_mesh({"expert": 2, "tensor": 2}))
    _, m = hf.load(str(ckpt / "fp8"), keep_fp8=True, runtime=bad)
    with pytest.raises(UserError, match="tensor=1"):  # while tracing, before anything compiles
        forward(m)


def forward(m):
    """The logits of TOKENS, jitted (one compile; eagerly every op of the FP8 GEMMs compiles on its own)."""
    return nnx.jit(lambda m: m(TOKENS).logits)(m)


def test_absorbed_decode_on_fp8_weights(loaded):
    """The serving engine on FP8-resident weights (weight-only; the latent-cache decode dequantises kv_b per layer
    from its blocks) gives the dequantised model's greedy tokens by repeated full forwards, plain and
    speculative. (Not W8A8: there the absorbed decode and the full forward's expanded K/V take wkv_b through
    different quantised GEMMs, so the two differ by design.)"""
    prompts = [[5, 9, 2, 7, 1], [3, 8]]
    greedy = SamplingParams(0.0, 0, 1.0, 0)
    want = decoding.greedy(loaded["deq"], prompts, 16, stop_tokens=(EOS_ID,))
    for speculative in (False, True):
        eng = Engine(loaded["weight_only"], page_size=8, max_batch=2, max_batch_tokens=16, pages=16,
                     speculative=speculative)
        assert "weights resident (weight_only" in eng.runtime.describe()
        assert [c.tokens for c in eng.generate(prompts, 16, greedy)] == want


def test_training_on_fp8_weights_is_refused(loaded):
    m = loaded["w8a8"]
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)

    def loss(p):
        return nnx.merge(graphdef, p, rest)(TOKENS).logits.mean()

    with pytest.raises(UserError, match="for inference"):  # while tracing, before anything compiles
        jax.jit(jax.grad(loss, allow_int=True))(params)
    with pytest.raises(UserError, match="exclude each other"):
        runtime.resolve(fp8=True, fp8_weights="w8a8")


def test_rotate_half_rope_rows_must_stay_in_their_blocks():
    fmt = L.Format(rope_interleave=False)
    q = np.arange(2 * 96 * 8, dtype=np.float32).reshape(192, 8)  # dn 64 + dr 32: rope rows inside blocks
    out = L.to_ours_fp8(q, "q", (2, 96, 8), CFG, fmt)
    assert out.shape == (2, 96, 8) and sorted(out.reshape(-1)) == sorted(q.reshape(-1))
    straddles = CFG.replace(qk_nope_head_dim=100, qk_rope_head_dim=56)  # head 0's rope rows 100..155 cross 128
    with pytest.raises(UserError, match="rotate-half"):
        L.to_ours_fp8(np.zeros((312, 8), np.float32), "q", (2, 156, 8), straddles, fmt)


def test_convert_keep_fp8_and_infer_cli(ckpt, loaded, tmp_path):
    """The converter writes the same bytes (float8 zarr arrays + scales); restore and infer.py --keep_fp8 use
    them; infer.py --hf --keep_fp8 (weight-only) decodes the dequantised model's greedy text."""
    out = str(tmp_path / "conv")
    assert convert.main(["--hf", str(ckpt / "fp8"), "--out", out, "--keep_fp8", "--dtype", "float32"]) == 0
    meta = json.load(open(os.path.join(out, "checkpoints", "0", "meta", "metadata")))
    assert meta["keep_fp8"] is True
    _, restored = convert.restore(out)
    for a, b in zip(jax.tree.leaves(nnx.state(restored)), jax.tree.leaves(nnx.state(loaded["w8a8"]))):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    with pytest.raises(UserError, match="without --keep_fp8"):
        convert.fp8_runtime({}, runtime.resolve(fp8_weights="w8a8"))  # a float workdir on an FP8 runtime
    tok = hf.load_tokenizer(str(ckpt / "fp8"))
    prompt = tok.decode([5, 9, 2])
    want = decoding.greedy(loaded["deq"], [tok.encode(prompt).ids], 12, stop_tokens=(EOS_ID,))[0]
    got = {}
    for name, args in (("hf", [f"--hf={ckpt / 'fp8'}", "--keep_fp8", "--fp8_mode=weight_only"]),
                       ("workdir", [f"--checkpoint={out}", "--fp8_mode=weight_only"])):
        js = str(tmp_path / f"{name}.json")
        r = subprocess.run([sys.executable, "infer.py", *args, f"--prompt={prompt}", "--max_new_tokens=12",
                            f"--output_json={js}"], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "weights resident (weight_only" in r.stderr
        got[name] = json.load(open(js))[0]["tokens"]
    assert got["hf"] == want and got["workdir"] == want


def test_device_bytes_of_fp8_and_bf16_loads_match_the_plan(ckpt):
    """The same checkpoint placed on an expert x data mesh: what each device holds, FP8 kept and BF16."""
    sizes = {a: 1 for a in sharding.MESH_AXES} | {"expert": 2, "data": 2}
    mesh = sharding.make_mesh(sizes)
    plan = serving_plan(CFG, sizes, fp8_block=(128, 128), keep_fp8=True, hbm_bytes=1 << 30)
    _, kept = hf.load(str(ckpt / "fp8"), dtype=jnp.bfloat16, keep_fp8=True, mesh=mesh)
    _, bf16 = hf.load(str(ckpt / "fp8"), dtype=jnp.bfloat16, mesh=mesh)
    assert device_bytes(nnx.state(kept)) == plan["weights_bytes_per_device"]
    assert device_bytes(nnx.state(bf16)) == plan["weights_bytes_per_device_bf16"]
    assert device_bytes(nnx.state(kept)) < 0.62 * device_bytes(nnx.state(bf16))


def test_quantize_weight_matches_the_block_quantiser():
    w = jax.random.normal(jax.random.PRNGKey(4), (2, 130, 260))
    qw = resident.quantize_weight(w)
    q, s = quant.quantize_blocks(w)
    assert qw.q.shape == (2, 130, 260) and qw.s.shape == (2, 2, 3)
    np.testing.assert_array_equal(np.asarray(qw.q, np.float32), np.asarray(q[:, :130, :260], np.float32))
    np.testing.assert_array_equal(np.asarray(qw.dequantize()), np.asarray(quant.dequantize_blocks(q, s, (130, 260))))
