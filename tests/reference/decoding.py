"""The decoding reference: the full forward, no cache (DESIGN.md: "the correctness reference is the full forward").

Every decoder test compares the engine (dsv3_jax/infer/engine.py) with these two, never with a second decoder:
  * `logits(model, tokens)`: teacher-forced logits, one full causal forward over the whole sequence
    (-> logits [B, T, V], MTP logits [depth x [B, T, V]]);
  * `greedy(model, prompts, max_new_tokens)`: greedy decoding by repeated full forwards; the next token is the
    argmax of the forward's logits at the last filled position.

`greedy` decodes each prompt alone in a zero-padded buffer [1, L] of one length L (default: prompt + new tokens
rounded up to 32), so one compilation serves every prompt and every step: attention is causal, so the zeros
after position p never change the logits at p. The steps run in one `lax.fori_loop`. O(T^2) work per token: a
reference, not a decoder.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@functools.partial(jax.jit, static_argnums=(0,))
def _forward(graphdef, state, tokens):
    out = nnx.merge(graphdef, state)(tokens)
    return out.logits, out.mtp_logits


@functools.partial(jax.jit, static_argnums=(0,))
def _greedy(graphdef, state, buf, length, steps):
    """buf [1, L] holds the prompt in [0, length); fills [length, length + steps) with greedy tokens."""
    model = nnx.merge(graphdef, state)

    def step(j, buf):
        pos = length + j
        nxt = jnp.argmax(model(buf).logits[0, pos - 1]).astype(buf.dtype)
        return buf.at[0, pos].set(nxt)

    return jax.lax.fori_loop(0, steps, step, buf)


def logits(model, tokens):
    """Teacher-forced (logits [B, T, V] float32, MTP logits) of one full forward over tokens [B, T]."""
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, jnp.asarray(tokens, jnp.int32))


def greedy(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_tokens: Sequence[int] = (),
           length: int | None = None) -> list[list[int]]:
    """Each prompt's greedy continuation of `max_new_tokens` tokens, alone, by repeated full forwards; cut before
    the first of `stop_tokens` (not included), as the engine does."""
    need = max(map(len, prompts)) + max_new_tokens
    L = length or min(-(-need // 32) * 32, model.cfg.max_position_embeddings)
    assert need <= L <= model.cfg.max_position_embeddings, (need, L)
    graphdef, state = nnx.split(model)
    out = []
    for p in prompts:
        buf = np.zeros((1, L), np.int32)
        buf[0, :len(p)] = p
        filled = _greedy(graphdef, state, jnp.asarray(buf), jnp.int32(len(p)), jnp.int32(max_new_tokens))
        tokens = np.asarray(filled)[0, len(p):len(p) + max_new_tokens].tolist()
        cut = [i for i, t in enumerate(tokens) if t in set(stop_tokens)]
        out.append(tokens[:cut[0]] if cut else tokens)
    return out
