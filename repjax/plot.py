"""Training/eval curves from `metrics.jsonl`: one subplot per metric, one line per workdir.

    python -m repjax.plot runs/a [runs/b ...] [--out curves.png] [--keys loss,top1] [--logy loss]

A key selects metrics named exactly so, else every metric containing it (`top1` → `eval/top1`,
`test/top1`). Each metric keeps its own steps, so metrics logged at different intervals (train every 10
steps, eval every 1000) plot correctly; a step logged twice (a resumed run) keeps its last value.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from repjax.metrics import read_metrics

Series = dict[str, tuple[list[float], list[float]]]


def load_series(workdir: str | Path) -> Series:
    """`{metric: (steps, values)}` sorted by step, numeric values only, last write per step wins."""
    by_key: dict[str, dict[float, float]] = {}
    for row in read_metrics(workdir):
        step = row.get("step")
        if not isinstance(step, int | float):
            continue
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                by_key.setdefault(key, {})[step] = float(value)
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in by_key.items()}


def select_keys(available: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
    """Metrics to plot, in `wanted` order (exact names first, else substring matches)."""
    if not wanted:
        return sorted(available)
    chosen: list[str] = []
    for w in wanted:
        matches = [w] if w in available else sorted(k for k in available if w in k)
        chosen += [m for m in matches if m not in chosen]
    if not chosen:
        raise ValueError(f"No metric matches {list(wanted)}; available: {sorted(available)}")
    return chosen


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib Figure on its own Agg canvas: no pyplot, so no global backend state (safe in threads)."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 110, tight: bool = True) -> Path:
    """Writes `fig` to `path` (parent folders created) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight" if tight else None)
    return path


def _labels(workdirs: Sequence[Path]) -> list[str]:
    names = [p.resolve().name for p in workdirs]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in workdirs]


def plot_runs(
    workdirs: Sequence[str | Path],
    out: str | Path | None = None,
    keys: Sequence[str] | None = None,
    logy: Sequence[str] = (),
    ncols: int = 3,
) -> Path:
    """Plots the selected metrics of all `workdirs` into one PNG and returns its path."""
    dirs = [Path(w) for w in workdirs]
    if not dirs:
        raise ValueError("Give at least one workdir")
    runs = [load_series(d) for d in dirs]
    available = sorted({k for run in runs for k in run})
    if not available:
        raise ValueError(f"No numeric metrics in {[str(d) for d in dirs]}")
    if not keys:  # by default, curves only: a metric logged once (final summary) is not a curve
        curves = [k for k in available if any(len(run.get(k, ((), ()))[0]) > 1 for run in runs)]
        available = curves or available
    chosen = select_keys(available, keys)
    labels = _labels(dirs)
    ncols = max(1, min(ncols, len(chosen)))
    nrows = math.ceil(len(chosen) / ncols)
    fig = new_figure(4.5 * ncols, 3.2 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, key in zip(axes.flat, chosen):
        for label, run in zip(labels, runs):
            if key in run:
                steps, values = run[key]
                ax.plot(steps, values, label=label, marker="o" if len(steps) <= 20 else None, markersize=3)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if any(k in key for k in logy):
            ax.set_yscale("log")
        if len(dirs) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(chosen) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return save_figure(fig, Path(out) if out is not None else dirs[0] / "curves.png", tight=False)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m repjax.plot", description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="run directories containing metrics.jsonl")
    parser.add_argument("--out", default=None, help="PNG path (default: <first workdir>/curves.png)")
    parser.add_argument("--keys", default=None, help="comma-separated metric names or substrings")
    parser.add_argument("--logy", default="", help="comma-separated keys plotted on a log y axis")
    args = parser.parse_args(argv)
    split = lambda s: [k.strip() for k in s.split(",") if k.strip()] if s else []
    try:
        path = plot_runs(args.workdirs, args.out, split(args.keys) or None, split(args.logy))
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
    print(path)


if __name__ == "__main__":
    main()
