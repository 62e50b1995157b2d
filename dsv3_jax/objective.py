"""The prediction terms of the objective (REFERENCE.md sections 3-4), shared by the plain program and the
scheduled pipeline's last stage: the main cross-entropy and the MTP cross-entropies of a window, and every
loss term of the whole model on a window (`model_losses`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsv3_jax.model import mtp_valid_mask


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean token cross-entropy in float32; `mask` [B, T] or [T] selects the counted positions."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    if mask is None:
        return ce.mean()
    mask = jnp.broadcast_to(mask, ce.shape).astype(jnp.float32)
    return (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def prediction_losses(logits, mtp_logits, window):
    """(CE_main, mean_k CE_k) of a window [B, T+1]: logits [B, T, V] predict window[:, 1:], the depth-k MTP
    logits window[:, k+1:] at the positions that have one."""
    T = logits.shape[1]
    main = cross_entropy(logits, window[:, 1:])
    mtp_terms = []
    for k, lg in enumerate(mtp_logits, start=1):
        tk = jnp.concatenate([window[:, k + 1:], jnp.zeros((window.shape[0], k), window.dtype)], axis=1)
        mtp_terms.append(cross_entropy(lg, tk, mtp_valid_mask(T, k)))
    mtp = jnp.mean(jnp.stack(mtp_terms)) if mtp_terms else jnp.zeros((), jnp.float32)
    return main, mtp


def model_losses(graphdef, params, biases, window: jax.Array):
    """All loss terms of the model (`nnx.merge(graphdef, params, biases)`) on one window [B, T+1]: (dict of
    scalars, moe_stats: MoE module path -> LayerStats, see `ModelOutput`). A model with sparse attention adds
    'indexer_kl' and 'index_recall' (`dsa.indexer_terms`, means over its blocks)."""
    model = nnx.merge(graphdef, params, biases)
    out = model(window[:, :-1])
    main, mtp = prediction_losses(out.logits, out.mtp_logits, window)
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
