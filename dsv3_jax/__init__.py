"""dsv3_jax: DeepSeek-V3 (MLA, DeepSeekMoE, MTP) in JAX and Flax NNX.

The names below are imported on first use (PEP 562), so that tools that need none of the model (e.g. the
tokenising workers of `python -m dsv3_jax.data.prepare`) do not load JAX and Flax.
"""
import importlib

_EXPORTS = {"ModelConfig": "config", "RopeScaling": "config", "LayerStats": "layer_stats", "DeepSeekV3": "model",
            "ModelOutput": "model", "param_counts": "model", "RouterBias": "moe", "Fp8Options": "runtime",
            "Runtime": "runtime"}
__all__ = list(_EXPORTS)


def lazy_exports(package: str, exports: dict[str, str], namespace: dict):
    """A package's module `__getattr__` and `__dir__` (PEP 562) that import `exports` (name -> submodule of
    `package`) on first use; `namespace` is the package's globals()."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(list(namespace) + list(exports))

    return __getattr__, __dir__


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
