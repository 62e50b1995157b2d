"""Checkpointing: a thin wrapper over orbax's `CheckpointManager` (async save, keep last N).

A checkpoint of step ``s`` is one directory ``DIR/<s>/`` holding two items:

* ``state`` -- the training state, any pytree of `jax.Array` (model params, optimizer state,
  RNG keys, step counter), written with ``ocp.args.StandardSave`` as tensorstore arrays. Each
  array is written shard by shard by the processes that own it, so a sharded 671B state is never
  gathered on one host.
* ``meta`` -- a small plain-JSON dict (``ocp.args.JsonSave``): data-loader position, a snapshot
  of the config, counters such as tokens seen. Anything ``json.dumps`` accepts.

Saving
------
``save(step, state, meta)`` is *asynchronous* by default: the call blocks only while the arrays
are copied from device to host memory, then tensorstore writes them in a background thread while
training continues (so the caller may donate/overwrite the device buffers as soon as ``save``
returns). The next ``save`` (or ``wait()``/``close()``) waits for the previous one to finish.
A step is written when ``step % save_interval_steps == 0``, or always with ``force=True`` (use it
for the final step or on preemption). Unlike orbax's default policy, the first call of a fresh
run is *not* saved unconditionally (orbax 0.12 adds an "initial save" policy; we pass an explicit
save-decision policy instead so the interval means exactly what it says). Saving a step that
already exists returns False instead of raising. After each save only the newest ``keep``
checkpoints are kept (``keep=None`` keeps all).

Crash safety
------------
A run can be killed at any moment, including in the middle of a save. Orbax never writes into
the final directory: on a local/POSIX file system a save goes into
``DIR/<s>.orbax-checkpoint-tmp-<timestamp>/`` and is *renamed* to ``DIR/<s>/`` only after every
array and the metadata are on disk (a rename within one file system is atomic). (On GCS, where
rename is not atomic, orbax instead writes ``commit_success.txt`` last and treats a step
directory without it as unfinished.) Step discovery (``latest_step``, ``restore``) only lists
finalized directories, so a killed save leaves the previous checkpoint as the latest usable one;
``cleanup_tmp_directories=True`` makes the next ``Checkpointer`` on that directory delete the
leftover temporary directory. Old checkpoints are deleted only *after* a newer one is finalized,
so there is always at least one complete checkpoint once the first save has finished. The test
suite kills a process inside ``finalize`` to check exactly this.

Restoring
---------
``restore(abstract_state, step=None) -> (step, state, meta)`` takes a pytree of
`jax.ShapeDtypeStruct` with ``.sharding`` set: each array is read directly into that sharding
(each device reads only its shard), so the same checkpoint can be restored onto a different mesh.
Build it from a freshly initialised (or ``jax.eval_shape``/``nnx.eval_shape``-d and sharded)
state::

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    # or: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)

Concrete arrays are accepted too (converted the same way); a leaf without a sharding is placed
on the first local device. ``partial=True`` restores only the top-level entries the target names
(e.g. ``{"params", "biases"}`` of a training state: readers need no optimizer to build a target).
Before reading any array the target is compared with the checkpoint's own metadata (tree paths and
shapes); a mismatch -- a different model/optimizer config -- raises
``ValueError`` naming the keys that differ and the directory. Dtypes may differ: orbax casts on
read (e.g. restore float32 master weights as bfloat16 for evaluation).

The one restore path
--------------------
``load(target, step=None, partial=False, move_aside=False, log=...)`` is what train.py (resume),
infer.py and the converter's reader (`interop.convert.restore`) all call: ``step=None`` restores the
newest step that reads cleanly (``restore_latest_good``), a given step restores exactly that one;
``target(meta)`` builds the abstract state from the step's JSON meta.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from dsv3_jax import sharding
from dsv3_jax.cli import UserError
from dsv3_jax.model import abstract_model, split_model
from dsv3_jax.moe import RouterBias

__all__ = ["Checkpointer", "CheckpointMismatch", "NoUsableCheckpoint", "Reshaped", "weights_target"]


class CheckpointMismatch(UserError):
    """The checkpoint holds a different model/optimizer tree (another config): not corruption."""


class NoUsableCheckpoint(UserError):
    """Every checkpoint in the directory failed to restore."""

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Reshaped:
    """A restore target read in the layout the checkpoint was saved in (`read`) and handed back converted
    (`convert(state)`), e.g. a pipeline's slot layout read as the layer layout (`parallel/pipeline/slot_state.py`)."""

    read: PyTree
    convert: Callable[[PyTree], PyTree]


