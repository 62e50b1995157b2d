"""Text data for training: corpus -> tokenizer -> token stream -> resumable batches.

The pipeline has four stages, each a small function you can call on its own:

1. **Corpus** (:func:`load_corpus`, :func:`default_corpus`). A corpus is just a
   ``list[str]`` of documents. With no path we use text that ships with every
   Python install, so training works offline: the English help pages in
   ``pydoc_data.topics`` (about 465 KB), or, if a distribution stripped that
   module, the standard library's own ``*.py`` sources. A path may name a
   ``.txt``/``.md`` file (one document), a ``.jsonl`` file (one document per
   line, taken from its ``"text"`` field) or a directory holding such files.

2. **Tokenizer** (:func:`train_tokenizer`, :func:`get_tokenizer`). A byte-level
   BPE tokenizer from the Hugging Face ``tokenizers`` library. Text is first
   mapped to bytes, each byte to one of 256 printable symbols (GPT-2's trick),
   and BPE merges frequent neighbouring symbols into new tokens. Because every
   byte has a token, *any* string encodes and decodes back to itself exactly.
   Like DeepSeek-V3, id 0 is ``<|begin_of_text|>`` (bos) and id 1 is
   ``<|end_of_text|>`` (eos). The trained tokenizer is saved as
   ``workdir/tokenizer.json`` and reloaded on resume, so token ids never change
   under a checkpoint.

3. **Token stream** (:func:`encode_corpus`, :func:`split_tokens`). All documents
   are encoded and concatenated into one ``int32`` array, with eos after every
   document so the model learns where documents end. The tail of the stream is
   held out as the validation split (the tail rather than random windows, so no
   validation text is ever seen in training).

4. **Batches** (:class:`TokenLoader`, :func:`val_batches`). The training
   stream is cut into non-overlapping windows of ``seq_len + 1`` tokens; a
   window ``w`` gives inputs ``w[:-1]`` and next-token targets ``w[1:]``. Each
   epoch visits every window once, in an order drawn from
   ``np.random.default_rng([seed, epoch])``. Since the order is a pure function
   of ``(seed, epoch)``, the loader's whole position is two integers
   (``epoch``, ``index``): save them with the checkpoint and a restored loader
   continues with exactly the batches the original would have produced, even if
   the batch size changes from step to step (a batch-size ramp).

:func:`build_data` runs all four stages for the training script.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv3_jax.cli import UserError
from dsv3_jax.data import shards
from dsv3_jax.io.tokenizer import TOKENIZER_FILENAME, load_tokenizer, save_tokenizer, tokenizer_hash

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
BOS_ID = 0
EOS_ID = 1
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN)  # list order = id order
N_BYTE_TOKENS = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + N_BYTE_TOKENS  # 258

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
CORPUS_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES
STDLIB_FALLBACK_MAX_BYTES = 2_000_000


# ---------------------------------------------------------------------------
# 1. Corpus
# ---------------------------------------------------------------------------


def _pydoc_topics_corpus() -> list[str]:
    """The help texts behind ``help('topic')``; raises ImportError if absent."""
    from pydoc_data.topics import topics  # noqa: PLC0415  (optional stdlib module)

    return [topics[key] for key in sorted(topics)]


def _stdlib_source_corpus(max_bytes: int = STDLIB_FALLBACK_MAX_BYTES) -> list[str]:
    """The stdlib's top-level ``*.py`` files, in sorted path order, until ``max_bytes``."""
    stdlib_dir = os.path.dirname(os.__file__)
    docs: list[str] = []
    total = 0
    for name in sorted(os.listdir(stdlib_dir)):
        path = os.path.join(stdlib_dir, name)
        if not name.endswith(".py") or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if not text:
            continue
        docs.append(text)
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    return docs


def default_corpus() -> list[str]:
    """An embedded corpus that needs no download, in a deterministic order.

    The pydoc topic help pages (sorted by topic name); if ``pydoc_data`` is not
    installed, the standard library's own top-level source files (~2 MB).
    """
    try:
        docs = _pydoc_topics_corpus()
    except ImportError:
        docs = []
    if not docs:
        docs = _stdlib_source_corpus()
    if not docs:
        raise UserError(
            "no embedded corpus available (neither pydoc_data.topics nor stdlib sources); "
            "set --config.data.path to a .txt/.md/.jsonl file or a directory of them"
        )
    return docs


