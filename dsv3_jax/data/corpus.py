"""Corpora for training: a ``list[str]`` of documents, from files or from text every Python ships.

With no path the corpus is embedded, so training works offline: the English help pages in
``pydoc_data.topics`` (about 465 KB, sorted by topic name), or, if a distribution stripped that module,
the standard library's own top-level ``*.py`` sources (about 2 MB). A path may name a ``.txt``/``.md``
file (one document), a ``.jsonl`` file (one document per line, taken from its ``"text"`` field) or a
directory holding such files (recursive, sorted by relative path). Empty documents are dropped.

Small corpora are read whole and prepared in memory (`data/build.py`); a large one is prepared once
into shards by `python -m dsv3_jax.data.prepare`, which streams the same file kinds (and gzip).
"""
from __future__ import annotations

import json
import os

from dsv3_jax.cli import UserError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
CORPUS_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES
STDLIB_FALLBACK_MAX_BYTES = 2_000_000


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
