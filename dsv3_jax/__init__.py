"""dsv3_jax: DeepSeek-V3 (MLA, DeepSeekMoE, MTP) in JAX and Flax NNX.

The names below are imported on first use (PEP 562), so that tools that need none of the model (e.g. the
tokenising workers of `python -m dsv3_jax.data.prepare`) do not load JAX and Flax.
"""
import importlib

_EXPORTS = {"ModelConfig": "config", "RopeScaling": "config", "LayerStats": "layer_stats", "DeepSeekV3": "model",
            "ModelOutput": "model", "param_counts": "model", "RouterBias": "moe", "Fp8Options": "runtime",
            "Runtime": "runtime"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"dsv3_jax.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'dsv3_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
