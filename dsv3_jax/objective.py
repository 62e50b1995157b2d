"""The prediction terms of the objective (REFERENCE.md sections 3-4), shared by the plain program and the
scheduled pipeline's last stage: the main cross-entropy and the MTP cross-entropies of a window, and every
loss term of the whole model on a window (`model_losses`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsv3_jax import lora
from dsv3_jax.data import packing
from dsv3_jax.model import mtp_valid_mask


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None,
                  denominator=None) -> jax.Array:
    """Mean token cross-entropy in float32; `mask` [B, T] or [T] selects the counted positions; `denominator`: divide
    their sum by it instead of by their count (the pipeline's micro-batches: the whole batch's count)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    if mask is None:
        return ce.mean()
    mask = jnp.broadcast_to(mask, ce.shape).astype(jnp.float32)
    if denominator is None:
        return (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    return (ce * mask).sum() / jnp.where(denominator > 0, denominator, 1.0)  # (nothing counted anywhere: 0)


def counted_predictions(window, T: int, depth: int) -> list[jax.Array]:
    """For a flagged window [B, T+1] (`data/packing.py`), [B, T] bool per depth k = 0 (the main prediction) .. depth
    (MTP): position i's prediction of token i + k + 1 counts when that token is a target, in position i's document,
    and inside the window."""
    _, ok, seg = packing.split(window)
    out = []
    for k in range(depth + 1):
        c = ok[:, k + 1:] & (seg[:, k + 1:] == seg[:, :T - k])
        out.append(jnp.concatenate([c, jnp.zeros((c.shape[0], k), bool)], axis=1))
    return out


def prediction_losses(logits, mtp_logits, window, documents: bool = False, denominators=None):
    """(CE_main, mean_k CE_k) of a window [B, T+1]: logits [B, T, V] predict window[:, 1:], the depth-k MTP
    logits window[:, k+1:] at the positions that have one. `documents`: the window carries packing flags
    (`data/packing.py`): only the predictions `counted_predictions` keeps count, and each term is their mean
    (`denominators` [depth + 1]: divide each term's sum by these instead, see `cross_entropy`)."""
    T = logits.shape[1]
    masks = [None] + [mtp_valid_mask(T, k) for k in range(1, len(mtp_logits) + 1)]
    dens = [None] * len(masks)
    if documents:
        masks = counted_predictions(window, T, len(mtp_logits))
        window = packing.split(window)[0]
        if denominators is not None:
            dens = [denominators[k] for k in range(len(masks))]
    main = cross_entropy(logits, window[:, 1:], masks[0], dens[0])
    mtp_terms = []
    for k, lg in enumerate(mtp_logits, start=1):
        tk = jnp.concatenate([window[:, k + 1:], jnp.zeros((window.shape[0], k), window.dtype)], axis=1)
        mtp_terms.append(cross_entropy(lg, tk, masks[k], dens[k]))
    mtp = jnp.mean(jnp.stack(mtp_terms)) if mtp_terms else jnp.zeros((), jnp.float32)
    return main, mtp


def model_losses(graphdef, params, biases, window: jax.Array, documents: bool = False, denominators=None,
                 dropout_key=None):
    """All loss terms of the model (`nnx.merge(graphdef, params, biases)`) on one window [B, T+1]: (dict of
    scalars, moe_stats: MoE module path -> LayerStats, see `ModelOutput`). A model with sparse attention adds
    'indexer_kl' and 'index_recall' (`dsa.indexer_terms`, means over its blocks). `documents`: the window carries
    packing flags (`data/packing.py`: loss masks and document boundaries, which attention does not cross);
    `denominators` as in `prediction_losses` (gradient accumulation: the whole step's counts); `dropout_key`: a
    training forward with LoRA adapter dropout (`lora.set_dropout_keys`)."""
    model = nnx.merge(graphdef, params, biases)
    if dropout_key is not None:
        lora.set_dropout_keys(model, dropout_key)
    if documents:
        tokens, _, seg = packing.split(window)
        out = model(tokens[:, :-1], seg[:, :-1])
    else:
        out = model(window[:, :-1])
    main, mtp = prediction_losses(out.logits, out.mtp_logits, window, documents, denominators)
    terms = {"loss": main, "mtp_loss": mtp, "balance_loss": out.balance_loss, "dropped_tokens": out.dropped_tokens}
    if model.cfg.dsa:
        terms |= {"indexer_kl": out.indexer_kl, "index_recall": out.index_recall}
    return terms, out.moe_stats


def indexer_setting(rt, cfg) -> tuple[float, bool] | None:
    """(weight of the indexer's KL, dense warm-up?) of a model with sparse attention trained under `rt`, else None."""
    return (rt.dsa_loss_weight, rt.dsa_stage == "dense_warmup") if cfg.dsa else None


def total_loss(terms: dict, lam, alpha, indexer: tuple[float, bool] | None = None):
    """The objective from its terms: CE_main + lam * CE_mtp + alpha * L_bal (+ w * KL_indexer with sparse attention,
    `indexer_setting`). In DSA's dense warm-up only the indexer trains: the objective is w * KL_indexer alone (its
    target is detached and the indexer reads detached inputs, so every other gradient is zero)."""
    if indexer is not None and indexer[1]:
        return indexer[0] * terms["indexer_kl"]
    total = terms["loss"] + lam * terms["mtp_loss"] + alpha * terms["balance_loss"]
    return total if indexer is None else total + indexer[0] * terms["indexer_kl"]
