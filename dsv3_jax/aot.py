"""Ahead-of-time compilation for accelerators this machine does not have: the real train step, compiled by XLA
for a TPU topology from shapes alone, and what the compiler says about it.

With libtpu installed (`pip install -e ".[tpu-aot]"`, Python >= 3.12), JAX describes a TPU slice of any size
(`jax.experimental.topologies.get_topology_desc`) and compiles SPMD programs for its devices on the CPU. Nothing
is allocated: the state is `jax.ShapeDtypeStruct`s with their shardings (`train.loop.abstract_state`), and every
"auto" of the Runtime is resolved for the target chips (`runtime.compiling_for`), so the program compiled is the
one train.py would run there, with the same mesh, pipeline schedule, expert dispatch and FP8 GEMMs.

    python train.py --config configs/deepseek_v3.py --aot v5p:8x8x16 --config.mesh.expert=64 ...

prints the trace / lower / compile seconds, the per-device bytes by kind (arguments, outputs, temporaries, code)
against the device's HBM, XLA's cost analysis (flops, bytes accessed, `optimal_seconds`), the model FLOPs of the
step (`dsv3_jax.flops`, the benchmarks' formula) and their ratio to the compiled flops, and an estimated step time
and MFU from the cost model; the last line is JSON (`REPORT_KEYS` and more).

Two caveats the report states rather than hides. XLA's cost analysis counts the body of a loop once, and the layer
stack is a `lax.scan`: the report scales XLA's flops and `optimal_seconds` by the traced program's matmul FLOPs with
the loops' trip counts over the same without (`jaxpr_flops`; `loop_factor`, with XLA's own figures beside it), so
`flops_ratio` is what remat, padding, dispatch and the pipeline's bubble add to the model FLOPs. And a program
that does not fit does not compile: XLA's out-of-memory message is parsed for the bytes it asked for.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.cli import UserError

REPORT_KEYS = ("aot_topology", "compile_s", "hbm_bytes_per_chip", "hbm_fits", "compiled_flops", "model_flops",
               "flops_ratio", "optimal_seconds", "est_mfu")
GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One JAX device of a TPU generation (Ironwood shows each chip as 2 devices, one per TensorCore; v4 and v5p
    chips are one device each, their two cores joined as a megacore): its HBM and dense peak FLOP/s, from Google's
    published per-chip figures divided by the devices per chip."""

    name: str
    hbm_bytes: int
    peak_bf16: float
    hbm_bandwidth: float  # bytes/s
    peak_fp8: float = 0.0  # 0: no FP8 matrix units (the FP8 GEMMs run on bf16 units)


CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1228e9),
    "v5e": Chip("TPU v5 lite", 16 * GiB, 197e12, 819e9),
    "v5p": Chip("TPU v5p", int(95.73 * GiB), 459e12, 2765e9),  # HBM: the capacity XLA's out-of-memory errors give
    "v6e": Chip("TPU v6 lite", 32 * GiB, 918e12, 1640e9),
    "tpu7x": Chip("TPU7x", int(94.75 * GiB), 2307e12 / 2, 7380e9 / 2, 4614e12 / 2),  # HBM: what XLA's
    # out-of-memory errors give as one Ironwood device's capacity (192 GB per chip, less what the runtime keeps)
}


def parse_topology(text: str) -> tuple[str, str]:
    """'v5p:8x8x16' -> ('v5p', 'v5p:8x8x16'); one clear line for anything else."""
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", text.strip())
    if not m or m.group(1) not in CHIPS:
        raise UserError(f"--aot={text!r}: give a TPU topology as GENERATION:AxB[xC] with GENERATION one of "
                        f"{sorted(CHIPS)} (e.g. v5p:8x8x16, v6e:16x16, tpu7x:8x8x8, v5e:2x2).", key="aot")
    return m.group(1), text.strip()


