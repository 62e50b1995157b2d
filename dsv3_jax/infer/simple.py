"""Cache-free greedy decoding: re-run the full causal forward over a fixed-size buffer each step.

Because attention is causal, tokens written after position p never change the logits at p, so a
buffer of static length (prompt + new tokens) compiles once. O(T^2) per token: meant for the short
sample printed after training and as a reference for the cached decoder, not for serving.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.cli import UserError
from dsv3_jax.model import DeepSeekV3


def greedy_tokens(model: DeepSeekV3, prompt: list[int], max_new_tokens: int) -> list[int]:
    total = len(prompt) + max_new_tokens
    if total > model.cfg.max_position_embeddings:
        raise UserError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                        f"context of {model.cfg.max_position_embeddings} tokens")
    buf = jnp.zeros((1, total), jnp.int32).at[0, :len(prompt)].set(jnp.asarray(prompt, jnp.int32))

    @jax.jit
    def next_token(buf, pos):
        logits = model(buf).logits[0]  # [T, V]
        return jnp.argmax(logits[pos - 1]).astype(jnp.int32)

    for pos in range(len(prompt), total):
        buf = buf.at[0, pos].set(next_token(buf, pos))
    return np.asarray(buf[0, len(prompt):]).tolist()


def greedy_text(model: DeepSeekV3, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer.encode(prompt).ids
    return prompt + tokenizer.decode(greedy_tokens(model, ids, max_new_tokens))
