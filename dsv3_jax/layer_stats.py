"""Per-layer statistics of the blocks (their MoE routing and their sparse-attention indexer), as one named structure.

Every FFN returns a `LayerStats` beside its output (a dense FFN returns zeros), the block adds its attention's
indexer terms (zeros without DeepSeek Sparse Attention), a layer stack returns
them stacked on a leading layer axis, and the model reports them in `ModelOutput.moe_stats`: a dict
keyed by the path of each MoE module in the model tree ("moe_layers/ffn" for the stacked main layers,
"mtp/0/block/ffn" for the first MTP block, ...), which is the path of that module's `RouterBias` less
its last name. The router-bias update pairs them by that path (`counts_like`), never by order.

Fields (add more here; everything that moves them uses `jax.tree.map`):
    counts   [..., E] float32  token-expert rows routed to each expert (no gradient)
    balance  [...]             sequence-wise balance loss, unweighted (mean over sequences)
    dropped  [...]             token-expert rows dropped by expert capacity (no gradient)
    indexer_kl    [...]        DSA: the indexer's KL to the attention distribution, mean over queries (`dsa.py`)
    index_recall  [...]        DSA: the dense attention mass inside the selected top-k keys (no gradient)
When stats of micro-batches are summed (pipeline, gradient accumulation), `MEAN_FIELDS` are the ones
that are means, divided back by `per_microbatch(n)`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct, traverse_util

from dsv3_jax.cli import UserError


@struct.dataclass
class LayerStats:
    counts: jax.Array
    balance: jax.Array
    dropped: jax.Array
    indexer_kl: jax.Array = None  # (None only while constructing: __post_init__-free zeros, see `zeros`)
    index_recall: jax.Array = None

    MEAN_FIELDS = ("balance", "indexer_kl", "index_recall")

    @classmethod
    def zeros(cls, num_experts: int, lead: tuple[int, ...] = ()) -> LayerStats:
        z = jnp.zeros(lead, jnp.float32)
        return cls(counts=jnp.zeros(lead + (num_experts,), jnp.float32), balance=z, dropped=z, indexer_kl=z,
                   index_recall=z)

    def with_indexer(self, kl, recall) -> LayerStats:
        """These stats with a block's indexer terms (scalars of one layer)."""
        return self.replace(indexer_kl=jnp.asarray(kl, jnp.float32), index_recall=jnp.asarray(recall, jnp.float32))

    def per_microbatch(self, n: int) -> LayerStats:
        """Stats summed over n micro-batches -> the whole batch's (means divided by n, counts kept)."""
        return self.replace(**{f: getattr(self, f) / n for f in self.MEAN_FIELDS})


def _order(key: str):
    """Model order of stats keys: the main stack, then MTP blocks by depth (numbers compared as numbers)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split("/")]


def ordered(moe_stats: dict[str, LayerStats]) -> list[LayerStats]:
    """The stats of `moe_stats`, each with a leading layer axis, main stack first then MTP depth 1, 2, ..."""
    out = []
    for key in sorted(moe_stats, key=_order):
        s = moe_stats[key]
        out.append(s if s.balance.ndim == 1 else jax.tree.map(lambda a: a[None], s))
    return out


def stacked_counts(moe_stats: dict[str, LayerStats], num_experts: int) -> jax.Array:
    """[MoE layers, E]: main stack rows first, then the MTP blocks (for reporting, e.g. MaxVio)."""
    rows = [s.counts for s in ordered(moe_stats)]
    return jnp.concatenate(rows, axis=0) if rows else jnp.zeros((0, num_experts), jnp.float32)


def mean_balance(moe_stats: dict[str, LayerStats]) -> jax.Array:
    """Mean over every MoE layer of the balance loss (scalar; 0 without MoE layers)."""
    rows = [s.balance for s in ordered(moe_stats)]
    return jnp.concatenate(rows).mean() if rows else jnp.zeros((), jnp.float32)


def indexer_means(stats: dict[str, LayerStats]) -> tuple[jax.Array, jax.Array]:
    """(indexer KL, top-k recall): means over every block of `stats` (path -> LayerStats of any blocks)."""
    rows = ordered(stats)
    if not rows:
        return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    return (jnp.concatenate([s.indexer_kl for s in rows]).mean(),
            jnp.concatenate([s.index_recall for s in rows]).mean())


def total_dropped(moe_stats: dict[str, LayerStats]) -> jax.Array:
    rows = [s.dropped for s in ordered(moe_stats)]
    return jnp.concatenate(rows).sum() if rows else jnp.zeros((), jnp.float32)


def counts_like(biases: dict, moe_stats: dict[str, LayerStats]) -> dict:
    """The expert counts as a pytree shaped like the router-bias state (a pure dict whose leaves sit at
    '<MoE module path>/bias'): each bias gets the counts of the module that owns it. A bias without
    stats, or stats without a bias, is an error naming the path."""
    flat = traverse_util.flatten_dict(biases)
    used = set()
    out = {}
    for path, b in flat.items():
        key = "/".join(str(p) for p in path[:-1])
        if key not in moe_stats:
            raise UserError(f"router bias {'/'.join(map(str, path))} has no expert counts in the model output "
                            f"(have: {sorted(moe_stats)})")
        counts = moe_stats[key].counts
        if counts.shape != b.shape:
            raise UserError(f"expert counts {key} have shape {counts.shape}, its router bias {b.shape}")
        out[path] = counts
        used.add(key)
    extra = sorted(set(moe_stats) - used)
    if extra:
        raise UserError(f"expert counts {extra} have no router bias in the state")
    return traverse_util.unflatten_dict(out)
