"""RepOpt-VGG vs RepVGG on CIFAR-10 (the RepOptimizers paper's claims, small scale, real data).

    python experiments/repopt_cifar.py [--quick] [--out experiments/results/repopt_cifar]

1. Hyper-Search: the HS model (3x3·s + 1x1·t + identity·d, one BN) trained normally; its scales extracted.
2. RepOpt-VGG: the plain model (conv3x3 -> BN -> ReLU) re-initialised from the scales and trained with
   RepOpt-SGD (Grad Mult), no clipping.
3. RepVGG: the multi-branch training form (3x3+BN, 1x1+BN, identity BN) with the same recipe and budget,
   then structurally re-parameterised.
Both end in the same deploy architecture (conv3x3 + bias + ReLU blocks; RepOpt's BN fused into the conv), so
deploy speed and int8 post-training quantization are compared on identical graphs. Training img/s and peak
memory are measured side by side (interleaved steps of both compiled train steps), not from the runs'
wall clocks. Writes `results.json`, `curves.png` and `summary.png` under --out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

import numpy as np

from repjax import bench, config as config_lib, data, models, sharding
from repjax.build import restore_variables
from repjax.evals import classification
from repjax.projects.repopt import repopt_vgg, repvgg, scales as scale_files
from repjax.projects.repopt.grad_mult import NO_DECAY
from repjax.projects.repopt.quant import evaluator as quantization
from repjax.train import train

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared/data/cifar10"
# One architecture for all three models: stage0 + 3 stages, 32x32 -> 8x8.
ARCH = dict(num_blocks=(2, 2, 2), widths=(16, 16, 32, 64), strides=(1, 1, 2, 2))


def _config(mode: str, steps: int, batch: int, scales: str = "") -> Any:
    """The RepOpt CIFAR recipe (configs/repopt/repopt_vgg_cifar.py) at this experiment's size and budget."""
    arg = f"mode={'target' if mode == 'target' else 'hs'},batch={batch},data=folder:{CIFAR}"
    arg += f",scales={scales}" if scales else ""
    c = config_lib.load(f"{REPO / 'configs/repopt/repopt_vgg_cifar.py'}:{arg}")
    c.model.kwargs.update(ARCH)
    c.total_steps, c.epochs = steps, 0.0  # steps here: the cadences below derive from them
    c.optim.warmup_steps, c.optim.warmup_epochs = steps // 20, 0.0
    c.eval_every_steps, c.eval_every_epochs = 0, 0.0
    c.checkpoint_every_steps = max(steps // 4, 1)
    c.log_every_steps = max(steps // 40, 1)
    if mode == "repvgg":  # same recipe, multi-branch model; BN (incl. the identity BN) and biases not decayed
        c.model.name = "repvgg_tiny"
        c.model.kwargs = config_lib.mlc.ConfigDict({**ARCH, "groups_map": ()})
        c.optim.rules = [(NO_DECAY + r"|(^|/)rbr_identity/", {"weight_decay": 0.0})]
        c.optim.clip_norm = 0.0  # as the RepOpt target run
    return c


def side_by_side(configs: dict[str, Any], batch: int, steps: int, rounds: int) -> dict[str, dict[str, float]]:
    """Train img/s (median of interleaved rounds) and XLA's peak memory of each compiled train step."""
    runners, out = {}, {}
    for name, config in configs.items():
        model = models.create(config.model.name, num_classes=10, **config.model.kwargs)
        runners[name], out[name] = bench.train_runner(model, config.optim, batch=batch, image_shape=(32, 32, 3),
                                                      iters=steps)
    for name, rate in bench.interleaved(runners, rounds).items():
        out[name]["train_img_s"] = rate
    return out


def deploy_throughput(variables: dict[str, dict], batch: int = 256, iters: int = 10, rounds: int = 3) -> dict:
    model = models.create("repvgg_tiny", num_classes=10, deploy=True, groups_map=(), **ARCH)
    runners = {name: bench.inference_runner(model, v, batch=batch, image_shape=(32, 32, 3), iters=iters)
               for name, v in variables.items()}
    return bench.interleaved(runners, rounds)


def plot(out: pathlib.Path, results: dict[str, Any], workdirs: dict[str, pathlib.Path]) -> None:
    from repjax.plot import plot_runs

    plot_runs([workdirs["repopt"], workdirs["repvgg"]], out=out / "curves.png", keys=["train/loss", "train/top1"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    names = ["repvgg", "repopt"]
    labels = ["RepVGG", "RepOpt-VGG"]
    x = np.arange(2)
    axes[0].bar(x - 0.2, [results[f"{n}_top1"] for n in names], 0.4, label="float")
    axes[0].bar(x + 0.2, [results[f"{n}_int8_top1"] for n in names], 0.4, label="int8 PTQ")
    axes[0].set_title("CIFAR-10 test top-1 (%)")
    axes[0].legend()
    axes[1].bar(x, [results[f"{n}_train_img_s"] for n in names])
    axes[1].set_title("training img/s (side by side)")
    axes[2].bar(x, [results[f"{n}_train_peak_memory_mb"] for n in names])
    axes[2].set_title("train step peak memory (MiB, XLA)")
    for ax in axes:
        ax.set_xticks(x, labels)
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few steps of everything (< 5 minutes on 2 cores)")
    p.add_argument("--hs_epochs", type=float, default=4)
    p.add_argument("--epochs", type=float, default=8)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--out", default=str(REPO / "experiments/results/repopt_cifar"))
    args = p.parse_args(argv)
    if not CIFAR.exists():
        raise FileNotFoundError(f"{CIFAR} not found (the shared CIFAR-10 ImageFolder beside the checkout)")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_epoch = len(data.get_source(f"folder:{CIFAR}", "train")) // args.batch
    hs_steps, steps = (30, 60) if args.quick else (int(args.hs_epochs * per_epoch), int(args.epochs * per_epoch))
    workdirs = {name: out / "runs" / name for name in ("hs", "repopt", "repvgg")}

    # 1. Hyper-Search -> scales
    hs_cfg = _config("hs", hs_steps, args.batch)
    hs = train(hs_cfg, workdirs["hs"])
    scales_path = out / "scales.npz"
    scale_files.save_scales(scales_path, scale_files.from_checkpoint(workdirs["hs"]))
    # 2. RepOpt-VGG and 3. RepVGG, same recipe and budget
    configs = {"repopt": _config("target", steps, args.batch, str(scales_path)),
               "repvgg": _config("repvgg", steps, args.batch)}
    runs = {name: train(cfg, workdirs[name]) for name, cfg in configs.items()}

    # Deploy forms: one architecture for both.
    trained = {name: restore_variables(configs[name], workdirs[name], 10, (32, 32, 3)) for name in configs}
    target = models.create(configs["repopt"].model.name, **configs["repopt"].model.kwargs)
    deploy = {"repopt": repopt_vgg.reparameterize(trained["repopt"], target),
              "repvgg": repvgg.reparameterize(trained["repvgg"])}
    mesh = sharding.make_mesh([("data", -1)])
    test = data.get_source(f"folder:{CIFAR}", "test")
    train_source = data.get_source(f"folder:{CIFAR}", "train")
    deploy_model = models.create("repvgg_tiny", num_classes=10, deploy=True, groups_map=(), **ARCH)
    pp = configs["repopt"].data.eval_pp
    results: dict[str, Any] = {"quick": args.quick, "hs_steps": hs_steps, "steps": steps, "batch": args.batch,
                               "arch": ARCH, "hs_top1": 100 * hs["test/top1"]}
    for name in ("repopt", "repvgg"):
        float_metrics = classification.evaluate(deploy_model, deploy[name], test, batch_size=500, pp=pp, mesh=mesh)
        ranges = quantization.calibration_ranges(deploy_model, deploy[name], train_source, batches=8,
                                                 batch_size=256, pp=pp, mesh=mesh, seed=0)
        int8 = quantization.evaluate_int8(deploy_model, deploy[name], ranges, test, batch_size=500, pp=pp, mesh=mesh)
        kernels = [np.asarray(b["rbr_reparam"]["kernel"]) for k, b in deploy[name]["params"].items() if k != "linear"]
        results |= {f"{name}_top1": 100 * runs[name]["test/top1"],
                    f"{name}_deploy_top1": 100 * float_metrics["top1"],
                    f"{name}_int8_top1": 100 * int8["top1"],
                    f"{name}_int8_drop": 100 * (float_metrics["top1"] - int8["top1"]),
                    f"{name}_deploy_kernel_std": float(np.mean([k.std() for k in kernels])),
                    f"{name}_run_train_img_s": runs[name]["train_img_s"]}
    speed = side_by_side(configs, args.batch, steps=5 if args.quick else 20, rounds=2 if args.quick else 3)
    infer = deploy_throughput(deploy)
    for name in ("repopt", "repvgg"):
        results |= {f"{name}_train_img_s": speed[name]["train_img_s"],
                    f"{name}_train_peak_memory_mb": speed[name]["peak_memory_mb"],
                    f"{name}_train_params": speed[name]["params"],
                    f"{name}_deploy_img_s": infer[name]}
    results["train_speedup_repopt_over_repvgg"] = results["repopt_train_img_s"] / results["repvgg_train_img_s"]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(out, results, workdirs)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
