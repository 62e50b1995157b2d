"""The one error path of the command-line tools (train.py, infer.py, serve.py, the converter).

A user error (a bad flag, config key or value, a corpus, tokenizer or checkpoint that is not what it
should be, a directory that cannot be written) ends as ONE line on stderr, naming the input, what is
wrong and the fix, and the process exits with status 2. No traceback: `--verbose` on the command line
or DSV3_VERBOSE=1 in the environment prints it too.

Where the error is raised does not matter. Every check of the package raises `UserError` (a
ValueError; `ConfigError` says "config error") with the whole message and, as data, the key or request
field it concerns (`key`, `field`: what `runtime.from_config` and the server read); a missing or
unwritable file is an OSError naming it; third-party errors (tokenizers, json, orbax, tensorstore) are
caught where the file is known and re-raised as `UserError` in our words (see `dsv3_jax.io.tokenizer.load_tokenizer`,
`dsv3_jax.interop.safetensors_io.read_header`, `dsv3_jax.io.checkpoint`). `run` turns those into
the line. Anything else, a ValueError from JAX or numpy included, is a bug or a machine failure, not a
user error, and keeps its traceback.

`check_config_args` checks `--config=FILE` and every `--config.a.b=v` override against the config
file before ml-collections sees them (ml-collections applies overrides while the flag is being
defined and answers an unknown key with a KeyError traceback); `parse_absl_flags` turns absl's
flag-parsing errors (a value of the wrong type) into a ConfigError.
"""
from __future__ import annotations

import argparse
import difflib
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

VERBOSE_ENV = "DSV3_VERBOSE"
EXIT_USER_ERROR = 2


class UserError(ValueError):
    """An error the user can fix; the message names the input, what is wrong and what to do. As data for
    callers (never recovered from the text): `key`, the config key, argument or field it concerns
    ('moe_impl', 'model.moe_impl', 'fp8.impl'), and `field`, the request field ('prompt', 'max_tokens')."""

    prefix = "error"

    def __init__(self, message: str = "", *, key: str | None = None, field: str | None = None):
        super().__init__(message)
        self.key, self.field = key, field


class ConfigError(UserError):
    """A bad config file, key or value."""

    prefix = "config error"


# Exceptions that carry a user-facing message when they reach the top of a command. OSError covers
# missing files, unwritable directories and a full disk; UserError every check of the package.
_USER_ERRORS = (UserError, OSError)


def verbose(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv if argv is None else argv
    flag = any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in argv)
    return flag or os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false", "False")


def one_line(text: str) -> str:
    """Collapse a (possibly multi-line) message into one line."""
    return " ".join(str(text).split())


def message(e: BaseException) -> str:
    """The line `run` prints for a user error."""
    if isinstance(e, UserError):
        return f"{e.prefix}: {one_line(e)}"
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        what = f"{e.filename}: {e.strerror}"
        if e.filename2 is not None:
            what += f" (-> {e.filename2})"
        return f"error: {one_line(what)}"
    return f"error: {one_line(e)}"


def call(main: Callable[[], Any], prog: str, argv: Sequence[str] | None = None) -> int:
    """Call `main()`; return its exit status: its own (None -> 0), 2 after one line for a user error,
    130 on Ctrl-C. Other exceptions (bugs) propagate with their traceback."""
    try:
        rc = main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except _USER_ERRORS as e:
        if verbose(argv):
            traceback.print_exc()
        print(f"{prog}: {message(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    return rc or 0


def run(main: Callable[[], Any], prog: str | None = None) -> None:
    """`call(main)` and exit with its status (SystemExit from absl passes through)."""
    sys.exit(call(main, prog or os.path.basename(sys.argv[0])))


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line usage error (argparse's own prints the usage block first)."""

    def error(self, message: str):
        raise UserError(f"{message}; see {self.prog} --help")


# ---------------------------------------------------------------------------- ml-collections configs

def load_config_file(spec: str):
    """`configs/x.py` or `configs/x.py:ARG` -> the ConfigDict its get_config() returns (ConfigError if not)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        here = os.path.dirname(path) or "."
        listed = sorted(n for n in os.listdir(here) if n.endswith(".py")) if os.path.isdir(here) else []
        hint = f"; files there: {', '.join(listed)}" if listed else ""
        raise ConfigError(f"--config={spec}: no such file{hint}")
    try:
        mod_spec = importlib.util.spec_from_file_location("dsv3_user_config", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        get_config = module.get_config
        return get_config(arg) if arg else get_config()
    except Exception as e:  # noqa: BLE001 -- any failure of the user's file is reported as such
        raise ConfigError(f"--config={spec}: the config file failed to load ({type(e).__name__}: {e}); "
                          f"it must define get_config() returning an ml_collections.ConfigDict") from e


def _config_overrides(argv: Sequence[str], flag: str) -> list[str]:
    """The dotted keys of every `--FLAG.a.b=v` / `--FLAG.a.b v` argument."""
    keys = []
    for a in argv:
        if a.startswith(f"--{flag}."):
            keys.append(a[len(flag) + 3:].partition("=")[0])
    return keys


def _config_spec(argv: Sequence[str], flag: str, default: str) -> str:
    for i, a in enumerate(argv):
        if a.startswith(f"--{flag}="):
            return a.partition("=")[2]
        if a == f"--{flag}" and i + 1 < len(argv):
            return argv[i + 1]
    return default


def check_config_args(argv: Sequence[str], default: str, flag: str = "config") -> None:
    """Raise ConfigError for a missing config file or an override naming a key the config lacks."""
    keys = _config_overrides(argv, flag)
    spec = _config_spec(argv, flag, default)
    config = load_config_file(spec)
    for dotted in keys:
        node, seen = config, []
        for part in dotted.split("."):
            children = _children(node)
            if children is None:
                raise ConfigError(f"--{flag}.{dotted}: {flag}.{'.'.join(seen)} is a value, not a section")
            if part not in children:
                close = difflib.get_close_matches(part, children, n=1)
                hint = (f"did you mean --{flag}.{'.'.join(seen + [close[0]])}?" if close
                        else f"keys of {flag}{'.' if seen else ''}{'.'.join(seen)}: {', '.join(sorted(children))}")
                raise ConfigError(f"--{flag}.{dotted}: no key {part!r} in {spec}; {hint}")
            node = children[part]
            seen.append(part)


def _children(node) -> dict | None:
    import ml_collections

    if isinstance(node, ml_collections.ConfigDict):
        return {k: node[k] for k in node.keys()}
    if isinstance(node, dict):
        return node
    return None


def parse_absl_flags(argv: list[str]) -> list[str]:
    """absl `flags_parser` for app.run: a flag-parsing error (wrong type, unknown flag) is a ConfigError."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        raise ConfigError(f"{e}; see --helpfull for the flags and their types") from None


def parse_dtype(name: str, what: str, choices: Sequence[str] = ("float32", "bfloat16", "float16")) -> str:
    """Check a dtype name given on the command line or in a config; returns it."""
    if name not in choices:
        close = difflib.get_close_matches(str(name), choices, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"{what}={name!r} is not a dtype this can use; {hint}choose from {', '.join(choices)}")
    return name
