"""Everything together: a corpus -> the tokenizer, a train loader and the validation tokens of a run.

There is one path. A corpus becomes *prepared*: a tokenizer plus a train and a val token stream (eos after
every document, `data/bpe.py`). A large corpus is prepared once on disk by `python -m dsv3_jax.data.prepare`
(memory-mapped shards, `data/shards.py`); a small one, and the embedded demo corpus, is prepared here in
memory (:func:`prepare_in_memory`), in four steps you can call on their own:

1. **Corpus** (`corpus.load_corpus`): a ``list[str]`` of documents; no path = the embedded corpus.
2. **Tokenizer** (`bpe.get_tokenizer`): an explicit file, else ``workdir/tokenizer.json``, else a byte-level
   BPE trained on the corpus and saved there, so token ids never change under a checkpoint.
3. **Token stream** (`bpe.encode_corpus`): every document encoded, each followed by eos, as int32.
4. **Split** (:func:`split_tokens`): the tail of the stream is the validation split (the tail rather than
   random windows, so no validation text is ever seen in training).

Both kinds then go through the same grain loader (`data/loader.py`, one resume position format): the
prepared kind names the window order its size allows (a numpy permutation per epoch in memory, grain's
index shuffle for shards). :func:`build_data` is what the training loop calls.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys

import numpy as np
from tokenizers import Tokenizer

from dsv3_jax.cli import UserError
from dsv3_jax.data import packing, shards
from dsv3_jax.data.bpe import EOS_ID, encode_corpus, get_tokenizer
from dsv3_jax.data.corpus import load_corpus
from dsv3_jax.data.loader import ArrayStream, TokenLoader
from dsv3_jax.io.tokenizer import TOKENIZER_FILENAME, load_tokenizer, tokenizer_hash


def split_tokens(
    tokens: np.ndarray, val_fraction: float, seq_len: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split the stream into ``(train, val)``: val is the last ``val_fraction`` of it.

    With ``seq_len`` given, each split is guaranteed at least one window of
    ``seq_len + 1`` tokens (val is enlarged to one window if the fraction is
    smaller), and a ValueError says how many tokens that needs if the corpus is
    too small. ``val_fraction == 0`` gives an empty validation split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    tokens = np.asarray(tokens)
    window = 1 if seq_len is None else seq_len + 1

    def n_val_for(n: int) -> int:
        return 0 if val_fraction == 0 else max(math.ceil(n * val_fraction), window)

    n = len(tokens)
    n_val = n_val_for(n)
    if n - n_val < window:
        needed = max(window + n_val_for(window), math.ceil(window / (1.0 - val_fraction)))
        while needed - n_val_for(needed) < window:  # ceil() can cost a token or two
            needed += 1
        what = f"seq_len={seq_len}" if seq_len is not None else "a train/val split"
        raise UserError(
            f"corpus too small for {what}: it has {n} tokens but needs at least {needed} "
            f"(a training window of {window} tokens"
            + (f" plus a validation split of at least {n_val_for(needed)} tokens" if n_val else "")
            + "); use a larger corpus, a smaller seq_len or a smaller val_fraction"
        )
    return tokens[: n - n_val], tokens[n - n_val :]


@dataclasses.dataclass
class Prepared:
    """A corpus ready to train from: its tokenizer and the token streams of its splits (on disk or in memory;
    ``len(stream)`` and ``stream.read(start, stop)``), with the loader order its size allows."""

    tokenizer: Tokenizer
    train: shards.TokenStream | ArrayStream
    val: shards.TokenStream | ArrayStream
    documents: int
    order: str  # "permutation" in memory, "shuffle" for shards (data/loader.py)
    flagged: bool = False  # the ids carry packing flags (chat shards: loss masks, document starts; data/packing.py)


def prepare_in_memory(data_path: str | None, tokenizer_path: str | None, workdir: str, vocab_size: int,
                      seq_len: int, val_fraction: float = 0.05) -> Prepared:
    """A small corpus (a file, a directory, or None = the embedded one) prepared in memory: read, get the
    tokenizer (training and saving one in ``workdir`` if needed), encode, split."""
    texts = load_corpus(data_path)
    tokenizer = get_tokenizer(tokenizer_path, workdir, texts, vocab_size)
    train, val = split_tokens(encode_corpus(tokenizer, texts), val_fraction, seq_len)
    return Prepared(tokenizer, ArrayStream(train), ArrayStream(val), len(texts), "permutation")


def open_prepared(directory: str, tokenizer_path: str | None, vocab_size: int) -> Prepared:
    """A prepared directory: its tokenizer (a given tokenizer_path must have the manifest's hash) and its
    memory-mapped splits. Nothing but the manifest and the tokenizer is read."""
    manifest = shards.read_manifest(directory)
    tokenizer = load_tokenizer(os.path.join(directory, TOKENIZER_FILENAME), what=f"--config.data.path {directory}")
    if tokenizer_path:
        given = load_tokenizer(tokenizer_path)
        if tokenizer_hash(given) != manifest["tokenizer_sha256"]:
            raise UserError(f"--config.data.tokenizer_path={tokenizer_path} is not the tokenizer {directory} was "
                            f"prepared with (its hash differs from the manifest's); leave tokenizer_path empty to use "
                            f"{directory}/{TOKENIZER_FILENAME}")
    if manifest["vocab_size"] > vocab_size:
        raise UserError(f"{directory} was prepared with a tokenizer of {manifest['vocab_size']} tokens but the "
                        f"model's vocab_size is {vocab_size}; raise --config.model.vocab_size to at least "
                        f"{manifest['vocab_size']}")
    train = shards.TokenStream(directory, manifest["splits"]["train"]["shards"])
    val = shards.TokenStream(directory, manifest["splits"]["val"]["shards"])
    return Prepared(tokenizer, train, val, manifest["documents"], "shuffle", bool(manifest.get("flags", False)))


@dataclasses.dataclass
class Data:
    """What the training loop needs: the tokenizer, a train loader and the head of the val tokens."""

    tokenizer: Tokenizer
    train: TokenLoader
    val: np.ndarray
    n_train_tokens: int
    n_val_tokens: int
    n_documents: int = 0
    documents: bool = False  # the windows carry packing flags: chat shards, or `document_mask` (data/packing.py)


def build_data(
    data_path: str | None,
    tokenizer_path: str | None,
    workdir: str,
    vocab_size: int,
    seq_len: int,
    val_fraction: float = 0.05,
    seed: int = 0,
    max_val_tokens: int | None = None,
    document_mask: bool = False,
) -> Data:
    """The run's data: a directory written by `python -m dsv3_jax.data.prepare` is opened (`open_prepared`),
    anything else is prepared in memory (`prepare_in_memory`); the train split goes behind the loader and at
    most ``max_val_tokens`` tokens of the val split are read (None = all). `document_mask`: every eos ends a
    document that later tokens do not attend across (`packing.mark_documents`, on each window and val batch)."""
    path = os.path.expanduser(data_path) if data_path else None
    if path and shards.is_prepared(path):
        p = open_prepared(path, tokenizer_path, vocab_size)
    else:
        p = prepare_in_memory(data_path, tokenizer_path, workdir, vocab_size, seq_len, val_fraction)
    n_val = len(p.val) if max_val_tokens is None else min(len(p.val), max_val_tokens)
    mark = functools.partial(packing.mark_documents, eos_id=EOS_ID) if document_mask else None
    return Data(tokenizer=p.tokenizer, train=TokenLoader(p.train, seq_len, seed, p.order, transform=mark),
                val=p.val.read(0, n_val), n_train_tokens=len(p.train), n_val_tokens=len(p.val),
                n_documents=p.documents, documents=p.flagged or document_mask)


if __name__ == "__main__":  # quick look: python -m dsv3_jax.data.build [path]
    import tempfile
    import time

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = build_data(sys.argv[1] if len(sys.argv) > 1 else None, None, tmp, 4096, 256)
    print(
        f"{data.n_documents} docs, vocab {data.tokenizer.get_vocab_size()}, "
        f"{data.n_train_tokens} train / {data.n_val_tokens} val tokens, "
        f"{data.train.n_windows} train windows, {time.perf_counter() - start:.2f}s"
    )
