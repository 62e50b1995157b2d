"""Metrics sinks: a tqdm progress bar on the console, TensorBoard event files (tensorboardX) and
WORKDIR/metrics.jsonl with one JSON object per logged step (strict JSON: a non-finite value, e.g. the
loss of a skipped step, is written as null).

On resume, records in metrics.jsonl with a step beyond the restored step are dropped first (they came
from steps that will be re-run), so the file always describes one uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import sys

from tqdm import tqdm


def strict(record: dict) -> dict:
    """The record with every non-finite float replaced by None (strict JSON has no NaN or Infinity)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # a line cut short by a kill, or not ours
        return None


def _truncate_jsonl(path: str, last_step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and (_step_of(line) or last_step + 1) <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def summary_writer():
    """tensorboardX's SummaryWriter class, imported without torch. tensorboardX's writer imports torch when it is
    installed, only to accept torch tensors (this module passes Python floats and strings), and that import was
    most of a training process's start on CPU (2.6 s of 3.6 s with torch 2.13). Unless torch is loaded already,
    the import sees it as absent (None in sys.modules is Python's mark for a module that is not available), and
    the mark is removed at once, so a later `import torch` works as usual."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0, quiet: bool = False,
                 enabled: bool = True):
        """`enabled=False` (every process but the first of a multi-host run) writes nothing."""
        self.path = os.path.join(workdir, "metrics.jsonl") if enabled else None
        self.quiet = quiet or not enabled
        self.bar = None if self.quiet else tqdm(total=total_steps, initial=start_step, unit="step",
                                                 dynamic_ncols=True)
        self.tb = None
        if not enabled:
            return
        _truncate_jsonl(self.path, start_step)
        try:
            self.tb = summary_writer()(os.path.join(workdir, "tensorboard"))
        except ImportError:  # tensorboardX is a dependency; tolerate its absence in stripped installs
            self.tb = None

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(strict(record), allow_nan=False) + "\n")
        step = record["step"]
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
                elif isinstance(v, list) and v and isinstance(v[0], dict):  # (samples: a markdown table)
                    cols = list(v[0])
                    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                    rows += ["| " + " | ".join(str(r.get(c, "")).replace("\n", " ").replace("|", "/") for c in cols)
                             + " |" for r in v]
                    self.tb.add_text(k, "\n".join(rows), step)
        if self.bar is not None:
            self.advance()
            shown = {k: record[k] for k in ("loss", "mtp_loss", "val_loss", "max_vio", "tokens_per_sec") if k in record}
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
            self.bar.write(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in shown.items()))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
