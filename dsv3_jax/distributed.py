"""Multi-host start-up: `jax.distributed.initialize` from `config.distributed` or the environment.

One process per host (or per GPU) runs the same `python train.py ...` command. Each one learns the
coordinator's address, the number of processes and its own id, from the config

    --config.distributed.coordinator_address=10.0.0.1:1234 --config.distributed.num_processes=2 \
    --config.distributed.process_id=0

or, where a key is left at its default, from the environment variables JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID (and JAX_LOCAL_DEVICE_IDS, read by JAX itself). With
`config.distributed.auto=True` JAX's own cluster detection (SLURM, Open MPI, Cloud TPU, ...) fills
in whatever is unset. After start-up `jax.devices()` lists every process's devices, the config's mesh
spans all of them, and each process feeds only its own shards of the (identical) global batch
(`sharding.put_global_batch`); process 0 writes metrics, orbax coordinates the checkpoint writes.
On CPU the cross-process collectives use gloo.
"""
from __future__ import annotations

import os

import jax

from dsv3_jax.cli import UserError


def settings(dist_cfg=None) -> dict | None:
    """Resolved (coordinator_address, num_processes, process_id, auto), or None for a single process.
    Raises ValueError naming the key / variable when the settings are incomplete."""
    get = (lambda k, d: dist_cfg.get(k, d)) if dist_cfg is not None else (lambda k, d: d)  # noqa: E731
    address = get("coordinator_address", "") or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num = int(get("num_processes", 0) or os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
    pid = int(get("process_id", -1))
    if pid < 0:
        pid = int(os.environ.get("JAX_PROCESS_ID", "-1") or -1)
    auto = bool(get("auto", False))
    if auto:
        return {"coordinator_address": address or None, "num_processes": num or None,
                "process_id": pid if pid >= 0 else None, "auto": True}
    if num <= 1:
        return None
    if not address:
        raise UserError(f"{num} processes need a coordinator: set config.distributed.coordinator_address (or "
                        f"JAX_COORDINATOR_ADDRESS) to HOST:PORT of process 0.")
    if not 0 <= pid < num:
        raise UserError(f"config.distributed.process_id (or JAX_PROCESS_ID) must be in [0, {num}) for "
                        f"{num} processes, got {pid}.")
    if ":" not in address:
        raise UserError(f"coordinator address {address!r} needs a port: HOST:PORT.")
    return {"coordinator_address": address, "num_processes": num, "process_id": pid, "auto": False}


def initialize(dist_cfg=None) -> bool:
    """Start jax.distributed if the config or environment asks for several processes. Must run before
    anything touches a JAX backend. Returns whether it started."""
    s = settings(dist_cfg)
    if s is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {k: v for k, v in s.items() if k != "auto" and v is not None}
    jax.distributed.initialize(**kwargs)
    return True


def is_main() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches this point (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
