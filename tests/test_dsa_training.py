"""DeepSeek Sparse Attention's two training stages (V3.2 report, section 2.1; `dsa.indexer_terms`,
`config.model.dsa.stage`): the indexer's KL and top-k recall against numpy by hand, the blockwise form against the
plain one, the gradients separated as the report says (the indexer learns only from its KL, the model only from
the language-model loss; the dense warm-up trains the indexer alone), and a tiny run through both stages with
`train.py`'s loop: the warm-up's KL falls, resume is exact, the sparse stage starts from the warm-up's weights
(`config.init_from`), and V3 weights without indexers start a V3.2 run with fresh indexers."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx, traverse_util

from dsv3_jax import param_kinds, runtime
from dsv3_jax.config import ModelConfig
from dsv3_jax.dsa import indexer_terms
from dsv3_jax.io.checkpoint import Checkpointer
from dsv3_jax.mla import MLA
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.moe import RouterBias
from dsv3_jax.objective import model_losses, total_loss
from dsv3_jax.rope import rope_tables

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                  num_attention_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                  v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                  first_k_dense_replace=1, max_position_embeddings=64, index_topk=4, index_n_heads=4,
                  index_head_dim=8, dtype="float32", initializer_range=0.2)


def _softmax(x, allowed):
    x = np.where(allowed, x, -np.inf)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("warmup", [True, False])
def test_indexer_terms_by_hand(warmup):
    """KL(p || q) and the recall, one query at a time in float64 numpy: p the heads' mean attention over the
    causal keys (warm-up) or over the kept keys (sparse), q the indexer's softmax over the same keys."""
    rng = np.random.default_rng(0)
    B, N, T = 2, 3, 6
    logits = rng.normal(size=(B, N, T, T)) * 2
    scores = rng.normal(size=(B, T, T)) * 2
    causal = np.tril(np.ones((T, T), bool))
    keep = np.zeros((B, T, T), bool)
    for b in range(B):
        for t in range(T):
            order = [s for s in np.argsort(-scores[b, t]) if s <= t][:3]
            keep[b, t, order] = True
    kl, recall = indexer_terms(jnp.asarray(logits, jnp.float32), jnp.asarray(scores, jnp.float32),
                               jnp.asarray(causal), jnp.asarray(keep), warmup)
    for b in range(B):
        for t in range(T):
            dense = np.mean([_softmax(logits[b, h, t], causal[t]) for h in range(N)], axis=0)
            allowed = causal[t] if warmup else keep[b, t]
            p = np.mean([_softmax(logits[b, h, t], allowed) for h in range(N)], axis=0)
            q = _softmax(scores[b, t], allowed)
            want = sum(p[s] * np.log(p[s] / q[s]) for s in range(T) if allowed[s])
            np.testing.assert_allclose(float(kl[b, t]), want, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(float(recall[b, t]), dense[keep[b, t]].sum(), rtol=1e-5)
    assert float(kl.min()) >= -1e-6 and float(recall.max()) <= 1 + 1e-6


@pytest.mark.parametrize("stage", ["dense_warmup", "sparse"])
def test_blockwise_terms_equal_the_plain_form(stage):
    """MLA.train with attention='blockwise' (blocks of 4 over 10 tokens: padding, the latent-form logits) against
    the einsum form, which the test above checks by hand: output, KL, recall and the indexer's gradients."""
    x = jax.random.normal(jax.random.key(0), (2, 10, CFG.hidden_size))
    cos, sin = rope_tables(CFG, jnp.broadcast_to(jnp.arange(10), (2, 10)))

    def run(attention):
        rt = dataclasses.replace(runtime.resolve(attention=attention), attention_block=4, dsa_stage=stage)
        mla = MLA(CFG, rngs=nnx.Rngs(1), runtime=rt)
        gd, params = nnx.split(mla, nnx.Param)

        def f(p):
            out, kl, recall = nnx.merge(gd, p).train(x, cos, sin)
            return kl, (out, recall)

        (kl, (out, recall)), g = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
        return out, kl, recall, nnx.to_pure_dict(g)["indexer"]

    plain, block = run("einsum"), run("blockwise")
    np.testing.assert_allclose(block[0], plain[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(block[1]), float(plain[1]), rtol=1e-4)
    np.testing.assert_allclose(float(block[2]), float(plain[2]), rtol=1e-5)
    assert float(plain[1]) > 1e-3 and float(plain[2]) < 0.99  # the terms are not trivial at this size
    for a, b in zip(jax.tree.leaves(plain[3]), jax.tree.leaves(block[3])):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5 * float(np.abs(a).max()) + 1e-9)


def _grads(stage, weight):
    """Gradients of the objective (`objective.total_loss`) and of its parts, for the tiny V3.2 model under `stage`."""
    rt = dataclasses.replace(runtime.resolve(), dsa_stage=stage)
    model = DeepSeekV3(CFG, rngs=nnx.Rngs(0), runtime=rt)
    gd, params, biases = nnx.split(model, nnx.Param, RouterBias)
    window = jax.random.randint(jax.random.key(2), (2, 17), 0, CFG.vocab_size)

    def grad(fn):
        return nnx.to_pure_dict(jax.jit(jax.grad(lambda p: fn(model_losses(gd, p, biases, window)[0])))(params))

    setting = (weight, stage == "dense_warmup")
    return (grad(lambda t: total_loss(t, 0.3, 0.01, setting)),
            grad(lambda t: total_loss(t, 0.3, 0.01)),  # the language-model objective alone
            grad(lambda t: t["indexer_kl"]))


def _split(grads):
    flat = traverse_util.flatten_dict(grads)
    return ({p: v for p, v in flat.items() if param_kinds.in_indexer(p)},
            {p: v for p, v in flat.items() if not param_kinds.in_indexer(p)})


def test_sparse_stage_separates_the_gradients():
    """Sparse stage: the model's gradients are the language-model objective's alone (the KL's target and the indexer's
    inputs are detached), the indexer's are w x the KL's alone (the top-k selection passes no gradient)."""
    total, lm, kl = (_split(g) for g in _grads("sparse", 0.5))
    for p, g in total[1].items():  # (two compiled programs: float32 rounding of the leaf's own scale, no more; a
        #                              leaked KL would add 0.5 x its gradient, and the last line checks that it is 0)
        np.testing.assert_allclose(g, lm[1][p], rtol=1e-6, atol=1e-6 * np.abs(lm[1][p]).max(), err_msg=str(p))
    for p, g in total[0].items():
        assert not np.any(lm[0][p]), p  # no language-model gradient reaches the indexer
        np.testing.assert_allclose(g, 0.5 * kl[0][p], rtol=1e-6, atol=1e-9, err_msg=str(p))
    assert all(np.any(g) for g in total[0].values())  # every indexer weight learns
    assert not any(np.any(g) for g in kl[1].values())  # the KL reaches nothing else


def test_dense_warmup_trains_only_the_indexer():
    total, _, kl = (_split(g) for g in _grads("dense_warmup", 1.0))
    assert not any(np.any(g) for g in total[1].values())
    for p, g in total[0].items():
        np.testing.assert_allclose(g, kl[0][p], rtol=1e-6, err_msg=str(p))
        assert np.any(g), p


# ---------------------------------------------------------------------------------------------- the loop
def _config(stage: str, steps: int, init_from: str = ""):
    from dsv3_jax.analysis import load_config

    c = load_config("tiny_dsa")
    m = c.model
    m.hidden_size, m.intermediate_size, m.moe_intermediate_size = 64, 96, 32
    m.num_hidden_layers, m.num_attention_heads, m.n_routed_experts = 2, 2, 8
    m.index_topk, m.index_n_heads, m.index_head_dim = 8, 4, 16
    m.initializer_range = 0.1  # peaked attention at initialisation: a KL worth learning
    m.dsa = ml_collections.ConfigDict({"stage": stage, "loss_weight": 1.0})
    c.init_from = init_from
    c.mesh.data = 1
    t = c.train
    t.steps, t.batch_size, t.seq_len, t.log_every, t.eval_every = steps, 4, 32, 1, 1000
    t.peak_lr, t.warmup_steps, t.sample_tokens, t.eval_batches = 1e-2, 0, 0, 1
    c.checkpoint.every_steps, c.checkpoint.async_save = 4, False
    return c


def test_two_stage_training(tmp_path):
    """Warm-up 8 steps: the KL falls (by a fifth at least) and resume from step 4 gives the same KLs; then the sparse
    stage starts from the warm-up's weights (`config.init_from`) and trains the model and the indexer."""
    from dsv3_jax.train.init_from import initial_weights
    from dsv3_jax.train.loop import train

    warm = train(_config("dense_warmup", 8), str(tmp_path / "warm"), quiet=True)
    kls = [r["indexer_kl"] for r in warm.history]
    assert np.mean(kls[-3:]) < 0.8 * kls[0], kls  # (measured 0.28 -> 0.20; a frozen indexer stays at ~1x)
    assert all(0 < r["index_recall"] <= 1 for r in warm.history)

    cut = str(tmp_path / "cut")  # the same run stopped at step 5 (as a crash would), resumed from step 4
    train(_config("dense_warmup", 8), cut, quiet=True, interrupt_at=5)
    resumed = train(_config("dense_warmup", 8), cut, quiet=True)
    assert [r["step"] for r in resumed.history] == [5, 6, 7, 8]
    np.testing.assert_array_equal([r["indexer_kl"] for r in resumed.history], kls[4:])

    sparse = train(_config("sparse", 3, init_from=str(tmp_path / "warm")), str(tmp_path / "sparse"), quiet=True)
    assert sparse.history[0]["step"] == 1 and all(np.isfinite(r["loss"]) for r in sparse.history)
    first = initial_weights(str(tmp_path / "warm"), lambda meta: {"params": warm.state["params"],
                                                                   "biases": warm.state["biases"]}, warm.state, True)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves({k: warm.state[k] for k in ("params", "biases")})):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [p for p, v in traverse_util.flatten_dict(sparse.state["params"]).items()
             if not np.array_equal(np.asarray(v), np.asarray(traverse_util.flatten_dict(warm.state["params"])[p]))]
    assert any(not param_kinds.in_indexer(p) for p in moved) and any(param_kinds.in_indexer(p) for p in moved)


