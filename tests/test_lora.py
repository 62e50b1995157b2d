"""LoRA (dsv3_jax/lora.py): the adapters' forward and gradients against float64 numpy, the merged model equal to the
base plus its adapters (logits, the engine's absorbed decode, and a released-format round trip), and a fine-tuning
run that trains the adapters alone from a base it does not move."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx, traverse_util

from dsv3_jax import lora, runtime
from dsv3_jax.cli import ConfigError, UserError
from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import Einsum
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.moe import RouterBias

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                  num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                  v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                  first_k_dense_replace=1, max_position_embeddings=64, dtype="float32", rope_scaling=None)
ALL = lora.LoraOptions(rank=3, alpha=6.0, targets=lora.TARGETS)


def _randomize_adapters(model, seed=0):
    """B = 0 at initialisation (the model starts as its base): give every adapter values."""
    _, params, rest = nnx.split(model, nnx.Param, ...)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(params))
    rng = np.random.default_rng(seed)
    flat = {p: (jnp.asarray(rng.normal(size=v.shape) * 0.3, v.dtype) if p[-1] in lora.ADAPTERS else v)
            for p, v in flat.items()}
    nnx.update(model, traverse_util.unflatten_dict(flat))
    return model


def test_adapter_forward_and_gradients_against_float64():
    """y = x W + (alpha / r) (x A) B for 'BTD,DNH->BTNH' and its gradients in A, B and x, against numpy float64."""
    e = Einsum("BTD,DNH->BTNH", (6, 2, 5), ("embed", "heads", "qk_head_dim"), std=0.5, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs=nnx.Rngs(0), lora=ALL)
    _randomize_adapters(e, 1)
    x = np.random.default_rng(2).normal(size=(2, 3, 6))
    g = np.random.default_rng(3).normal(size=(2, 3, 2, 5))
    W, A, B = (np.asarray(v[...], np.float64) for v in (e.kernel, e.lora_a, e.lora_b))
    s = ALL.alpha / ALL.rank
    want = np.einsum("btd,dnh->btnh", x, W) + s * np.einsum("btd,dr,rnh->btnh", x, A, B)
    gd, params = nnx.split(e, nnx.Param)

    def loss(p, x):
        return jnp.sum(nnx.merge(gd, p)(x) * g)

    np.testing.assert_allclose(nnx.merge(gd, params)(jnp.asarray(x, jnp.float32)), want, rtol=1e-5, atol=1e-5)
    dp, dx = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(dp["lora_a"][...], s * np.einsum("btd,btnh,rnh->dr", x, g, B), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dp["lora_b"][...], s * np.einsum("btd,dr,btnh->rnh", x, A, g), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, np.einsum("btnh,dnh->btd", g, W + s * np.einsum("dr,rnh->dnh", A, B)),
                               rtol=1e-5, atol=1e-6)


def test_merged_model_equals_base_plus_adapters(tmp_path):
    """Adapters on every target (MLA, dense and shared-expert MLPs), stacked layers and the MTP block: the merged
    model's logits equal the LoRA model's; the engine's absorbed decode (which folds wkv_b's adapter into the
    weight it absorbs) gives the merged model's greedy tokens; hf.save(merge_lora=True) loads back to them."""
    from dsv3_jax.infer.engine import Engine
    from dsv3_jax.interop import hf

    from reference import decoding

    rt = dataclasses.replace(runtime.resolve(), lora=ALL)
    model = _randomize_adapters(DeepSeekV3(CFG, rngs=nnx.Rngs(0), runtime=rt))
    merged = lora.merged(model)
    assert not any(p[-1] in lora.ADAPTERS for p, _ in nnx.to_flat_state(nnx.state(merged, nnx.Param)))
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, CFG.vocab_size, (2, 12)))
    ours, ref = jax.jit(lambda t: model(t))(tokens), jax.jit(lambda t: merged(t))(tokens)
    np.testing.assert_allclose(ours.logits, ref.logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours.mtp_logits[0], ref.mtp_logits[0], rtol=1e-4, atol=1e-4)
    base = DeepSeekV3(CFG, rngs=nnx.Rngs(0))  # the same base weights without adapters: other logits
    assert np.abs(jax.jit(lambda t: base(t))(tokens).logits - ref.logits).max() > 1e-2

    prompts = [[3, 9, 4, 11, 2], [7, 7, 1, 30]]
    want = decoding.greedy(merged, prompts, 6)
    eng = Engine.for_batch(model, 2, 16, page_size=4)
    assert [r.tokens for r in eng.generate(prompts, 6, stop_tokens=())] == want
    with pytest.raises(UserError, match="merge_lora=True"):
        hf.save(model, None, str(tmp_path / "x"))
    hf.save(model, None, str(tmp_path / "hf"), merge_lora=True)
    _, loaded = hf.load(str(tmp_path / "hf"))
    np.testing.assert_allclose(jax.jit(lambda t: loaded(t))(tokens).logits, ref.logits, rtol=1e-4, atol=1e-4)