_STATE = "state"
_META = "meta"
_MAX_LISTED = 8  # how many mismatching keys an error message lists per category


def abstract_leaf(x):
    """Leaf of the restore target -> ShapeDtypeStruct with a sharding."""
    if isinstance(x, jax.ShapeDtypeStruct):
        if getattr(x, "sharding", None) is None:
            return jax.ShapeDtypeStruct(
                x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            )
        return x
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return abstract_leaf(ocp.utils.to_shape_dtype_struct(x))
    return x


def _state_handler() -> ocp.StandardCheckpointHandler:
    """orbax's standard handler, with one change in a single process: each array is written by the first device
    holding it. orbax's default ("replica-parallel") splits a replicated array's write among its replicas so that
    several hosts share it; within one process the same process writes every piece, and the splitting only adds
    a slice program per shape and device (148 compilations for each save of the tiny config's pipelined state on
    8 CPU devices). Several processes keep orbax's default, and so does an orbax without these internals (the
    handler has no public option for it)."""
    handler = ocp.StandardCheckpointHandler()
    if jax.process_count() > 1:
        return handler
    try:
        import numpy as np
        from orbax.checkpoint._src.serialization import type_handler_registry as registries

        base = registries.GLOBAL_TYPE_HANDLER_REGISTRY
        array = ocp.type_handlers.ArrayHandler(
            use_replica_parallel=False, array_metadata_store=base.get(jax.Array)._array_metadata_store)
        registry = registries.create_type_handler_registry(
            *[(ty, base.get(ty)) for ty in (int, float, bytes, np.number, np.ndarray, str, type(ocp.PLACEHOLDER))],
            (jax.Array, array))
        # (what orbax's standard handler wraps, built as it builds it but for the registry: orbax internals, to
        # re-check on an orbax upgrade; tests/test_checkpoint.py fails if this stops taking effect)
        handler._impl = ocp.PyTreeCheckpointHandler(save_concurrent_gb=96, restore_concurrent_gb=96,
                                                    type_handler_registry=registry)
    except (AttributeError, ImportError, TypeError, ValueError):
        return ocp.StandardCheckpointHandler()
    return handler


def _fmt_key(key: tuple) -> str:
    return "/".join(str(k) for k in key)


def _damage(e: BaseException) -> str:
    """The one-line reason when `e` says the checkpoint's files are damaged; re-raise anything else.

    Damage: a missing, truncated or undecodable file (OSError, ValueError incl. JSON and tensorstore
    errors, EOFError) or the bare Exception orbax wraps a failed array read in. Not damage, raised as it
    is: running out of memory, XLA runtime errors, TypeError/KeyError/AttributeError (bugs), Ctrl-C.
    """
    damaged = isinstance(e, (OSError, ValueError, EOFError)) or type(e) is Exception
    if not damaged or isinstance(e, MemoryError):
        raise e
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def _is_failed_read_echo(exc_type, exc, tb) -> bool:
    """The late echo of a failed orbax restore: tensorstore completing a read for an event loop that the
    failed restore already closed (RuntimeError 'Event loop is closed' in call_soon_threadsafe)."""
    if exc_type is not RuntimeError or str(exc) != "Event loop is closed":
        return False
    frames = traceback.extract_tb(tb)
    return any(f.name == "call_soon_threadsafe" and "asyncio" in f.filename for f in frames)


class _Muted:
    """What `_failed_reads_muted` dropped: `settle()` waits for the abandoned reads of a failed restore to finish
    echoing (they arrive from tensorstore's threads for a while after the failure), so none is printed after
    the hooks are restored."""

    def __init__(self):
        self.dropped = 0

    def settle(self, quiet_s: float = 0.3, limit_s: float = 5.0) -> None:
        """Return once `quiet_s` has passed without a new echo (at most `limit_s`)."""
        end = time.monotonic() + limit_s
        while time.monotonic() < end:
            seen = self.dropped
            gc.collect()
            time.sleep(quiet_s)
            if self.dropped == seen:
                return


@contextlib.contextmanager
def _failed_reads_muted():
    """While restores may fail, drop what Python prints for the abandoned reads of a failed orbax restore,
    possibly from tensorstore's threads: "Exception ignored in: <coroutine _read_array_index_and_device_put>"
    (sys.unraisablehook) and 'Event loop is closed' from read callbacks (sys.excepthook). Only those are
    dropped; everything else reaches the previous hooks, which are back in place on exit. Yields a `_Muted`."""
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook
    muted = _Muted()

    def unraisable_hook(unraisable):
        if getattr(unraisable.object, "__qualname__", "").endswith("_read_array_index_and_device_put") or \
                _is_failed_read_echo(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback):
            muted.dropped += 1
            return
        previous_unraisable(unraisable)

    def except_hook(exc_type, exc, tb):
        if _is_failed_read_echo(exc_type, exc, tb):
            muted.dropped += 1
            return
        previous_except(exc_type, exc, tb)

    sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook
    try:
        yield muted
    finally:
        if sys.unraisablehook is unraisable_hook:  # unless someone else replaced it meanwhile
            sys.unraisablehook = previous_unraisable
        if sys.excepthook is except_hook:
            sys.excepthook = previous_except


@contextlib.contextmanager
def _quiet_orbax():
    """Mute the tracebacks orbax (absl logging) and its read tasks (asyncio: "Task exception was never
    retrieved", printed when the failed sibling tasks are garbage-collected) log for a failure that the
    caller reports in one line, for the duration of the call only (yields the `_Muted` of the hooks: call its
    `settle()` after a failure). The collection is forced before the loggers and hooks are restored."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    with _failed_reads_muted() as muted:
        try:
            yield muted
        finally:
            gc.collect()
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


class Checkpointer:
    """Async, keep-last-N checkpoints of ``(state pytree, JSON meta)`` in ``directory``.

    Args:
      directory: where step directories ``<step>/`` are written (created if missing).
      keep: how many most recent checkpoints to keep; None keeps all.
      save_interval_steps: ``save`` writes only when ``step % save_interval_steps == 0``
        (unless ``force=True``).
      async_save: write in a background thread (True) or block until written (False).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ):
        if keep is not None and keep < 1:
            raise UserError(f"keep must be >= 1 or None, got {keep}")
        if save_interval_steps < 1:
            raise UserError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        path = os.fspath(directory)
        if "://" not in path:  # orbax wants absolute local paths
            path = os.path.abspath(path)
        self.directory = epath.Path(path)
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
            save_decision_policy=policies.AnySavePolicy(
                [
                    policies.FixedIntervalPolicy(save_interval_steps),
                    policies.PreemptionCheckpointingPolicy(),
                ]
            ),
        )
        # Explicit handlers (not just item names): a manager opened on an existing directory has
        # not saved anything yet, and without them it cannot read the items' metadata.
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={_STATE: _state_handler(), _META: ocp.JsonCheckpointHandler()},
        )

    # ------------------------------------------------------------------ save

    def save(self, step: int, state: PyTree, meta: dict | None = None, *, force: bool = False) -> bool:
        """Start saving ``state`` and ``meta`` as step ``step``; True if a save was started.

        Skipped (False) when a checkpoint of ``step`` already exists, and, unless ``force``,
        when ``step`` is not a multiple of ``save_interval_steps`` or not newer than the latest.
        """
        step = int(step)
        meta = {} if meta is None else meta
        try:  # fail here, in the caller's thread, rather than in the background writer
            json.dumps(meta)
        except TypeError as e:
            raise TypeError(f"checkpoint meta must be plain JSON: {e}") from e
        if step in self._mngr.all_steps():
            return False
        return self._mngr.save(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}
            ),
            force=force,
        )

    # --------------------------------------------------------------- inspect

    def latest_step(self) -> int | None:
        """Newest *finalized* step in the directory (unfinished temporary saves are ignored)."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        """All finalized steps, ascending."""
        return sorted(self._mngr.all_steps())

    # --------------------------------------------------------------- restore

    def _check_matches(self, step: int, abstract_state: PyTree) -> None:
        """Raise ValueError if the restore target's tree paths/shapes differ from the checkpoint."""
        md = self._mngr.item_metadata(step)[_STATE]
        if md is None:  # metadata unreadable: leave the checking to orbax's restore
            return
        tree = getattr(md, "tree", md)
        saved = ocp.tree.to_flat_dict(tree)
        target = ocp.tree.to_flat_dict(abstract_state)
        missing = sorted(set(target) - set(saved))  # the target wants them, the checkpoint lacks them
        extra = sorted(set(saved) - set(target))
        shapes = []
        for k in sorted(set(saved) & set(target)):
            s_shape = getattr(saved[k], "shape", None)
            t_shape = getattr(target[k], "shape", None)
            if s_shape is not None and t_shape is not None and tuple(s_shape) != tuple(t_shape):
                shapes.append(f"{_fmt_key(k)}: checkpoint {tuple(s_shape)} vs requested {tuple(t_shape)}")
        if not (missing or extra or shapes):
            return

        def listing(items):
            shown = ", ".join(items[:_MAX_LISTED])
            return shown + (f", ... ({len(items)} in all)" if len(items) > _MAX_LISTED else "")

        parts = []
        if shapes:
            parts.append("shape mismatch: " + listing(shapes))
        if missing:
            parts.append("not in checkpoint: " + listing([_fmt_key(k) for k in missing]))
        if extra:
            parts.append("only in checkpoint: " + listing([_fmt_key(k) for k in extra]))
        raise CheckpointMismatch(
            f"checkpoint in {self.directory} (step {step}) was written with a different config "
            f"(model/optimizer tree or shapes differ from the restore target); "
            + "; ".join(parts) + "; restore with the config it was written with, or use another --workdir"
        )

    def restore(self, abstract_state: PyTree, step: int | None = None, *,
                partial: bool = False) -> tuple[int, PyTree, dict]:
        """Restore ``(step, state, meta)``; ``step=None`` means the latest finalized step.

        ``abstract_state`` gives the tree, shapes, dtypes and *shardings* to restore into (or is a
        `Reshaped`: its ``read`` tree is read and ``convert`` applied to what comes back).
        Raises FileNotFoundError if there is no such checkpoint and ValueError if its tree or
        shapes do not match ``abstract_state``. ``partial``: ``abstract_state`` is a dict naming some
        of the saved top-level entries; only those come back (the others are read onto the first
        device and dropped: orbax's standard handler reads whole trees).
        """
        self._mngr.wait_until_finished()  # a save in flight becomes visible first
        steps = self._mngr.all_steps()
        if step is None:
            step = self._mngr.latest_step()
            if step is None:
                raise FileNotFoundError(f"no finalized checkpoint in {self.directory}")
        step = int(step)
        convert = None
        if isinstance(abstract_state, Reshaped):
            abstract_state, convert = abstract_state.read, abstract_state.convert
        if step not in steps:
            raise FileNotFoundError(
                f"no finalized checkpoint for step {step} in {self.directory}; available: {sorted(steps)}"
            )
        wanted = None
        if partial:
            wanted = set(abstract_state)
            abstract_state = {**self._saved_abstract(step), **abstract_state}
        abstract_state = jax.tree.map(abstract_leaf, abstract_state)
        self._check_matches(step, abstract_state)
        out = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardRestore(abstract_state), _META: ocp.args.JsonRestore()}
            ),
        )
        meta = out[_META]
        state = out[_STATE]
        if wanted is not None:
            state = {k: v for k, v in state.items() if k in wanted}
        if convert is not None:
            state = convert(state)
        return step, state, ({} if meta is None else dict(meta))

    def saved_abstract(self, step: int | None = None) -> dict:
        """The saved state's tree (newest step by default) as ShapeDtypeStructs, from its metadata: no array is read."""
        self._mngr.wait_until_finished()
        step = self._mngr.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no finalized checkpoint in {self.directory}")
        return self._saved_abstract(step)

    def _saved_abstract(self, step: int) -> dict:
        """The saved state's tree as ShapeDtypeStructs on the first local device (from its metadata)."""
        md = self._mngr.item_metadata(step)[_STATE]
        tree = getattr(md, "tree", md)
        if tree is None:
            raise NoUsableCheckpoint(f"checkpoint step {step} in {self.directory} has no readable metadata")
        return jax.tree.map(lambda m: abstract_leaf(jax.ShapeDtypeStruct(tuple(m.shape), m.dtype)), dict(tree))

    def load(self, target: Callable[[dict], PyTree], step: int | None = None, *, partial: bool = False,
             move_aside: bool = False, log: Callable[[str], None] = print) -> tuple[int, PyTree, dict] | None:
        """The one restore path: ``(step, state, meta)`` of `step`, or of the newest step that restores
        cleanly when `step` is None (None if the directory holds no checkpoint; damaged newer steps are
        reported through `log` and, with `move_aside`, moved away). ``target(meta)`` builds the abstract
        state from the step's meta; ``partial`` as in `restore`."""
        if step is None:
            return self.restore_latest_good(target, log=log, move_aside=move_aside, partial=partial)
        _, meta = self.restore_meta(step)
        return self.restore(target(meta), step, partial=partial)

    def restore_meta(self, step: int | None = None) -> tuple[int, dict]:
        """Only the JSON meta of a checkpoint (e.g. its config), without reading any array."""
        self._mngr.wait_until_finished()
        step = self._mngr.latest_step() if step is None else int(step)
        if step is None or step not in self._mngr.all_steps():
            raise FileNotFoundError(f"no finalized checkpoint{'' if step is None else f' for step {step}'} in "
                                    f"{self.directory}")
        out = self._mngr.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
        return step, dict(out[_META] or {})

    def restore_latest_good(
        self, target: Callable[[dict], PyTree], log: Callable[[str], None] = print, move_aside: bool = True,
        partial: bool = False,
    ) -> tuple[int, PyTree, dict] | None:
        """Restore the newest checkpoint that restores cleanly; None if the directory has none at all.

        ``target(meta) -> abstract_state`` picks the restore target from a step's JSON meta. A step
        whose meta or arrays fail to read (truncated or corrupted data file, missing or truncated
        metadata) is reported through ``log`` with the reason, and once an older step has restored,
        every newer bad step is moved aside into ``<directory>.corrupt/<step>-<time>`` (never deleted:
        the run goes on from the good step and would otherwise collide with them). A config mismatch
        (CheckpointMismatch) is not corruption and is raised at once, and so is any error that does not
        say the files are damaged (out of memory, XLA errors, bugs: see `_damage`). ``move_aside=False``
        (readers such as infer.py, and every process but the first of a multi-host run) leaves the
        directory as it is. If no step restores, nothing is moved and NoUsableCheckpoint names every
        step and its error.
        """
        self._mngr.wait_until_finished()
        self._mngr.reload()
        failed: list[tuple[int, str]] = []
        # one muted scope for every attempt: a failed step's abandoned reads echo from tensorstore's threads while
        # the next step restores, and are waited for (settle) before the hooks are restored
        with _quiet_orbax() as muted:  # orbax logs a traceback for the failure we report in one line
            try:
                got = self._first_restoring(target, partial, failed, log)
            finally:
                if failed:
                    muted.settle()
        if got is not None:
            step = got[0]
            for bad, _ in failed if move_aside else ():
                moved = self.move_aside(bad)
                log(f"moved the unreadable checkpoint of step {bad} to {moved}; continuing from step {step}")
            return got
        if failed:
            listed = "; ".join(f"step {s}: {r}" for s, r in failed)
            raise NoUsableCheckpoint(f"no checkpoint in {self.directory} restores ({listed}); move the directory "
                                     f"away to start over, or restore a backup")
        return None

    def _first_restoring(self, target, partial, failed: list, log):
        """The newest step that restores (as `restore` returns it), or None; each failure is logged and appended
        to `failed` as (step, reason)."""
        for step in sorted(self._mngr.all_steps(), reverse=True):
            reason = None
            try:
                _, meta = self.restore_meta(step)
            except Exception as e:  # noqa: BLE001 -- sorted by _damage
                reason = _damage(e)
            if reason is None:
                abstract = target(meta)  # the caller's errors (mismatch, missing tokenizer) propagate
                try:
                    return self.restore(abstract, step, partial=partial)
                except UserError:  # a config mismatch is the caller's to fix, not corruption
                    raise
                except Exception as e:  # noqa: BLE001
                    reason = _damage(e)
            # leaving the except clauses drops the tracebacks, so the failed read tasks die muted
            log(f"checkpoint step {step} in {self.directory} failed to restore ({reason})")
            failed.append((step, reason))
        return None

    def reload(self) -> None:
        """Re-read the step list from disk (after another process moved a step aside)."""
        self._mngr.reload()

    def move_aside(self, step: int) -> str:
        """Rename step ``step``'s directory to ``<directory>.corrupt/<step>-<unix time>``; returns the new path."""
        src = os.path.join(os.fspath(self.directory), str(step))
        dst_dir = os.fspath(self.directory) + ".corrupt"
        os.makedirs(dst_dir, exist_ok=True)
        dst = os.path.join(dst_dir, f"{step}-{int(time.time())}")
        os.replace(src, dst)
        self._mngr.reload()
        return dst

    # ------------------------------------------------------------- lifecycle

    def wait(self) -> None:
        """Block until any in-flight async save is finalized on disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release orbax's background resources."""
        self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def weights_target(model_cfg, runtime=None, mesh=None):
    """(graphdef, abstract {"params", "biases"}) of the model `model_cfg` runs as: the restore target of
    a model's weights (a train.py state restored with ``partial=True``, or the converter's output). With a
    mesh, every leaf carries its NamedSharding from the logical-axis rules (each device reads its shard);
    without one, leaves land on the first local device."""
    model = abstract_model(model_cfg, runtime)
    graphdef, params, biases = split_model(model)
    abstract = {"params": params, "biases": biases}
    if mesh is not None:
        specs = {"params": sharding.pure_specs(nnx.state(model, nnx.Param)),
                 "biases": sharding.pure_specs(nnx.state(model, RouterBias))}
        abstract = jax.tree.map(lambda x, spec: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=jax.sharding.NamedSharding(mesh, spec)), abstract, specs)
    return graphdef, abstract

