"""The one logical-axis rules table, the mesh built from the config, and activation constraints.

Every parameter carries logical axis names (see `layers.param`). This table maps each name to a mesh
axis (or a tuple of them, or None = replicated). Mesh axes, outermost first:

    data    pure data parallelism (parameters replicated)
    stage   pipeline stages (the stacked 'layers' axis)
    fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
    expert  expert parallelism: routed experts split over it; tokens also split over it (each expert
            rank is a data-parallel rank for everything that is not a routed expert)
    tensor  tensor parallelism of heads / ffn width (size 1 by default; DeepSeek-V3 used none)

A name missing from the table is an error, so a new parameter cannot silently end up replicated;
`tests/test_sharding.py` keeps a golden table of names per parameter. Activations are constrained
with `constrain(x, names)` at block boundaries; outside a mesh context it does nothing, so the same
model code runs on one device or many.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsv3_jax.cli import UserError
from dsv3_jax.mesh_axes import MESH_AXES, MESH_OPTIONS, parse_mesh  # noqa: F401  (re-exported)

BATCH_AXES = ("data", "fsdp", "expert")

# logical name -> mesh axis (None: replicated)
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    # parameters
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
    ("index_heads", "tensor"),
    ("index_head_dim", None),
    # inference cache
    ("cache_length", None),
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
    """PartitionSpecs for every variable of an nnx.State (or its pure dict), from `out_sharding` names."""

    def spec(v):
        names = v.get_metadata().get("out_sharding") if hasattr(v, "get_metadata") else None
        if names is None:
            return P()
        return logical_to_spec(names)

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_numel(shape, spec, sizes: Mapping[str, int]) -> int:
    """Elements of one device's shard of an array: each dim divided (rounded up, as XLA pads) by the sizes
    of its mesh axes in `spec` (a PartitionSpec)."""
    n = 1
    for i, dim in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        div = math.prod(sizes[a] for a in (axes if isinstance(axes, tuple) else (axes,))) if axes else 1
        n *= -(-int(dim) // div)
    return n


def state_shardings(state: nnx.State, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(state))


# ----------------------------------------------------------------------------- mesh


def mesh_sizes(mesh_cfg: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolve axis sizes from the config (at most one -1 = "the rest") and check the device count."""
    sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
    unknown = sorted(set(mesh_cfg) - set(MESH_AXES) - set(MESH_OPTIONS))
    if unknown:
        raise UserError(f"config.mesh has unknown axes {unknown}; valid axes are {list(MESH_AXES)}.")
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise UserError(f"config.mesh: only one axis may be -1 (fill with the remaining devices), got {fill}.")
    for a, s in sizes.items():
        if s == 0 or s < -1:
            raise UserError(f"config.mesh.{a}={s} must be >= 1 (or -1 for the remaining devices).")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % known:
            raise UserError(f"config.mesh: the fixed axes multiply to {known}, which does not divide the "
                            f"{num_devices} devices; change the axis sizes.")
        sizes[fill[0]] = num_devices // known
    total = math.prod(sizes.values())
    if total > num_devices:
        raise UserError(f"config.mesh {sizes} needs {total} devices but {num_devices} are available; make the "
                        f"product of the axis sizes at most {num_devices} (or set one axis to -1).")
    return sizes


def validate_mesh(sizes: Mapping[str, int], model_cfg, batch_size: int | None = None, *,
                  allow_uneven_stages: bool = False) -> None:
    """Model/batch divisibility checks, with the field and the fix named. `allow_uneven_stages` lets a
    memory plan round stages up (as DeepSeek's 16 stages over 61 layers do)."""
    ep = sizes["expert"]
    if model_cfg.has_moe and model_cfg.n_routed_experts % ep:
        raise UserError(f"config.mesh.expert={ep} must divide model.n_routed_experts="
                        f"{model_cfg.n_routed_experts}.")
    st = sizes["stage"]
    for name, n in (("dense", model_cfg.num_dense_layers), ("MoE", model_cfg.num_moe_layers)):
        if n and n % st and not allow_uneven_stages:
            raise UserError(f"config.mesh.stage={st} must divide the number of {name} layers ({n}); change "
                            f"the stage count or model.first_k_dense_replace / num_hidden_layers.")
    tp = sizes["tensor"]
    for field in ("num_attention_heads", "intermediate_size", "moe_intermediate_size", "vocab_size"):
        if getattr(model_cfg, field) % tp:
            raise UserError(f"config.mesh.tensor={tp} must divide model.{field}={getattr(model_cfg, field)}.")
    fs = sizes["fsdp"]
    if model_cfg.hidden_size % fs:
        raise UserError(f"config.mesh.fsdp={fs} must divide model.hidden_size={model_cfg.hidden_size}.")
    if batch_size is not None:
        shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
        if batch_size % shards:
            raise UserError(f"config.train.batch_size={batch_size} must be divisible by data x fsdp x expert = "
                            f"{shards}.")


def make_mesh(mesh_cfg: Mapping[str, int], devices=None) -> Mesh:
    """A mesh over the first prod(sizes) devices (all of them when an axis is -1)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(np.asarray(devices[:math.prod(shape)]).reshape(shape), MESH_AXES)


def auto_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axes with every axis Auto (XLA's sharding propagation decides what an op without an
    explicit placement gets), for code that updates or gathers arrays of mixed placements."""
    from jax.sharding import AxisType

    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def current_mesh():
    """The mesh set with `jax.set_mesh`, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def in_manual_region() -> bool:
    """True inside a `shard_map` that is manual over 'stage' only (a pipeline stage of executor.py), where
    XLA still partitions the other axes; False outside and inside a shard_map manual over every axis."""
    ctx = jax.sharding.get_abstract_mesh()
    if ctx.empty:
        return False
    manual = {a for a, t in zip(ctx.axis_names, ctx.axis_types) if t == jax.sharding.AxisType.Manual}
    return bool(manual) and len(manual) < len(ctx.axis_names)


def inner_mesh(mesh):
    """The mesh a nested `shard_map` takes: inside a pipeline stage (a shard_map manual over 'stage') the
    context's abstract mesh, which knows that axis is manual; elsewhere `mesh`."""
    ctx = jax.sharding.get_abstract_mesh()
    manual = not ctx.empty and any(t == jax.sharding.AxisType.Manual for t in ctx.axis_types)
    return ctx if manual else mesh


def axis_size(name: str) -> int:
    mesh = current_mesh()
    return 1 if mesh is None or name not in mesh.axis_names else mesh.shape[name]


def constrain(x: jax.Array, names) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op without a mesh context."""
    if current_mesh() is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def put_global_batch(x, sharding: NamedSharding) -> jax.Array:
    """Every process holds the same global batch (same seed); each places only its own shards. `x` may be
    lazy (`data.loader.LazyRows`): then only the rows of this process's devices are ever read."""
    if not hasattr(x, "shape") or isinstance(x, (list, tuple)):
        x = np.asarray(x)
    return jax.make_array_from_callback(tuple(x.shape), sharding, lambda idx: np.asarray(x[idx]))


def pure_specs(state: nnx.State) -> dict:
    """Nested dict of PartitionSpecs matching `nnx.to_pure_dict(state)`, from the logical names."""
    out: dict = {}
    for path, var in nnx.to_flat_state(state):
        names = var.get_metadata().get("out_sharding")
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = P() if names is None else logical_to_spec(names)
    return out
