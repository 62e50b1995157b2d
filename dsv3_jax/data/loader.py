"""The one training loader: shuffled, resumable batches of token windows, through grain, for every source.

A source is a token stream: ``len(stream)`` tokens and ``stream.read(start, stop)`` -> int32. Two kinds
exist: the memory-mapped shards of a prepared directory (`shards.TokenStream`) and an array in memory
(`ArrayStream`: a small corpus, or the embedded demo corpus, prepared in memory by `data/build.py`).
Window k is tokens [k w, (k + 1) w) of the stream, w = seq_len + 1 (`WindowSource`, a grain
random-access source); a window gives inputs w[:-1] and next-token targets w[1:]; trailing tokens that
do not fill a window are unused. Packing is DeepSeek-V3's: documents are concatenated with eos between
them and cut into windows with no regard for document boundaries.

Order. The loader reads global positions 0, 1, 2, ...; position p is a window of epoch p // n_windows,
and every epoch visits every window once. Which window is a grain `MapDataset` transformation over
`MapDataset.source(WindowSource)`, chosen by the source:

- ``"permutation"`` (in memory): epoch e visits the windows in the order
  ``np.random.default_rng([seed, e]).permutation(n_windows)`` (`EpochPermutation`). It holds one int64
  per window, small next to the tokens already in memory. This is the order text runs have always had,
  so their batches (and losses) are those of earlier versions.
- ``"shuffle"`` (prepared shards): grain's own ``.shuffle(seed)``, a seeded bijection per epoch computed
  index by index, O(1) memory however many windows (a permutation table of 10^9 windows would be 8 GB
  on every host).

State. The order is a pure function of (seed, position), so the loader's whole state is the next
position: ``state()`` = ``{"position", "n_windows", "seed", "order"}`` (plain JSON), saved with every
checkpoint; a restored loader continues with exactly the batches of the uninterrupted one, whatever the
batch size of each step (a batch-size ramp). A checkpoint written before the loaders were one holds
``{"epoch", "index"}`` (the in-memory loader's): that is position ``epoch * n_windows + index``.

Batches. ``next_batch(B)`` is a `LazyRows` of B positions; only the rows a process asks for are read
(`sharding.put_global_batch` asks for this process's devices' rows), so on many hosts each reads its own
part of the global batch, and the global batch at a step never depends on the number of hosts.
`val_batches` cuts the validation split into fixed sequential batches.
"""
from __future__ import annotations

import grain
import numpy as np

from dsv3_jax.cli import UserError

ORDERS = ("permutation", "shuffle")


class ArrayStream:
    """A token stream held in memory (the same interface as the memory-mapped `shards.TokenStream`)."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = np.asarray(tokens, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.tokens)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.tokens[start:stop]


class WindowSource:
    """grain random-access source: window k = tokens [k w, (k + 1) w) of a stream, w = seq_len + 1."""

    def __init__(self, stream, window: int, transform=None):
        self.stream, self.window, self.transform = stream, window, transform
        self.n = len(stream) // window

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> np.ndarray:
        k = int(k)
        w = self.stream.read(k * self.window, (k + 1) * self.window)
        return w if self.transform is None else self.transform(w)


class EpochPermutation(grain.MapDataset):
    """Position p -> element ``default_rng([seed, e]).permutation(n)[p % n]`` of epoch e = p // n (the last two
    epochs' permutations are kept: a batch may straddle an epoch boundary)."""

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self.seed = int(seed)
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.parents[0])

    def __str__(self) -> str:
        return f"EpochPermutation(seed={self.seed})"

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self))
        return self._orders[epoch]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        n = len(self)
        epoch, i = divmod(int(index), n)
        return self.parents[0][int(self.order(epoch)[i]) + epoch * n]


class LazyRows:
    """A global batch [B, seq_len + 1] whose rows are read only when indexed (np.asarray reads them all)."""

    def __init__(self, dataset, positions: np.ndarray, window: int):
        self.dataset, self.positions = dataset, positions
        self.shape, self.dtype, self.ndim = (len(positions), window), np.dtype(np.int32), 2

    def rows(self, which) -> np.ndarray:
        picked = self.positions[which]
        return np.stack([self.dataset[int(p)] for p in np.atleast_1d(picked)])

    def __getitem__(self, index):  # numpy's semantics: batch[i] is a row, batch[a:b, :-1] a 2-D array
        first, rest = (index[0], tuple(index[1:])) if isinstance(index, tuple) else (index, ())
        rows = self.rows(first)
        if np.ndim(self.positions[first]) == 0:
            return rows[0][rest] if rest else rows[0]
        return rows[(slice(None),) + rest] if rest else rows

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __array__(self, dtype=None, copy=None):
        a = self.rows(slice(None))
        return a if dtype is None else a.astype(dtype)

    def __len__(self) -> int:
        return self.shape[0]