def test_lora_run_trains_only_the_adapters(tmp_path):
    """Two steps from a base in the converter's format: every base weight and router bias as it was, the adapters
    moved, the optimizer's moments the adapters' alone, and the records count them as the trainable parameters;
    then the adapters exported alone and attached to the base."""
    from dsv3_jax.analysis import load_config
    from dsv3_jax.io.checkpoint import Checkpointer
    from dsv3_jax.train.loop import train, validate_train_config

    c = load_config("tiny")
    m = c.model
    m.hidden_size, m.intermediate_size, m.moe_intermediate_size, m.num_hidden_layers = 64, 96, 32, 2
    c.lora = ml_collections.ConfigDict({"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": "wq_a,wkv_b,wo,dense_ffn"})
    t = c.train
    t.steps, t.batch_size, t.seq_len, t.log_every, t.eval_every, t.sample_tokens, t.eval_batches = 2, 4, 32, 1, 2, 0, 1
    c.mesh.data = 1
    cfg = validate_train_config(c)
    base = DeepSeekV3(cfg, rngs=nnx.Rngs(5))
    _, params, biases = nnx.split(base, nnx.Param, RouterBias)
    ck = Checkpointer(tmp_path / "base" / "checkpoints", async_save=False)
    ck.save(0, {"params": nnx.to_pure_dict(params), "biases": nnx.to_pure_dict(biases)},
            {"format": "dsv3_jax.params"}, force=True)
    ck.close()
    c.init_from = str(tmp_path / "base")
    out = train(c, str(tmp_path / "run"), quiet=True)
    got = traverse_util.flatten_dict(out.state["params"])
    want = traverse_util.flatten_dict(nnx.to_pure_dict(params))
    adapters = {p for p in got if lora.is_adapter(p)}
    assert set(got) - set(want) == adapters and len(adapters) == 2 * (3 * 3 + 3)  # 3 MLA x 3 blocks + dense MLP
    for p, v in want.items():
        np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(v), err_msg=str(p))
    assert all(np.any(np.asarray(got[p])) for p in adapters if p[-1] == "lora_b")  # B left zero: moved
    n = sum(got[p].size for p in adapters)
    moments = [x for x in jax.tree.leaves(out.state["opt_state"]) if getattr(x, "ndim", 0) > 0]
    assert sum(x.size for x in moments) == 2 * n
    assert {(r["trainable_params"], r["total_params"]) for r in out.history} == {(n, sum(v.size for v in got.values()))}

    # the adapters alone (python -m dsv3_jax.lora_io export): a small checkpoint that, attached to the base, gives the
    # fine-tuned model's logits; on another network it is refused naming the fields
    from dsv3_jax import lora_io
    from dsv3_jax.infer.load import load_trained

    assert lora_io.main(["export", "--workdir", str(tmp_path / "run"), "--output", str(tmp_path / "ad")]) == 0
    tuned = load_trained(str(tmp_path / "run"))[0]
    attached = lora_io.attach(base, str(tmp_path / "ad"))
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, cfg.vocab_size, (2, 12)))
    np.testing.assert_allclose(jax.jit(lambda t: attached(t))(tokens).logits,
                               jax.jit(lambda t: tuned(t))(tokens).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="num_hidden_layers"):
        other = DeepSeekV3(dataclasses.replace(cfg, num_hidden_layers=3), rngs=nnx.Rngs(0))
        lora_io.attach(other, str(tmp_path / "ad"))


def test_bad_lora_configs():
    with pytest.raises(ConfigError, match="targets"):
        lora.from_config({"rank": 4, "targets": "q_proj"})
    with pytest.raises(ConfigError, match="dropout"):
        lora.from_config({"rank": 4, "dropout": 1.0})
    assert lora.from_config({"rank": 4, "dropout": 0.1}).dropout == 0.1
    with pytest.raises(ConfigError, match="unknown"):
        lora.from_config({"rank": 4, "rnak": 2})
    assert lora.from_config({"rank": 0}) is None


