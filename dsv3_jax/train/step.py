"""The jitted train step: objective, AdamW update, non-finite guard and the router-bias update.

Objective (REFERENCE.md sections 3-4), for a window w [B, T+1] of tokens (inputs w[:, :T], targets w[:, 1:]):
    L = CE_main + (lambda / D) * sum_k CE_k + alpha * L_bal
CE_k is the depth-k MTP cross-entropy: position i predicts w[i + k + 1], valid for i < T - k.

Aux-loss-free balancing: after the optimizer update, outside the gradient,
    b_i += gamma * sign(mean_j c_j - c_i)      per MoE layer, c = tokens routed to each expert in the
global batch (under jit on a mesh the count is a global reduction, so every replica sees the same c).
Each RouterBias is paired with the counts of the MoE module that owns it by path (`layer_stats.counts_like`).
    MaxVio = (max_i c_i - mean c) / mean c,   averaged over MoE layers.

Non-finite guard: when the loss, the gradient norm, or any value of the updated parameters, optimizer
state or router biases is not finite, all three are kept as they were (a select, no host round trip)
and `skipped` is incremented; so a checkpoint never holds a non-finite parameter.

The train state is a dict of plain pytrees (`params`, `biases`, `opt_state`, `step`, `skipped`), split
from the NNX model with `nnx.split(model, nnx.Param, RouterBias)` and converted to pure dicts so it
checkpoints with orbax and jits with donated buffers.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dsv3_jax import layer_stats, lora
from dsv3_jax.objective import cross_entropy  # noqa: F401  (public here too: notebooks)
from dsv3_jax.programs import Plain
from dsv3_jax.sharding import constrain


def max_violation(counts: jax.Array) -> jax.Array:
    """Mean over layers of (max load - mean load) / mean load; counts [L, E]."""
    if counts.shape[0] == 0:
        return jnp.zeros((), jnp.float32)
    mean = counts.mean(-1)
    return ((counts.max(-1) - mean) / jnp.maximum(mean, 1e-9)).mean()


def update_biases(biases, moe_stats, gamma):
    """b += gamma * sign(mean - c) for every MoE layer, each bias with the counts of its own module (paired
    by path: `biases` is the pure-dict RouterBias state, `moe_stats` the model's path -> LayerStats)."""
    counts = layer_stats.counts_like(biases, moe_stats)

    def step(b, c):  # c [..., E]: one row per layer of a stack
        return b + (gamma * jnp.sign(c.mean(-1, keepdims=True) - c)).astype(b.dtype)

    return jax.tree.map(step, biases, counts)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: Callable, mesh=None,
                    state_shardings=None, grad_accum_steps: int = 1, program: Plain | None = None,
                    dropout_seed: int | None = None) -> Callable:
    """Returns step(state, window, lam, alpha, gamma) -> (state, metrics), jitted with the state donated.

    With a mesh, the step is traced and run under `jax.set_mesh(mesh)` (activation constraints and
    expert parallelism read it) and returns the state with the shardings it was given.

    `grad_accum_steps` = k > 1 splits the window into k micro-batches (rows i, i+k, ..., so each data
    shard keeps an equal slice) run one after another in a `lax.scan`: gradients and loss terms are
    averaged and expert counts summed, so with dropless routing the update equals the whole-batch one
    while only one micro-batch's activations are live (with an expert capacity factor, capacity is per
    micro-batch, so which rows drop can differ).

    `program` (`dsv3_jax.programs.program_for(rt, ...)`, default `Plain()`: `jax.value_and_grad` of the model) gives
    the loss and gradients of a window, on the state in its layout (the scheduled pipeline's slots).

    `dropout_seed` (LoRA adapter dropout): micro-batch j of step s drops with the key
    fold_in(lora.step_key(seed, s), j), so a resumed run draws what the uninterrupted one drew.
    """
    program = program or Plain()

    def grads_and_terms(params, biases, window, lam, alpha, key):
        # packed documents: each micro-batch's terms are divided by the step's counts / k, so that their mean over the
        # k micro-batches is the step's mean over its counted predictions
        dens = (program.prediction_counts(window) / grad_accum_steps
                if program.documents and grad_accum_steps > 1 else None)

        def grad_fn(params, w, j):
            kw = {} if key is None else {"dropout_key": jax.random.fold_in(key, j)}
            return program.value_and_grad(graphdef, params, biases, w, lam, alpha, mesh=mesh, denominators=dens, **kw)

        return _accumulate(grad_fn, params, window)

    def _accumulate(grad_fn, params, window):
        k = grad_accum_steps
        if k == 1:
            return grad_fn(params, window, 0)
        B = window.shape[0]
        micro = window.reshape(B // k, k, -1).swapaxes(0, 1)  # [k, B/k, T+1]
        micro = constrain(micro, (None, "batch", None))

        def body(acc, wj):
            out = grad_fn(params, *wj)
            return jax.tree.map(jnp.add, acc, out), None

        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, params, micro[0], 0))
        (total, (terms, stats)), grads = jax.lax.scan(body, zero, (micro, jnp.arange(k)))[0]
        mean = lambda t: jax.tree.map(lambda x: x / k, t)  # noqa: E731
        stats = {key: s.per_microbatch(k) for key, s in stats.items()}  # counts and drops summed, means averaged
        return (total / k, (mean(terms) | {"dropped_tokens": terms["dropped_tokens"]}, stats)), mean(grads)

    def step(state: dict[str, Any], window, lam, alpha, gamma):
        key = None if dropout_seed is None else lora.step_key(dropout_seed, state["step"])
        (total, (terms, stats)), grads = grads_and_terms(state["params"], state["biases"], window, lam, alpha, key)
        counts = layer_stats.stacked_counts(stats, 0)
        # (a frozen FP8 base's gradients are zeros in a dtype without arithmetic promotion: left out)
        grad_norm = optax.tree.norm([g for g in jax.tree.leaves(grads) if g.dtype != jnp.float8_e4m3fn])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        biases = update_biases(state["biases"], stats, gamma)
        # the guard covers the update itself: a finite gradient can still overflow the moments or the
        # parameters (a huge learning rate), and no non-finite value may reach the state or a checkpoint
        ok = jnp.isfinite(total) & jnp.isfinite(grad_norm) & all_finite((params, opt_state, biases))

        def keep(new, old):
            return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

        new_state = {
            "params": keep(params, state["params"]),
            "opt_state": keep(opt_state, state["opt_state"]),
            "biases": keep(biases, state["biases"]),
            "step": state["step"] + 1,
            "skipped": state["skipped"] + (~ok).astype(jnp.int32),
        }
        metrics = dict(terms, total_loss=total, grad_norm=grad_norm, lr=schedule(state["step"]),
                       max_vio=max_violation(counts), skipped_steps=new_state["skipped"], finite=ok)
        return new_state, metrics

    out_shardings = None if state_shardings is None else (state_shardings, None)
    return with_mesh(jax.jit(step, donate_argnums=(0,), out_shardings=out_shardings), mesh)


def all_finite(tree) -> jax.Array:
    """True when every floating-point value in `tree` is finite (integer leaves, e.g. counts, are skipped)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def make_eval_step(graphdef, mesh=None, program: Plain | None = None) -> Callable:
    """The main loss of a window, from `program` (see `make_train_step`)."""
    program = program or Plain()

    def evaluate(params, biases, window):
        return program.loss(graphdef, params, biases, window, mesh=mesh)

    return with_mesh(jax.jit(evaluate), mesh)


def with_mesh(fn: Callable, mesh) -> Callable:
    """Run (and trace) `fn` with `mesh` as the current mesh; identity when mesh is None."""
    if mesh is None:
        return fn

    def wrapped(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)

    def lower(*args, **kwargs):  # what runs (tests read the compiled HLO)
        with jax.set_mesh(mesh):
            return fn.lower(*args, **kwargs)

    wrapped.lower = lower
    wrapped.jitted = fn  # (trace / lower / compile it under the mesh yourself: dsv3_jax.aot)
    return wrapped
