"""Streaming converter: a released-format (HF safetensors) directory -> an orbax checkpoint of dsv3_jax.

    python -m dsv3_jax.interop.convert --hf DeepSeek-V3/ --out WORKDIR [--mesh fsdp=8,expert=4]
                                       [--dtype bfloat16] [--mtp auto|yes|no] [--keep_fp8] [--overwrite]

--keep_fp8 writes the projection and expert weights as float8_e4m3fn plus their float32 128x128 block
scales (`<leaf>_scale` arrays), the checkpoint's FP8 blocks byte for byte (a BF16 source is quantised),
in the orientation of dsv3_jax/fp8/resident.py; `restore` and `infer.py --checkpoint` then build the
model on FP8-resident weights. Everything else is written in --dtype as without it.

Memory: the 671B release is ~690 GB on disk and a peer converter that loads every shard needs
terabytes. Here nothing larger than one tensor is held: the checkpoint is planned from the
safetensors headers (layout.py), every destination array is created on disk with tensorstore, and
each HF tensor is read with pread, dequantised if FP8, transposed into our layout and written into its
slice (`leaf[layer]` or `leaf[layer, expert]`) before the next one is read. A tensor larger than
`--max_chunk_mib` (V3's 1.85 GB embedding and head, its 264 MB dense-MLP matrices) is read and
written in bands of rows instead. At most `--inflight` writes are pending at once, so peak memory is a
few bands whatever the model size (benchmarks/convert_memory.py measures it: doubling the layers
leaves peak RSS where it was).

Output format (WORKDIR looks like a train.py workdir at step 0):

    WORKDIR/tokenizer.json                  copied from the HF directory (when it has one)
    WORKDIR/checkpoints/0/_CHECKPOINT_METADATA
    WORKDIR/checkpoints/0/meta/metadata     JSON: {"format": "dsv3_jax.params", "config": <train config
                                            JSON (config_base + model section)>, "source": ..., "mesh": ...}
    WORKDIR/checkpoints/0/state/_METADATA   orbax PyTree metadata (use_ocdbt=false, zarr v2)
    WORKDIR/checkpoints/0/state/params.moe_layers.ffn.w_gate/   one zarr v2 array per leaf ('.'-joined path)
    WORKDIR/checkpoints/0/state/biases.moe_layers.ffn.bias/

The item `state` = {"params": <pure dict of nnx.Param>, "biases": <pure dict of RouterBias>} in exactly
the tree of `nnx.split(model, nnx.Param, RouterBias)`; it is the non-OCDBT layout that orbax itself
writes (and always reads back), so `dsv3_jax.train.checkpoint.Checkpointer.restore` reads it given a
target of that tree, onto any mesh. There is no optimizer state: restore {"params", "biases"} only
(`restore` below does; a trainer starting from these weights initialises its optimizer fresh).
Writing goes to `0.orbax-checkpoint-tmp-*` and is renamed into place at the end, as orbax does, so an
interrupted conversion never leaves a checkpoint that looks complete.

Chunks ("sharded for the given mesh"): each array is chunked as the intersection of the slice one HF
tensor (or row band) fills (1 along stacked layer/expert axes) and the shard one device holds under
`--mesh` (axis sizes for dsv3_jax.sharding's mesh axes data, stage, fsdp, expert, tensor), so every
write covers whole chunks and every device of that mesh reads only its own chunks.
"""
from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import shutil
import sys
import time

import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorstore as ts
from flax import nnx

from dsv3_jax import cli, sharding
from dsv3_jax import runtime as runtime_lib
from dsv3_jax.cli import UserError, parse_dtype
from dsv3_jax.config import ModelConfig
from dsv3_jax.config_base import base_config
from dsv3_jax.interop import layout as L
from dsv3_jax.interop.hf_checkpoint import Checkpoint, open_checkpoint
from dsv3_jax.interop.hf_config import read_config
from dsv3_jax.io.checkpoint import Checkpointer, weights_target
from dsv3_jax.io.tokenizer import TOKENIZER_FILENAME
from dsv3_jax.runtime import Runtime

