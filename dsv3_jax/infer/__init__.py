"""Inference: `Engine`, the one decoder (continuous batching over the paged absorbed-MLA latent cache, chunked
prefill, prefix sharing, MTP speculative decoding, per-request sampling, sharding over a mesh; `Engine.generate`
for static batches), `SamplingParams`, and loaders for train.py workdirs and released-format directories
(`infer.load`)."""
from dsv3_jax.infer.engine import Completion, Engine
from dsv3_jax.infer.sampling import SamplingParams

__all__ = ["Completion", "Engine", "SamplingParams"]
