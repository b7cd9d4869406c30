"""Checkpoints (orbax CheckpointManager) and clean preemption handling.

A checkpoint at step s is `<directory>/<s>/{state/, extra/, repjax_manifest.json}`: `state` is the train
state stored as a nested dict (`flax.serialization.to_state_dict`, so dataclasses, optax namedtuples, None
leaves and empty dicts all work), `extra` a small JSON dict. The data position needs no saving: batches are a
pure function of (seed, step).

Integrity: once orbax has finalised a save, the manifest records the size and sha256 of every file of the
step (written atomically, by process 0). `restore` verifies it first. Without a `step`, a damaged checkpoint
(changed, truncated, missing or extra files, no manifest because the run stopped before the save was sealed,
a stray step folder) is reported in one line, moved aside to `<directory>.damaged/<s>` (`set_aside=True`, what training
does) or skipped (what evaluation does), and the newest intact one is restored. A damaged `step` asked for
explicitly raises `CheckpointDamagedError`.

    with Checkpointer(workdir / "ckpt", save_every_steps=1000) as ckpt:
        if (restored := ckpt.restore(abstract_state)) is not None:
            start_step, state, extra = restored
        with PreemptionGuard() as guard:
            for step in ...:
                ...
                stop = sync_flag(guard.requested)
                ckpt.save(step, state, extra, force=stop)
                if stop:
                    break

PRNG keys may be typed (`jax.random.key`) or raw uint32 (`jax.random.PRNGKey`); they are restored in the
form the abstract state asks for, whichever form was saved. All processes must call `save`/`restore`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

log = logging.getLogger(__name__)

_MAX_LISTED = 20
MANIFEST = "repjax_manifest.json"


class CheckpointMismatchError(ValueError):
    """The stored tree does not match the abstract state (different model, config or optimizer)."""


class CheckpointDamagedError(ValueError):
    """A checkpoint's files do not match its manifest (or it has none)."""


def _as_dir(directory: str | Path) -> str | Path:
    """Absolute local path; remote URLs (gs://...) are left as they are."""
    return directory if "://" in str(directory) else Path(directory).expanduser().resolve()


def _flat(tree: Any) -> dict[str, Any]:
    """Leaves of `tree` keyed by "a/b/c" paths (None and empty containers have no leaves)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in leaves}


def _files(step_dir: Path) -> dict[str, Path]:
    return {p.relative_to(step_dir).as_posix(): p for p in sorted(step_dir.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(step_dir: str | Path) -> None:
    """Seals a finished checkpoint: `{relative path: {size, sha256}}` of every file, written atomically."""
    step_dir = Path(step_dir)
    files = {name: {"size": p.stat().st_size, "sha256": _sha256(p)} for name, p in _files(step_dir).items()}
    tmp = step_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, step_dir / MANIFEST)


def verify(step_dir: str | Path) -> str | None:
    """None when `step_dir` matches its manifest, else the first problem found, in words."""
    step_dir = Path(step_dir)
    try:
        files = json.loads((step_dir / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return "no manifest: the run stopped before this save was sealed, or this is not a checkpoint"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest ({type(e).__name__})"
    present = _files(step_dir)
    for name, want in files.items():
        path = present.get(name)
        if path is None:
            return f"file {name} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"file {name} has {size} bytes, expected {want['size']}"
        if _sha256(path) != want["sha256"]:
            return f"file {name} differs from its sha256 in the manifest"
    extra = sorted(set(present) - set(files))
    return f"unexpected file {extra[0]}" if extra else None


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _replicated() -> jax.sharding.NamedSharding:
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("_all",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _to_abstract(x: Any) -> Any:
    """Leaf → ShapeDtypeStruct; arrays keep their sharding, leaves without one are replicated."""
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, jax.ShapeDtypeStruct | np.ndarray | np.generic):
        sharding = getattr(x, "sharding", None) or _replicated()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return x


def _stored_shape(x: Any) -> tuple[int, ...] | None:
    """Shape as stored on disk: typed keys are stored as their uint32 key data."""
    if _is_key(x):
        return tuple(jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape)
    shape = getattr(x, "shape", None)
    return None if shape is None else tuple(shape)


def _fix_key(abstract: Any, value: Any) -> Any:
    """Converts a restored key to the form (typed or raw) that `abstract` asks for."""
    if _is_key(abstract) and not _is_key(value):
        return jax.random.wrap_key_data(value, impl=abstract.dtype)
    if not _is_key(abstract) and _is_key(value):
        return jax.random.key_data(value)
    return value


def _mismatch_report(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    def listed(title: str, items: list[str]) -> list[str]:
        more = [f"    ... and {len(items) - _MAX_LISTED} more"] if len(items) > _MAX_LISTED else []
        return [f"  {title} ({len(items)}):", *(f"    {s}" for s in items[:_MAX_LISTED]), *more] if items else []

    missing = [f"{k} {_stored_shape(v)}" for k, v in wanted.items() if k not in stored]
    unexpected = [f"{k} {_stored_shape(v)}" for k, v in stored.items() if k not in wanted]
    shapes = [
        f"{k}: checkpoint {_stored_shape(stored[k])} vs expected {_stored_shape(v)}"
        for k, v in wanted.items()
        if k in stored and _stored_shape(stored[k]) != _stored_shape(v)
    ]
    return (
        listed("missing from checkpoint", missing)
        + listed("in checkpoint but not in the state", unexpected)
        + listed("shape differs", shapes)
    )


def _jsonable(x: Any) -> Any:
    """Makes `extra` JSON-serialisable (numpy/jax scalars → Python numbers)."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, jax.Array | np.ndarray | np.generic):
        return np.asarray(x).tolist()
    return x


class Checkpointer:
    """Periodic, pruned, optionally asynchronous checkpoints of a train state plus a JSON `extra` dict."""

    def __init__(
        self,
        directory: str | Path,
        *,
        max_to_keep: int | None = 3,
        save_every_steps: int = 1000,
        async_save: bool = True,
    ):
        if save_every_steps < 1:
            raise ValueError(f"save_every_steps must be >= 1, got {save_every_steps}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None (keep all), got {max_to_keep}")
        self.directory = _as_dir(directory)
        self.save_every_steps = save_every_steps
        self._local = isinstance(self.directory, Path)
        self._async = async_save
        self._sealer: threading.Thread | None = None  # writes the manifest once orbax has finalised a save
        self._seal_error: BaseException | None = None
        # The periodic policy lives in `should_save`: orbax's own interval policy also consults JAX's
        # preemption sync point, which all processes would have to reach in lockstep at every step.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=1,
            enable_async_checkpointing=async_save,
            create=True,
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "extra": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def should_save(self, step: int, *, force: bool = False) -> bool:
        """Whether `save(step, ..., force=force)` would write (same answer on every process)."""
        return step not in self._manager.all_steps() and (force or step % self.save_every_steps == 0)

    def save(self, step: int, state: Any, extra: Mapping[str, Any] | None = None, *, force: bool = False) -> bool:
        """Saves when `step` is a multiple of `save_every_steps` (or `force`); never the same step twice.

        With async saving this returns once the arrays are copied off the device (buffers may then be
        donated); writing to disk continues in the background (see `wait`).
        """
        if not self.should_save(step, force=force):
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(serialization.to_state_dict(state)),
            extra=ocp.args.JsonSave(_jsonable(dict(extra or {}))),
        )
        self._join_sealer()
        saved = bool(self._manager.save(step, args=args, force=True))
        if saved:
            self._sealer = threading.Thread(target=self._seal, args=(step,), name=f"seal-{step}", daemon=True)
            self._sealer.start() if self._async else self._sealer.run()
        return saved

    def _seal(self, step: int) -> None:
        """Writes the manifest of `step` once orbax has finalised it (the step folder has its final name)."""
        try:
            while self._manager.is_saving_in_progress():
                time.sleep(0.02)
            if self._local and jax.process_index() == 0:
                write_manifest(self._step_dir(step))
        except BaseException as e:  # re-raised by `wait`, never lost in a thread
            self._seal_error = e

    def _join_sealer(self) -> None:
        if self._sealer is not None and self._sealer.is_alive():
            self._sealer.join()
        self._sealer = None
        if self._seal_error is not None:
            error, self._seal_error = self._seal_error, None
            raise RuntimeError(f"Could not seal a checkpoint in {self.directory}: {error}")

    def restore(self, abstract_state: Any, step: int | None = None, *,
                set_aside: bool = False) -> tuple[int, Any, dict] | None:
        """Restores `(step, state, extra)` from `step` (default: the newest intact); None when there is none.

        `abstract_state` has the structure of the state with `jax.ShapeDtypeStruct` leaves carrying the
        target `.sharding` (concrete arrays also work; leaves without a sharding are restored replicated
        over all devices); the state is restored onto those shardings and rebuilt into the same container
        types. Stored dtypes are cast to the abstract dtypes. Raises `CheckpointMismatchError` naming the differing
        entries when the stored tree does not match. Every checkpoint is verified against its manifest first;
        without `step`, damaged ones are reported (one line each) and skipped, or moved aside with `set_aside`.
        """
        self.wait()
        if step is not None:
            if step not in self._manager.all_steps():
                raise FileNotFoundError(
                    f"No checkpoint for step {step} in {self.directory}; available: {self.all_steps()}"
                )
            problem = self._verify_everywhere(step)
            if problem is not None:
                raise CheckpointDamagedError(f"Checkpoint {self._step_dir(step)} is damaged: {problem}")
        else:
            step = self.latest_intact_step(set_aside=set_aside)
            if step is None:
                return None
        abstract = jax.tree.map(_to_abstract, serialization.to_state_dict(abstract_state))
        self._check_matches(step, abstract)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()),
        )
        state_dict = jax.tree.map(_fix_key, abstract, restored.state)
        state = serialization.from_state_dict(abstract_state, state_dict)
        return int(step), state, dict(restored.extra or {})

    def _step_dir(self, step: int) -> Path:
        return Path(str(self.directory)) / str(step)

    def verify(self, step: int) -> str | None:
        """None when checkpoint `step` matches its manifest, else what is wrong (remote directories: None)."""
        return verify(self._step_dir(step)) if self._local else None

    def _verify_everywhere(self, step: int) -> str | None:
        """`verify` on process 0 (one reader hashes the files); every process gets the same verdict."""
        problem = self.verify(step) if jax.process_index() == 0 else None
        if jax.process_count() > 1 and sync_flag(problem is not None) and problem is None:
            problem = "damaged (details in the log of process 0)"
        return problem

    def latest_intact_step(self, *, set_aside: bool = False) -> int | None:
        """The newest step that verifies; each damaged newer one is reported and, with `set_aside`, moved
        to `<directory>.damaged/` so that saving can continue past it."""
        for step in sorted(self._manager.all_steps(), reverse=True):
            problem = self._verify_everywhere(step)
            if problem is None:
                return step
            where = self._step_dir(step)
            if set_aside:
                dest = Path(f"{self.directory}.damaged") / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
                if jax.process_index() == 0:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(where), str(dest))
                _sync("repjax_set_aside")  # every process sees the move before it lists the steps again
                self._manager.reload()
                _say(f"Checkpoint {where} is damaged ({problem}); moved to {dest}, using an older one")
            else:
                _say(f"Checkpoint {where} is damaged ({problem}); skipped")
        return None

    def _check_matches(self, step: int, abstract: Any) -> None:
        stored = _flat(self._manager.item_metadata(step).state.tree)
        report = _mismatch_report(stored, _flat(abstract))
        if report:
            where = Path(str(self.directory)) / str(step)
            raise CheckpointMismatchError(
                f"Checkpoint {where} does not match the state to restore "
                "(different model, optimizer or config?):\n" + "\n".join(report)
            )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk and sealed by their manifest."""
        self._manager.wait_until_finished()
        self._join_sealer()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.wait()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PreemptionGuard:
    """Turns SIGTERM/SIGINT into a `.requested` flag so the loop can save and exit cleanly.

    A second SIGINT (Ctrl-C twice) raises KeyboardInterrupt as usual. Previous handlers are restored on
    exit. Outside the main thread signals cannot be caught; the guard then does nothing.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        log.warning("Received %s: will checkpoint and stop.", signal.Signals(signum).name)

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionGuard outside the main thread: signals are not caught.")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()


def _say(line: str) -> None:
    if jax.process_index() == 0:
        print(line, file=sys.stderr, flush=True)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def sync_flag(flag: bool) -> bool:
    """True when `flag` is set on any process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, dtype=np.bool_))))