def topology_devices(text: str) -> tuple[Chip, list]:
    """(the chip, the devices of that TPU topology) from libtpu, compiled for on this machine."""
    generation, name = parse_topology(text)
    try:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(topology_name=name, platform="tpu")
    except Exception as e:  # noqa: BLE001 (libtpu missing, or a topology it does not know)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--aot={text}: cannot describe this TPU topology ({first[:200]}); compiling for TPUs needs "
                        f"libtpu: under Python >= 3.12, pip install -e \".[tpu-aot]\".", key="aot") from None
    return CHIPS[generation], list(topo.devices)


def _oom_bytes(message: str) -> tuple[float, float] | None:
    """(bytes asked for, bytes available) from XLA's out-of-memory error, in either of its forms: 'Used 108.30G
    of 94.75G hbm' or 'the total memory required for HLO temporaries (3.70T) exceeds available HBM (95.73G)'."""
    num = r"([\d.]+)([KMGT]?)"
    m = re.search(rf"Used {num} of {num} hbm", message) or re.search(
        rf"required for HLO temporaries \({num}\) exceeds available HBM \({num}\)", message)
    if not m:
        return None
    unit = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GiB, "T": 1024 ** 4}
    return float(m.group(1)) * unit[m.group(2)], float(m.group(3)) * unit[m.group(4)]


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    return dict(cost or {})


def compile_report(fn, args: tuple, *, topology: str, chip: Chip, devices: int, model_flops: float,
                   fp8: bool = False, extra: dict | None = None, mesh=None) -> dict:
    """Trace, lower and compile `fn` (a jitted function) for `args` (ShapeDtypeStructs with shardings), and
    the report: seconds per phase, per-device bytes against the chip's HBM, XLA's cost analysis, the model FLOPs
    of one call (`model_flops`, all devices together) and what follows from them."""
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        t0 = time.perf_counter()
        traced = fn.trace(*args)
        t1 = time.perf_counter()
        lowered = traced.lower()
        t2 = time.perf_counter()
        oom = None
        try:
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001 (XLA raises its runtime error type for out-of-memory)
            oom = _oom_bytes(str(e))
            if oom is None:
                raise
            compiled = None
        t3 = time.perf_counter()
    peak = chip.peak_fp8 if fp8 and chip.peak_fp8 else chip.peak_bf16
    out = {"aot_topology": topology, "chip": chip.name, "devices": devices, "trace_s": round(t1 - t0, 2),
           "lower_s": round(t2 - t1, 2), "compile_s": round(t3 - t2, 2), "hbm_capacity": chip.hbm_bytes,
           "peak_flops_per_device": peak, "model_flops": float(model_flops)}
    if compiled is None:
        used, available = oom
        out |= {"hbm_bytes_per_chip": int(used), "hbm_capacity": int(available), "hbm_fits": False,
                "oom": "XLA: the temporaries alone exceed HBM",
                "compiled_flops": None, "flops_ratio": None, "optimal_seconds": None, "est_step_s": None,
                "est_mfu": None}
        return out | (extra or {})
    mem = compiled.memory_analysis()
    kinds = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
             for k in ("argument", "output", "alias", "temp", "generated_code")}
    total = kinds["argument"] + kinds["output"] - kinds["alias"] + kinds["temp"] + kinds["generated_code"]
    cost = _cost(compiled)
    flops = float(cost.get("flops", 0.0)) or None
    # XLA counts each loop body once (the layer scans!): the traced program's matmul FLOPs with and without the
    # loops' trip counts say how much that leaves out; the compiled figures are scaled by that factor
    program, once = jaxpr_flops(traced.jaxpr, True), jaxpr_flops(traced.jaxpr, False)
    factor = program / once if once else 1.0
    optimal = cost.get("optimal_seconds")
    optimal = float(optimal) if optimal is not None and optimal > 0 else None
    per_device_model = model_flops / devices
    out |= {"bytes_by_kind": kinds, "hbm_bytes_per_chip": total, "hbm_fits": total <= chip.hbm_bytes,
            "compiled_flops": flops * factor if flops else None, "compiled_flops_loop_once": flops,
            "loop_factor": round(factor, 3), "program_flops": program,
            "bytes_accessed": cost.get("bytes accessed"),
            "flops_ratio": flops * factor / per_device_model if flops and model_flops else None,
            "optimal_seconds": optimal * factor if optimal else None, "optimal_seconds_loop_once": optimal}
    out["est_step_s"] = out["optimal_seconds"]
    if out["est_step_s"] is None and flops:  # no cost-model time (XLA gives none for some programs): the
        # roofline of the compiled flops and bytes at the chip's peak and HBM bandwidth
        moved = float(cost.get("bytes accessed", 0.0)) * factor
        out["est_step_s"] = max(flops * factor / peak, moved / chip.hbm_bandwidth)
        out["est_step_from"] = "roofline"
    out["est_mfu"] = per_device_model / out["est_step_s"] / peak if out["est_step_s"] else None
    return out | (extra or {})


