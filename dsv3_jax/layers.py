"""Building blocks: parameters with logical axes, RMSNorm, embedding, einsum projections, SwiGLU.

Shape legend (all model files): B batch, T query length, S key length, D model width, N heads,
H head dim, R latent rank, E experts, K top-k, F ffn width, V vocabulary, L stacked layers.

Every parameter is created through `param(...)`, which attaches *logical* axis names (e.g.
`('embed', 'mlp')`). `sharding.py` holds the single table that maps these names onto mesh axes, so a
module never mentions a device or a mesh. Eager sharding is off: parameters are placed when the
caller jits the constructor with output shardings derived from the names.

Dtypes: parameters are stored in `param_dtype` (float32 master weights); matmuls run in the
config's compute `dtype` (bfloat16 on accelerators, float32 on CPU); RMSNorm always computes its
statistics in float32:  y = w * x / sqrt(mean(x^2) + eps).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.cli import UserError
from dsv3_jax.fp8 import resident
from dsv3_jax.fp8.linear import fp8_einsum
from dsv3_jax.runtime import Fp8Options, Fp8Weights


def param(rngs: nnx.Rngs, init, shape: Sequence[int], axes: Sequence[str | None], dtype) -> nnx.Param:
    """A Param initialised by `init(key, shape, dtype)` and tagged with logical axis names."""
    if len(axes) != len(shape):
        raise UserError(f"param: {len(axes)} axis names {tuple(axes)} for shape {tuple(shape)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


def normal(std: float):
    return nnx.initializers.normal(stddev=std)


class RMSNorm(nnx.Module):
    """w * x / sqrt(mean(x^2) + eps), statistics in float32; output in the input dtype."""

    def __init__(self, dim: int, eps: float, *, axis_name: str, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), (axis_name,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """(x - mean) / sqrt(var + eps) * w + b, statistics in float32; output in the input dtype (the V3.2 indexer's
    key norm)."""

    def __init__(self, dim: int, eps: float, *, axis_name: str, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), (axis_name,), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), (axis_name,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def fp8_params(rngs: nnx.Rngs, init, kshape, nshape, kaxes, naxes, lead=(), lead_axes=()):
    """An FP8-resident weight ([*lead, N..., K...] e4m3, the checkpoint's orientation, axes permuted with it)
    and its block scales ([*lead, Nb, Kb] f32, replicated along the block axes), as two `Fp8Param`s. The
    values are `init` quantised per 128x128 block (a checkpoint load overwrites them)."""
    N, K = math.prod(nshape), math.prod(kshape)
    w = init(rngs.params(), (*lead, N, K), jnp.float32)
    qw = resident.quantize_weight(w)
    q = resident.Fp8Param(qw.q.reshape(*lead, *nshape, *kshape), out_sharding=(*lead_axes, *naxes, *kaxes),
                          eager_sharding=False)
    s = resident.Fp8Param(qw.s, out_sharding=(*lead_axes, None, None), eager_sharding=False)
    return q, s


class Einsum(nnx.Module):
    """A projection written as an einsum, e.g. 'BTD,DNH->BTNH', weight of `shape` with logical `axes`.

    fp8: block-scaled FP8 GEMMs on the float32 master weight, forward and backward (training).
    fp8_weights: the weight itself is FP8-resident (`dsv3_jax.fp8.resident`): `kernel` holds the e4m3 values
    in the checkpoint's [N..., K...] orientation and `kernel_scale` its 128x128 block scales (inference).
    lora: low-rank adapters `lora_a`, `lora_b` beside the weight (`dsv3_jax.lora`)."""

    def __init__(self, eq: str, shape, axes, *, std: float, dtype, param_dtype, rngs: nnx.Rngs,
                 fp8: Fp8Options | None = None, fp8_weights: Fp8Weights | None = None, lora=None):
        self.eq = eq
        self.dtype = dtype
        self.fp8 = fp8
        self.fp8_weights = fp8_weights
        self.lora = lora
        if lora is not None:
            from dsv3_jax.lora import adapter_params

            self.lora_a, self.lora_b = adapter_params(rngs, shape, axes, resident.contracted(eq), lora.rank,
                                                      param_dtype)
        if fp8_weights is None:
            self.kernel = param(rngs, normal(std), shape, axes, param_dtype)
            return
        nc = resident.contracted(eq)
        self.kernel, self.kernel_scale = fp8_params(rngs, normal(std), shape[:nc], shape[nc:], axes[:nc], axes[nc:])

    @property
    def qweight(self) -> resident.QWeight:
        return resident.QWeight(self.kernel[...], self.kernel_scale[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        if self.lora is None:
            return y
        from dsv3_jax.lora import delta, dropped

        key = getattr(self, "lora_key", None)  # (a training forward with adapter dropout: `lora.set_dropout_keys`)
        xa = dropped(x.astype(self.dtype), None if key is None else key[...], self.lora.dropout)
        return y + delta(self.eq, resident.contracted(self.eq), xa, self.lora_a[...], self.lora_b[...],
                         self.lora.scale, self.dtype).astype(y.dtype)

    def weight(self) -> jax.Array:
        """The float weight this projection applies: the kernel, plus (alpha / r) A B with LoRA (float32 then)."""
        if self.lora is None:
            return self.kernel[...]
        a, b = self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32)
        return self.kernel[...].astype(jnp.float32) + self.lora.scale * jnp.tensordot(a, b, axes=([a.ndim - 1], [0]))

    def base(self, x: jax.Array) -> jax.Array:
        if self.fp8_weights is not None:
            return resident.einsum(self.eq, x.astype(self.dtype), self.qweight, self.fp8_weights)
        if self.fp8 is not None:  # quantises the float32 master weight itself, per 128x128 block
            return fp8_einsum(self.eq, x.astype(self.dtype), self.kernel[...], options=self.fp8)
        return jnp.einsum(self.eq, x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class Embed(nnx.Module):
    """Token embedding table [V, D]; lookup returns the compute dtype."""

    def __init__(self, vocab: int, dim: int, *, std: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(rngs, normal(std), (vocab, dim), ("vocab", "embed"), param_dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int, *, std: float, dtype, param_dtype, rngs: nnx.Rngs,
                 fp8: Fp8Options | None = None, fp8_weights: Fp8Weights | None = None, lora=None):
        kw = dict(std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs, fp8=fp8, fp8_weights=fp8_weights,
                  lora=lora)
        self.gate = Einsum("...D,DF->...F", (dim, hidden), ("embed", "mlp"), **kw)
        self.up = Einsum("...D,DF->...F", (dim, hidden), ("embed", "mlp"), **kw)
        self.down = Einsum("...F,FD->...D", (hidden, dim), ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
