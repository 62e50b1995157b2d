"""Prepared token shards: the on-disk format and its memory-mapped reading.

A prepared directory (written by `python -m dsv3_jax.data.prepare`) holds

    manifest.json        written last: {"format": "dsv3_jax.tokens/1", "dtype": "uint32", "eos_id": 1,
                         "vocab_size", "tokenizer_sha256", "documents", "tokens", "skipped",
                         "splits": {"train": {"tokens", "documents", "shards": [{"file", "tokens"}]}, "val": {...}}}
    tokenizer.json       the tokenizer the ids come from (its hash is the manifest's tokenizer_sha256)
    train-00000.bin ...  raw little-endian uint32 token ids, documents concatenated, each followed by eos
    val-00000.bin ...    the validation split (whole documents, chosen by a hash of their name)

A directory without manifest.json is not a prepared corpus (an interrupted preparation never is).

A split is read as one `TokenStream` over its memory-mapped shards (nothing read up front); the training
loader (`data/loader.py`, the same one that serves corpora prepared in memory) cuts it into windows of
seq_len + 1 tokens and shuffles them with grain. Packing, as DeepSeek-V3 trains: documents are
concatenated with eos between them and cut into windows with no regard for document boundaries, and
attention is not masked across documents.
"""
from __future__ import annotations

import json
import os

import numpy as np

from dsv3_jax.cli import UserError

FORMAT = "dsv3_jax.tokens/1"
MANIFEST = "manifest.json"
TOKEN_DTYPE = np.dtype("<u4")
SPLITS = ("train", "val")


def is_prepared(path: str) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, MANIFEST))


def read_manifest(directory: str) -> dict:
    """The manifest of a prepared directory, checked against the shard files (sizes), with the fix named."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            m = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg}); prepare the directory again") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise UserError(f"{path}: not a dsv3_jax token manifest (format {got!r}, expected {FORMAT!r}); write it "
                        f"with python -m dsv3_jax.data.prepare")
    for split in SPLITS:
        for shard in m["splits"][split]["shards"]:
            f = os.path.join(directory, shard["file"])
            want = shard["tokens"] * TOKEN_DTYPE.itemsize
            if not os.path.isfile(f) or os.path.getsize(f) != want:
                got = os.path.getsize(f) if os.path.isfile(f) else "missing"
                raise UserError(f"{f}: {got} bytes, the manifest says {want}; the prepared directory is damaged, "
                                f"prepare it again")
    return m


class TokenStream:
    """The concatenated token stream of one split, over its memory-mapped shards (nothing read up front)."""

    def __init__(self, directory: str, shards: list[dict]):
        self.maps = [np.memmap(os.path.join(directory, s["file"]), TOKEN_DTYPE, mode="r") for s in shards
                     if s["tokens"]]
        sizes = [len(m) for m in self.maps]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """tokens[start:stop] as int32 (a window may span two shards)."""
        out, i = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            base = int(self.starts[i])
            end = min(stop, int(self.starts[i + 1]))
            out.append(np.asarray(self.maps[i][start - base:end - base]))
            start, i = end, i + 1
        return np.concatenate(out).astype(np.int32) if out else np.zeros((0,), np.int32)
