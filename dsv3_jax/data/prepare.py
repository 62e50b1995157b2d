"""Prepare a corpus once: text files -> token shards a run trains from (format: `dsv3_jax/data/shards.py`).
With --chat: JSONL conversations -> shards with loss masks and document starts (`dsv3_jax/data/chat.py`).

    python -m dsv3_jax.data.prepare --input PATH [PATH ...] --tokenizer tokenizer.json|DIR --output DIR
                                    [--val_fraction 0.005] [--workers N] [--shard_tokens 16777216]
                                    [--on_error fail|skip] [--overwrite]

Inputs: files or directories (recursive, sorted) of .txt / .md (one document per file) and .jsonl
(one document per line, its "text" field), each optionally gzip-compressed (.gz). Everything streams:
files are read in blocks, documents longer than a block are cut at a line start (for byte-level BPE
pre-tokenisers, which split at newlines, the tokens are those of the whole document), pieces are
tokenised in parallel by `--workers` processes in bounded waves, and token ids go to fixed-size shards
as they come; peak memory does not grow with the input.

Each document is followed by eos (id 1). A document goes to the validation split when a hash of its
name (input-relative path, plus the line for .jsonl) falls below --val_fraction: the split does not
depend on the number of workers or the order of the inputs' bytes on disk.

A bad record (a line that is not UTF-8 or not a JSON object with a string "text") fails the run with
FILE:LINE named, or with --on_error skip is reported on stderr and skipped (counted in the manifest). A
text file that is not UTF-8 is one bad record. Shards are written to a temporary name and renamed; the
manifest is written last, so an interrupted preparation leaves a directory no run will read, and running
the command again starts it over.
"""
from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator

import numpy as np

from dsv3_jax import cli
from dsv3_jax.cli import UserError
from dsv3_jax.data import packing
from dsv3_jax.data.bpe import EOS_ID, split_document
from dsv3_jax.data.corpus import JSONL_SUFFIXES as JSONL
from dsv3_jax.data.corpus import TEXT_SUFFIXES as TEXT
from dsv3_jax.data.shards import FORMAT, MANIFEST, SPLITS, TOKEN_DTYPE
from dsv3_jax.io import tokenizer as tokenizer_io

BLOCK_CHARS = 1 << 22  # text read (and cut into pieces) this many characters at a time
WAVE_CHARS_PER_WORKER = 1 << 22  # characters each worker tokenises per wave


def _kind(path: str) -> str | None:
    name = path.lower().removesuffix(".gz")
    return "text" if name.endswith(TEXT) else "jsonl" if name.endswith(JSONL) else None


def input_files(inputs: list[str]) -> list[tuple[str, str]]:
    """(path, name) of every corpus file under the inputs, in a stable order; name = input-relative path."""
    out = []
    for inp in inputs:
        inp = os.path.expanduser(inp)
        if os.path.isfile(inp):
            if _kind(inp) is None:
                raise UserError(f"--input {inp}: not a .txt/.md/.jsonl file (optionally .gz)")
            out.append((inp, os.path.basename(inp)))
        elif os.path.isdir(inp):
            found = []
            for root, _, files in os.walk(inp):
                for f in files:
                    full = os.path.join(root, f)
                    if _kind(full):
                        found.append((os.path.relpath(full, inp).split(os.sep), full))
            found.sort()
            out.extend((full, "/".join(rel)) for rel, full in found)
        else:
            raise UserError(f"--input {inp}: no such file or directory")
    if not out:
        raise UserError(f"--input {' '.join(inputs)}: no .txt/.md/.jsonl(.gz) files found")
    return out


def _open(path: str):
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _cut(text: str) -> int:
    """Where to cut a long text: just after the last newline that a non-space character follows (0: none)."""
    i = len(text)
    while True:
        i = text.rfind("\n", 0, i)
        if i < 0:
            return 0
        if i + 1 < len(text) and not text[i + 1].isspace():
            return i + 1


class BadRecord(Exception):
    def __init__(self, where: str, why: str):
        super().__init__(f"{where}: {why}")