def test_finetune_plan_counts_adapters_by_hand():
    """The dry run's fine-tuning plan on one device: the adapters of wq_a and wo in 2 main layers and the MTP
    block, r (D + Q) + r (N dv + D) values each, their bytes x 4 (float32 values, gradients, two moments) on top of
    the base, and the fit against the memory given."""
    from dsv3_jax import sharding
    from dsv3_jax.train.plan import finetune_plan

    opts = lora.LoraOptions(rank=4, targets=("wq_a", "wo"))
    sizes = {a: 1 for a in sharding.MESH_AXES}
    plan = finetune_plan(CFG, sizes, 2, 16, remat=False, lora_opts=opts, fp8_base=False, hbm_bytes=2**30)
    D, Q, N, dv = CFG.hidden_size, CFG.q_lora_rank, CFG.num_attention_heads, CFG.v_head_dim
    n = 3 * (4 * (D + Q) + 4 * (N * dv + D))
    assert plan["lora_trainable_params"] == n and plan["lora_adapter_bytes_per_device"] == 16 * n
    assert plan["lora_bytes_per_device"] == (plan["lora_base_bytes_per_device"] + 16 * n
                                             + plan["activations_est_bytes_per_device"])
    assert plan["lora_fits"] and plan["lora_bytes_per_device"] < plan["full_finetune_bytes_per_device"]


def _with_adapters(base, opts, seed=11):
    """`base` (a loaded model) rebuilt with LoRA adapters of fixed random values: (graphdef, base params, adapters,
    biases) as pure dicts."""
    from dsv3_jax.model import split_model

    rt = dataclasses.replace(base.runtime, lora=opts)
    gd, abstract, _ = split_model(nnx.eval_shape(lambda: DeepSeekV3(base.cfg, rngs=nnx.Rngs(0), runtime=rt)))
    _, params, biases = split_model(base)
    rng = np.random.default_rng(seed)
    adapters = {p: jnp.asarray(rng.normal(size=v.shape) * 0.2, jnp.float32)
                for p, v in sorted(traverse_util.flatten_dict(abstract).items()) if p[-1] in lora.ADAPTERS}
    return gd, params, adapters, biases


def test_fp8_base_lora_against_the_dequantised_base(tmp_path):
    """The same adapters over one FP8 release (a tiny model saved with FP8 projections and experts), its base held
    (a) dequantised to float32, (b) FP8-resident with weight-only GEMMs, (c) FP8-resident W8A8 (activations
    quantised in 1x128 tiles, DeepSeek's serving recipe): the loss and every adapter gradient of (b) equal (a)'s
    to 1e-4 (the activations' gradients pass the frozen FP8 GEMMs through the dequantised blocks), and (c)'s loss
    within 1e-4 and its adapter gradients within 5% (relative L2 over all of them; measured 2.2%, README)."""
    from dsv3_jax.interop import hf
    from dsv3_jax.objective import model_losses
    from dsv3_jax.param_kinds import freeze_fp8

    cfg = dataclasses.replace(CFG, num_nextn_predict_layers=0)
    hf.save(DeepSeekV3(cfg, rngs=nnx.Rngs(3)), None, str(tmp_path), fp8=True)
    window = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 17)))
    opts = lora.LoraOptions(rank=4, alpha=8.0, targets=lora.TARGETS)
    out = {}
    for name, kw in (("f32", {}), ("weight_only", dict(keep_fp8=True, fp8_mode="weight_only")),
                     ("w8a8", dict(keep_fp8=True, fp8_mode="w8a8"))):
        _, base = hf.load(str(tmp_path), **kw)
        gd, params, adapters, biases = _with_adapters(base, opts)

        def loss(ad, params=params, gd=gd, biases=biases):
            p = traverse_util.unflatten_dict(traverse_util.flatten_dict(freeze_fp8(params)) | ad)
            return model_losses(gd, p, biases, window)[0]["loss"]

        out[name] = jax.jit(jax.value_and_grad(loss))(adapters)
        if name != "f32":
            assert any(v.dtype == jnp.float8_e4m3fn for v in traverse_util.flatten_dict(params).values())
    (l32, g32), (lwo, gwo), (l8, g8) = out["f32"], out["weight_only"], out["w8a8"]
    np.testing.assert_allclose(float(lwo), float(l32), rtol=1e-5)
    for p in g32:
        np.testing.assert_allclose(gwo[p], g32[p], rtol=1e-3, atol=1e-4 * float(np.abs(g32[p]).max()) + 1e-9,
                                   err_msg=str(p))
    flat = lambda g: np.concatenate([np.ravel(g[p]) for p in sorted(g)])  # noqa: E731
    rel = np.linalg.norm(flat(g8) - flat(g32)) / np.linalg.norm(flat(g32))
    print(f"FP8 W8A8 base vs float32 base: loss {float(l8):.5f} vs {float(l32):.5f}, adapter gradients {rel:.2%} "
          f"relative L2")
    assert abs(float(l8) - float(l32)) < 1e-4 * float(l32) and rel < 0.05


