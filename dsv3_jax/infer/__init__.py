"""Inference: `Engine`, the one decoder (continuous batching over the paged absorbed-MLA latent cache, chunked
prefill, prefix sharing, MTP speculative decoding, per-request sampling, sharding over a mesh; `Engine.generate`
for static batches), `SamplingParams`, and loaders for train.py workdirs and released-format directories
(`infer.load`).

The names are imported on first use (`dsv3_jax.lazy_exports`), so that `SamplingParams` and the command-line
tools' checks load no JAX."""
from dsv3_jax import lazy_exports

_EXPORTS = {"Completion": "engine", "Engine": "engine", "SamplingParams": "sampling_params"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
