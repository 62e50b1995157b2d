"""Inference: `Engine`, the one decoder (continuous batching over the paged absorbed-MLA latent cache, chunked
prefill, prefix sharing, MTP speculative decoding, per-request sampling, sharding over a mesh; `Engine.generate`
for static batches), `SamplingParams`, and loaders for train.py workdirs and released-format directories
(`infer.load`).

The names are imported on first use (PEP 562, as in `dsv3_jax/__init__.py`), so that `SamplingParams` and the
command-line tools' checks load no JAX."""
import importlib

_EXPORTS = {"Completion": "engine", "Engine": "engine", "SamplingParams": "sampling_params"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"dsv3_jax.infer.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'dsv3_jax.infer' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
