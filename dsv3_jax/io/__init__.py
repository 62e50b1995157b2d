"""Shared I/O: orbax checkpoints and the one restore path (`checkpoint.py`), tokenizer files (`tokenizer.py`)."""