def _utf8_error(path: str, data: bytes, e: UnicodeDecodeError, first_line: int = 1) -> UserError:
    """'FILE:LINE: not UTF-8' for a decode error at byte e.start of `data` (which starts at `first_line`)."""
    line = first_line + data.count(b"\n", 0, e.start)
    column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    return UserError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column}); "
                     f"re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove it from the corpus")


def _read_text_file(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _utf8_error(path, data, e) from None


def _read_jsonl_file(path: str) -> list[str]:
    docs = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _utf8_error(path, raw, e, lineno) from None
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not records
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); each line of a .jsonl "
                                f'file must be one JSON object like {{"text": "..."}}') from None
            if not isinstance(record, dict) or "text" not in record:
                raise UserError(f'{path}:{lineno}: expected a JSON object with a "text" field, got '
                                f"{type(record).__name__}{' without text' if isinstance(record, dict) else ''}")
            text = record["text"]
            if not isinstance(text, str):
                raise UserError(f'{path}:{lineno}: the "text" field must be a string, got {type(text).__name__}')
            docs.append(text)
    return docs


def _read_corpus_file(path: str) -> list[str]:
    lower = path.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return _read_jsonl_file(path)
    if lower.endswith(TEXT_SUFFIXES):
        return [_read_text_file(path)]
    raise UserError(
        f"{path}: unsupported corpus file type; use one of {', '.join(CORPUS_SUFFIXES)} "
        "or a directory of such files"
    )


def _corpus_files_under(directory: str) -> list[str]:
    """All corpus files below ``directory`` (recursive), sorted by relative path."""
    found = []
    for root, _dirs, files in os.walk(directory):
        for name in files:
            if name.lower().endswith(CORPUS_SUFFIXES):
                full = os.path.join(root, name)
                found.append((os.path.relpath(full, directory).split(os.sep), full))
    found.sort()  # compare path components, so "a/b" < "a-b" is decided per component
    return [full for _, full in found]


def load_corpus(path: str | None) -> list[str]:
    """Load documents from ``path`` (see the module docstring); None or "" -> :func:`default_corpus`.

    Empty documents are dropped. Raises FileNotFoundError for a missing path and
    ValueError for an unsupported file, a malformed ``.jsonl`` line, or a corpus
    with no text at all.
    """
    if not path:
        return default_corpus()
    resolved = os.path.expanduser(path)
    if not os.path.exists(resolved):
        raise FileNotFoundError(
            f"data path {path!r} does not exist; set --config.data.path to an existing "
            "file or directory (or leave it empty for the embedded corpus)"
        )
    if os.path.isdir(resolved):
        files = _corpus_files_under(resolved)
        if not files:
            raise UserError(
                f"data directory {path!r} contains no {'/'.join(CORPUS_SUFFIXES)} files (searched recursively); "
                "put text in such files or point --config.data.path at one"
            )
        docs = [doc for file in files for doc in _read_corpus_file(file)]
    else:
        docs = _read_corpus_file(resolved)
    docs = [doc for doc in docs if doc]
    if not docs:
        raise UserError(f"corpus at {path!r} is empty (no non-empty documents); add text or point "
                        "--config.data.path elsewhere")
    return docs


# ---------------------------------------------------------------------------
# 2. Tokenizer
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# 3. Token stream and splits
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# 4. Batches
# ---------------------------------------------------------------------------