FORMAT = "dsv3_jax.params"
_ZARR_DTYPES = {"float32": "<f4", "bfloat16": "bfloat16", "float16": "<f2", "float8_e4m3fn": "float8_e4m3fn"}
_HANDLERS = {
    "meta": "orbax.checkpoint._src.handlers.json_checkpoint_handler.JsonCheckpointHandler",
    "state": "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler",
}


def parse_mesh(text: str | None) -> dict[str, int]:
    """'fsdp=8,expert=4' -> {'fsdp': 8, 'expert': 4} (`sharding.parse_mesh`); the target mesh of a conversion
    is explicit (no -1: the converter does not know the devices it will be read on)."""
    sizes = sharding.parse_mesh(text or "")
    fill = [a for a, v in sizes.items() if v == -1]
    if fill:
        raise UserError(f"--mesh {text!r}: give every axis its size (the converter chunks for a mesh it does not "
                        f"run on, so {fill[0]}=-1 has no meaning here)")
    return sizes


def chunk_shape(shape, spec, n_indexed: int, mesh: dict[str, int]) -> list[int]:
    """1 along the `n_indexed` stacked axes, else the per-device shard extent of the dimension."""
    chunks = []
    for i, dim in enumerate(shape):
        if i < n_indexed:
            chunks.append(1)
            continue
        axes = spec[i] if i < len(spec) else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        parts = math.prod(mesh.get(a, 1) for a in axes)
        chunks.append(max(1, -(-dim // parts)))
    return chunks


# Our block dimension that the HF tensor's rows map onto, for the transforms that keep rows whole:
# such tensors are streamed in bands of rows when larger than `max_chunk_bytes`.
_ROW_DIM = {"copy": 0, "t": 1, "o": 2}


def row_band(piece: L.Piece, block, itemsize: int, max_chunk_bytes: int) -> tuple[int, int] | None:
    """(dimension of the leaf slice, rows per band) when `piece` is streamed in row bands, else None."""
    dim = _ROW_DIM.get(piece.kind)
    if dim is None or piece.select or piece.rows is not None or len(block) <= dim:
        return None
    row_bytes = math.prod(block) // block[dim] * itemsize
    rows = max(1, max_chunk_bytes // row_bytes)
    return (dim, rows) if rows < block[dim] else None


def _aligned(shard: int, cap: int) -> int:
    """Rows per band: the shard extent if it fits under `cap`, else its largest divisor in [cap/2, cap]
    (so bands tile each device's shard), else `cap`."""
    if shard <= cap:
        return shard
    return next((d for d in range(cap, cap // 2, -1) if shard % d == 0), cap)


def _leaf_name(path) -> str:
    return ".".join(str(k) for k in path)


def _train_config_json(cfg: ModelConfig) -> str:
    """The train.py config that infer/train code reads from checkpoint meta: defaults + this model."""
    c = base_config()
    model = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}
    rs = cfg.rope_scaling
    model["rope_scaling"] = {} if rs is None else {k: getattr(rs, k) for k in rs.__dataclass_fields__}
    c.model = ml_collections.ConfigDict(model)
    return c.to_json()


def convert(hf_dir: str, out_dir: str, *, mesh: dict[str, int] | None = None, dtype: str = "auto",
            mtp="auto", overwrite: bool = False, inflight: int = 2, max_chunk_bytes: int = 64 * 2**20,
            keep_fp8: bool = False, log=print) -> dict:
    """Convert `hf_dir` into `out_dir` (see the module docstring); returns a summary dict."""
    t0 = time.perf_counter()
    mesh = dict(mesh or {})
    out_dir = os.path.abspath(out_dir)
    check_output_dir(out_dir, overwrite)  # before reading anything: refuse what would destroy a user's work
    if dtype == "auto":
        raw = read_config(hf_dir)
        dtype = "float32" if (raw.get("torch_dtype") or raw.get("dtype")) == "float32" else "bfloat16"
    parse_dtype(dtype, "--dtype", ("float32", "bfloat16", "float16"))
    rt = runtime_lib.default().with_fp8_weights("w8a8") if keep_fp8 else None
    ck = open_checkpoint(hf_dir, mtp=mtp, dtype=dtype, param_dtype=dtype, runtime=rt)  # every check happens here
    if keep_fp8 and (ck.hf.fp8_block or (128, 128)) != (128, 128):
        raise UserError(f"--keep_fp8: {hf_dir} has weight_block_size={list(ck.hf.fp8_block)}; FP8-resident weights "
                        f"use the release's 128x128 blocks. Convert without --keep_fp8 (dequantised)")
    cfg = ck.config
    ckpt_root = os.path.join(out_dir, "checkpoints")
    final = os.path.join(ckpt_root, "0")
    tokenizer_plan = _tokenizer_plan(ck.path, out_dir)
    if os.path.exists(final):
        shutil.rmtree(final)  # only reached with --overwrite on a converter's own output (check_output_dir)
    for name in _leftovers(out_dir) or []:  # an interrupted conversion's temporary directories
        shutil.rmtree(os.path.join(ckpt_root, name))
    tmp = os.path.join(ckpt_root, f"0.orbax-checkpoint-tmp-{time.time_ns()}")
    os.makedirs(os.path.join(tmp, "state"))
    os.makedirs(os.path.join(tmp, "meta"))

    specs = L.leaf_specs(ck.params_state, ck.biases_state)
    first = {}
    for p in ck.plan.pieces:
        first.setdefault(p.leaf, p)
        if L.is_fp8_leaf(ck.plan.leaves[p.leaf]):
            first.setdefault(L.scale_leaf(p.leaf), p)  # scales are written with their weight
    fp8_leaves = {p for p, sds in ck.plan.leaves.items() if L.is_fp8_leaf(sds)}
    arrays, tree_md, bands = {}, {}, {}
    for path, sds in ck.plan.leaves.items():
        leaf_dtype = jnp.dtype(sds.dtype).name if path in fp8_leaves or path[0] == "biases" or \
            first[path].leaf != path else dtype
        n_idx = len(first[path].index)
        chunks = chunk_shape(sds.shape, specs[path], n_idx, mesh)
        band = None if first[path].leaf != path or path in fp8_leaves else \
            row_band(first[path], sds.shape[n_idx:], jnp.dtype(leaf_dtype).itemsize, max_chunk_bytes)
        if band is not None:  # chunk boundaries = band boundaries, so each band write fills whole chunks
            dim = n_idx + band[0]
            chunks[dim] = _aligned(chunks[dim], band[1])
            bands[path] = (band[0], chunks[dim])
        name = _leaf_name(path)
        arrays[path] = ts.open({
            "driver": "zarr",
            "kvstore": {"driver": "file", "path": os.path.join(tmp, "state", name)},
            "metadata": {"shape": list(sds.shape), "chunks": chunks, "dtype": _ZARR_DTYPES[leaf_dtype],
                         "compressor": {"id": "zstd", "level": 1}, "fill_value": None},
        }, create=True).result()
        tree_md[str(tuple(str(k) for k in path))] = {
            "key_metadata": [{"key": str(k), "key_type": 2} for k in path],
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": chunks},
        }

    pending, n_read, bytes_in = collections.deque(), 0, 0
    for piece in sorted(ck.plan.pieces, key=lambda p: ck.tensors.order(p.key)):
        leaf_dtype = np.float32 if piece.leaf[0] == "biases" else jnp.dtype(dtype)
        n_read += 1
        if piece.leaf in fp8_leaves:
            parts = _fp8_parts(ck, piece)
        else:
            parts = ((piece.leaf, where, x) for where, x in _piece_parts(ck, piece, bands.get(piece.leaf), leaf_dtype))
        for leaf, where, x in parts:
            bytes_in += x.nbytes
            pending.append(arrays[leaf][where].write(x) if where else arrays[leaf].write(x))
            del x
            while len(pending) > inflight:
                pending.popleft().result()
    while pending:
        pending.popleft().result()
    _check_aliases_streaming(ck, max_chunk_bytes, log)

    with open(os.path.join(tmp, "state", "_METADATA"), "w") as f:
        json.dump({"tree_metadata": tree_md, "use_ocdbt": False, "use_zarr3": False,
                   "store_array_data_equal_to_fill_value": True, "custom_metadata": None}, f)
    meta = {"format": FORMAT, "config": _train_config_json(cfg), "dtype": dtype, "mesh": mesh, "keep_fp8": keep_fp8,
            "tokenizer_files": tokenizer_plan,
            "source": {"hf": ck.path, "fp8": ck.hf.fp8_block is not None, "fused_experts": ck.fmt.fused_experts,
                       "rope_interleave": ck.fmt.rope_interleave, "mtp_layers": ck.fmt.mtp_layers}}
    with open(os.path.join(tmp, "meta", "metadata"), "w") as f:
        json.dump(meta, f)
    now = time.time_ns()
    with open(os.path.join(tmp, "_CHECKPOINT_METADATA"), "w") as f:
        json.dump({"item_handlers": _HANDLERS, "metrics": {}, "performance_metrics": {},
                   "init_timestamp_nsecs": now, "commit_timestamp_nsecs": now, "custom_metadata": {}}, f)
    os.replace(tmp, final)  # atomic on one file system: the checkpoint appears complete or not at all
    copied = _copy_tokenizer_files(ck.path, out_dir, tokenizer_plan)
    summary = {"tensors": n_read, "arrays": len(arrays), "bytes": bytes_in, "seconds": time.perf_counter() - t0,
               "checkpoint": final, "tokenizer": copied, "mtp_layers": ck.fmt.mtp_layers}
    log(f"converted {ck.path} -> {final}: {n_read} tensors into {len(arrays)} arrays, {bytes_in / 2**30:.2f} GiB "
        f"({dtype}{', projections and experts FP8-resident' if keep_fp8 else ''}) in {summary['seconds']:.1f}s"
        + ("" if copied else "; no tokenizer.json to copy"))
    return summary


def _converted_meta(out_dir: str) -> dict | None:
    """The meta of a finished conversion in `out_dir` (checkpoints/0 with our format), else None."""
    try:
        with open(os.path.join(out_dir, "checkpoints", "0", "meta", "metadata")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _leftovers(out_dir: str) -> list[str] | None:
    """The temporary directories of an interrupted conversion when checkpoints/ holds nothing else."""
    root = os.path.join(out_dir, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    tmp = [n for n in names if n.startswith("0.orbax-checkpoint-tmp-")]
    return tmp if names and len(tmp) == len(names) else None


def check_output_dir(out_dir: str, overwrite: bool) -> None:
    """Refuse a train.py workdir always, and any other non-empty directory unless --overwrite was given
    and the directory holds a previous (finished or interrupted) output of this converter."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {out_dir} is a file; pass a new or empty directory")
    entries = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if not entries:
        return
    ours = _converted_meta(out_dir) is not None
    interrupted = not ours and _leftovers(out_dir) is not None
    trained = (os.path.exists(os.path.join(out_dir, "metrics.jsonl")) or
               (os.path.isdir(os.path.join(out_dir, "checkpoints")) and not ours and not interrupted))
    if trained:
        raise UserError(f"--out {out_dir} is a train.py workdir (it holds a training run's checkpoints or "
                        f"metrics); converting into it would replace them. Pass a new or empty directory")
    if not overwrite:
        what = ("a previous conversion" if ours else "an interrupted conversion" if interrupted
                else f"{len(entries)} entries ({', '.join(entries[:4])}...)")
        raise UserError(f"--out {out_dir} is not empty (it holds {what}); pass a new or empty directory, or "
                        f"--overwrite to replace a previous conversion")
    if not (ours or interrupted):
        raise UserError(f"--out {out_dir} is not empty and was not written by this converter "
                        f"({', '.join(entries[:4])}); --overwrite replaces only a previous conversion. "
                        f"Pass a new or empty directory")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tokenizer_plan(src: str, out_dir: str) -> dict[str, str]:
    """Tokenizer files to copy from `src` -> their sha256. A file already in `out_dir` that differs is
    replaced only if this converter wrote it (its sha256 is the one the previous conversion recorded; a
    conversion from before the record existed counts as having written it); otherwise an error."""
    names = [n for n in (TOKENIZER_FILENAME, "tokenizer_config.json") if os.path.isfile(os.path.join(src, n))]
    meta = _converted_meta(out_dir)
    recorded = meta.get("tokenizer_files") if meta is not None else None
    plan = {}
    for name in names:
        plan[name] = _sha256(os.path.join(src, name))
        dst = os.path.join(out_dir, name)
        if not os.path.exists(dst) or _sha256(dst) == plan[name]:
            continue
        ours = meta is not None and (not isinstance(recorded, dict) or recorded.get(name) == _sha256(dst))
        if not ours:
            raise UserError(f"{dst} exists, differs from {os.path.join(src, name)} and was not written by the "
                            f"converter; move it away first (it is never replaced)")
    return plan


def _copy_tokenizer_files(src: str, dst: str, plan: dict[str, str]) -> list[str]:
    for name in plan:
        tmp = os.path.join(dst, name + ".tmp")
        shutil.copyfile(os.path.join(src, name), tmp)
        os.replace(tmp, os.path.join(dst, name))
    return list(plan)


def _piece_parts(ck: Checkpoint, piece: L.Piece, band, dtype):
    """(index into the leaf, array) pairs for one piece: the whole slice, or bands of HF rows."""
    if band is None:
        yield piece.index, ck.read_piece(piece, dtype)
        return
    dim, rows = band
    block = ck.plan.leaves[piece.leaf].shape[len(piece.index):]
    qblock = ck.hf.fp8_block or (128, 128)
    for r0 in range(0, block[dim], rows):
        r1 = min(r0 + rows, block[dim])
        x = ck.tensors.read(piece.key, (), (r0, r1), qblock)
        part = tuple(r1 - r0 if i == dim else n for i, n in enumerate(block))
        y = np.asarray(L.to_ours(x, piece.kind, part, ck.config, ck.fmt), dtype=dtype)
        yield piece.index + (slice(None),) * dim + (slice(r0, r1),), y


def _fp8_parts(ck: Checkpoint, piece: L.Piece):
    """(leaf, index, array) writes of one FP8-resident piece: its e4m3 values and its block scales."""
    q, scale = ck.read_fp8_piece(piece)
    block = ck.plan.leaves[piece.leaf].shape[len(piece.index):]
    yield piece.leaf, piece.index, L.to_ours_fp8(q, piece.kind, block, ck.config, ck.fmt)
    yield L.scale_leaf(piece.leaf), piece.index, scale


def _digest(ck: Checkpoint, key: str, max_bytes: int) -> str:
    """blake2b of a tensor's stored bytes, read in bands of at most `max_bytes`."""
    h, shape = hashlib.blake2b(digest_size=16), ck.tensors.shape(key)
    rows = max(1, max_bytes // max(1, math.prod(shape[1:]) * 4)) if shape else 1
    for r0 in range(0, shape[0] if shape else 1, rows):
        x = ck.tensors.read_raw(key, (), (r0, min(r0 + rows, shape[0]))) if shape else ck.tensors.read_raw(key)
        h.update(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def _check_aliases_streaming(ck: Checkpoint, max_bytes: int, log):
    """MTP embed/head copies must equal the main tensors (compared by digest, band by band)."""
    digests = {}
    for a in ck.plan.aliases:
        if a.source not in digests:
            digests[a.source] = _digest(ck, a.source, max_bytes)
        if _digest(ck, a.key, max_bytes) != digests[a.source]:
            log(f"warning: {a.key} differs from {a.source}; the MTP module shares the main tensor")


# ---------------------------------------------------------------------- restore

def fp8_runtime(meta: dict, runtime: Runtime | None, fp8_mode: str = "w8a8") -> Runtime | None:
    """The runtime a converted checkpoint restores under: FP8-resident weights (in `fp8_mode`) when it was
    written with --keep_fp8, else `runtime` as given (which must not expect FP8-resident weights)."""
    if meta.get("keep_fp8"):
        return (runtime or runtime_lib.default()).with_fp8_weights(fp8_mode)
    if runtime is not None and runtime.fp8_weights:
        raise UserError("this checkpoint holds float weights (converted without --keep_fp8); convert it again with "
                        "--keep_fp8 to serve FP8-resident weights")
    return runtime


def restore(workdir: str, *, dtype=None, mesh=None, step: int | None = None, runtime: Runtime | None = None,
            fp8_mode: str = "w8a8", **overrides):
    """(ModelConfig, DeepSeekV3) from a converted WORKDIR; `mesh` (a jax Mesh) places each parameter
    with its dsv3_jax.sharding sharding, read straight into that sharding. `runtime`: how the model runs
    (default: this backend, no mesh). A --keep_fp8 conversion restores onto FP8-resident weights whose
    GEMMs run in `fp8_mode` ('w8a8' | 'weight_only')."""
    ckdir = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(ckdir):
        raise FileNotFoundError(f"{workdir} has no checkpoints/: convert one with "
                                f"`python -m dsv3_jax.interop.convert --hf DIR --out {workdir}`")
    found = {}

    def target(meta):
        if meta.get("format") != FORMAT:
            raise UserError(f"{ckdir} is not a converted checkpoint (meta format {meta.get('format')!r}); use "
                            f"dsv3_jax.infer.load.load_trained for train.py runs")
        config = ml_collections.ConfigDict(json.loads(meta["config"]))
        cfg = ModelConfig.from_dict(config.model)
        if dtype is not None:
            overrides.update(dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(dtype).name)
        cfg = cfg.replace(**overrides) if overrides else cfg
        rt = fp8_runtime(meta, runtime, fp8_mode)
        graphdef, abstract = weights_target(cfg, rt, mesh)
        found.update(cfg=cfg, graphdef=graphdef)
        return abstract

    with Checkpointer(ckdir, async_save=False) as ckpt:
        got = ckpt.load(target, step)
    if got is None:
        raise FileNotFoundError(f"no finalized checkpoint in {ckdir}")
    _, state, _ = got
    return found["cfg"], nnx.merge(found["graphdef"], state["params"], state["biases"])


# ---------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="python -m dsv3_jax.interop.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", required=True, help="released-format directory (config.json, *.safetensors)")
    p.add_argument("--out", required=True, help="output workdir (checkpoints/0 and tokenizer.json go here)")
    p.add_argument("--mesh", default="", help="target mesh for chunking, e.g. fsdp=8,expert=4 (default: none)")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (float32 sources stay "
                                                   "float32, others become bfloat16)")
    p.add_argument("--mtp", default="auto", choices=("auto", "yes", "no"), help="convert the MTP layers")
    p.add_argument("--inflight", type=int, default=2, help="tensor writes pending at once (memory vs overlap)")
    p.add_argument("--max_chunk_mib", type=int, default=64,
                   help="tensors larger than this are streamed in bands of rows (and chunked to match)")
    p.add_argument("--keep_fp8", action="store_true", help="keep projection and expert weights in FP8 with their "
                                                           "128x128 block scales (a BF16 source is quantised)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous conversion in WORKDIR (never a "
                                                            "train.py workdir or files the converter did not write)")
    p.add_argument("--verbose", action="store_true", help="print the traceback of a user error too")

    def run():
        args = p.parse_args(argv)
        mtp = {"auto": "auto", "yes": True, "no": False}[args.mtp]
        convert(args.hf, args.out, mesh=parse_mesh(args.mesh), dtype=args.dtype, mtp=mtp, overwrite=args.overwrite,
                inflight=args.inflight, max_chunk_bytes=args.max_chunk_mib * 2**20, keep_fp8=args.keep_fp8)

    return cli.call(run, "convert", argv)


if __name__ == "__main__":
    sys.exit(main())
