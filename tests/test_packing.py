"""Packed documents and loss masks (`data/packing.py`): a window of several documents gives each document the logits
of running it alone (positions restart, attention and DSA's top-k stay inside it) on the einsum and blockwise cores,
and the loss counts exactly the predictions a hand count says (targets only, never across a boundary)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import runtime
from dsv3_jax.config import ModelConfig
from dsv3_jax.data import packing
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.moe import RouterBias
from dsv3_jax.objective import model_losses

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                  num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                  v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                  first_k_dense_replace=1, max_position_embeddings=64, dtype="float32", initializer_range=0.2,
                  rope_scaling=None)
DOCS = [[5, 9, 3, 17, 1], [22, 8, 8, 40, 2, 33, 1], [7, 11, 1]]  # 15 tokens: a window of T + 1 = 15


def _model(dsa: bool, attention: str):
    cfg = dataclasses.replace(CFG, index_topk=3, index_n_heads=2, index_head_dim=8) if dsa else CFG
    rt = dataclasses.replace(runtime.resolve(attention=attention), attention_block=4)
    return DeepSeekV3(cfg, rngs=nnx.Rngs(0), runtime=rt)


@pytest.mark.parametrize("dsa, attention", [(False, "einsum"), (True, "einsum"), (False, "blockwise"),
                                            (True, "blockwise"), (False, "xla")],
                         ids=["einsum-mla", "einsum-dsa", "blockwise-mla", "blockwise-dsa", "xla-mla"])
def test_each_document_sees_only_itself(dsa, attention):
    """Main and MTP logits of every packed document equal those of the document alone (1e-5), with DSA's top-k 3
    below the documents' lengths; without the flags the later documents' logits differ (the test can fail). 'xla':
    `jax.nn.dot_product_attention` with the same-document mask (the cuDNN core takes the same argument)."""
    model = _model(dsa, attention)
    starts = np.cumsum([0] + [len(d) for d in DOCS[:-1]])
    flat = sum(DOCS, [])
    window = packing.encode([flat], starts=[np.isin(np.arange(len(flat)), starts)])
    tokens, _, seg = packing.split(jnp.asarray(window.astype(np.int32)))
    fwd = jax.jit(lambda t, s: model(t, s))
    out = fwd(tokens, seg)
    for s, d in zip(starts, DOCS):
        alone = jax.jit(lambda t: model(t))(jnp.asarray([d]))
        np.testing.assert_allclose(out.logits[0, s:s + len(d)], alone.logits[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.mtp_logits[0][0, s:s + len(d) - 1], alone.mtp_logits[0][0, :-1], rtol=1e-5,
                                   atol=1e-5)  # (the last position's MTP input is the next document's token)
    plain = jax.jit(lambda t: model(t))(tokens)
    assert np.abs(plain.logits[0, starts[1]:] - out.logits[0, starts[1]:]).max() > 1e-3


def test_loss_counts_targets_inside_documents_by_hand():
    """The main and MTP cross-entropies of a flagged window equal numpy's mean over the predictions a hand count
    keeps: target flagged as a target, and in the input's document (the document-alone logits of the test above)."""
    model = _model(False, "einsum")
    gd, params, biases = nnx.split(model, nnx.Param, RouterBias)
    flat = sum(DOCS, [])
    starts = np.isin(np.arange(len(flat)), [0, 5, 12])
    targets = np.ones(len(flat), bool)
    targets[[1, 2, 6, 7]] = False  # prompt tokens of the first two documents
    window = jnp.asarray(packing.encode([flat], targets=[targets], starts=[starts]).astype(np.int32))
    terms, _ = jax.jit(lambda w: model_losses(gd, params, biases, w, documents=True))(window)
    tokens, _, seg = packing.split(window)
    out = model(tokens[:, :-1], seg[:, :-1])
    seg = np.asarray(seg[0])

    def ce(logits, i, target):
        lg = np.asarray(logits[0, i], np.float64)
        return np.log(np.exp(lg - lg.max()).sum()) + lg.max() - lg[target]

    T = len(flat) - 1
    main = [ce(out.logits, i, flat[i + 1]) for i in range(T) if targets[i + 1] and seg[i + 1] == seg[i]]
    mtp = [ce(out.mtp_logits[0], i, flat[i + 2]) for i in range(T - 1) if targets[i + 2] and seg[i + 2] == seg[i]]
    # by hand: main targets 1..14 less the prompt tokens {1, 2, 6, 7} and the starts {5, 12}; MTP targets 2..14 less
    # {2, 6, 7} and those two back from a start {5, 6, 12, 13}
    assert len(main) == 14 - 4 - 2 and len(mtp) == 13 - len({2, 6, 7} | {5, 6, 12, 13})
    np.testing.assert_allclose(float(terms["loss"]), np.mean(main), rtol=1e-5)
    np.testing.assert_allclose(float(terms["mtp_loss"]), np.mean(mtp), rtol=1e-5)


