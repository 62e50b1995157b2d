"""Independent references for the model-core tests.

`numpy_ref` re-implements the DeepSeek-V3 math of /work/shared/REFERENCE.md (sections 2-4) in plain
numpy (float64), reading only the module's weights, never calling `dsv3_jax` code. This package module
holds the small fixtures shared by the tests: the tiny config, abstract construction with every
parameter re-drawn from numpy (larger-than-default weights, so wrong variants show), and state -> numpy.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax import runtime
from dsv3_jax.config import ModelConfig
from dsv3_jax.moe import RouterBias
from dsv3_jax.runtime import Runtime

# Tiny config used across the model-core tests: 1 dense + 2 MoE layers, MTP depth 2, YaRN on (factor 4
# over an original context of 16, so the ramp is not trivial at dr = 8), 8 experts in 4 groups.
TINY = dict(
    vocab_size=48, hidden_size=16, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=3,
    num_attention_heads=2, q_lora_rank=12, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=8, v_head_dim=6,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
    routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=2, max_position_embeddings=64,
    rope_scaling=dict(factor=4.0, original_max_position_embeddings=16, beta_fast=4.0, beta_slow=1.0),
    dtype="float32", param_dtype="float32",
)
# how the tiny model runs in these tests: the 'blocks' expert layout with blocks of 4 rows
TINY_RUN = dict(moe_impl="blocks", moe_block_size=4)


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


def tiny_runtime(**overrides) -> Runtime:
    return runtime.resolve(**{**TINY_RUN, **overrides})


def build(ctor, seed: int = 0, std: float = 0.2):
    """Build `ctor(rngs)` abstractly (no eager init: each distinct eager init shape compiles a kernel)
    and draw every variable from numpy: kernels N(0, std), norm scales U(0.5, 1.5), router bias N(0, 0.1)."""
    module = nnx.eval_shape(lambda: ctor(nnx.Rngs(0)))
    randomize(module, seed, std)
    return module


def randomize(module, seed: int = 0, std: float = 0.2, bias_std: float = 0.1):
    rng = np.random.default_rng(seed)

    def draw(path, v):
        shape = v.get_value().shape
        if isinstance(v, RouterBias):
            a = rng.normal(0.0, bias_std, shape)
        elif path[-1] == "scale":
            a = rng.uniform(0.5, 1.5, shape)
        else:
            a = rng.normal(0.0, std, shape)
        return v.replace(jnp.asarray(a, v.get_value().dtype))

    state = nnx.state(module)
    flat = [(p, draw(p, v)) for p, v in nnx.to_flat_state(state)]
    nnx.update(module, nnx.from_flat_state(flat))
    return module


def to_numpy(module) -> dict:
    """Nested dict of numpy arrays shaped like the module's state (list indices become int keys)."""
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module)))