def jaxpr_flops(jaxpr, loops: bool = True) -> float:
    """Matmul FLOPs of a (closed) jaxpr, all devices together: 2 x output elements x contracted size of every
    dot_general (ragged_dot: each row against its one group), through every nested jaxpr (jit, remat, custom
    VJPs, cond: its costliest branch; shard_map: its per-device body times the devices it runs on), each `scan`
    body counted `length` times (`loops=False`: once, as XLA's cost analysis counts loop bodies). Pallas kernels
    (the FP8 GEMMs) are opaque here and count 0."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lc)
            continue
        if name == "ragged_dot" or name == "ragged_dot_general":
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            total += 2.0 * math.prod(lhs) * rhs[-1]
            continue
        subs = [v for v in eqn.params.values() if hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns")]
        subs += [j for v in eqn.params.values() if isinstance(v, (tuple, list))
                 for j in v if hasattr(j, "eqns") or hasattr(getattr(j, "jaxpr", None), "eqns")]
        if not subs:
            continue
        inner = [jaxpr_flops(j, loops) for j in subs]
        if name == "cond":
            total += max(inner)
        elif name == "scan":
            total += sum(inner) * (eqn.params["length"] if loops else 1)
        elif name == "shard_map":
            mesh = eqn.params.get("mesh")
            manual = eqn.params.get("manual_axes") or eqn.params.get("axis_names") or ()
            total += sum(inner) * (math.prod(mesh.shape[a] for a in manual) if mesh is not None else 1)
        else:
            total += sum(inner)
    return total


def print_report(r: dict) -> None:
    """A table a person reads, then the JSON line."""
    gb = lambda b: f"{b / 1e9:,.2f} GB" if b is not None else "n/a"  # noqa: E731
    sci = lambda x: f"{x:.3e}" if x else "n/a"  # noqa: E731
    print(f"ahead-of-time compile for {r['aot_topology']} ({r['devices']} x {r['chip']}), jax {jax.__version__}")
    print(f"  trace {r['trace_s']:.1f} s, lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s")
    for k, v in r.get("bytes_by_kind", {}).items():
        print(f"  {k + ' bytes':<24}{gb(v):>14}")
    fits = "fits" if r["hbm_fits"] else "DOES NOT FIT"
    print(f"  {'per device':<24}{gb(r['hbm_bytes_per_chip']):>14} of {gb(r['hbm_capacity'])} HBM: {fits}")
    if r.get("compiled_flops"):
        print(f"  compiled flops / device {sci(r['compiled_flops'])} (XLA, loop bodies once: "
              f"{sci(r['compiled_flops_loop_once'])}, x {r['loop_factor']:.2f} for the loops' trips)")
        print(f"  model flops / device    {sci(r['model_flops'] / r['devices'])}: compiled / model = "
              f"{r['flops_ratio']:.2f}")
    if r.get("est_step_s"):
        print(f"  cost model: step {r['est_step_s'] * 1e3:,.1f} ms, est. MFU {100 * r['est_mfu']:.1f}% of "
              f"{r['peak_flops_per_device'] / 1e12:,.0f} TFLOP/s per device")
    print(json.dumps({k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items()}))


def train_step_report(config, topology: str) -> dict:
    """Compile train.py's step for `config` on the TPU `topology` (config.mesh over its devices) from shapes
    only, and report (see `compile_report`)."""
    from dsv3_jax import runtime, sharding
    from dsv3_jax.flops import train_flops_per_token
    from dsv3_jax.model import abstract_model
    from dsv3_jax.programs import program_for
    from dsv3_jax.train.loop import abstract_state, make_schedules, validate_train_config
    from dsv3_jax.train.step import make_train_step

    chip, devices = topology_devices(topology)
    t = config.train
    with runtime.compiling_for(devices):
        mesh_cfg = config.mesh.to_dict()
        try:
            sizes = sharding.mesh_sizes(mesh_cfg, len(devices))
        except ValueError as e:
            raise UserError(f"--aot={topology} ({len(devices)} devices): {e}", key="mesh") from None
        model_cfg = validate_train_config(config, num_devices=len(devices))
        mesh = sharding.make_mesh(mesh_cfg, devices)
        rt = runtime.from_config(config, mesh)
        tx, schedule, *_ = make_schedules(config, dict(mesh.shape))
        program = program_for(rt, model_cfg, t.seq_len)
        graphdef, state = abstract_state(model_cfg, tx, rt, program)
        step = make_train_step(graphdef, tx, schedule, mesh, jax.tree.map(lambda x: x.sharding, state),
                               grad_accum_steps=t.get("grad_accum_steps", 1), program=program)
        window = jax.ShapeDtypeStruct((t.batch_size, t.seq_len + 1), jnp.int32,
                                      sharding=sharding.batch_sharding(mesh))
        scalar = jax.ShapeDtypeStruct((), jnp.float32)
        model_flops = train_flops_per_token(abstract_model(model_cfg), t.seq_len) * t.batch_size * t.seq_len
        extra = {"mesh": {k: v for k, v in sizes.items() if v > 1}, "batch": t.batch_size, "seq_len": t.seq_len,
                 "fp8": rt.fp8, "schedule": rt.pipeline_schedule if sizes["stage"] > 1 else None,
                 "remat": rt.remat, "jax": jax.__version__}
        return compile_report(step.jitted, (state, window, scalar, scalar, scalar), topology=topology, chip=chip,
                              devices=len(devices), model_flops=model_flops, fp8=rt.fp8, extra=extra, mesh=mesh)


def serve_step_report(config, topology: str, *, step: str = "decode", batch: int = 256, context: int = 8192,
                      prefill_len: int = 2048, page_size: int = 64, decode_steps: int = 1,
                      fp8_weights: str = "auto", paged_attention: str = "auto") -> dict:
    """Compile one of the serving engine's steps (`infer.steps`: 'prefill' of `prefill_len` tokens per row, or
    'decode' of `decode_steps` tokens per row) for `config.model` on the TPU `topology` (config.mesh over its
    devices) at `batch` rows, each with `context` positions of paged latent cache (pages of `page_size`), from
    shapes only, placed as the Engine places them (parameters by the logical-axis rules, pools split over
    'stage' by layer and otherwise replicated, rows over the batch axes). fp8_weights: 'w8a8' (the FP8
    release kept FP8), 'none' (BF16), or 'auto' (FP8 where the chip has FP8 matrix units)."""
    from flax import nnx

    from dsv3_jax import runtime, sharding
    from dsv3_jax.config import ModelConfig
    from dsv3_jax.flops import decode_flops_per_token, train_flops_per_token
    from dsv3_jax.infer import steps as engine_steps
    from dsv3_jax.infer.engine import pool_shardings
    from dsv3_jax.infer.paged_cache import PagedLatentCache
    from dsv3_jax.model import ModelCache, abstract_model, with_runtime

    if step not in ("prefill", "decode"):
        raise UserError(f"step={step!r}: choose 'prefill' or 'decode'.", key="step")
    if fp8_weights not in ("auto", "none", "w8a8", "weight_only"):
        raise UserError(f"fp8_weights={fp8_weights!r}: choose auto, none, w8a8 or weight_only.", key="fp8_weights")
    for name, v in (("batch", batch), ("context", context), ("prefill_len", prefill_len),
                    ("page_size", page_size), ("decode_steps", decode_steps)):
        if v < 1:
            raise UserError(f"{name}={v} must be >= 1.", key=name)
    chip, devices = topology_devices(topology)
    cfg = ModelConfig.from_dict(config.model)
    if context > cfg.max_position_embeddings:
        raise UserError(f"context={context} exceeds the model's max_position_embeddings "
                        f"({cfg.max_position_embeddings}).", key="context")
    mode = ("w8a8" if chip.peak_fp8 else None) if fp8_weights == "auto" else (
        None if fp8_weights == "none" else fp8_weights)
    with runtime.compiling_for(devices):
        mesh_cfg = config.mesh.to_dict()
        try:
            sizes = sharding.mesh_sizes(mesh_cfg, len(devices))
            sharding.validate_mesh(sizes, cfg, None, allow_uneven_stages=False)
        except ValueError as e:
            raise UserError(f"--aot={topology} ({len(devices)} devices): {e}", key="mesh") from None
        mesh = sharding.make_mesh(mesh_cfg, devices)
        rt = runtime.from_config(config, mesh).without_fp8_gemms().with_fp8_weights(mode)
        model = abstract_model(cfg, rt)
        eng_rt = rt.for_engine(paged_attention)
        graphdef, state = nnx.split(with_runtime(model, eng_rt))
        if step == "decode":
            graphdef = nnx.split(with_runtime(model, eng_rt.for_decode()))[0]
        state_sh = sharding.state_shardings(state, mesh)
        state = jax.tree.map(lambda s, v: v.replace(value=jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
                             state_sh, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        shards = math.prod(sizes[a] for a in sharding.BATCH_AXES)  # rows are split over the batch axes: the
        batch = -(-batch // shards) * shards  # engine pads a step's rows to a multiple of them (Engine._rows)
        width = -(-context // page_size)  # page-table entries per row
        pages = batch * width + 1  # every row's context, and the trash page
        dtype = jnp.dtype(cfg.compute_dtype)
        stack = lambda n: (jax.eval_shape(lambda: PagedLatentCache.zeros(cfg, pages, page_size, dtype, n))  # noqa
                           if n else None)
        pools = ModelCache(dense=stack(cfg.num_dense_layers), moe=stack(cfg.num_moe_layers), mtp=None)
        pools = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), pools,
                             pool_shardings(pools, mesh))
        from jax.sharding import NamedSharding, PartitionSpec

        rows = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))
        arr = lambda shape, dt=jnp.int32: jax.ShapeDtypeStruct(shape, dt, sharding=rows)  # noqa: E731
        table = arr((batch, width))
        sampling = (arr((batch,)), arr((batch,)), arr((batch,), jnp.float32), arr((batch,)),
                    arr((batch,), jnp.float32), arr((batch,), jnp.float32))  # seeds, index, temperature, top_k,
        # top_p, min_p
        abstract = abstract_model(cfg)
        if step == "decode":
            fn = engine_steps.decode_step
            args = (graphdef, decode_steps, 0, state, pools, table, arr((batch,)), arr((batch,)),
                    arr((batch,), jnp.bool_), *sampling)
            model_flops = decode_flops_per_token(abstract, context) * batch * decode_steps
        else:
            fn = engine_steps.prefill_step
            args = (graphdef, 0, state, pools, table, arr((batch, prefill_len)), arr((batch, prefill_len)),
                    arr((batch,)), arr((batch, prefill_len)), *sampling)
            model_flops = train_flops_per_token(abstract, prefill_len) / 3 * batch * prefill_len
        extra = {"step": step, "mesh": {k: v for k, v in sizes.items() if v > 1}, "batch": batch,
                 "context": context, "prefill_len": prefill_len if step == "prefill" else None,
                 "decode_steps": decode_steps if step == "decode" else None, "page_size": page_size,
                 "fp8_weights": mode, "paged_attention": eng_rt.paged_attention, "jax": jax.__version__}
        return compile_report(fn, args, topology=topology, chip=chip, devices=len(devices),
                              model_flops=model_flops, fp8=mode == "w8a8", extra=extra, mesh=mesh)
