"""Tokenizer files: the one loader (`load_tokenizer`), an atomic writer and the hash recorded with checkpoints.

Used by training (`data/bpe.py`, `train/loop.py`), inference (`infer/load.py`) and the HF interop (`interop/hf.py`,
`interop/convert.py`). Only JSON is ever parsed: a pickle is recognised by its first byte and refused.
"""
from __future__ import annotations

import hashlib
import json
import os

from tokenizers import Tokenizer

from dsv3_jax.cli import UserError, one_line

TOKENIZER_FILENAME = "tokenizer.json"


def load_tokenizer(path: str, what: str = "--config.data.tokenizer_path") -> Tokenizer:
    """Load a ``tokenizer.json`` written by `data.bpe.train_tokenizer` (or any HF ``tokenizers`` file).

    The one tokenizer loader of the package (training, inference, the converter, HF directories). A
    missing file, a pickle, a SentencePiece model or any JSON the ``tokenizers`` library rejects is a
    UserError naming the file; nothing but JSON is ever parsed (a pickle is recognised by its first
    byte and never opened as one).
    """
    resolved = os.path.expanduser(path)
    if not os.path.isfile(resolved):
        raise FileNotFoundError(f"{what}: tokenizer file {path!r} does not exist; point it at a tokenizer.json "
                                "saved by the tokenizers library")
    with open(resolved, "rb") as f:
        head = f.read(64)
    if head[:1] == b"\x80" or resolved.endswith((".pkl", ".pickle", ".bin", ".pt")):
        raise UserError(f"{path}: looks like a pickle; dsv3_jax never opens pickles. Pass a tokenizer.json "
                        "(tokenizers' JSON format) instead")
    if not head.lstrip()[:1] == b"{":
        kind = "a SentencePiece model" if resolved.endswith(".model") else "not JSON"
        raise UserError(f"{path}: {kind}, not a tokenizer.json; pass the JSON file written by "
                        "tokenizers' Tokenizer.save (for a SentencePiece model, convert it with transformers first)")
    try:
        return Tokenizer.from_file(resolved)
    except Exception as e:  # noqa: BLE001 -- tokenizers raises plain Exception with serde's message
        raise UserError(f"{path}: not a valid tokenizer.json ({one_line(str(e))[:200]}); pass a file written by "
                        "tokenizers' Tokenizer.save") from None


def save_tokenizer(tokenizer: Tokenizer, path: str) -> None:
    """Write ``tokenizer`` to ``path`` atomically (a crash never leaves half a file)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    tokenizer.save(tmp)
    os.replace(tmp, path)


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """sha256 of what maps text to ids (vocabulary with added tokens, BPE merges): recorded with
    checkpoints so a resume cannot change token ids. Computed from the data, not the JSON text, which
    differs between tokenizers releases (merges as "a b" strings or as pairs)."""
    model = json.loads(tokenizer.to_str()).get("model", {})
    merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges", [])]
    vocab = sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda kv: (kv[1], kv[0]))
    payload = json.dumps({"type": model.get("type"), "vocab": vocab, "merges": merges}, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()
