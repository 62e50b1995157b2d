"""Inference: `Generator` (prefill + absorbed-MLA cached decode, MTP speculative decoding, sharding),
`SamplingParams`, and loaders for train.py workdirs and released-format directories (`infer.load`)."""
from dsv3_jax.infer.generate import Completion, Generator
from dsv3_jax.infer.sampling import SamplingParams

__all__ = ["Completion", "Generator", "SamplingParams"]
