"""Metric logging: `workdir/metrics.jsonl` + TensorBoard (tensorboardX), a progress bar, a summary block.

Only process 0 writes files or prints; other processes get silent no-op objects, so every process may call
the same code.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


def _scalar(name: str, value: Any) -> float | str:
    """Number-like → float (jax/numpy scalars, 0-d or 1-element arrays); strings pass through."""
    if isinstance(value, str):
        return value
    arr = np.asarray(jax.device_get(value))
    if arr.size != 1 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"metric {name!r} must be a scalar number or string, got {arr.dtype}{list(arr.shape)}")
    return float(arr.reshape(()))


def _to_json(obj: Any) -> Any:
    """Config → JSON-able (ConfigDicts, tuples, numpy values; anything else as its str)."""
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    if isinstance(obj, Mapping):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_json(v) for v in obj]
    if isinstance(obj, np.generic | np.ndarray | jax.Array):
        return np.asarray(obj).tolist()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


def _drop_torn_tail(path: Path) -> None:
    """Cuts a last line without its newline (a write torn by a crash), so the next row starts a new line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping a torn last line (%d bytes)", path, len(data) - keep)
        f.truncate(keep)


class MetricWriter:
    """Appends `{"step": s, name: value, ...}` lines to `workdir/metrics.jsonl`, scalars to `workdir/tb`.

    A torn last line left by a crash is cut when the file is opened; `rewind` drops the rows of steps a
    resumed run repeats.
    """

    def __init__(self, workdir: str | Path, *, tensorboard: bool = True):
        self.workdir = Path(workdir)
        self.active = jax.process_index() == 0
        self._file: TextIO | None = None
        self._tb: Any = None
        if not self.active:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(self.workdir / METRICS_FILE)
        self._file = open(self.workdir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            self._tb = self._open_tensorboard()

    def _open_tensorboard(self, purge_step: int | None = None) -> Any:
        from tensorboardX import SummaryWriter

        return SummaryWriter(str(self.workdir / "tb"), purge_step=purge_step)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Logs `metrics` (scalar numbers or strings) at `step`; a line is flushed immediately."""
        if not self.active or self._file is None:
            return
        row = {name: _scalar(name, v) for name, v in metrics.items()}
        self._file.write(json.dumps({"step": int(step), **row}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, v in row.items():
                if isinstance(v, float):
                    self._tb.add_scalar(name, v, global_step=int(step))

    write_scalars = write

    def rewind(self, keep: Callable[[dict[str, Any]], bool], *, purge_from: int | None = None) -> int:
        """Rewrites `metrics.jsonl` with only the rows for which `keep(row)` holds; returns how many went.

        A resumed run calls it with "step <= restored step" so that the steps it repeats are not logged twice.
        `purge_from`: TensorBoard hides the events of earlier files at steps >= it (a new event file opened
        with tensorboardX's `purge_step`), so the curves do not repeat either.
        """
        if not self.active or self._file is None:
            return 0
        if self._tb is not None and purge_from is not None:
            self._tb.close()
            self._tb = self._open_tensorboard(int(purge_from))
        self._file.close()
        path = self.workdir / METRICS_FILE
        rows = read_metrics(path)
        kept = [r for r in rows if keep(r)]
        tmp = path.with_name(f".{METRICS_FILE}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, path)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115
        return len(rows) - len(kept)

    def write_hparams(self, config: Any, *, file: bool = True) -> None:
        """Shows the configuration (dict or ConfigDict) in TensorBoard; with `file`, also writes
        `workdir/config.json` (training leaves that file to `repjax.workdir`, which writes it once)."""
        if not self.active:
            return
        text = json.dumps(_to_json(config), indent=2, sort_keys=True)
        if file:
            (self.workdir / CONFIG_FILE).write_text(text + "\n", encoding="utf-8")
        if self._tb is not None:
            self._tb.add_text("config", "```\n" + text + "\n```", global_step=0)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """Rows of `workdir/metrics.jsonl` in file order (a torn last line from a crash is skipped)."""
    path = Path(workdir)
    path = path if path.suffix == ".jsonl" else path / METRICS_FILE
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d: skipping malformed line", path, lineno)
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e7 or abs(value) < 1e-3) and math.isfinite(value):
            return f"{value:.3e}"
        return f"{value:.0f}" if abs(value) >= 1e3 else f"{value:.4g}"
    return str(value)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ProgressBar:
    """Training progress: a tqdm bar on a terminal, plain periodic lines otherwise (logs, CI).

    `update(step, metrics)` may be called at any subset of steps; throughput (img/s) is measured between
    calls. Metric names are shown without their `train/` prefix.
    """

    def __init__(
        self,
        total_steps: int,
        initial_step: int = 0,
        batch_size: int | None = None,
        *,
        print_every: int | None = None,
        file: TextIO | None = None,
        plain: bool | None = None,
        desc: str = "train",
    ):
        self.total = total_steps
        self.batch_size = batch_size
        self.file = file if file is not None else sys.stdout
        self.active = jax.process_index() == 0
        self.plain = plain if plain is not None else not self.file.isatty()
        self.print_every = print_every or max(1, total_steps // 20)
        self._start = self._last_time = time.perf_counter()
        self._start_step = self._last_step = self._last_print = initial_step
        self._last_print_time = self._start
        self._printed = False
        self._bar: Any = None
        if self.active and not self.plain:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc=desc, file=self.file,
                             unit="step", dynamic_ncols=True)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Advances the bar to `step` and shows `metrics` (scalars), img/s and ETA."""
        if not self.active:
            return
        now = time.perf_counter()
        shown = {k.removeprefix("train/"): _scalar(k, v) for k, v in (metrics or {}).items()}
        if self.batch_size and step > self._last_step and now > self._last_time:
            shown["img/s"] = (step - self._last_step) * self.batch_size / (now - self._last_time)
        self._last_step, self._last_time = step, now
        if self._bar is not None:
            self._bar.set_postfix_str(" ".join(f"{k}={_fmt(v)}" for k, v in shown.items()), refresh=False)
            self._bar.update(step - self._bar.n)
        elif not self._printed or step - self._last_print >= self.print_every or step >= self.total:
            if self.batch_size and step > self._last_print:
                shown["img/s"] = (step - self._last_print) * self.batch_size / max(now - self._last_print_time, 1e-9)
            self._printed, self._last_print, self._last_print_time = True, step, now
            rate = (step - self._start_step) / max(now - self._start, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else float("inf")
            parts = [f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)"]
            parts += [f"{k}={_fmt(v)}" for k, v in shown.items()]
            parts += [f"elapsed={_hms(now - self._start)}", f"eta={_hms(eta)}"]
            print(" ".join(parts), file=self.file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def summary(values: Mapping[str, Any], title: str = "Summary") -> str:
    """A `key: value` block with aligned keys, e.g. for the end of a run (what train and eval print)."""
    width = max((len(str(k)) for k in values), default=0)
    lines = [f"== {title} " + "=" * max(3, 40 - len(title))]
    lines += [f"{k!s:<{width}} : {_fmt(v)}" for k, v in values.items()]
    return "\n".join(lines)
