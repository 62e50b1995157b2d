"""The mesh's axis names and the one parser of mesh strings ('data=2,tensor=4'), without JAX: the command-line tools
check a --mesh flag before they import it. The rules that map parameters onto these axes, and the mesh itself, are
`dsv3_jax.sharding`."""
from __future__ import annotations

from dsv3_jax.cli import UserError

MESH_AXES = ("data", "stage", "fsdp", "expert", "tensor")
MESH_OPTIONS = ("microbatches", "pipeline_schedule", "pipeline_chunks",  # keys of config.mesh that are not axes
                "pipeline_stage_layers")


def parse_mesh(text: str, flag: str = "--mesh") -> dict[str, int]:
    """'data=2,tensor=4' -> {'data': 2, 'tensor': 4}: the one parser of mesh strings (infer.py, the converter).
    Sizes are >= 1, or -1 for "the remaining devices" (resolved by `mesh_sizes`); '' is no axis at all."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, size = (x.strip() for x in part.partition("="))
        ok = eq and name in MESH_AXES and size.lstrip("-").isdigit() and (int(size) >= 1 or int(size) == -1)
        if not ok or name in sizes:
            raise UserError(f"{flag} {text!r}: write AXIS=SIZE pairs separated by commas, each axis once, with AXIS "
                            f"in {', '.join(MESH_AXES)} and SIZE >= 1 (or -1 for the remaining devices), e.g. "
                            f"data=2,tensor=4")
        sizes[name] = int(size)
    return sizes
