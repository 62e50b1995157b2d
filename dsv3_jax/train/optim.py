"""Optimizer, learning-rate / coefficient schedules and batch-size ramp for DeepSeek-V3 training.

DeepSeek-V3 (report section 4.2) trains with AdamW and a few hand-shaped schedules. This module
builds all of them as pure functions so that the train step can evaluate them *inside* `jax.jit`
with a traced step counter (no recompilation when the value changes).

Learning rate (`lr_schedule`)
-----------------------------
Four phases, with W = warmup_steps, C = constant_steps, D = decay_steps, r = final_ratio::

    lr(s) = peak * s / W                                   0 <= s < W        (linear warmup)
    lr(s) = peak                                           W <= s < W + C    (constant)
    lr(s) = peak * (r + (1 - r) * (1 + cos(pi * t)) / 2)   t = (s - W - C)/D in [0, 1]  (cosine)
    lr(s) = peak * r                                       s >= W + C + D    (floor)

DeepSeek-V3: W = 2K steps to 2.2e-4, constant up to 10T tokens, cosine to 2.2e-5 (r = 0.1) over
4.3T tokens, then 2.2e-5 (and 7.3e-6 for the final 500B tokens; that last drop can be composed on
top with `optax.join_schedules` or a multiplicative `step_schedule`). The cosine midpoint is
``peak * (r + (1 - r) / 2)``. Token budgets become steps by dividing by tokens-per-step.

Note the optax convention: the schedule is evaluated at the optimizer's update *count before
increment*, so the very first update uses ``lr(0) == 0`` during warmup (that step still
accumulates Adam moments; it just does not move the weights).

Piecewise-constant coefficients (`step_schedule`)
-------------------------------------------------
``values[i]`` applies for ``boundaries[i-1] <= s < boundaries[i]``. Computed as
``values[searchsorted(boundaries, s, side='right')]`` so it traces under jit. Used for the
auxiliary-loss-free router-bias update rate gamma (0.001, then 0 for the last 500B tokens) and the
multi-token-prediction loss weight lambda (0.3 for the first 10T tokens, then 0.1).

Batch-size ramp (`batch_size_at`)
---------------------------------
DeepSeek-V3 grows the global batch from 3072 to 15360 sequences over the first 469B tokens.
The batch size decides array *shapes*, so it is a host-side Python int (one compiled step per
distinct size). ``b(s) = start + (end - start) * s / ramp_steps`` for ``s < ramp_steps``, else
``end``; every value is rounded to the nearest multiple of ``multiple_of`` (e.g. the data-parallel
degree) and never below ``multiple_of``. Rounding keeps the number of distinct shapes (and thus
compilations) small when ``multiple_of`` is chosen coarse.

AdamW (`make_optimizer`)
------------------------
``chain(clip_by_global_norm(c), adamw(lr, b1, b2, eps, wd, mask=decay_mask))``:

    g   <- g * min(1, c / ||g||_2)                  (global norm over *all* parameters)
    m   <- b1 m + (1 - b1) g ;   v <- b2 v + (1 - b2) g^2
    m^  =  m / (1 - b1^t)    ;   v^ = v / (1 - b2^t)          (t = update count, from 1)
    p   <- p - lr_t * ( m^ / (sqrt(v^) + eps) + wd * mask * p )

Weight decay is *decoupled* (added to the Adam direction, not to the gradient) and, as in
PyTorch/optax, multiplied by the scheduled lr. DeepSeek-V3: b1 0.9, b2 0.95, wd 0.1, clip 1.0.

``decay_mask`` excludes RMSNorm weights and biases from decay: shrinking a norm gain towards 0
(or a bias towards 0) is a constraint on the function, not a regulariser of its capacity. In this
codebase parameters live in a Flax NNX ``nnx.State``; RMSNorm weights are stored under the
attribute ``scale`` and biases under names ending in ``bias``. The decision is made from the
*name* of each leaf, never from ``ndim`` (layers may be stacked along a leading axis for
``nnx.scan``, which turns a [D] norm weight into an [L, D] array).

``mu_dtype`` stores Adam's *first* moment in that dtype (e.g. ``jnp.bfloat16`` as in the report's
"BF16 AdamW moments"); optax keeps the second moment in the parameter dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dsv3_jax import param_kinds
from dsv3_jax.cli import UserError

__all__ = [
    "lr_schedule",
    "step_schedule",
    "batch_size_at",
    "decay_mask",
    "make_optimizer",
]


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


def lr_schedule(
    peak_lr: float,
    warmup_steps: int,
    constant_steps: int,
    decay_steps: int,
    final_ratio: float = 0.1,
) -> optax.Schedule:
    """Warmup -> constant -> cosine -> floor learning rate (see module docstring).

    Returns a function ``step -> float32 scalar`` that accepts a Python int or a traced array.
    Zero-length phases are allowed (e.g. ``warmup_steps=0`` starts at ``peak_lr``).
    """
    if warmup_steps < 0 or constant_steps < 0 or decay_steps < 0:
        raise UserError(
            f"phase lengths must be >= 0, got warmup={warmup_steps}, "
            f"constant={constant_steps}, decay={decay_steps}"
        )
    if not 0.0 <= final_ratio <= 1.0:
        raise UserError(f"final_ratio must be in [0, 1], got {final_ratio}")
    peak = float(peak_lr)
    final = peak * float(final_ratio)
    w, c, d = int(warmup_steps), int(constant_steps), int(decay_steps)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        # Warmup: peak * s / W (guard W == 0: that branch is never selected then).
        warm = peak * s / max(w, 1)
        # Cosine: t in [0, 1] measured from the end of the constant phase.
        t = jnp.clip((s - (w + c)) / max(d, 1), 0.0, 1.0)
        cos = final + (peak - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
        lr = jnp.where(s < w, warm, jnp.where(s < w + c, peak, jnp.where(s < w + c + d, cos, final)))
        return lr.astype(jnp.float32)

    return schedule


def step_schedule(values: Sequence[float], boundaries: Sequence[int]) -> Callable[[Any], jax.Array]:
    """Piecewise-constant schedule: ``values[i]`` for ``boundaries[i-1] <= step < boundaries[i]``.

    ``len(values)`` must be ``len(boundaries) + 1`` and ``boundaries`` strictly increasing,
    otherwise ``ValueError``. The returned function is jit-traceable (float32 scalar output).
    Example: ``step_schedule([0.3, 0.1], [10_000])`` is lambda = 0.3 before step 10000, else 0.1.
    """
    values = [float(v) for v in values]
    boundaries = [int(b) for b in boundaries]
    if len(values) != len(boundaries) + 1:
        raise UserError(
            f"step_schedule needs len(values) == len(boundaries) + 1, "
            f"got {len(values)} values and {len(boundaries)} boundaries"
        )
    if any(b1 >= b2 for b1, b2 in zip(boundaries, boundaries[1:])):
        raise UserError(f"boundaries must be strictly increasing, got {boundaries}")
    vals = jnp.asarray(values, jnp.float32)
    bnds = jnp.asarray(boundaries, jnp.int32).reshape(-1)

    def schedule(step):
        s = jnp.asarray(step, jnp.int32)
        idx = jnp.searchsorted(bnds, s, side="right")  # number of boundaries <= step
        return vals[idx]

    return schedule


def batch_size_at(step: int, start: int, end: int, ramp_steps: int, *, multiple_of: int = 1) -> int:
    """Global batch size (host-side Python int) at ``step`` for a linear ramp ``start -> end``.

    ``ramp_steps <= 0`` means no ramp (always ``end``). The result is rounded to the nearest
    multiple of ``multiple_of`` (halves round up) and clamped to at least ``multiple_of``.
    """
    multiple_of = int(multiple_of)
    if multiple_of < 1:
        raise UserError(f"multiple_of must be >= 1, got {multiple_of}")
    step = max(int(step), 0)
    if ramp_steps <= 0 or step >= ramp_steps:
        b = float(end)
    else:
        b = start + (end - start) * step / ramp_steps
    rounded = int(math.floor(b / multiple_of + 0.5)) * multiple_of
    return max(rounded, multiple_of)


# --------------------------------------------------------------------------------------------
# Weight-decay mask
# --------------------------------------------------------------------------------------------

# Attribute under which an nnx.Variable stores its array; it shows up as the last path entry
# (GetAttrKey('value')) when flattening an nnx.State, and is not the parameter's name.


def decay_mask(params):
    """Pytree of bools (same structure as ``params``): True where weight decay applies.

    False for RMSNorm weights (leaf named ``scale``) and biases (name ending in ``bias``), True
    for everything else. Works on an ``nnx.State`` of ``nnx.Param`` (the bools come back wrapped
    in the same Variable types, so the structure matches for ``optax.masked``) and on plain
    nested dicts of arrays.
    """
    return jax.tree_util.tree_map_with_path(lambda p, _: param_kinds.decays(p), params)


# --------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------


def make_optimizer(
    *,
    peak_lr: float,
    warmup_steps: int,
    constant_steps: int,
    decay_steps: int,
    final_ratio: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    clip_norm: float | None = 1.0,
    mu_dtype: Any = None,
    trainable: Callable[[Any], bool] | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clipping followed by masked, decoupled AdamW with the DeepSeek-V3 schedule.

    Returns ``(tx, schedule)``; ``schedule(step)`` gives the lr for logging. ``clip_norm`` of
    None or 0 disables clipping. ``trainable(path) -> bool`` (None: every parameter) freezes the others: their
    updates are zero and the optimizer holds no moments for them (``optax.multi_transform`` with
    ``set_to_zero``); clipping sees only the trainable gradients.
    """
    schedule = lr_schedule(peak_lr, warmup_steps, constant_steps, decay_steps, final_ratio)
    parts = []
    if clip_norm:
        parts.append(optax.clip_by_global_norm(float(clip_norm)))
    parts.append(
        optax.adamw(
            learning_rate=schedule,
            b1=b1,
            b2=b2,
            eps=eps,
            weight_decay=weight_decay,
            mask=decay_mask,
            mu_dtype=mu_dtype,
        )
    )
    tx = optax.chain(*parts)
    if trainable is not None:
        labels = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
            lambda p, _: "train" if trainable(p) else "frozen", params)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule
