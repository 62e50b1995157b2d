"""Stack strategy 'scan': a stacked layer module applied layer by layer with `jax.lax.scan`.

A stack is one module whose parameters carry a leading 'layers' axis (built with `nnx.vmap`, see
`model.stacked_blocks`); each layer maps (h [B, T, D], cos, sin) -> (h, LayerStats). The scan lowers one
layer body whatever the depth, so compile time does not grow with the number of layers. It is the only stack
strategy: pipeline parallelism runs the whole train step as a program (`programs.py`, `parallel/pipeline/`).
"""
from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from dsv3_jax.sharding import constrain


def scan_blocks(stack, x, cos, sin, *, remat: bool, segment_ids=None, unroll: bool = False):
    """Apply a stacked Block layer by layer; returns x and the layers' LayerStats stacked [L, ...]. Each
    block's output is constrained to the batch sharding (the block boundary). `segment_ids` [B, T]: packed
    documents (`data/packing.py`). `unroll` (`Runtime.unroll_layers`, on CPU): the scan unrolled, so the step
    has no while loop, no per-layer slices of the stacked weights and no zero-filled stacked residual buffers
    (8% of the tiny config's CPU train step, `benchmarks/train_throughput.py --profile`); the same ops otherwise."""
    graphdef, state = nnx.split(stack)

    def body(h, layer_state):
        h, stats = nnx.merge(graphdef, layer_state)(h, cos, sin, segment_ids)
        return constrain(h, ("batch", "length", "act_embed")), stats

    if remat:
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    return jax.lax.scan(body, x, state, unroll=unroll)


@dataclasses.dataclass(frozen=True)
class ScanStack:
    """Stack strategy: every layer on every device, one `lax.scan` (rematerialised per layer if asked; unrolled
    on CPU)."""

    remat: bool = False
    unroll: bool = False

    def __call__(self, stack, x, cos, sin, segment_ids=None):
        return scan_blocks(stack, x, cos, sin, remat=self.remat, segment_ids=segment_ids, unroll=self.unroll)