class TokenLoader:
    """Shuffled, resumable batches of windows from a token stream (see the module docstring): next_batch(B),
    state(), restore(state), epoch, n_windows. `stream` may be a plain array (held in memory)."""

    def __init__(self, stream, seq_len: int, seed: int = 0, order: str = "permutation", transform=None):
        if seq_len < 1:
            raise UserError(f"seq_len must be >= 1, got {seq_len}")
        if seed < 0 or (order == "shuffle" and seed >= 2 ** 32):
            raise UserError(f"seed must be >= 0 (and < 2**32 for a prepared directory), got {seed}")
        if order not in ORDERS:
            raise UserError(f"loader order {order!r}: choose one of {', '.join(ORDERS)}")
        if not hasattr(stream, "read"):
            stream = ArrayStream(stream)
        self.window, self.seq_len, self.seed, self.order = seq_len + 1, seq_len, int(seed), order
        source = WindowSource(stream, self.window, transform)  # transform: each window as read (document starts)
        self.n_windows = len(source)
        if self.n_windows == 0:
            raise UserError(f"the train split has {len(stream)} tokens, fewer than one window of "
                            f"seq_len+1={self.window}; use more data or a smaller train.seq_len")
        windows = grain.MapDataset.source(source)
        self.dataset = EpochPermutation(windows, self.seed) if order == "permutation" else windows.shuffle(self.seed)
        self.position = 0

    def next_batch(self, batch_size: int) -> LazyRows:
        """The next ``[batch_size, seq_len + 1]`` int32 windows (inputs ``[:, :-1]``, targets ``[:, 1:]``)."""
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        positions = np.arange(self.position, self.position + batch_size, dtype=np.int64)
        self.position += batch_size
        return LazyRows(self.dataset, positions, self.window)

    @property
    def epoch(self) -> int:
        return self.position // self.n_windows

    def state(self) -> dict:
        """The loader position and what it is a position in, as plain JSON values."""
        return {"position": int(self.position), "n_windows": int(self.n_windows), "seed": self.seed,
                "order": self.order}

    def restore(self, state: dict) -> None:
        """Continue from a `state()` of a loader over the same windows and seed (or an old {"epoch", "index"})."""
        if "position" not in state and {"epoch", "index"} <= set(state):  # the in-memory loader's, before
            epoch, index = int(state["epoch"]), int(state["index"])
            if epoch < 0 or not 0 <= index < self.n_windows:
                raise UserError(f"invalid loader state {state!r}: need epoch >= 0 and 0 <= index < "
                                f"{self.n_windows}")
            state = {"position": epoch * self.n_windows + index, "order": "permutation"}
        if "position" not in state or int(state["position"]) < 0:
            raise UserError(f"invalid loader state {state!r}: need a position >= 0")
        order = state.get("order", self.order)  # a prepared directory's state before "order" was saved
        if order != self.order:
            kind = {"permutation": "in-memory text", "shuffle": "a prepared directory"}
            raise UserError(f"loader state was written for {kind[order]}, this run reads {kind[self.order]}; "
                            f"resume with the data.path the checkpoint was trained on")
        if int(state.get("n_windows", self.n_windows)) != self.n_windows:
            raise UserError(f"loader state was saved for {state['n_windows']} windows, this corpus has "
                            f"{self.n_windows} (another corpus, prepared directory or seq_len)")
        self.position = int(state["position"])


def val_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None = None
) -> list[np.ndarray]:
    """A fixed list of validation batches ``[batch_size, seq_len + 1]`` from sequential windows.

    Only full batches are returned (so they shard evenly over devices), at most
    ``max_batches`` of them (None = all). If the split has fewer windows than
    ``batch_size``, one batch is filled by cycling through the windows it has.
    An empty split gives an empty list.
    """
    window = seq_len + 1
    tokens = np.asarray(tokens, dtype=np.int32)
    n_windows = len(tokens) // window
    if n_windows == 0 or (max_batches is not None and max_batches <= 0):
        return []
    windows = tokens[: n_windows * window].reshape(n_windows, window)
    n_batches = n_windows // batch_size
    if n_batches == 0:
        return [windows[np.arange(batch_size) % n_windows]]
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    return [windows[b * batch_size : (b + 1) * batch_size] for b in range(n_batches)]
