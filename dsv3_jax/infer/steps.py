"""The serving engine's compiled steps: prefill, multi-token decode and MTP speculative verify over the paged
latent cache, with per-row sampling.

Each is a module-level `jax.jit` of a static graphdef, so engines of the same model structure (and runtime) share
their compilations; the cache pools are donated. A row's j-th output token is drawn with the key
fold_in(PRNGKey(seed), j) (`sample_rows`, `_keys`), so its tokens do not depend on what it is batched with. The
engine (engine.py) decides which rows run, with which page tables and shapes.

Log-probabilities: with a static `nlogprobs` K > 0 a step also returns, for every token it samples, that token's
log-probability and the K most likely tokens with theirs (`logprob_rows`; after the row's sampling transforms,
sampling.log_probabilities), and a prefill step the same for each prompt token it runs over (the `targets`: the
token after each position, -1 where none). K = 0 (no request in the step asked) computes none of it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.infer.paged_cache import PagedLatentCache
from dsv3_jax.infer.sampling import (
    greedy,
    log_probabilities,
    penalize,
    penalties_seen,
    probabilities,
    sample,
    verify_draft,
)
from dsv3_jax.model import ModelCache


def sample_rows(seeds, index, logits, knobs):
    """One token per row [B] with each row's own parameters (`knobs`: temperature, top_k, top_p, min_p, each
    [B]) and key fold_in(PRNGKey(seed), index). When every row is greedy only the argmax runs (per-row sampling
    under vmap would compute every branch: a sort of the vocabulary per row for top-k/top-p)."""

    def one(seed, j, row, *kn):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), j)
        return sample(key, row[None], *kn)[0]

    def sampled():
        return jax.vmap(one)(seeds, index, logits, *knobs)

    return jax.lax.cond(jnp.any(knobs[0] > 0), sampled, lambda: greedy(logits))


def logprob_rows(logits, chosen, knobs, k: int):
    """logits [N, V] with each row's own parameters (`knobs`), chosen [N] (-1: none) -> (log-probability of
    chosen [N], top ids [N, k], top log-probabilities [N, k])."""
    lp = jax.vmap(lambda row, *kn: log_probabilities(row[None], *kn)[0])(logits, *knobs)
    top_lp, top_ids = jax.lax.top_k(lp, k)
    picked = jnp.take_along_axis(lp, jnp.maximum(chosen, 0)[:, None], axis=-1)[:, 0]
    return picked, top_ids.astype(jnp.int32), top_lp


def _prompt_logprobs(logits, targets, knobs, k: int):
    """logits [B, T, V], targets [B, T] -> each of logprob_rows' outputs with a leading [B, T]."""
    B, T, V = logits.shape
    out = logprob_rows(logits.reshape(B * T, V), targets.reshape(-1), tuple(jnp.repeat(x, T) for x in knobs), k)
    return tuple(x.reshape((B, T) + x.shape[1:]) for x in out)


def _with_table(pools: ModelCache, table) -> ModelCache:
    return jax.tree.map(lambda c: c.with_table(table), pools, is_leaf=lambda x: isinstance(x, PagedLatentCache))


def _strip(cache: ModelCache) -> ModelCache:
    return _with_table(cache, jnp.zeros((1, 1), jnp.int32))


# The compiled steps are module-level functions of a static graphdef, so engines of the same model structure
# (and runtime) share their compilations.
@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def prefill_step(graphdef, nlogprobs, state, pools, table, tokens, positions, last, targets, seeds, index,
                 temperature, top_k, top_p, min_p, pen=None):
    """Tokens [B, T] at positions [B, T] (-1: padding) through the paged cache; sample after token `last` (after
    the token-dependent transforms `pen`, sampling.penalize; None: none).
    -> (next [B], log-probabilities (None when nlogprobs is 0), pools)."""
    model = nnx.merge(graphdef, state)
    logits, _, cache = model.decode(tokens, positions, _with_table(pools, table))
    rows = jnp.arange(tokens.shape[0])
    knobs = (temperature, top_k, top_p, min_p)
    at_last = penalize(logits[rows, last], pen)
    nxt = sample_rows(seeds, index, at_last, knobs)
    return nxt, _prefill_logprobs(logits, at_last, nxt, targets, knobs, nlogprobs), _strip(cache)