def records(path: str, name: str) -> Iterator[tuple[str, str, bool] | BadRecord]:
    """(document key, text piece, last piece of the document) for every piece of every document in a file,
    or a BadRecord in place of a document that cannot be read."""
    if _kind(path) == "jsonl":
        with _open(path) as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield BadRecord(where, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                    continue
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    yield BadRecord(where, f"invalid JSON ({e.msg} at column {e.colno})")
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    yield BadRecord(where, 'expected a JSON object with a string "text" field')
                    continue
                if rec["text"]:
                    yield f"{name}:{lineno}", rec["text"], True
        return
    with _open(path) as f:  # one document per file, read a block at a time
        decoder, buf, offset = codecs.getincrementaldecoder("utf-8")(), "", 0
        while True:
            raw = f.read(BLOCK_CHARS)
            try:
                buf += decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                yield BadRecord(f"{path}", f"not valid UTF-8 (byte 0x{raw[e.start]:02x} near byte "
                                           f"{offset + e.start})")
                return
            offset += len(raw)
            if not raw:
                break
            if len(buf) > 2 * BLOCK_CHARS and (cut := _cut(buf[:-1])):
                yield name, buf[:cut], False
                buf = buf[cut:]
        yield name, buf, True


def in_val(key: str, fraction: float) -> bool:
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return h / 2.0 ** 64 < fraction


# ----------------------------------------------------------------------------- tokenising workers

_TOKENIZER = None


def _init_worker(tokenizer_path: str) -> None:
    global _TOKENIZER
    _TOKENIZER = tokenizer_io.load_tokenizer(tokenizer_path)
    _TOKENIZER.encode_special_tokens = True  # special-token text inside a document is ordinary text


def encode_pieces(pieces: list[tuple[str, bool]]) -> np.ndarray:
    """Token ids of the pieces in order, eos after each piece that ends a document (uint32)."""
    texts, ends = [], []
    for text, last in pieces:
        parts = split_document(text, tokenizer=_TOKENIZER)
        texts += parts
        ends += [False] * (len(parts) - 1) + [last]
    out = []
    for enc, end in zip(_TOKENIZER.encode_batch(texts, add_special_tokens=False), ends):
        out.append(np.asarray(enc.ids, TOKEN_DTYPE))
        if end:
            out.append(np.asarray([EOS_ID], TOKEN_DTYPE))
    return np.concatenate(out) if out else np.zeros((0,), TOKEN_DTYPE)


def _encode_job(job: tuple[str, list[tuple[str, bool]]]) -> tuple[str, np.ndarray]:
    split, pieces = job
    return split, encode_pieces(pieces)


# ----------------------------------------------------------------------------- shard writer


class ShardWriter:
    """Appends token ids of one split; writes every full shard of `shard_tokens` (tmp file + rename)."""

    def __init__(self, directory: str, split: str, shard_tokens: int):
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict] = []
        self.documents = 0

    def add(self, ids: np.ndarray, documents: int) -> None:
        self.pending.append(ids)
        self.pending_tokens += len(ids)
        self.documents += documents
        while self.pending_tokens >= self.shard_tokens:
            flat = np.concatenate(self.pending)
            self._write(flat[: self.shard_tokens])
            rest = flat[self.shard_tokens:]
            self.pending, self.pending_tokens = [rest], len(rest)

    def close(self) -> None:
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_tokens = [], 0

    def _write(self, ids: np.ndarray) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        tmp = os.path.join(self.directory, name + ".tmp")
        ids.astype(TOKEN_DTYPE).tofile(tmp)
        os.replace(tmp, os.path.join(self.directory, name))
        self.shards.append({"file": name, "tokens": int(len(ids))})

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self.pending_tokens


# ----------------------------------------------------------------------------- the command


def _check_output(out: str, overwrite: bool, log) -> None:
    ours = lambda f: f.endswith((".bin", ".tmp")) or f == tokenizer_io.TOKENIZER_FILENAME  # noqa: E731
    present = os.listdir(out) if os.path.isdir(out) else []
    if MANIFEST in present:
        if not overwrite:
            raise UserError(f"--output {out} already holds a prepared corpus; pass --overwrite to replace it or "
                            f"choose another directory")
    elif present and all(ours(f) for f in present):
        log(f"{out}: an interrupted preparation (no manifest); starting it over")
    elif present:
        raise UserError(f"--output {out} is not empty and holds no prepared corpus; choose an empty or new directory")
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(out):
        if f == MANIFEST or f.endswith((".bin", ".tmp")):
            os.remove(os.path.join(out, f))


