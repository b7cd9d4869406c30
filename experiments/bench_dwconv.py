"""Forward+backward speed of depthwise convolution: repjax algorithms vs XLA's grouped conv vs PyTorch (CPU).

    python experiments/bench_dwconv.py            # PeLK stage shapes and small-kernel rows, ~2 min on 2 shared cores
    python experiments/bench_dwconv.py --quick    # tiny shapes, seconds

Every runner computes y = conv(x, k) and the gradients of <y, g> w.r.t. x and the kernel (theta for the piecewise
rows), jitted (torch: eager), timed with block_until_ready, best of `repeats` after warm-up (the machine is
shared: the minimum is the least disturbed run, taken alike for every framework). The repjax algorithms of a row
take turns round by round (`repjax.bench.fastest_interleaved`), so none is favoured by its place in the order;
'auto' is the time of the algorithm it chooses (the same program). XLA's grouped conv and PyTorch are so slow at
large K that they are timed on a slice of the batch (and of the channels when one image still costs more than
BUDGET_MACS); their time is then scaled linearly by (N*C)/(n*c) -- every group/image is independent work -- and
the row says so ('scaled'). Ratios are per full batch, measured in one run.
PeLK-T conv channels: int(3/8 * w) of widths int(1.3 * [96,192,384,768]) = [124,249,499,998] -> [46,93,187,374];
PeLK-101 at 384: int(3/8 * 166) = 62 channels on 96x96. Peripheral grids follow spec Eq. 2 (outer cell clipped).
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from repjax.bench import best_seconds, fastest_interleaved
from repjax.nn.dwconv import choose, choose_piecewise, depthwise_conv, expand_piecewise, piecewise_conv
from repjax.projects.pelk.peripheral import sharing_grid

OUT = pathlib.Path(__file__).resolve().parent / "results" / "bench_dwconv"
THREADS = 2  # torch threads; XLA:CPU uses every core of this 2-core machine
BUDGET_MACS = 1.5e8  # baselines: largest N*C*H*W*K^2 timed per call (XLA grouped conv runs ~0.05 GMAC/s fwd+bwd)


def shapes(quick: bool) -> list[dict]:
    if quick:
        return [dict(name="quick K7", n=2, h=14, c=8, k=7, grid=None),
                dict(name="quick K13", n=2, h=12, c=8, k=13, grid=sharing_grid(13, 2))]
    rows = [dict(name=f"PeLK-T s{i + 1} {h}x{h}x{c} K{k}", n=8, h=h, c=c, k=k, grid=sharing_grid(k, 2))
            for i, (h, c, k) in enumerate([(56, 46, 51), (28, 93, 49), (14, 187, 47), (7, 374, 13)])]
    rows += [dict(name="PeLK-101 s1 96x96x62 K101", n=8, h=96, c=62, k=101, grid=sharing_grid(101, 3)),
             dict(name="issue 56x56x128 K51", n=8, h=56, c=128, k=51, grid=None),
             dict(name="ConvNeXt-T s1 56x56x96 K7", n=8, h=56, c=96, k=7, grid=None)]
    rows += [dict(name=f"sweep 56x56x96 K{k}", n=8, h=56, c=96, k=k, grid=None) for k in (1, 3, 5)]
    rows += [dict(name="RepMLPNet-64 local 8x8x4 K3 (batch 768)", n=768, h=8, c=4, k=3, grid=None),
             dict(name="SLaK-64 s4 2x2x499 K3 (batch 32)", n=32, h=2, c=499, k=3, grid=None)]
    return rows


def _jax_step(conv, x, w, g):
    """One jitted forward+backward call; g is an argument (closed over, XLA could fold it as a constant)."""
    step = jax.jit(jax.grad(lambda a, b, c: jnp.vdot(conv(a, b), c), argnums=(0, 1)))
    return functools.partial(step, x, w, g)


def _data(row: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, h, c, k = row["n"], row["h"], row["c"], row["k"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, h, h, c)).astype(np.float32)
    g = rng.standard_normal((n, h, h, c)).astype(np.float32)
    return x, g, (rng.standard_normal((k, k, 1, c)) * 0.05).astype(np.float32)


def _sliced(row: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    x, g, w = _data(row)
    sn, sc = _baseline_slice(row["n"], row["c"], row["h"], row["k"])
    return x[:sn, ..., :sc], g[:sn, ..., :sc], w[..., :sc], {"n": sn, "c": sc, "scale": row["n"] * row["c"] / (sn * sc)}


def torch_times(quick: bool, repeats: int, device: str = "cpu") -> dict[str, float]:
    """PyTorch ms per shape, run in a child process that never starts XLA (its CPU threads would compete)."""
    cmd = [sys.executable, __file__, "--torch-child", "--repeats", str(repeats), "--torch-device", device]
    cmd += ["--quick"] if quick else []
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def _torch_child(quick: bool, repeats: int, device: str) -> None:
    out = {}
    for row in shapes(quick):
        xs, gs, ws, sl = _sliced(row)
        reps = max(1, repeats - 1) if sl["scale"] > 1 else repeats
        out[row["name"]] = 1e3 * sl["scale"] * _torch_time(xs, ws, gs, reps, device)
    print(json.dumps(out))


def _torch_time(x, k, g, repeats, device: str = "cpu") -> float:
    import torch

    torch.set_num_threads(THREADS)
    tx = torch.tensor(x.transpose(0, 3, 1, 2).copy(), requires_grad=True, device=device)
    tk = torch.tensor(k.transpose(3, 2, 0, 1).copy(), requires_grad=True, device=device)
    tg = torch.tensor(g.transpose(0, 3, 1, 2).copy(), device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step():
        tx.grad = tk.grad = None
        y = torch.nn.functional.conv2d(tx, tk, padding=(k.shape[0] // 2, k.shape[1] // 2), groups=tk.shape[0])
        (y * tg).sum().backward()
        sync()
        return tx.grad

    ts = []
    for _ in range(repeats + 2):  # two warm-up calls: torch's first two calls pay one-off set-up
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    return min(ts[2:])


def _baseline_slice(n: int, c: int, h: int, k: int) -> tuple[int, int]:
    """Whole images first (batch slice); channels are sliced only when one image exceeds 4x the budget."""
    per_image = c * h * h * k * k
    if per_image <= 4 * BUDGET_MACS:
        return max(1, min(n, int(BUDGET_MACS // per_image))), c
    return 1, max(1, int(4 * BUDGET_MACS // (h * h * k * k)))


def bench(row: dict, repeats: int, torch_ms: float) -> list[dict]:
    c, k = row["c"], row["k"]
    rng = np.random.default_rng(1)
    x, g, w = (jnp.asarray(a) for a in _data(row))
    out = {"shape": row["name"], "path": "dense", "auto_choice": choose(x.shape, w.shape), "ms": {}}
    methods = ["fft"] + (["shift"] if k <= 13 else []) + (["matmul"] if row["h"] ** 2 <= 256 else [])
    methods += [out["auto_choice"]] if out["auto_choice"] not in methods else []
    steps = {m: _jax_step(lambda a, b, m=m: depthwise_conv(a, b, m), x, w, g) for m in methods}
    out["ms"].update({m: 1e3 * s for m, s in fastest_interleaved(steps, repeats).items()})
    out["ms"]["auto"] = out["ms"][out["auto_choice"]]  # the same program: timed once
    xs, gs, ws, sl = (jnp.asarray(a) if isinstance(a, np.ndarray) else a for a in _sliced(row))
    out["baseline_slice"] = sl
    rep_b = max(1, repeats - 1) if sl["scale"] > 1 else repeats
    native_ms = 1e3 * best_seconds(_jax_step(lambda a, b: depthwise_conv(a, b, "native"), xs, ws, gs), repeats=rep_b)
    out["ms"]["xla_native"], out["ms"]["torch"] = sl["scale"] * native_ms, torch_ms
    results = [out]
    if row["grid"]:
        sizes = row["grid"]
        theta = jnp.asarray(rng.standard_normal((len(sizes), len(sizes), 1, c)) * 0.05, jnp.float32)
        pw = {"shape": row["name"], "path": f"piecewise k'={len(sizes)}", "grid": list(sizes),
              "auto_choice": choose_piecewise(x.shape, sizes), "ms": {}, "baseline_slice": out["baseline_slice"]}
        methods = ("fft", "boxsum") + (("matmul",) if row["h"] ** 2 <= 256 else ())
        methods += (pw["auto_choice"],) if pw["auto_choice"] not in methods else ()
        steps = {m: _jax_step(lambda a, t, m=m: piecewise_conv(a, t, sizes, m), x, theta, g) for m in methods}
        pw["ms"].update({m: 1e3 * s for m, s in fastest_interleaved(steps, repeats).items()})
        pw["ms"]["auto"] = pw["ms"][pw["auto_choice"]]
        # baselines convolve the expanded dense kernel: same cost as the dense row (the expansion is negligible)
        pw["ms"]["xla_native"], pw["ms"]["torch"] = out["ms"]["xla_native"], out["ms"]["torch"]
        results.append(pw)
        assert np.allclose(expand_piecewise(theta, sizes).shape[:2], (k, k))
    return results


def table(results: list[dict]) -> str:
    cols = ["auto", "fft", "shift", "matmul", "boxsum", "xla_native", "torch"]
    lines = [f"{'shape':30s} {'path':16s} {'auto=':6s} " + " ".join(f"{c:>10s}" for c in cols)
             + f" {'native/auto':>11s} {'torch/auto':>10s}"]
    for r in results:
        ms = r["ms"]
        cells = " ".join(f"{ms[c]:10.1f}" if c in ms else f"{'-':>10s}" for c in cols)
        scale = r["baseline_slice"]["scale"]
        flag = f" (baselines scaled x{scale:.0f})" if scale > 1 else ""
        lines.append(f"{r['shape']:30s} {r['path']:16s} {r['auto_choice']:6s} {cells} "
                     f"{ms['xla_native'] / ms['auto']:11.1f} {ms['torch'] / ms['auto']:10.1f}{flag}")
    return "\n".join(lines)


def plot(results: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['shape']}\n{r['path']}" for r in results]
    idx = np.arange(len(results))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(results)), 4.5))
    ax.bar(idx - 0.2, [r["ms"]["xla_native"] / r["ms"]["auto"] for r in results], 0.4, label="XLA native / repjax auto")
    ax.bar(idx + 0.2, [r["ms"]["torch"] / r["ms"]["auto"] for r in results], 0.4, label="PyTorch / repjax auto")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("speed-up of repjax auto (fwd+bwd)")
    ax.set_xticks(idx, labels, rotation=60, ha="right", fontsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (seconds), for smoke tests")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=pathlib.Path, default=OUT)
    ap.add_argument("--torch-device", default="cpu", help="cpu, or cuda on a GPU machine (experiments/bench_gpu.sh)")
    ap.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    if args.torch_child:
        return _torch_child(args.quick, repeats, args.torch_device)
    t0 = time.time()
    torch_ms = torch_times(args.quick, repeats, args.torch_device)
    print(f"torch done in {time.time() - t0:.0f} s", flush=True)
    results = []
    for row in shapes(args.quick):
        rows = bench(row, repeats, torch_ms[row["name"]])
        results += rows
        print("\n".join(table(rows).splitlines()[1:]), flush=True)
    report = {"backend": jax.default_backend(), "threads": THREADS, "quick": args.quick,
              "torch_device": args.torch_device, "repeats": args.repeats,
              "command": "python experiments/bench_dwconv.py" + (" --quick" if args.quick else ""),
              "units": "ms per fwd+bwd of the full batch (best of repeats)", "seconds": time.time() - t0,
              "results": results}
    print(table(results))
    print(f"total {report['seconds']:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    plot(results, args.out / "speedup.png")
    return report


if __name__ == "__main__":
    main()