class TokenLoader:
    """Shuffled, resumable batches of ``seq_len + 1``-token windows from one token stream.

    Window ``i`` is ``tokens[i*(seq_len+1) : (i+1)*(seq_len+1)]``; trailing tokens
    that do not fill a window are unused. Epoch ``e`` visits the windows in the
    order ``np.random.default_rng([seed, e]).permutation(n_windows)``; a batch
    that runs past the end of an epoch continues seamlessly into the next one.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0):
        if seq_len < 1:
            raise UserError(f"seq_len must be >= 1, got {seq_len}")
        if seed < 0:
            raise UserError(f"seed must be >= 0, got {seed}")
        self.window = seq_len + 1
        self.seq_len = seq_len
        self.seed = int(seed)
        tokens = np.asarray(tokens, dtype=np.int32)
        self.n_windows = len(tokens) // self.window
        if self.n_windows == 0:
            raise UserError(
                f"{len(tokens)} tokens do not fill a single window of seq_len+1={self.window} tokens"
            )
        self.windows = tokens[: self.n_windows * self.window].reshape(self.n_windows, self.window)
        self._epoch = 0
        self._index = 0
        self._perm_epoch = -1
        self._perm = np.zeros((0,), np.int64)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    @property
    def epoch(self) -> int:
        return self._epoch

    def next_batch(self, batch_size: int) -> np.ndarray:
        """The next ``[batch_size, seq_len + 1]`` int32 windows (inputs ``[:, :-1]``, targets ``[:, 1:]``)."""
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        picked = []
        need = batch_size
        while need:
            take = min(need, self.n_windows - self._index)
            picked.append(self._order(self._epoch)[self._index : self._index + take])
            self._index += take
            need -= take
            if self._index == self.n_windows:
                self._epoch += 1
                self._index = 0
        return self.windows[np.concatenate(picked)]

    def state(self) -> dict:
        """The loader position as plain ints: ``{"epoch": e, "index": i}`` (JSON-serialisable)."""
        return {"epoch": int(self._epoch), "index": int(self._index)}

    def restore(self, state: dict) -> None:
        """Continue from a :meth:`state` (taken from a loader with the same tokens, seq_len and seed)."""
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.n_windows:
            raise UserError(
                f"invalid loader state {state!r}: need epoch >= 0 and 0 <= index < {self.n_windows}"
            )
        self._epoch, self._index = epoch, index


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


# ---------------------------------------------------------------------------
# 5. Everything together
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    """What the training script needs: the tokenizer, a train loader and the val tokens."""

    tokenizer: Tokenizer
    train: TokenLoader
    val: np.ndarray
    n_train_tokens: int
    n_val_tokens: int
    n_documents: int = 0


def build_data(
    data_path: str | None,
    tokenizer_path: str | None,
    workdir: str,
    vocab_size: int,
    seq_len: int,
    val_fraction: float = 0.05,
    seed: int = 0,
    max_val_tokens: int | None = None,
) -> Data:
    """Load the corpus, get the tokenizer, encode, split and wrap the train split in a loader. A directory
    written by `python -m dsv3_jax.data.prepare` is read from its shards instead (`build_prepared_data`)."""
    if data_path and shards.is_prepared(os.path.expanduser(data_path)):
        return build_prepared_data(os.path.expanduser(data_path), tokenizer_path, vocab_size, seq_len, seed,
                                   max_val_tokens)
    texts = load_corpus(data_path)
    tokenizer = get_tokenizer(tokenizer_path, workdir, texts, vocab_size)
    tokens = encode_corpus(tokenizer, texts)
    train, val = split_tokens(tokens, val_fraction, seq_len)
    return Data(
        tokenizer=tokenizer,
        train=TokenLoader(train, seq_len, seed),
        val=val,
        n_train_tokens=int(len(train)),
        n_val_tokens=int(len(val)),
        n_documents=len(texts),
    )


def build_prepared_data(directory: str, tokenizer_path: str | None, vocab_size: int, seq_len: int, seed: int = 0,
                        max_val_tokens: int | None = None) -> Data:
    """A prepared directory: its tokenizer (a given tokenizer_path must have the manifest's hash), the train
    split as memory-mapped shards behind the grain loader, and the head of the val split (at most
    max_val_tokens tokens are read). Nothing else is read at start-up."""
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
    n_val = len(val) if max_val_tokens is None else min(len(val), max_val_tokens)
    return Data(tokenizer=tokenizer, train=shards.ShardLoader(train, seq_len, seed), val=val.read(0, n_val),
                n_train_tokens=len(train), n_val_tokens=len(val), n_documents=manifest["documents"])


if __name__ == "__main__":  # quick look: python -m dsv3_jax.train.data [path]
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
