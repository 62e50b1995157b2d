"""LoRA: low-rank adapters on the model's projections, the base weights frozen (`config.lora`).

A targeted projection y = x W (an `Einsum`, W [K..., N...]) gains two parameters, `lora_a` [K..., r] and `lora_b`
[r, N...], and computes

    y = x W + (alpha / r) (x A) B        A ~ N(0, 1/K) at initialisation, B = 0: the model starts as the base

Only the adapters train: the optimizer holds no moments for anything else (`is_adapter`), so a rank-16 run holds
two small matrices per projection beside the frozen base. `merged` folds them into the weights
(W + (alpha / r) A B) and gives the plain model back, the form `hf.save` writes (`merge_lora=True`) and any
reader loads; `lora_io.py` writes the adapters alone and attaches them to a base.

Targets (`config.lora.targets`, comma-separated names): the MLA projections `wq` (no query latent), `wq_a`, `wq_b`,
`wkv_a`, `wkv_b`, `wo`; `dense_ffn` (the dense layers' SwiGLU), `shared_experts` (the MoE layers' shared expert) and
`routed_experts`: one adapter per expert on each of w_gate, w_up, w_down (`ExpertAdapter`, A [E, K, r], B [E, r, N]),
applied as the expert's weight W_e + (alpha / r) A_e B_e, so every expert layout and expert parallelism (the
adapters shard over experts with the weights) run unchanged; over an FP8-resident base that layer's experts are
dequantised for the step (one layer at a time under the scan).

`config.lora.fp8_base`: the base is held FP8-resident as the release ships it (W8A8 GEMMs forward, the activations'
gradients through the dequantised blocks, `fp8/resident.py`; from `init_from` of a released-format directory it is
read with keep_fp8), so only the adapters are float.

`config.lora.dropout`: inverted dropout on the projections' adapter input while training (the base path sees x
whole); each step draws from fold_in(key(train.seed), step) (and the micro-batch), so a resumed run drops the same
inputs. Routed-expert adapters (a weight update, not a path) and the pipelined program take none.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax import param_kinds
from dsv3_jax.cli import ConfigError

ATTENTION = ("wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo")
TARGETS = ATTENTION + ("dense_ffn", "shared_experts", "routed_experts")
ADAPTERS = ("lora_a", "lora_b")
EXPERT_SUFFIX = "_lora"  # a routed expert weight's adapter module: MoE.w_gate_lora beside MoE.w_gate


@dataclasses.dataclass(frozen=True)
class LoraOptions:
    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = ("wq_a", "wq_b", "wkv_a", "wkv_b", "wo")
    dropout: float = 0.0  # on the adapters' input while training (`set_dropout_keys`); the base path never drops

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def on(self, name: str) -> LoraOptions | None:
        """These options when `name` is a target, else None."""
        return self if name in self.targets else None


def from_config(section) -> LoraOptions | None:
    """`config.lora` (rank 0 or absent: none) -> LoraOptions, every key checked (ConfigError naming it)."""
    d = dict(section.to_dict() if hasattr(section, "to_dict") else (section or {}))
    unknown = sorted(set(d) - {"rank", "alpha", "dropout", "targets", "fp8_base"})
    if unknown:
        raise ConfigError(f"config.lora has unknown key(s) {unknown}; valid keys are alpha, dropout, fp8_base, rank, "
                          f"targets.", key="lora")
    rank = int(d.get("rank", 0))
    if rank <= 0:
        return None
    dropout = float(d.get("dropout", 0.0))
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"config.lora.dropout={d['dropout']} must be in [0, 1) (the probability of zeroing an input "
                          f"of the adapters).", key="lora.dropout")
    targets = d.get("targets", ",".join(LoraOptions.targets))
    targets = tuple(t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip())
    bad = sorted(set(targets) - set(TARGETS))
    if bad or not targets:
        raise ConfigError(f"config.lora.targets names {bad or 'nothing'}; choose from {', '.join(TARGETS)}.",
                          key="lora.targets")
    alpha = float(d.get("alpha", 16.0))
    if not alpha > 0:
        raise ConfigError(f"config.lora.alpha={alpha} must be > 0.", key="lora.alpha")
    return LoraOptions(rank=rank, alpha=alpha, targets=targets, dropout=dropout)


def adapter_params(rngs: nnx.Rngs, shape, axes, nc: int, rank: int, param_dtype):
    """(lora_a [K..., r], lora_b [r, N...]) of a weight of `shape` whose first `nc` axes contract."""
    k = math.prod(shape[:nc])
    a_shape, b_shape = (*shape[:nc], rank), (rank, *shape[nc:])
    a = nnx.Param(jax.random.normal(rngs.params(), a_shape, param_dtype) * k ** -0.5,
                  out_sharding=(*axes[:nc], None), eager_sharding=False)
    b = nnx.Param(jnp.zeros(b_shape, param_dtype), out_sharding=(None, *axes[nc:]), eager_sharding=False)
    return a, b


def delta(eq: str, nc: int, x, a, b, scale: float, dtype):
    """(alpha / r) (x A) B for the projection `eq` ('BTD,DNH->BTNH': x's trailing axes contract with W's first nc)."""
    lhs, out = eq.replace(" ", "").split("->")
    xs, ws = lhs.split(",")
    k_axes, n_axes = ws[:nc], ws[nc:]
    batch = out[: len(out) - len(n_axes)]
    r = next(c for c in "ZYXWVU" if c not in eq)
    h = jnp.einsum(f"{xs},{k_axes}{r}->{batch}{r}", x, a.astype(dtype))
    return jnp.einsum(f"{batch}{r},{r}{n_axes}->{out}", h, b.astype(dtype)) * jnp.asarray(scale, dtype)


class ExpertAdapter(nnx.Module):
    """One low-rank adapter per routed expert on an [E, K, N] weight: lora_a [E, K, r], lora_b [E, r, N] (B = 0)."""

    def __init__(self, rngs: nnx.Rngs, shape, axes, rank: int, param_dtype):
        E, K, N = shape
        self.lora_a = nnx.Param(jax.random.normal(rngs.params(), (E, K, rank), param_dtype) * K ** -0.5,
                                out_sharding=(axes[0], axes[1], None), eager_sharding=False)
        self.lora_b = nnx.Param(jnp.zeros((E, rank, N), param_dtype), out_sharding=(axes[0], None, axes[2]),
                                eager_sharding=False)

    def update(self, scale: float) -> jax.Array:
        """(alpha / r) A_e B_e per expert, float32 [E, K, N]."""
        return expert_update(self.lora_a[...], self.lora_b[...], scale)


def expert_update(a, b, scale: float) -> jax.Array:
    """(alpha / r) A B per expert ([..., E, K, r] x [..., E, r, N], leading layer axes allowed) in float32."""
    return scale * jnp.einsum("...EKr,...ErN->...EKN", a.astype(jnp.float32), b.astype(jnp.float32))


class DropoutKey(nnx.Variable):
    """The random key of one projection's adapter dropout for this step (per layer in a stack: [L] keys), set on the
    merged model of a training forward by `set_dropout_keys`; absent everywhere else (evaluation, serving)."""


def step_key(seed: int, step) -> jax.Array:
    """The adapter dropout key of training step `step` (a run's `train.seed`): an 'rbg' key, whose bits XLA's
    RngBitGenerator makes (threefry's hash made a CPU step 2x slower at rate 0.05 on the notebook's model)."""
    return jax.random.fold_in(jax.random.key(seed, impl="rbg"), step)


def set_dropout_keys(model, key: jax.Array) -> None:
    """Give every adapted projection of `model` (dropout > 0) its own key from `key`: the i-th such module
    fold_in(key, i), split over its leading layer axes, so each layer and projection drops its own inputs."""
    i = 0
    for _, m in nnx.iter_modules(model):
        opts, a = getattr(m, "lora", None), getattr(m, "lora_a", None)
        if opts is None or a is None or not opts.dropout:
            continue
        lhs, out = m.eq.replace(" ", "").split("->")
        nc = len([c for c in lhs.split(",")[1] if c not in out])  # the weight's contracted axes
        lead = a.shape[: a.ndim - nc - 1]  # stacked layers
        k = jax.random.fold_in(key, i)
        m.lora_key = DropoutKey(jax.random.split(k, math.prod(lead)).reshape(lead) if lead else k)
        i += 1


def dropped(x: jax.Array, key: jax.Array | None, rate: float) -> jax.Array:
    """The adapters' input: x with each element zeroed with probability `rate` and the rest scaled by 1 / (1 - rate)
    (inverted dropout, as PEFT's `lora_dropout`), or x itself without a key."""
    if key is None or not rate:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def is_adapter(path) -> bool:
    """True for the adapters' parameters (what a LoRA run trains)."""
    names = param_kinds.path_names(path)
    return bool(names) and names[-1] in ADAPTERS


def merged(model):
    """The same model with every adapter folded into its weight (W + (alpha / r) A B) and no adapters: built without
    LoRA under the model's runtime otherwise (its own class, so this module imports nothing of the model)."""
    from flax import traverse_util

    opts = model.runtime.lora
    _, params, rest = nnx.split(model, nnx.Param, ...)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(params))
    for path in [p for p in flat if p[-1] == "lora_a"]:
        a, b = flat.pop(path), flat.pop(path[:-1] + ("lora_b",))
        if path[:-1] + ("kernel",) in flat:  # a projection (`Einsum`)
            wpath = path[:-1] + ("kernel",)
            a, b = a.astype(jnp.float32), b.astype(jnp.float32)
            outer = lambda a, b: jnp.tensordot(a, b, axes=([a.ndim - 1], [0]))  # noqa: E731
            stacked = flat[wpath].ndim == a.ndim + b.ndim - 3  # a leading layer axis on all three: one per layer
            upd = opts.scale * (jax.vmap(outer)(a, b) if stacked else outer(a, b))
        else:  # a routed expert weight's `ExpertAdapter` ('w_gate_lora' beside 'w_gate')
            wpath = path[:-2] + (path[-2].removesuffix(EXPERT_SUFFIX),)
            upd = expert_update(a, b, opts.scale)
        w = flat[wpath]
        flat[wpath] = (w.astype(jnp.float32) + upd).astype(w.dtype)
    rt = dataclasses.replace(model.runtime, lora=None)
    plain = nnx.eval_shape(lambda: type(model)(model.cfg, rngs=nnx.Rngs(0), runtime=rt))
    graphdef = nnx.split(plain, nnx.Param, ...)[0]
    return nnx.merge(graphdef, traverse_util.unflatten_dict(flat), rest)