def prepare(inputs: list[str], tokenizer_path: str, out: str, *, val_fraction: float = 0.005, workers: int = 1,
            shard_tokens: int = 1 << 24, on_error: str = "fail", overwrite: bool = False,
            log=lambda m: print(m, file=sys.stderr), progress: bool = True) -> dict:
    """Write the prepared directory `out`; returns its manifest."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val_fraction={val_fraction} must be in [0, 1)")
    if workers < 1 or shard_tokens < 1:
        raise UserError(f"--workers={workers} and --shard_tokens={shard_tokens} must be >= 1")
    if on_error not in ("fail", "skip"):
        raise UserError(f"--on_error={on_error!r}: choose fail or skip")
    tok_file = os.path.join(tokenizer_path, tokenizer_io.TOKENIZER_FILENAME) if os.path.isdir(tokenizer_path) \
        else tokenizer_path
    tokenizer = tokenizer_io.load_tokenizer(tok_file, what="--tokenizer")
    files = input_files(inputs)
    _check_output(out, overwrite, log)
    shutil.copyfile(tok_file, os.path.join(out, tokenizer_io.TOKENIZER_FILENAME))
    writers = {s: ShardWriter(out, s, shard_tokens) for s in SPLITS}
    total_bytes = sum(os.path.getsize(p) for p, _ in files)
    skipped, t0 = 0, time.perf_counter()
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tok_file,)) if workers > 1 else None
    if pool is None:
        _init_worker(tok_file)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", file=sys.stderr)

    def flush(jobs: list[tuple[str, list[tuple[str, bool]]]]):
        results = pool.map(_encode_job, jobs) if pool else map(_encode_job, jobs)
        for (split, pieces), (_, ids) in zip(jobs, results):
            writers[split].add(ids, sum(last for _, last in pieces))

    try:
        # a job: ~WAVE_CHARS_PER_WORKER characters of one split; a wave: one job per worker, tokenised at once
        jobs, current, chars = [], {s: [] for s in SPLITS}, dict.fromkeys(SPLITS, 0)
        for path, name in files:
            for rec in records(path, name):
                if isinstance(rec, BadRecord):
                    if on_error == "fail":
                        raise UserError(f"{rec}; fix or remove it, or pass --on_error skip")
                    skipped += 1
                    log(f"skipped {rec}")
                    continue
                key, text, last = rec
                split = "val" if in_val(key, val_fraction) else "train"
                current[split].append((text, last))
                chars[split] += len(text)
                if chars[split] >= WAVE_CHARS_PER_WORKER:
                    jobs.append((split, current[split]))
                    current[split], chars[split] = [], 0
                    if len(jobs) >= workers:
                        flush(jobs)
                        jobs = []
            if bar:
                bar.update(os.path.getsize(path))
        flush(jobs + [(s, current[s]) for s in SPLITS if current[s]])
    finally:
        if pool:
            pool.close()
            pool.join()
        if bar:
            bar.close()
    for w in writers.values():
        w.close()
    seconds = time.perf_counter() - t0
    manifest = {
        "format": FORMAT, "dtype": "uint32", "eos_id": EOS_ID,
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "tokenizer_sha256": tokenizer_io.tokenizer_hash(tokenizer),
        "documents": sum(w.documents for w in writers.values()), "tokens": sum(w.tokens for w in writers.values()),
        "skipped": skipped, "val_fraction": val_fraction, "shard_tokens": shard_tokens,
        "inputs": [name for _, name in files],
        "splits": {s: {"tokens": w.tokens, "documents": w.documents, "shards": w.shards} for s, w in writers.items()},
    }
    tmp = os.path.join(out, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out, MANIFEST))  # the directory becomes readable only now
    log(f"prepared {manifest['documents']:,} documents, {manifest['tokens']:,} tokens "
        f"(train {writers['train'].tokens:,}, val {writers['val'].tokens:,}) from {total_bytes / 1e6:.1f} MB in "
        f"{seconds:.1f}s ({manifest['tokens'] / max(seconds, 1e-9):,.0f} tokens/s, {workers} workers); "
        f"{skipped} bad records skipped -> {out}")
    return manifest


def prepare_chat(inputs: list[str], tokenizer_path: str, out: str, *, chat_template: str | None = None,
                 targets: str = "assistant", max_tokens: int = 0, val_fraction: float = 0.005,
                 shard_tokens: int = 1 << 24, on_error: str = "fail", overwrite: bool = False,
                 log=lambda m: print(m, file=sys.stderr)) -> dict:
    """Write the prepared directory `out` from JSONL conversations (`data/chat.py`): flagged ids (loss masks,
    document starts) in the same shard format, the manifest saying so ("flags": true); returns the manifest."""
    from dsv3_jax.data import chat

    if targets not in chat.TARGETS:
        raise UserError(f"--targets {targets!r}: choose one of {', '.join(chat.TARGETS)}")
    if on_error not in ("fail", "skip") or max_tokens < 0 or not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--on_error {on_error!r} (fail|skip), --max_tokens {max_tokens} (>= 0) and --val_fraction "
                        f"{val_fraction} (in [0, 1)): one is out of range")
    tok_file = os.path.join(tokenizer_path, tokenizer_io.TOKENIZER_FILENAME) if os.path.isdir(tokenizer_path) \
        else tokenizer_path
    tokenizer = tokenizer_io.load_tokenizer(tok_file, what="--tokenizer")
    render, template_name = chat.renderer(os.path.dirname(os.path.abspath(tok_file)), chat_template)
    files = input_files(inputs)
    bad_kind = [name for path, name in files if _kind(path) != "jsonl"]
    if bad_kind:
        raise UserError(f"--chat reads JSONL conversations (one {{\"messages\": [...]}} per line); {bad_kind[0]} is "
                        f"not .jsonl")
    _check_output(out, overwrite, log)
    shutil.copyfile(tok_file, os.path.join(out, tokenizer_io.TOKENIZER_FILENAME))
    writers = {s: ShardWriter(out, s, shard_tokens) for s in SPLITS}
    skipped, targets_n, t0 = [], 0, time.perf_counter()
    for path, name in files:
        for lineno, rec in chat.conversations(path, _open):
            try:
                if isinstance(rec, chat.BadConversation):
                    raise rec
                ids = chat.encode_conversation(chat.check_messages(rec), tokenizer, render, targets, max_tokens)
            except chat.BadConversation as e:
                where = f"{path}:{lineno}"
                if on_error == "fail":
                    raise UserError(f"{where}: {e}; fix or remove it, or pass --on_error skip") from None
                skipped.append(f"{name}:{lineno}")
                log(f"skipped {where}: {e}")
                continue
            targets_n += int(np.sum((ids & packing.NOT_TARGET) == 0))
            writers["val" if in_val(f"{name}:{lineno}", val_fraction) else "train"].add(ids, 1)
    for w in writers.values():
        w.close()
    manifest = {
        "format": FORMAT, "dtype": "uint32", "eos_id": EOS_ID, "flags": True,
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "tokenizer_sha256": tokenizer_io.tokenizer_hash(tokenizer),
        "documents": sum(w.documents for w in writers.values()), "tokens": sum(w.tokens for w in writers.values()),
        "target_tokens": targets_n, "skipped": len(skipped), "skipped_records": skipped[:1000],
        "chat": {"targets": targets, "template": template_name, "max_tokens": max_tokens},
        "val_fraction": val_fraction, "shard_tokens": shard_tokens, "inputs": [name for _, name in files],
        "splits": {s: {"tokens": w.tokens, "documents": w.documents, "shards": w.shards} for s, w in writers.items()},
    }
    if not manifest["documents"]:
        raise UserError(f"no usable conversation in {', '.join(inputs)} ({len(skipped)} skipped); see the lines above")
    tmp = os.path.join(out, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out, MANIFEST))
    log(f"prepared {manifest['documents']:,} conversations, {manifest['tokens']:,} tokens of which "
        f"{targets_n:,} targets ({targets}; template: {template_name}) in {time.perf_counter() - t0:.1f}s; "
        f"{len(skipped)} bad conversations skipped -> {out}")
    return manifest


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="python -m dsv3_jax.data.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="files or directories of .txt/.md/.jsonl(.gz)")
    p.add_argument("--tokenizer", required=True, help="a tokenizer.json, or a directory holding one")
    p.add_argument("--output", required=True, help="the prepared directory to write")
    p.add_argument("--val_fraction", type=float, default=0.005, help="share of documents held out for validation")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="tokenising processes")
    p.add_argument("--shard_tokens", type=int, default=1 << 24, help="tokens per shard file (uint32)")
    p.add_argument("--on_error", default="fail", choices=("fail", "skip"), help="a bad record fails, or is skipped")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared corpus in --output")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--chat", action="store_true",
                   help="JSONL conversations ({\"messages\": [...]} per line) for chat fine-tuning")
    p.add_argument("--chat_template", default=None, help="--chat: a jinja template file (default: the tokenizer "
                   "directory's, else plain role lines)")
    p.add_argument("--targets", default="assistant", choices=("assistant", "last", "all"),
                   help="--chat: which tokens the loss counts")
    p.add_argument("--max_tokens", type=int, default=0, help="--chat: longer conversations are bad records (0: any)")

    def run():
        args = p.parse_args(argv)
        if args.chat:
            prepare_chat(args.input, args.tokenizer, args.output, chat_template=args.chat_template,
                         targets=args.targets, max_tokens=args.max_tokens, val_fraction=args.val_fraction,
                         shard_tokens=args.shard_tokens, on_error=args.on_error, overwrite=args.overwrite)
            return 0
        prepare(args.input, args.tokenizer, args.output, val_fraction=args.val_fraction, workers=args.workers,
                shard_tokens=args.shard_tokens, on_error=args.on_error, overwrite=args.overwrite,
                progress=not args.no_progress)
        return 0

    return cli.call(run, "python -m dsv3_jax.data.prepare", argv)


if __name__ == "__main__":
    sys.exit(main())