def test_lora_run_on_an_fp8_release(tmp_path):
    """train.py's loop with config.lora.fp8_base from a released-format directory stored in FP8: the base stays
    FP8 in the train state (the release's blocks and scales as loaded with keep_fp8, unchanged by two steps), the
    adapters move, and the optimizer holds moments for the adapters alone."""
    from dsv3_jax.analysis import load_config
    from dsv3_jax.interop import hf
    from dsv3_jax.train.loop import train, validate_train_config

    c = load_config("tiny")
    m = c.model
    m.hidden_size, m.intermediate_size, m.moe_intermediate_size, m.num_hidden_layers = 64, 96, 32, 2
    m.num_nextn_predict_layers = 0
    c.lora = ml_collections.ConfigDict({"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": "wq_a,wkv_b,wo",
                                        "fp8_base": True})
    t = c.train
    t.steps, t.batch_size, t.seq_len, t.log_every, t.eval_every, t.sample_tokens, t.eval_batches = 2, 4, 32, 1, 2, 0, 1
    c.mesh.data = 1
    cfg = validate_train_config(c)
    hf.save(DeepSeekV3(cfg, rngs=nnx.Rngs(5)), None, str(tmp_path / "fp8"), fp8=True)
    c.init_from = str(tmp_path / "fp8")
    out = train(c, str(tmp_path / "run"), quiet=True)
    _, base = hf.load(str(tmp_path / "fp8"), keep_fp8=True)
    want = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(base, nnx.Param)))
    got = traverse_util.flatten_dict(out.state["params"])
    assert sum(v.dtype == jnp.float8_e4m3fn for v in got.values()) > 10
    for p, v in want.items():
        np.testing.assert_array_equal(np.asarray(got[p]).astype(np.float32), np.asarray(v).astype(np.float32),
                                      err_msg=str(p))
    adapters = [p for p in got if lora.is_adapter(p)]
    assert all(np.any(np.asarray(got[p])) for p in adapters if p[-1] == "lora_b")
    moments = [x for x in jax.tree.leaves(out.state["opt_state"]) if getattr(x, "ndim", 0) > 0]
    assert sum(x.size for x in moments) == 2 * sum(got[p].size for p in adapters)


def test_routed_expert_adapters_against_float64():
    """One adapter per routed expert (`routed_experts`): each weight the strategies receive is W_e + (alpha / r) A_e
    B_e, and the gradients of a loss on them in A and B, against numpy float64, expert by expert."""
    from dsv3_jax.moe import MoE

    opts = lora.LoraOptions(rank=3, alpha=6.0, targets=("routed_experts",))
    moe = _randomize_adapters(MoE(CFG, rngs=nnx.Rngs(0), runtime=dataclasses.replace(runtime.resolve(), lora=opts)))
    s = opts.alpha / opts.rank
    gd, params, rest = nnx.split(moe, nnx.Param, ...)
    gs = [np.random.default_rng(i).normal(size=w.shape) for i, w in enumerate(moe.expert_weights())]

    def loss(p):
        return sum(jnp.sum(w * g) for w, g in zip(nnx.merge(gd, p, rest).expert_weights(), gs))

    grads = jax.grad(loss)(params)
    for name, w, g in zip(("w_gate", "w_up", "w_down"), moe.expert_weights(), gs):
        ad = getattr(moe, name + lora.EXPERT_SUFFIX)
        W, A, B = (np.asarray(v, np.float64) for v in (getattr(moe, name)[...], ad.lora_a[...], ad.lora_b[...]))
        assert A.shape[0] == B.shape[0] == CFG.n_routed_experts
        np.testing.assert_allclose(w, W + s * np.einsum("ekr,ern->ekn", A, B), rtol=1e-6, atol=1e-6)
        gad = grads[name + lora.EXPERT_SUFFIX]
        np.testing.assert_allclose(gad["lora_a"][...], s * np.einsum("ekn,ern->ekr", g, B), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(gad["lora_b"][...], s * np.einsum("ekr,ekn->ern", A, g), rtol=1e-5, atol=1e-6)


def test_adapter_dropout_against_float64():
    """With a key, y = x W + (alpha / r) ((x * m / (1 - p)) A) B: the base path sees x whole, the adapters a dropped
    and rescaled x (m the key's keep mask, about 1 - p of it); without a key (evaluation, serving) nothing drops."""
    opts = lora.LoraOptions(rank=3, alpha=6.0, targets=lora.TARGETS, dropout=0.4)
    e = _randomize_adapters(Einsum("BTD,DNH->BTNH", (6, 2, 5), ("embed", "heads", "qk_head_dim"), std=0.5,
                                   dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0), lora=opts), 1)
    x = np.random.default_rng(2).normal(size=(4, 50, 6))
    W, A, B = (np.asarray(v[...], np.float64) for v in (e.kernel, e.lora_a, e.lora_b))
    s, p = opts.alpha / opts.rank, opts.dropout
    plain = np.einsum("btd,dnh->btnh", x, W) + s * np.einsum("btd,dr,rnh->btnh", x, A, B)
    np.testing.assert_allclose(e(jnp.asarray(x, jnp.float32)), plain, rtol=1e-5, atol=1e-5)
    lora.set_dropout_keys(e, jax.random.key(7))
    m = np.asarray(lora.dropped(jnp.ones(x.shape), e.lora_key[...], p)) != 0
    assert abs(m.mean() - (1 - p)) < 0.05
    want = np.einsum("btd,dnh->btnh", x, W) + s * np.einsum("btd,dr,rnh->btnh", x * m / (1 - p), A, B)
    np.testing.assert_allclose(e(jnp.asarray(x, jnp.float32)), want, rtol=1e-5, atol=1e-5)


