"""Packed documents and loss masks, carried inside the token windows themselves.

A training window is one int32 array [B, T+1] everywhere (the loader, the step's gradient accumulation, the
pipeline's micro-batches, the shards on disk), so the two per-token facts fine-tuning needs ride in its high bits:

    bits 0-23   the token id (vocabularies up to 16.7M; DeepSeek-V3's is 129,280)
    bit 24      NOT_TARGET: the loss does not count predicting this token (a prompt or system turn of a conversation)
    bit 25      DOC_START: this token starts a document: attention does not cross it and positions restart at it

A window with no flags set is plain pretraining text (every token a target, documents packed with eos between them
and attending to each other, as DeepSeek-V3 trains), so existing corpora and checkpoints read as before.
Prepared chat shards (`data/prepare.py --chat`) store the flagged values; `config.data.document_mask` marks a
document start after every eos of plain text (`mark_documents`, on the host).

`split(window)` is the one place the bits are read: (tokens, targets_ok, segment_ids) where segment_ids [B, T+1] is
the running count of document starts, so two positions are in the same document iff their ids are equal. The model
takes the inputs' ids (`DeepSeekV3(tokens, segment_ids)`): positions restart at each document (`positions`), and
attention (and DSA's top-k) never crosses a boundary; the objective counts the prediction of token i + k + 1 at
position i only when both are in one document and the target is a target (`objective.prediction_losses`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

TOKEN_BITS = 24
TOKEN_MASK = (1 << TOKEN_BITS) - 1
NOT_TARGET = 1 << 24
DOC_START = 1 << 25


def encode(tokens, targets=None, starts=None) -> np.ndarray:
    """Token ids with their flags as stored (uint32, numpy): `targets` (bool, default all) and `starts` (bool,
    default none) of the same shape."""
    t = np.asarray(tokens, np.int64)
    if t.size and (t.min() < 0 or t.max() > TOKEN_MASK):
        raise ValueError(f"token ids must be in [0, {TOKEN_MASK}] to carry flags, got {t.min()}..{t.max()}")
    out = t.astype(np.uint32)
    if targets is not None:
        out |= np.where(np.asarray(targets, bool), 0, NOT_TARGET).astype(np.uint32)
    if starts is not None:
        out |= np.where(np.asarray(starts, bool), DOC_START, 0).astype(np.uint32)
    return out


def split(window: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """window [..., N] (int32, flagged) -> (tokens [..., N] int32, targets_ok [..., N] bool, segment_ids [..., N]
    int32: the number of document starts up to and including each position)."""
    w = jnp.asarray(window).astype(jnp.int32)
    tokens = w & TOKEN_MASK
    ok = (w & NOT_TARGET) == 0
    segments = jnp.cumsum(((w & DOC_START) != 0).astype(jnp.int32), axis=-1)
    return tokens, ok, segments


def has_flags(window) -> bool:
    """True when any value carries a flag (host-side check of a batch; numpy)."""
    return bool(np.any(np.asarray(window).astype(np.int64) > TOKEN_MASK))


def positions(segment_ids: jax.Array) -> jax.Array:
    """[B, T] position of each token inside its document (0 at each start, and at the window's first token)."""
    T = segment_ids.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(T), segment_ids.shape)
    new = jnp.concatenate([jnp.ones(segment_ids.shape[:-1] + (1,), bool),
                           segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    start = jax.lax.cummax(jnp.where(new, idx, 0), axis=segment_ids.ndim - 1)
    return idx - start


def same_document(segment_ids: jax.Array) -> jax.Array:
    """[B, T, T] bool: query t and key s in one document (combine with the causal mask)."""
    return segment_ids[:, :, None] == segment_ids[:, None, :]


def mark_documents(window, eos_id: int) -> np.ndarray:
    """Plain text windows (host, numpy) with a document start after every eos (`config.data.document_mask`)."""
    w = np.asarray(window).astype(np.uint32)
    after_eos = np.zeros(w.shape, bool)
    after_eos[..., 1:] = (w[..., :-1] & TOKEN_MASK) == eos_id
    return (w | np.where(after_eos, DOC_START, 0).astype(np.uint32)).astype(np.int32)
