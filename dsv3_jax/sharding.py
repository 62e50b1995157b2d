"""The one logical-axis rules table, and helpers that turn logical names into mesh shardings.

Every parameter carries logical axis names (see `layers.param`). This table maps each name to a mesh
axis (or a tuple of them, or None = replicated). Mesh axes: 'data', 'fsdp', 'expert', 'stage',
'tensor'. A name missing from the table is an error, so a new parameter cannot silently end up
replicated; `tests/test_sharding.py` keeps a golden table of names per parameter.
"""
from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "stage", "fsdp", "expert", "tensor")

# logical name -> mesh axis (None: replicated)
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("layers", "stage"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("qk_head_dim", None),
    ("kv_head_dim", None),
    ("v_head_dim", None),
    ("q_lora", None),
    ("kv_lora", None),
    ("experts", "expert"),
    ("expert_mlp", "tensor"),
    ("router_experts", None),
    ("mtp_concat", None),
)
_RULES = dict(RULES)


def logical_to_spec(names) -> P:
    """('layers', 'embed', 'mlp') -> PartitionSpec('stage', 'fsdp', 'tensor')."""
    axes = []
    for n in names:
        if n is not None and n not in _RULES:
            raise KeyError(f"logical axis {n!r} has no rule in dsv3_jax.sharding.RULES; add one")
        axes.append(None if n is None else _RULES[n])
    return P(*axes)


def state_specs(state: nnx.State):
    """PartitionSpecs for every variable of an nnx.State, from its `out_sharding` logical names."""

    def spec(v):
        names = v.get_metadata().get("out_sharding") if hasattr(v, "get_metadata") else None
        if names is None:
            return P()
        return logical_to_spec(names)

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: nnx.State, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(state))