def _prefill_logprobs(logits, at_last, nxt, targets, knobs, k):
    """The sampled token's log-probabilities (from the logits it was drawn from) and the prompt tokens'."""
    if not k:
        return None
    return logprob_rows(at_last, nxt, knobs, k), _prompt_logprobs(logits, targets, knobs, k)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(4,))
def decode_step(graphdef, steps, nlogprobs, state, pools, table, token, position, valid, seeds, index, temperature,
                top_k, top_p, min_p, pen=None):
    """`steps` decode steps of one token per row, each sampled token fed back on the device (and counted in `pen`
    for the next): -> (tokens [B, steps], log-probabilities ([B, steps], [B, steps, K] ids, [B, steps, K]) or
    None, pools)."""
    model = nnx.merge(graphdef, state)
    layers = model.layer_states(token.shape[0])  # (sliced once, outside the loop over tokens)
    knobs = (temperature, top_k, top_p, min_p)
    rows = jnp.arange(token.shape[0])

    def body(carry, k):
        pools, tok, pen = carry
        pos = jnp.where(valid, position + k, -1)
        logits, _, cache = model.decode(tok[:, None], pos[:, None], _with_table(pools, table), layers)
        step_logits = penalize(logits[:, 0], pen)
        nxt = sample_rows(seeds, index + k, step_logits, knobs)
        lps = logprob_rows(step_logits, nxt, knobs, nlogprobs) if nlogprobs else None
        return (_strip(cache), nxt, penalties_seen(pen, rows, nxt, valid)), (nxt, lps)

    (pools, _, _), (toks, lps) = jax.lax.scan(body, (pools, token, pen), jnp.arange(steps))
    lps = None if lps is None else tuple(jnp.swapaxes(x, 0, 1) for x in lps)
    return toks.T, lps, pools


def _keys(seeds, index, salt: int):
    """Per-row keys fold_in(fold_in(PRNGKey(seed), index), salt): a request's draws depend on it alone."""
    return jax.vmap(lambda s, j: jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(s), j), salt))(seeds, index)


def _probs_rows(logits, knobs):
    return jax.vmap(lambda row, *kn: probabilities(row[None], *kn)[0])(logits, *knobs)


def _draft_rows(keys, logits, knobs):
    """Draft token [B] and its distribution q [B, V] (used by sampling rows only; zeros when all are greedy)
    from MTP logits [B, V]."""

    def sampled():
        q = _probs_rows(logits, knobs)
        drawn = jax.vmap(lambda k, row: jax.random.categorical(k, jnp.log(row)))(keys, q).astype(jnp.int32)
        return jnp.where(knobs[0] > 0, drawn, greedy(logits)), q

    return jax.lax.cond(jnp.any(knobs[0] > 0), sampled,
                        lambda: (greedy(logits), jnp.zeros(logits.shape, jnp.float32)))


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def prefill_step_spec(graphdef, nlogprobs, state, pools, table, tokens, positions, last, targets, next_known, seeds,
                      index, temperature, top_k, top_p, min_p, allowed=None):
    """`prefill_step` plus the MTP module over the same positions (its input at the chunk's last position is
    the token after it: `next_known`, or the token sampled here when the chunk ends the sequence); returns
    the draft for the token after the sampled one. `allowed` [B, V] (structured outputs): the sampled token's
    grammar mask."""
    model = nnx.merge(graphdef, state)
    cache = _with_table(pools, table)
    logits, h, cache = model.decode(tokens, positions, cache)
    rows = jnp.arange(tokens.shape[0])
    knobs = (temperature, top_k, top_p, min_p)
    nxt = sample_rows(seeds, index, _masked(logits[rows, last], allowed), knobs)
    after = jnp.where(next_known >= 0, next_known, nxt)
    shifted = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1).at[rows, last].set(after)
    mtp_logits, cache = model.mtp_decode(h, shifted, positions, cache)
    draft, q = _draft_rows(_keys(seeds, index + 1, 1), mtp_logits[rows, last], knobs)
    lps = _prefill_logprobs(logits, _masked(logits[rows, last], allowed), nxt, targets, knobs, nlogprobs)
    return nxt, lps, draft, q, _strip(cache)


