"""Streaming safetensors I/O and DeepSeek's 128x128 block-scaled FP8 weights, in plain numpy.

The safetensors format is small enough to read by hand, and doing so lets us control memory:

    [8 bytes: little-endian u64 n] [n bytes: JSON header] [raw tensor bytes ...]
    header = {"name": {"dtype": "BF16", "shape": [out, in], "data_offsets": [begin, end]}, ...,
              "__metadata__": {...}}          (offsets are relative to the end of the header)

A released checkpoint is a directory of such files plus `model.safetensors.index.json`, whose
"weight_map" says which file holds each tensor. `SafetensorsDir` parses every header once and then
reads tensors with `os.pread`, so reading a tensor costs exactly its bytes of memory. (The
`safetensors` package maps whole files into memory: every page touched stays in the process's RSS
until the file is closed, so streaming a 4 GB shard would hold 4 GB. Its numpy backend also cannot
return float8 tensors.) Reads may select a leading index and a row range, e.g. expert `e`'s gate half
`[e, 0:F]` of a fused `gate_up_proj` [E, 2F, D], which is one contiguous byte range in row-major order.

FP8 (REFERENCE.md section 5): a projection weight W [out, in] is stored as `F8_E4M3` values q plus
`<name>_scale_inv` s of shape [ceil(out/128), ceil(in/128)] in float32, with

    W[i, j] = float(q[i, j]) * s[i // 128, j // 128]          (edge blocks are partial)

`dequantize_blocks` applies this (also to a row range of a larger tensor, offsetting the block
index). Writing FP8 uses the package's one block quantiser, `dsv3_jax.fp8.quant.quantize_blocks`:
per block s = max(max|W|, 1e-4) / 448 (448: the largest finite E4M3 value), q = round_to_e4m3(W / s).

`write_shards` writes tensors into files of at most `max_shard_bytes` each (plus the index when there
is more than one), producing each tensor's bytes only when its turn comes: the caller passes shapes,
dtypes and a function per tensor, so writing never holds more than one tensor.
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from typing import NamedTuple

import ml_dtypes
import numpy as np

from dsv3_jax.cli import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


class TensorInfo(NamedTuple):
    file: str  # absolute path of the safetensors file
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the tensor's data in `file`


MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit on the JSON header
LFS_POINTER = b"version https://git-lfs.github.com/spec/"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def read_header(path: str) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo for one safetensors file (reads only the header), validated.

    Refused with a UserError naming the file: a git-lfs pointer in place of the weights, a header
    length beyond the file or the format's 100 MB limit, a header that is not a JSON object of
    tensors, a tensor whose `data_offsets` span differs from shape x itemsize, lies outside the file
    or overlaps another tensor, an unknown dtype. Nothing that passes can be read wrong silently.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if head.startswith(LFS_POINTER[:8]) and (head + f.read(len(LFS_POINTER) - 8)).startswith(LFS_POINTER):
            raise UserError(f"{path} is a git-lfs pointer file ({size} bytes), not the weights; run `git lfs pull` "
                            f"in {os.path.dirname(path)} (or download the file itself)")
        if len(head) != 8:
            raise UserError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise UserError(f"{path}: the header length field says {n} bytes but the file has {size}"
                            f"{' (the format allows at most 100 MB)' if n > MAX_HEADER_BYTES else ''}; the file is "
                            f"truncated or not safetensors: download it again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: unreadable safetensors header ({e}); the file is damaged: download it again") \
                from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: the safetensors header is not a JSON object; the file is damaged")
    out, spans = {}, []
    data_bytes = size - 8 - n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not (isinstance(meta, dict) and {"dtype", "shape", "data_offsets"} <= set(meta)):
            raise UserError(f"{where}: header entry needs dtype, shape and data_offsets; the file is damaged")
        dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
        if dtype not in DTYPES:
            raise UserError(f"{where} has unsupported dtype {dtype!r} (known: {', '.join(DTYPES)})")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise UserError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise UserError(f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
        begin, end = offsets
        want = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != want:
            raise UserError(f"{where}: data_offsets span {end - begin} bytes but shape {tuple(shape)} x {dtype} "
                            f"needs {want}; the header is inconsistent: the file is damaged")
        if end > data_bytes:
            raise UserError(f"{where}: data ends at byte {8 + n + end} but the file has {size} bytes; the file is "
                            f"truncated: download it again")
        spans.append((begin, end, name))
        out[name] = TensorInfo(path, dtype, tuple(shape), 8 + n + begin)
    spans.sort()
    for (b0, e0, a), (b1, e1, b) in zip(spans, spans[1:]):
        if b1 < e0:
            raise UserError(f"{path}: tensors {a!r} and {b!r} overlap (bytes {b0}-{e0} and {b1}-{e1}); the header is "
                            f"damaged")
    return out


class SafetensorsDir:
    """All tensors of a checkpoint directory (one file, or shards with an index), read on demand."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        index = os.path.join(self.directory, INDEX_FILE)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{index}: not a valid index ({type(e).__name__}: {e}); it needs a "
                                f'"weight_map" object from tensor name to file name') from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(n for n in os.listdir(self.directory) if n.endswith(".safetensors"))
            weight_map = None
        if not files:
            pickles = sorted(n for n in os.listdir(self.directory) if n.endswith(PICKLE_SUFFIXES))
            if pickles:
                raise UserError(f"{self.directory} holds {', '.join(pickles[:3])} (PyTorch pickles) and no "
                                f"*.safetensors; dsv3_jax never opens pickles: convert them to safetensors first")
            raise UserError(f"no *.safetensors files in {self.directory}")
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            path = os.path.join(self.directory, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{INDEX_FILE} names {name}, which is not in {self.directory}")
            for key, info in read_header(path).items():
                if key in self.tensors:
                    raise UserError(f"tensor {key!r} is stored twice: in {self.tensors[key].file} and {path}")
                self.tensors[key] = info
        if weight_map is not None:
            unlisted = sorted(set(self.tensors) - set(weight_map))
            absent = sorted(set(weight_map) - set(self.tensors))
            if absent:
                raise UserError(f"{INDEX_FILE} lists tensors that no file holds: {absent[:5]}")
            if unlisted:
                raise UserError(f"tensors missing from {INDEX_FILE}'s weight_map: {unlisted[:5]}")

    def language_model(self, prefixes: tuple[str, ...], skipped: tuple[str, ...]) -> list[str]:
        """Keep only a multimodal checkpoint's language model, named as a text-only checkpoint names it: a key under
        one of `prefixes` loses it ('language_model.model.layers.0...' -> 'model.layers.0...', 'language_model.lm_head'
        -> 'lm_head', 'model.language_model.norm' -> 'model.norm'); keys under `skipped` (the other towers) are
        dropped and returned. Anything else stays as it is (and the plan's check names it)."""
        out, dropped = {}, []
        for key, info in self.tensors.items():
            if key.startswith(skipped):
                dropped.append(key)
                continue
            for p in prefixes:
                if key.startswith(p):
                    rest = key[len(p):]
                    key = rest if rest.startswith(("model.", "lm_head.")) else (
                        "model." + rest if p.endswith("model.") else rest)
                    break
            if key in out:
                raise UserError(f"tensor {key!r} is stored twice under the language model's prefixes {prefixes}")
            out[key] = info
        self.tensors = out
        return dropped

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape

    def order(self, key: str) -> tuple[str, int]:
        """Sort key that visits tensors in on-disk order (file, offset): sequential reads."""
        info = self.tensors[key]
        return info.file, info.offset

    def read_raw(self, key: str, select: tuple[int, ...] = (), rows: tuple[int, int] | None = None) -> np.ndarray:
        """tensor[select][rows[0]:rows[1]] in its stored dtype; the selection must be contiguous on disk."""
        info = self.tensors[key]
        dt = DTYPES[info.dtype]
        shape = info.shape
        if len(select) + (rows is not None) > len(shape):
            raise UserError(f"{key}: cannot select {select} rows {rows} of a tensor of shape {shape}")
        start = 0
        for i, s in enumerate(select):
            if not 0 <= s < shape[i]:
                raise IndexError(f"{key}: index {select} out of range for shape {shape}")
            start = start * shape[i] + s
        rest = shape[len(select):]
        if rows is not None:
            r0, r1 = rows
            if not 0 <= r0 <= r1 <= rest[0]:
                raise IndexError(f"{key}: rows {rows} out of range for shape {shape}")
            row_elems = math.prod(rest[1:])
            start = start * math.prod(rest) + r0 * row_elems
            out_shape = (r1 - r0,) + tuple(rest[1:])
        else:
            start *= math.prod(rest)
            out_shape = tuple(rest)
        nbytes = math.prod(out_shape) * dt.itemsize
        buf = bytearray(nbytes)
        view, done, where = memoryview(buf), 0, info.offset + start * dt.itemsize
        with open(info.file, "rb", buffering=0) as f:
            while done < nbytes:  # one pread may return less than asked for (large reads)
                got = os.preadv(f.fileno(), [view[done:]], where + done)
                if got == 0:
                    raise UserError(f"{info.file}: truncated data for tensor {key!r}")
                done += got
        return np.frombuffer(buf, dtype=dt).reshape(out_shape)

    def read(self, key: str, select: tuple[int, ...] = (), rows: tuple[int, int] | None = None,
             block: tuple[int, int] = (128, 128)) -> np.ndarray:
        """Like `read_raw`, but FP8 tensors come back dequantised to float32 with their `_scale_inv`."""
        x = self.read_raw(key, select, rows)
        if self.tensors[key].dtype not in FP8_DTYPES:
            return x
        skey = key + SCALE_SUFFIX
        if skey not in self.tensors:
            raise UserError(f"{key} is stored as {self.tensors[key].dtype} but {skey} is missing")
        r0 = 0 if rows is None else rows[0]
        r1 = self.tensors[key].shape[len(select)] if rows is None else rows[1]
        scale_rows = (r0 // block[0], -(-r1 // block[0]))
        scale = self.read_raw(skey, select, scale_rows).astype(np.float32)
        return dequantize_blocks(x, scale, block, row_offset=r0)


def dequantize_blocks(q: np.ndarray, scale_inv: np.ndarray, block=(128, 128), row_offset: int = 0) -> np.ndarray:
    """W = q * scale_inv[i // bm, j // bn] for a [rows, cols] slice starting at row `row_offset` (float32).

    `scale_inv` holds the scale rows covering the slice: its row 0 is block row `row_offset // bm`.
    """
    bm, bn = block
    rows, cols = q.shape
    if scale_inv.ndim != 2:
        raise UserError(f"FP8 scale_inv must be 2-D per tensor, got shape {scale_inv.shape}")
    i = (np.arange(rows) + row_offset) // bm - row_offset // bm  # block row of each row, within scale_inv
    j = np.arange(cols) // bn
    if (rows and i[-1] >= scale_inv.shape[0]) or (cols and j[-1] >= scale_inv.shape[1]):
        raise UserError(f"FP8 scale_inv of shape {scale_inv.shape} does not cover a {q.shape} weight in "
                        f"{bm}x{bn} blocks")
    return q.astype(np.float32) * scale_inv[i][:, j]


class PlannedTensor(NamedTuple):
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]  # called once, when the tensor's bytes are written


def write_shards(directory: str, tensors: Iterable[PlannedTensor], max_shard_bytes: int,
                 metadata: dict | None = None) -> list[str]:
    """Write `tensors` (in order) into safetensors files of at most `max_shard_bytes`; returns file names.

    One file is named model.safetensors; several are model-0000i-of-0000n.safetensors plus
    model.safetensors.index.json. Each tensor is produced, checked against its planned shape and
    dtype, written and dropped before the next one is produced.
    """
    tensors = list(tensors)
    groups, size = [[]], 0
    for t in tensors:
        nbytes = math.prod(t.shape) * np.dtype(t.dtype).itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += nbytes
    n = len(groups)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for name, group in zip(names, groups):
        header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
        for t in group:
            nbytes = math.prod(t.shape) * np.dtype(t.dtype).itemsize
            header[t.name] = {"dtype": DTYPE_NAMES[np.dtype(t.dtype)], "shape": list(t.shape),
                              "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[t.name] = name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the reference writer does
        path = os.path.join(directory, name)
        with open(path + ".tmp", "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for t in group:
                x = np.ascontiguousarray(t.produce())
                if x.shape != tuple(t.shape) or x.dtype != np.dtype(t.dtype):
                    raise AssertionError(f"{t.name}: produced {x.shape} {x.dtype}, planned {t.shape} {t.dtype}")
                f.write(x.reshape(-1).view(np.uint8).data)  # no copy of the tensor's bytes
        os.replace(path + ".tmp", path)
    if n > 1:
        total = sum(math.prod(t.shape) * np.dtype(t.dtype).itemsize for t in tensors)
        with open(os.path.join(directory, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names
