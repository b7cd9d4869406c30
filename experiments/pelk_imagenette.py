"""Small, dense-large, stripe (SLaK) and peripheral (PeLK) kernels in one small backbone on Imagenette.

    python experiments/pelk_imagenette.py [--quick] [--epochs 8] [--image_size 64] [--kernels 31,15,7,3]

One ConvNeXt-style backbone (`convnext_imagenette` layout: stem 4x4/4, depths 2-2-4-2, widths 48-384 for
all four, so only the depthwise mixer differs), trained with the same recipe and budget
(configs/pelk/lk_imagenette.py) at a resolution the CPU can train:
  small   7x7 depthwise conv (ConvNeXt)
  dense   dense KxK + parallel 5x5, each with BN (PeLK Table 1's dense baseline)
  stripe  Kx5 + 5xK + 5x5, each with BN (SLaK, no dynamic sparsity)
  pelk    partial (3/8 of channels) peripheral KxK + 5x5 with BN, kernel-wise PE per stage (PeLK)
K per stage is `--kernels` (default 31-15-7-3 on 16-8-4-2 maps: global in every stage, as 51 is at 224).
Reports test top-1, parameters (all, and the mixers' own), training img/s measured side by side in one
process, and ERF area ratios (RepLKNet protocol at 2x the training resolution). Writes `results.json`,
`summary.png`, `curves.png` and `erf_<variant>.png` under --out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

import jax
import numpy as np

from repjax import bench, config as config_lib, data, models, sharding
from repjax.build import restore_variables
from repjax.evals import erf as erf_lib
from repjax.evals.cost import param_count
from repjax.train import train

REPO = pathlib.Path(__file__).resolve().parents[1]
IMAGENETTE = REPO.parent / "shared/data/imagenette"
DIMS = (48, 96, 192, 384)
NAMES = ("small", "dense", "stripe", "pelk")


def variant(name: str, kernels: tuple[int, ...]) -> tuple[str, dict[str, Any]]:
    """(registered model, kwargs) of one variant; all share depths, widths and stem."""
    if name == "small":
        return "convnext_imagenette", dict(dims=DIMS, kernel_sizes=(7, 7, 7, 7))
    if name == "dense":
        return "convnext_imagenette", dict(dims=DIMS, kernel_sizes=kernels, small_kernel=5, use_bn=True)
    if name == "stripe":
        return "slak_imagenette", dict(dims=DIMS, kernel_sizes=kernels, small_kernel=5)
    return "pelk_imagenette", dict(dims=DIMS, kernel_sizes=kernels, small_kernel=5)


def _config(name: str, args: argparse.Namespace, kernels: tuple[int, ...], steps: int) -> Any:
    model, kwargs = variant(name, kernels)
    c = config_lib.load(f"{REPO / 'configs/pelk/lk_imagenette.py'}:model={model},image_size={args.image_size},"
                        f"batch={args.batch},data=folder:{IMAGENETTE}")
    c.model.kwargs.update(kwargs)
    c.total_steps, c.epochs = steps, 0.0  # steps here: the cadences below derive from them
    c.optim.warmup_steps, c.optim.warmup_epochs = max(steps // 10, 1), 0.0
    c.eval_every_steps, c.eval_every_epochs = 0, 0.0
    c.checkpoint_every_steps = max(steps // 4, 1)
    c.log_every_steps = max(steps // 40, 1)
    return c


def mixer_params(params: Any) -> int:
    """Parameters of the spatial mixers (kernels, branch BNs, biases) and the stage PEs."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [str(getattr(p, "key", "")) for p in path]
        if "mixer" in keys or keys[0].startswith("pe_"):
            total += int(np.prod(leaf.shape))
    return total


def plot(out: pathlib.Path, results: dict[str, Any], workdirs: dict[str, pathlib.Path]) -> None:
    from repjax.plot import plot_runs

    plot_runs(list(workdirs.values()), out=out / "curves.png", keys=["train/loss", "train/top1"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    x = np.arange(len(NAMES))
    panels = [("top1", "Imagenette val top-1 (%)"), ("mixer_params", "mixer + PE parameters"),
              ("train_img_s", "training img/s (side by side)"), ("erf_ratio_0.2", "ERF area ratio, t = 0.2")]
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.bar(x, [results[f"{n}_{key}"] for n in NAMES])
        ax.set_xticks(x, NAMES)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few steps of everything (< 5 minutes on 2 cores)")
    p.add_argument("--epochs", type=float, default=8)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--kernels", default="31,15,7,3", help="large-kernel sizes per stage")
    p.add_argument("--erf_images", type=int, default=32)
    p.add_argument("--out", default=str(REPO / "experiments/results/pelk_imagenette"))
    args = p.parse_args(argv)
    if not IMAGENETTE.exists():
        raise FileNotFoundError(f"{IMAGENETTE} not found (the shared Imagenette ImageFolder beside the checkout)")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kernels = tuple(int(k) for k in args.kernels.split(","))
    num_train = len(data.get_source(f"folder:{IMAGENETTE}", "train"))
    steps = 12 if args.quick else int(args.epochs * num_train / args.batch)
    configs = {name: _config(name, args, kernels, steps) for name in NAMES}
    workdirs = {name: out / "runs" / name for name in NAMES}
    runs = {name: train(cfg, workdirs[name]) for name, cfg in configs.items()}

    shape = (args.image_size, args.image_size, 3)
    mesh = sharding.make_mesh([("data", -1)])
    results: dict[str, Any] = {"quick": args.quick, "steps": steps, "epochs": steps * args.batch / num_train,
                               "batch": args.batch, "image_size": args.image_size, "kernels": kernels, "dims": DIMS}
    erf_size = 2 * args.image_size
    for name, c in configs.items():
        trained = restore_variables(c, workdirs[name], 10, shape)
        model = models.create(c.model.name, num_classes=10, **c.model.kwargs)
        erf = erf_lib.erf(model, trained, c, mesh, image_size=erf_size, num_images=4 if args.quick else args.erf_images,
                          save=str(out / f"erf_{name}"))
        results |= {f"{name}_top1": 100 * runs[name]["test/top1"], f"{name}_params": param_count(trained["params"]),
                    f"{name}_mixer_params": mixer_params(trained["params"])}
        results |= {f"{name}_erf_{k}": v for k, v in erf.items() if k.startswith(("ratio", "side"))}
    results["erf_image_size"] = erf_size

    trainers = {}
    for name, c in configs.items():
        model = models.create(c.model.name, num_classes=10, **c.model.kwargs)
        trainers[name] = bench.train_runner(model, c.optim, batch=args.batch, image_shape=shape,
                                            iters=2 if args.quick else 5)
    rates = bench.interleaved({name: run for name, (run, _) in trainers.items()}, 2 if args.quick else 3)
    for name, (_, info) in trainers.items():
        results |= {f"{name}_train_img_s": rates[name], f"{name}_train_peak_memory_mb": info["peak_memory_mb"]}
    results["pelk_over_dense_mixer_params"] = results["pelk_mixer_params"] / results["dense_mixer_params"]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(out, results, workdirs)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
