"""Byte-level BPE: the special tokens (the one EOS_ID), training a tokenizer, encoding documents.

A tokenizer here is a byte-level BPE from the Hugging Face ``tokenizers`` library. Text is first mapped
to bytes, each byte to one of 256 printable symbols (GPT-2's trick), and BPE merges frequent
neighbouring symbols into new tokens. Because every byte has a token, *any* string encodes and decodes
back to itself exactly. Like DeepSeek-V3, id 0 is ``<|begin_of_text|>`` (bos) and id 1 is
``<|end_of_text|>`` (eos): ``EOS_ID`` below is the one constant training, preparation and decoding use.

A run's tokenizer (:func:`get_tokenizer`) is an explicit file, else ``workdir/tokenizer.json``, else
one trained on the corpus and saved there, so a resumed run maps text to the same ids. Files are
read and written by `dsv3_jax/io/tokenizer.py` (the one loader).

:func:`encode_corpus` turns documents into one ``int32`` stream, eos after each; long documents are cut
(:func:`split_document`) where the tokenizer ends a word anyway, so the pieces encode like the whole.
`python -m dsv3_jax.data.prepare` encodes with the same cut and the same eos.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv3_jax.cli import UserError
from dsv3_jax.io.tokenizer import TOKENIZER_FILENAME, load_tokenizer, save_tokenizer

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
BOS_ID = 0
EOS_ID = 1  # DeepSeek-V3's <|end_of_text|>, and ours: after every document, and where decoding stops
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN)  # list order = id order
N_BYTE_TOKENS = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + N_BYTE_TOKENS  # 258

PIECE_CHARS = 1 << 16  # documents are tokenised in pieces of at most this many characters
ENCODE_BATCH_CHARS = 1 << 21  # characters encoded per batch (bounds the tokenizer's per-token objects)
TOKENIZER_TRAIN_CHARS = 1 << 22  # characters of the corpus the BPE merges are learned from (~4.2M)
MAX_TRAIN_WORD = 256  # runs of non-whitespace longer than this are cut for BPE training only
_LONG_RUN = re.compile(r"\S{" + str(MAX_TRAIN_WORD) + ",}")


# Candidate cut positions, best first: a U+0020 space between two letters is a word boundary for
# GPT-2-, Llama-3- and DeepSeek-style pre-tokenizer regexes alike; then any whitespace boundary (only
# "before whitespace" without a tokenizer to check it).
_WORD_GAP = re.compile(r"(?<=[^\W\d_]) (?=[^\W\d_])")
_ANY_GAP = re.compile(r"(?<=\S)(?=\s)|(?<=\s)(?=\S)")
_BEFORE_SPACE = re.compile(r"(?<=\S)(?=\s)")


def _same_tokens(text: str, i: int, tokenizer: Tokenizer, window: int = 32) -> bool:
    """Encoding the text around position i whole equals encoding the two sides apart (which rejects,
    e.g., a whitespace run the regex splits differently, or a normalizer that prepends to every piece)."""
    left, right = text[max(0, i - window):i], text[i:i + window]
    enc = lambda t: tokenizer.encode(t, add_special_tokens=False).ids  # noqa: E731
    return enc(left + right) == enc(left) + enc(right)


def split_document(text: str, max_chars: int = PIECE_CHARS, tokenizer: Tokenizer | None = None) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_chars`` that tokenise like the whole.

    Each cut is searched backwards from ``max_chars`` to ``max_chars / 2``: first a space between two
    letters, then any whitespace boundary, each checked with the tokenizer when one is given
    (:func:`_same_tokens`). Only where neither exists (a run of ``max_chars / 2`` characters such as a
    base64 blob or one long "word") is the text cut hard, which may tokenise the characters at that cut
    differently than the whole would.
    """
    if len(text) <= max_chars:
        return [text]
    pieces, start, n = [], 0, len(text)
    while n - start > max_chars:
        end = start + max_chars
        lo = start + max(1, max_chars // 2)
        cut = end
        for pattern in (_WORD_GAP, _ANY_GAP if tokenizer is not None else _BEFORE_SPACE):
            found = [m.start() for m in pattern.finditer(text, lo, min(n, end + 2)) if m.start() <= end]
            ok = next((i for i in reversed(found) if tokenizer is None or _same_tokens(text, i, tokenizer)), None)
            if ok is not None:
                cut = ok
                break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def training_pieces(texts: Iterable[str], max_chars: int = TOKENIZER_TRAIN_CHARS) -> Iterator[str]:
    """What BPE training reads: the first ``max_chars`` characters of the corpus, in pieces, with runs
    of non-whitespace longer than MAX_TRAIN_WORD cut into such runs (a 50 MB line without a space
    would otherwise be one "word" whose every merge rescans it). Memory and time stay bounded by
    ``max_chars`` whatever the corpus; the merges learned still apply to the whole corpus."""
    budget = max_chars
    for text in texts:
        for piece in split_document(text):
            if budget <= 0:
                return
            piece = piece[:budget]
            budget -= len(piece)
            if _LONG_RUN.search(piece) is None:
                yield piece
                continue
            last = 0
            for m in _LONG_RUN.finditer(piece):
                if m.start() > last:
                    yield piece[last:m.start()]
                for i in range(m.start(), m.end(), MAX_TRAIN_WORD):
                    yield piece[i:min(i + MAX_TRAIN_WORD, m.end())]
                last = m.end()
            if last < len(piece):
                yield piece[last:]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a deterministic byte-level BPE tokenizer with at most ``vocab_size`` tokens.

    Ids: 0 = ``<|begin_of_text|>``, 1 = ``<|end_of_text|>``, then the 256 byte
    symbols, then merges in the order they were learned. Merges must occur at
    least twice, so a small corpus may yield fewer than ``vocab_size`` tokens.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(
            f"vocab_size={vocab_size} is too small for a byte-level tokenizer: it needs at least "
            f"{MIN_VOCAB_SIZE} ({len(SPECIAL_TOKENS)} special tokens + {N_BYTE_TOKENS} bytes)"
        )
    tokenizer = Tokenizer(models.BPE())
    # No prefix space and no normalizer: the text is encoded byte-for-byte, so
    # decode(encode(text)) == text for every string.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_pieces(texts), trainer=trainer)
    for token, expected in zip(SPECIAL_TOKENS, (BOS_ID, EOS_ID)):
        got = tokenizer.token_to_id(token)
        if got != expected:  # pragma: no cover - guards against a library behaviour change
            raise RuntimeError(f"{token} got id {got}, expected {expected}")
    return tokenizer


def get_tokenizer(
    tokenizer_path: str | None, workdir: str, texts: Sequence[str], vocab_size: int
) -> Tokenizer:
    """The run's tokenizer: an explicit file, else ``workdir/tokenizer.json``, else a new one.

    A newly trained tokenizer is saved to ``workdir/tokenizer.json`` so a resumed
    run maps text to the same ids. Raises ValueError if the tokenizer has more
    tokens than the model's embedding table (``vocab_size``).
    """
    saved = os.path.join(workdir, TOKENIZER_FILENAME)
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path)
        source = tokenizer_path
    elif os.path.isfile(saved):
        tokenizer = load_tokenizer(saved, what="the run's tokenizer")
        source = saved
    else:
        tokenizer = train_tokenizer(texts, vocab_size)
        save_tokenizer(tokenizer, saved)
        source = "the newly trained tokenizer"
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise UserError(
            f"{source} has {n} tokens but the model's vocab_size is {vocab_size}; "
            f"raise --config.model.vocab_size to at least {n}"
        )
    return tokenizer