def test_flags_round_trip_and_mark_documents():
    w = packing.encode([[3, 1, 4, 1, 5]], targets=[[1, 0, 1, 1, 0]], starts=[[1, 0, 1, 0, 0]])
    tokens, ok, seg = packing.split(jnp.asarray(w.astype(np.int32)))
    assert tokens.tolist() == [[3, 1, 4, 1, 5]] and ok.tolist() == [[True, False, True, True, False]]
    assert seg.tolist() == [[1, 1, 2, 2, 2]]
    assert packing.positions(jnp.asarray([[0, 0, 1, 1, 1, 2]])).tolist() == [[0, 1, 0, 1, 2, 0]]
    marked = packing.mark_documents(np.array([[7, 1, 8, 9, 1, 6]]), eos_id=1)
    assert packing.split(jnp.asarray(marked))[2].tolist() == [[0, 0, 1, 1, 1, 2]]
    with pytest.raises(ValueError, match="token ids"):
        packing.encode([1 << 24])


def test_gradient_accumulation_keeps_the_batch_mean():
    """Two accumulated halves of a flagged batch (`make_train_step`'s denominators: the step's counts / 2) give the
    whole batch's loss and gradients, though the halves count different numbers of targets."""
    from dsv3_jax.programs import Plain

    model = _model(False, "einsum")
    gd, params, biases = nnx.split(model, nnx.Param, RouterBias)
    rng = np.random.default_rng(1)
    tokens = rng.integers(2, CFG.vocab_size, (4, 13))
    targets = rng.random((4, 13)) > np.array([[0.1], [0.1], [0.6], [0.6]])  # the second half counts fewer
    starts = np.zeros((4, 13), bool)
    starts[:, 6] = True
    window = jnp.asarray(packing.encode(tokens, targets, starts).astype(np.int32))
    prog = Plain(documents=True, mtp_depth=CFG.num_nextn_predict_layers)

    def vg(w, dens=None):
        return jax.jit(lambda p: prog.value_and_grad(gd, p, biases, w, 0.3, 0.0, denominators=dens))(params)

    (total, _), grads = vg(window)
    dens = prog.prediction_counts(window) / 2
    halves = [vg(window[i::2], dens) for i in range(2)]  # rows i, i + 2 (as `make_train_step` splits)
    np.testing.assert_allclose(float(sum(h[0][0] for h in halves) / 2), float(total), rtol=1e-5)
    for a, b, c in zip(jax.tree.leaves(grads), *(jax.tree.leaves(h[1]) for h in halves)):
        np.testing.assert_allclose((b + c) / 2, a, rtol=1e-4, atol=1e-6 * float(np.abs(a).max()) + 1e-9)
    naive = [vg(window[i::2]) for i in range(2)]  # each half's own mean: not the batch's
    assert abs(float(sum(h[0][0] for h in naive) / 2) - float(total)) > 1e-3
