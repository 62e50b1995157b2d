"""Prepared token shards: the on-disk format, memory-mapped reading, and the grain loader.

A prepared directory (written by `python -m dsv3_jax.data.prepare`) holds

    manifest.json        written last: {"format": "dsv3_jax.tokens/1", "dtype": "uint32", "eos_id": 1,
                         "vocab_size", "tokenizer_sha256", "documents", "tokens", "skipped",
                         "splits": {"train": {"tokens", "documents", "shards": [{"file", "tokens"}]}, "val": {...}}}
    tokenizer.json       the tokenizer the ids come from (its hash is the manifest's tokenizer_sha256)
    train-00000.bin ...  raw little-endian uint32 token ids, documents concatenated, each followed by eos
    val-00000.bin ...    the validation split (whole documents, chosen by a hash of their name)

A directory without manifest.json is not a prepared corpus (an interrupted preparation never is).

Packing, as DeepSeek-V3 trains: documents are concatenated with eos between them and cut into windows of
seq_len + 1 tokens with no regard for document boundaries, and attention is not masked across documents.

Loading (`ShardLoader`): window k of a split is tokens [k (seq_len + 1), (k + 1)(seq_len + 1)) of the
split's concatenated stream, read from the memory-mapped shards (`WindowSource`, a grain random-access
source). `grain.MapDataset.source(...).shuffle(seed)` maps a global position p to the window of epoch
p // n_windows under that epoch's permutation, so the loader's whole state is one integer (the next
position): a resumed run continues with exactly the batches of the uninterrupted one, whatever the batch
size of each step. A batch is a `LazyRows` of positions; only the rows a process asks for are read
(`sharding.put_global_batch` asks for this process's devices' rows), so on many hosts each reads its own
part of the global batch, and the global batch at a step never depends on the number of hosts.
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


class WindowSource:
    """grain random-access source: window k = tokens [k w, (k + 1) w) of a split, w = seq_len + 1."""

    def __init__(self, stream: TokenStream, window: int):
        self.stream, self.window = stream, window
        self.n = len(stream) // window

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> np.ndarray:
        k = int(k)
        return self.stream.read(k * self.window, (k + 1) * self.window)


class LazyRows:
    """A global batch [B, seq_len + 1] whose rows are read only when indexed (np.asarray reads them all)."""

    def __init__(self, dataset, positions: np.ndarray, window: int):
        self.dataset, self.positions = dataset, positions
        self.shape, self.dtype, self.ndim = (len(positions), window), np.dtype(np.int32), 2

    def rows(self, which) -> np.ndarray:
        picked = self.positions[which]
        return np.stack([self.dataset[int(p)] for p in np.atleast_1d(picked)])

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        rows = self.rows(index[0])
        return rows[(slice(None),) + tuple(index[1:])] if len(index) > 1 else rows

    def __array__(self, dtype=None, copy=None):
        a = self.rows(slice(None))
        return a if dtype is None else a.astype(dtype)

    def __len__(self) -> int:
        return self.shape[0]


class ShardLoader:
    """Shuffled, resumable batches of windows from a prepared split, through grain (see the module docstring).
    Same interface as `train.data.TokenLoader`: next_batch(B), state(), restore(state), n_windows."""

    def __init__(self, stream: TokenStream, seq_len: int, seed: int = 0):
        self.window, self.seq_len, self.seed = seq_len + 1, seq_len, int(seed)
        source = WindowSource(stream, self.window)
        self.n_windows = len(source)
        if self.n_windows == 0:
            raise UserError(f"the prepared train split has {len(stream)} tokens, fewer than one window of "
                            f"seq_len+1={self.window}; prepare more data or lower train.seq_len")
        import grain  # here, not at import: the format's readers and the preparation workers need no JAX

        self.dataset = grain.MapDataset.source(source).shuffle(seed=self.seed)
        self.position = 0

    def next_batch(self, batch_size: int) -> LazyRows:
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        positions = np.arange(self.position, self.position + batch_size, dtype=np.int64)
        self.position += batch_size
        return LazyRows(self.dataset, positions, self.window)

    @property
    def epoch(self) -> int:
        return self.position // self.n_windows

    def state(self) -> dict:
        return {"position": int(self.position), "n_windows": int(self.n_windows), "seed": self.seed}

    def restore(self, state: dict) -> None:
        if "position" not in state:
            raise UserError(f"loader state {state!r} was written for in-memory text, not a prepared directory")
        if int(state.get("n_windows", self.n_windows)) != self.n_windows:
            raise UserError(f"loader state was saved for {state['n_windows']} windows, this corpus has "
                            f"{self.n_windows} (another prepared directory or seq_len)")
        self.position = int(state["position"])
