"""A run's workdir is its record: what it was started with, what changed, who uses it, what was evaluated.

    <workdir>/
      config.json            the config the run was started with (epochs resolved to steps); written once
      config_changes.jsonl   one line per resume that changed the config: the changed keys and the new config
      lock.json              pid and host of the run using the workdir; removed at exit, taken over when stale
      checkpoints/<step>/    orbax checkpoints, each sealed by a manifest of sha256 digests (repjax.checkpoint)
      checkpoints.damaged/   checkpoints that failed verification, moved aside when a run resumed
      metrics.jsonl, tb/     metrics (repjax.metrics); rows beyond the restored step are dropped on resume
      evals.jsonl            one line per `python -m repjax.eval --workdir` (checkpoint, overrides, results)

The run's config is `config.json` with the accepted changes applied (`run_config`). A resume whose config
differs in a key that changes the result is refused, naming the keys, unless explicitly allowed
(`--allow_config_change`); changes of result-neutral keys (`NEUTRAL_KEYS`) are accepted and recorded too.
Only process 0 writes these files.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections as mlc

from repjax.metrics import _to_json

CONFIG_FILE = "config.json"
CHANGES_FILE = "config_changes.jsonl"
LOCK_FILE = "lock.json"
EVALS_FILE = "evals.jsonl"

# Keys (and key prefixes) that change neither the trained parameters nor the reported numbers beyond float
# summation order: cadences, host threads and caches, device layout, the conv weight-gradient order.
NEUTRAL_KEYS = ("log_every_steps", "eval_every_steps", "eval_every_epochs", "checkpoint_every_steps",
                "keep_checkpoints", "eval_batch_size", "data.num_threads", "data.cache_gb", "conv_chunked_wgrad",
                "mesh", "sharding_rules")


class ConfigChangedError(ValueError):
    """A resume would change a key that alters the run's result."""


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir's lock."""


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _append_line(path: pathlib.Path, row: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")


def _tuples(x: Any) -> Any:
    """JSON -> config values: lists become tuples (configs use both; every consumer takes tuples)."""
    if isinstance(x, Mapping):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def config_from_json(data: Mapping[str, Any]) -> mlc.ConfigDict:
    return mlc.ConfigDict(_tuples(dict(data)))


def flat_json(config: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a.b": value}` of a config in its JSON form (every dict level, free-form blocks included)."""
    out: dict[str, Any] = {}
    for key, value in (_to_json(config) if prefix == "" else config).items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_json(value, path + "."))
        else:
            out[path] = value
    return out


def config_diff(old: Any, new: Any) -> dict[str, tuple[Any, Any]]:
    """`{key: (old, new)}` for every leaf that differs (absent leaves are None)."""
    a, b = flat_json(old), flat_json(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def is_neutral(key: str) -> bool:
    return any(key == n or key.startswith(n + ".") for n in NEUTRAL_KEYS)


def _describe(diff: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in diff.items())


def run_config(workdir: str | os.PathLike) -> mlc.ConfigDict | None:
    """The run's current config: `config.json` with the accepted changes applied; None for a new workdir."""
    workdir = pathlib.Path(workdir)
    path = workdir / CONFIG_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        changes = workdir / CHANGES_FILE
        if changes.exists():
            for line in changes.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    data = json.loads(line)["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} or {workdir / CHANGES_FILE} is unreadable ({e}); restore it from a backup "
                         "or use a new workdir") from None
    return config_from_json(data)


def record_config(workdir: str | os.PathLike, config: mlc.ConfigDict, *, allow_change: bool = False) -> str | None:
    """Records `config` as the run's config; returns a line to print when an accepted change was recorded.

    A new workdir gets `config.json` (never rewritten afterwards). On a resume, `config` is compared with
    `run_config(workdir)`: a change of a key outside `NEUTRAL_KEYS` raises ConfigChangedError listing the
    changed keys, unless `allow_change`; accepted changes are appended to `config_changes.jsonl`. Nothing is
    written when the change is refused.
    """
    workdir = pathlib.Path(workdir)
    previous = run_config(workdir)
    write = jax.process_index() == 0
    if previous is None:
        if write:
            _write_atomic(workdir / CONFIG_FILE, json.dumps(_to_json(config), indent=2, sort_keys=True) + "\n")
        return None
    diff = config_diff(previous, config)
    if not diff:
        return None
    changed = {k: v for k, v in diff.items() if not is_neutral(k)}
    if changed and not allow_change:
        raise ConfigChangedError(
            f"{workdir} was run with another config; changed keys that alter the result: {_describe(changed)}. "
            "Rerun with the run's config (see config.json and config_changes.jsonl there), use a new workdir, "
            "or pass --allow_config_change to continue with the change (it is recorded)")
    if write:
        _append_line(workdir / CHANGES_FILE, {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "allowed": bool(changed),
            "changed": {k: list(v) for k, v in diff.items()}, "config": _to_json(config)})
    kind = "accepted (--allow_config_change)" if changed else "accepted (result-neutral)"
    return f"Config changes {kind}, recorded in {workdir / CHANGES_FILE}: {_describe(diff)}"


def append_eval(workdir: str | os.PathLike, record: Mapping[str, Any]) -> pathlib.Path:
    """Appends one evaluation record to `<workdir>/evals.jsonl` (earlier records are never rewritten)."""
    path = pathlib.Path(workdir) / EVALS_FILE
    if jax.process_index() == 0:
        _append_line(path, {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **_to_json(dict(record))})
    return path


# ----------------------------------------------------------------------------------------------- lock

def _proc_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (tells a live process from a reused pid), when /proc has it."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: Mapping[str, Any]) -> bool:
    """Whether the lock's holder may still run (a holder on another host is assumed alive)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (OverflowError, ValueError):
        return False
    start = holder.get("proc_start")
    return start is None or _proc_start(pid) in (None, start)


class WorkdirLock(contextlib.AbstractContextManager):
    """Holds `<workdir>/lock.json` (pid, host, start time) while a run uses the workdir.

    The lock file appears atomically with its content (hard link of a written temp file). A lock left by a
    dead process on this host (also a reused pid) is taken over with a notice; a live holder, or one on
    another host, makes `__enter__` raise WorkdirLockedError naming it. Process 0 holds the lock for all.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.path = pathlib.Path(workdir) / LOCK_FILE
        self.held = False

    def __enter__(self) -> WorkdirLock:
        error = None
        if jax.process_index() == 0:
            try:
                self._take()
            except WorkdirLockedError as e:
                error = e
        if jax.process_count() > 1:  # every process stops when process 0 could not take the lock
            from repjax.checkpoint import sync_flag

            if sync_flag(error is not None) and error is None:
                error = WorkdirLockedError(f"process 0 could not take {self.path} (see its log)")
        if error is not None:
            raise error
        return self

    def _take(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getpid()),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv}
        tmp = self.path.with_name(f".{LOCK_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(me), encoding="utf-8")
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return
                except FileExistsError:
                    pass
                try:
                    holder = json.loads(self.path.read_text(encoding="utf-8"))
                except FileNotFoundError:
                    continue  # released meanwhile: try again
                except (OSError, json.JSONDecodeError):
                    raise WorkdirLockedError(f"{self.path} is unreadable; delete it if no run uses "
                                             f"{self.path.parent}") from None
                who = f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')})"
                if _alive(holder):
                    raise WorkdirLockedError(
                        f"{self.path.parent} is in use by {who}; wait for it, or delete {self.path} if that run "
                        "is gone")
                print(f"Taking over the stale lock of {who}, which no longer runs", file=sys.stderr, flush=True)
                self.path.unlink(missing_ok=True)
            raise WorkdirLockedError(f"Could not take {self.path}: other runs keep taking it")
        finally:
            tmp.unlink(missing_ok=True)

    def __exit__(self, *exc: object) -> None:
        if self.held:
            with contextlib.suppress(OSError, json.JSONDecodeError):
                if json.loads(self.path.read_text(encoding="utf-8")).get("pid") == os.getpid():
                    self.path.unlink()
            self.held = False
