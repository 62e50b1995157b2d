"""dsv3_jax: DeepSeek-V3 (MLA, DeepSeekMoE, MTP) in JAX and Flax NNX."""
from dsv3_jax.config import ModelConfig, RopeScaling
from dsv3_jax.model import DeepSeekV3, ModelOutput, param_counts
from dsv3_jax.moe import RouterBias

__all__ = ["ModelConfig", "RopeScaling", "DeepSeekV3", "ModelOutput", "RouterBias", "param_counts"]