def _masked(logits, allowed):
    return logits if allowed is None else jnp.where(allowed, logits, -jnp.inf)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(4,))
def verify_step(graphdef, steps, nlogprobs, state, pools, table, pending, draft, q, position, valid, seeds, index,
                temperature, top_k, top_p, min_p, allowed=None):
    """`steps` MTP speculative steps per row: verify [pending, draft] at [L, L+1], accept or resample, draft
    the next token with the MTP module; rollback of a rejected draft = not advancing L. `allowed` [B, 2, V]
    (structured outputs, with steps = 1): the grammar's masks at L and, if the draft is taken, at L + 1 (a draft
    the grammar refuses has probability 0 there, so it is never accepted: the output is what decoding without
    speculation under the same grammar gives).
    -> emitted [B, steps, 2], n_new [B, steps], log-probabilities of emitted (each [B, steps, 2, ...]) or None,
    draft [B], q [B, V], pools."""
    model = nnx.merge(graphdef, state)
    layers = model.layer_states(2 * pending.shape[0])  # (sliced once, outside the loop over tokens)
    rows = jnp.arange(pending.shape[0])
    knobs = (temperature, top_k, top_p, min_p)

    def body(carry, _):
        pools, pending, draft, q, position, index = carry
        pos = jnp.where(valid[:, None], position[:, None] + jnp.arange(2), -1)
        logits, h, cache = model.decode(jnp.stack([pending, draft], 1), pos, _with_table(pools, table), layers)
        if allowed is not None:
            logits = jnp.where(allowed, logits, -jnp.inf)
        a1_g = greedy(logits[:, 0])

        def verify_sampled():
            p1 = _probs_rows(logits[:, 0], knobs)
            return jax.vmap(lambda k, p, qq, d: tuple(x[0] for x in verify_draft(k, p[None], qq[None], d[None])))(
                _keys(seeds, index, 2), p1, q, draft)

        ok_s, a1_s = jax.lax.cond(jnp.any(temperature > 0), verify_sampled, lambda: (draft == a1_g, a1_g))
        sampled = temperature > 0
        a1 = jnp.where(sampled, a1_s, a1_g)
        accept = jnp.where(sampled, ok_s, draft == a1_g)
        a2 = sample_rows(seeds, index + 1, logits[:, 1], knobs)
        mtp_logits, cache = model.mtp_decode(h, jnp.stack([a1, a2], 1), pos, cache)
        n_new = 1 + accept.astype(jnp.int32)
        new_draft, new_q = _draft_rows(_keys(seeds, index + n_new, 1), mtp_logits[rows, accept.astype(jnp.int32)],
                                       knobs)
        emitted = jnp.stack([a1, a2], 1)
        lps = None
        if nlogprobs:
            lps = logprob_rows(logits.reshape(-1, logits.shape[-1]), emitted.reshape(-1),
                               tuple(jnp.repeat(x, 2) for x in knobs), nlogprobs)
            lps = tuple(x.reshape((-1, 2) + x.shape[1:]) for x in lps)
        out = (emitted, n_new, lps)
        carry = (_strip(cache), jnp.where(accept, a2, a1), new_draft, new_q, position + jnp.where(valid, n_new, 0),
                 index + n_new)
        return carry, out

    (pools, _, draft, q, _, _), (emitted, n_new, lps) = jax.lax.scan(
        body, (pools, pending, draft, q, position, index), None, length=steps)
    lps = None if lps is None else tuple(jnp.swapaxes(x, 0, 1) for x in lps)
    return emitted.transpose(1, 0, 2), n_new.T, lps, draft, q, pools