def encode_corpus(tokenizer: Tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Encode every document and concatenate them, each followed by eos (id 1), as int32.

    Special-token strings that happen to occur inside a document (e.g. the
    literal text ``<|end_of_text|>``) are encoded as ordinary text, so data can
    never inject control tokens; only the separators we add are real eos.

    Memory stays bounded: documents are cut into pieces (:func:`split_document`, checked with this
    tokenizer to give the same tokens) and
    encoded ENCODE_BATCH_CHARS characters at a time, so the tokenizer's per-token objects (~100 bytes
    a token) exist for one batch only; what is kept is 4 bytes per token.
    """
    out: list[np.ndarray] = []
    eos = np.asarray([EOS_ID], np.int32)
    batch: list[str] = []
    ends: list[bool] = []  # whether each piece of the batch ends its document
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        def flush():
            for enc, end in zip(tokenizer.encode_batch(batch, add_special_tokens=False), ends):
                out.append(np.asarray(enc.ids, np.int32))
                if end:
                    out.append(eos)
            batch.clear()
            ends.clear()

        chars = 0
        for text in texts:
            pieces = split_document(text, tokenizer=tokenizer)
            for i, piece in enumerate(pieces):
                batch.append(piece)
                ends.append(i == len(pieces) - 1)
                chars += len(piece)
                if chars >= ENCODE_BATCH_CHARS:
                    flush()
                    chars = 0
        flush()
    finally:
        tokenizer.encode_special_tokens = previous
    return np.concatenate(out) if out else np.zeros((0,), np.int32)