@pytest.mark.parametrize("source", ["converter", "hf"])
def test_dense_warmup_freezes_everything_else(tmp_path, source):
    """Two warm-up steps from V3 weights without indexers (a converter-format checkpoint, or a released-format
    directory written by hf.save, made here): every weight but the indexer's and the router biases equal those
    weights, the indexers were added fresh, the optimizer holds moments for the indexer alone, and the metrics
    records count the trainable parameters."""
    from dsv3_jax.interop import hf
    from dsv3_jax.train.loop import make_schedules, train, validate_train_config

    config = _config("dense_warmup", 2)
    cfg = validate_train_config(config)
    dense = DeepSeekV3(dataclasses.replace(cfg, index_topk=0), rngs=nnx.Rngs(7))
    _, params, biases = nnx.split(dense, nnx.Param, RouterBias)
    src = tmp_path / "v3"
    if source == "hf":
        hf.save(dense, None, str(src))
    else:
        ck = Checkpointer(src / "checkpoints", async_save=False)
        ck.save(0, {"params": nnx.to_pure_dict(params), "biases": nnx.to_pure_dict(biases)},
                {"format": "dsv3_jax.params"}, force=True)
        ck.close()
    config.init_from = str(src)
    out = train(config, str(tmp_path / "run"), quiet=True)
    got = traverse_util.flatten_dict(out.state["params"])
    base = traverse_util.flatten_dict(nnx.to_pure_dict(params))
    assert set(got) - set(base) == {p for p in got if param_kinds.in_indexer(p)} != set()
    for p, v in base.items():
        np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(v), err_msg=str(p))
    for a, b in zip(jax.tree.leaves(out.state["biases"]), jax.tree.leaves(nnx.to_pure_dict(biases))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moments = [x for x in jax.tree.leaves(out.state["opt_state"]) if getattr(x, "ndim", 0) > 0]
    n_indexer = sum(v.size for p, v in got.items() if param_kinds.in_indexer(p))
    assert sum(x.size for x in moments) == 2 * n_indexer  # Adam's mu and nu of the indexer, nothing else
    assert make_schedules(config)[3](0) == 0.0  # gamma: the router biases do not move
    total = sum(v.size for v in got.values())
    assert {(r["trainable_params"], r["total_params"]) for r in out.history} == {(n_indexer, total)}