def test_dropout_keys_per_layer_and_step_in_the_train_step():
    """Every adapted projection of a stacked model gets its own key per layer; the train step (two accumulated
    micro-batches) computes the loss under fold_in(lora.step_key(seed, step), j) for micro-batch j, which differs
    from the loss without dropout and from the next step's draw (the adapters are non-zero here)."""
    import optax

    from dsv3_jax.model import split_model
    from dsv3_jax.objective import model_losses
    from dsv3_jax.train.step import make_train_step

    opts = lora.LoraOptions(rank=3, alpha=6.0, targets=("wq_a", "wo", "dense_ffn"), dropout=0.3)
    cfg = dataclasses.replace(CFG, num_hidden_layers=3)  # 1 dense layer, 2 stacked MoE layers
    model = _randomize_adapters(DeepSeekV3(cfg, rngs=nnx.Rngs(0), runtime=dataclasses.replace(runtime.resolve(),
                                                                                               lora=opts)))
    gd, params, biases = split_model(model)
    probe = nnx.merge(gd, params, biases)
    lora.set_dropout_keys(probe, jax.random.key(3))
    keys = {"/".join(map(str, p)): m.lora_key[...] for p, m in nnx.iter_modules(probe) if hasattr(m, "lora_key")}
    assert keys and all(("moe_layers" not in k) or v.shape == (2,) for k, v in keys.items())
    data = [np.asarray(jax.random.key_data(v)).reshape(-1, jax.random.key_data(v).shape[-1]) for v in keys.values()]
    rows = np.concatenate(data)
    assert len({r.tobytes() for r in rows}) == len(rows)  # every layer of every projection: its own key

    window = jnp.asarray(np.random.default_rng(6).integers(0, cfg.vocab_size, (4, 13)))
    tx = optax.sgd(0.0)
    state = {"params": params, "biases": biases, "opt_state": tx.init(params), "step": jnp.int32(5),
             "skipped": jnp.int32(0)}
    step = make_train_step(gd, tx, lambda s: 0.0, grad_accum_steps=2, dropout_seed=11)
    _, metrics = step(jax.tree.map(jnp.copy, state), window, jnp.float32(0.0), jnp.float32(0.0), jnp.float32(0.0))

    def loss(key_step, w):
        return [float(model_losses(gd, params, biases, w[j::2], dropout_key=None if key_step is None else
                                   jax.random.fold_in(lora.step_key(11, key_step), j))[0]["loss"])
                for j in range(2)]

    np.testing.assert_allclose(float(metrics["loss"]), np.mean(loss(5, window)), rtol=1e-5)
    assert abs(np.mean(loss(None, window)) - np.mean(loss(5, window))) > 1e-4
    assert abs(np.mean(loss(6, window)) - np.mean(loss(5, window))) > 1e-4
    with pytest.raises(ConfigError, match="stage"):
        c = ml_collections.ConfigDict({"lora": {"rank": 2, "dropout": 0.1}, "mesh": {"stage": 2}, "model": {}})
        runtime.from_config(c)
