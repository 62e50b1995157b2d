"""dsv3_jax: DeepSeek-V3 (MLA, DeepSeekMoE, MTP) in JAX and Flax NNX."""
from dsv3_jax.config import ModelConfig, RopeScaling
from dsv3_jax.layer_stats import LayerStats
from dsv3_jax.model import DeepSeekV3, ModelOutput, param_counts
from dsv3_jax.moe import RouterBias
from dsv3_jax.runtime import Fp8Options, Runtime

__all__ = ["ModelConfig", "RopeScaling", "DeepSeekV3", "ModelOutput", "RouterBias", "param_counts", "Runtime",
           "Fp8Options", "LayerStats"]
