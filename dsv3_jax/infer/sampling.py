"""Next-token selection: greedy, temperature, top-k and top-p (nucleus) sampling.

Shape legend: B batch rows, V vocabulary. Logits come in as float32 [B, V]; all maths here is float32.

    greedy (temperature == 0):  t = argmax_v logits_v
    otherwise:                  l = logits / temperature
        top-k (k > 0):          drop every l_v below the k-th largest (ties at the threshold are kept)
        top-p (p < 1):          sort the surviving tokens by probability, keep the smallest prefix whose
                                mass reaches p (the first token always survives), drop the rest
        min-p (m > 0):          drop every token whose probability is below m x the largest (vLLM's order:
                                after top-k and top-p; the most likely token always survives)
        t ~ softmax(l over the kept tokens)

Speculative sampling (`verify_draft`): a draft d drawn from the draft model's q is accepted with
probability min(1, p(d) / q(d)); on rejection the token is drawn from norm(max(p - q, 0)). The emitted
token is then distributed exactly as p (Leviathan et al. 2023), whatever q is; greedy decoding is the
special case of one-hot p and q (accept iff d = argmax p).

The parameters are traced scalars (not static), so one compiled decode step serves every setting;
the greedy branch is selected with `jnp.where`, and top_k = 0 / top_p = 1 / min_p = 0 disable their filters.
Random draws take an explicit key (`jax.random.fold_in(seed key, step)`), so a seed reproduces a run.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.infer.sampling_params import SamplingParams  # noqa: F401  (re-exported)


def penalize(logits: jax.Array, pen: dict | None) -> jax.Array:
    """The logit transforms that depend on a request's tokens, before temperature and the filters (vLLM's and
    OpenAI's definitions), rows [B, V] each with their own values; `pen` None = none of them:
        l += bias                                        (logit_bias)
        l = l / r where l > 0, l * r where l <= 0        for tokens of the prompt or output (repetition_penalty)
        l -= frequency x count + presence x [count > 0]  counts over the output (frequency / presence_penalty)
        l = -inf where the row's grammar allows no token  (structured outputs: `allowed`)
    pen: {'bias' [B, V], 'seen' [B, V] bool, 'counts' [B, V] int32, 'presence', 'frequency', 'repetition' [B],
    'allowed' [B, V] bool}."""
    if pen is None:
        return logits
    l = logits.astype(jnp.float32) + pen["bias"]
    r = pen["repetition"][:, None]
    l = jnp.where(pen["seen"], jnp.where(l > 0, l / r, l * r), l)
    counts = pen["counts"].astype(jnp.float32)
    l = l - pen["frequency"][:, None] * counts - pen["presence"][:, None] * (counts > 0)
    return jnp.where(pen["allowed"], l, -jnp.inf)  # a structured output's grammar: the tokens it allows now


def penalties_seen(pen: dict | None, rows, token, live) -> dict | None:
    """`pen` after each row's new token [B] (rows where `live`): counted in the output, and seen."""
    if pen is None:
        return None
    add = live.astype(jnp.int32)
    return pen | {"counts": pen["counts"].at[rows, token].add(add),
                  "seen": pen["seen"].at[rows, token].set(pen["seen"][rows, token] | live)}


def filter_logits(logits: jax.Array, temperature, top_k, top_p, min_p=0.0) -> jax.Array:
    """logits [B, V] -> temperature-scaled logits with filtered-out tokens at -inf (a temperature of 0 is
    treated as 1 here; greedy selection happens in `sample`). The sort runs only if top-k or top-p is on."""
    t = jnp.where(temperature > 0, temperature, 1.0)
    l = logits.astype(jnp.float32) / t
    l = jax.lax.cond((top_k > 0) | (top_p < 1.0), _top_k_top_p, lambda l, k, p: l, l, top_k, top_p)
    # min-p: p_v >= m * p_max  <=>  l_v >= l_max + log(m)   (log(0) = -inf keeps everything)
    floor = jnp.max(l, axis=-1, keepdims=True) + jnp.log(jnp.asarray(min_p, jnp.float32))
    return jnp.where(l >= floor, l, -jnp.inf)


def _top_k_top_p(l, top_k, top_p):
    V = l.shape[-1]
    desc = -jnp.sort(-l, axis=-1)  # [B, V] largest first
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take(desc, k - 1, axis=-1)[:, None]  # [B, 1]
    l = jnp.where(l >= kth, l, -jnp.inf)
    desc = jnp.where(jnp.arange(V) < k, desc, -jnp.inf)
    p_desc = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(p_desc, axis=-1) - p_desc  # mass of the strictly more likely tokens
    keep = (before < top_p) | (jnp.arange(V) == 0)
    cut = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)  # smallest kept logit
    return jnp.where(l >= cut, l, -jnp.inf)


def probabilities(logits: jax.Array, temperature, top_k, top_p, min_p=0.0) -> jax.Array:
    """The sampling distribution [B, V] after temperature, top-k, top-p and min-p."""
    return jax.nn.softmax(filter_logits(logits, temperature, top_k, top_p, min_p), axis=-1)


# The log-probability reported for a token the request's filters removed (-inf has no JSON form); vLLM's choice.
LOGPROB_FLOOR = float(jnp.finfo(jnp.float32).min)


def log_probabilities(logits: jax.Array, temperature, top_k, top_p, min_p=0.0) -> jax.Array:
    """The log-probabilities [B, V] a request reports: after its sampling transforms (temperature, top-k, top-p)
    when it samples, of the raw logits when it is greedy; removed tokens at LOGPROB_FLOOR. One row's parameters
    (scalars), as in `probabilities`."""
    raw = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    lp = jnp.where(temperature > 0,
                   jax.nn.log_softmax(filter_logits(logits, temperature, top_k, top_p, min_p), axis=-1), raw)
    return jnp.maximum(lp, LOGPROB_FLOOR)


def greedy(logits: jax.Array) -> jax.Array:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def sample(key: jax.Array, logits: jax.Array, temperature, top_k, top_p, min_p=0.0) -> jax.Array:
    """One token per row [B] int32: argmax when temperature == 0, else a draw from `probabilities`."""

    def draw():
        l = filter_logits(logits, temperature, top_k, top_p, min_p)
        return jax.random.categorical(key, l, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, draw, lambda: greedy(logits))


def verify_draft(key: jax.Array, p: jax.Array, q: jax.Array, draft: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Speculative sampling: p, q [B, V] target and draft distributions, draft [B] drawn from q.
    -> (accepted [B] bool, token [B] int32), token ~ p."""
    k_accept, k_fix = jax.random.split(key)
    rows = jnp.arange(p.shape[0])
    accepted = jax.random.uniform(k_accept, draft.shape) * q[rows, draft] < p[rows, draft]
    resid = jnp.maximum(p - q, 0.0)
    mass = resid.sum(-1, keepdims=True)
    resid = jnp.where(mass > 0, resid / jnp.where(mass > 0, mass, 1.0), p)  # p == q: never rejected anyway
    fix = jax.random.categorical(k_fix, jnp.log(resid), axis=-1).astype(jnp.int32)
    return accepted, jnp.where(accepted, draft, fix)
