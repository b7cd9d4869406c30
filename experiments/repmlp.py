"""RepMLPNet with and without Locality Injection against a conv baseline on CIFAR-10 (real data, small scale).

    python experiments/repmlp.py [--quick] [--epochs 4] [--baseline resnet20] [--out experiments/results/repmlp]

Three runs with the same budget (epochs, batch, augmentation): RepMLPNet (repmlpnet_cifar) with its Local
Perceptron conv+BN branches (k = 1, 3), the same network without them (the paper's ablation: both end in
the SAME deploy architecture, FC3 with bias), and a conv baseline trained with its own recipe
(configs/resnet_cifar10.py). The trained RepMLPNet is converted by Locality Injection and the deploy form is
checked to give the same test accuracy. Throughputs are measured side by side in one process: training
img/s of the three, and eval img/s of the training form against the deploy form. Writes `results.json`,
`curves.png` and `summary.png` under --out.
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
from repjax.evals.cost import param_count
from repjax.projects.repmlp import repmlp
from repjax.train import train

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared/data/cifar10"
SHAPE = (32, 32, 3)


def _config(name: str, epochs: float, batch: int, baseline: str, num_train: int) -> Any:
    data_arg = f"data=folder:{CIFAR},batch={batch},epochs=1"
    if name == "conv":
        c = config_lib.load(f"{REPO / 'configs/resnet_cifar10.py'}:depth={baseline.removeprefix('resnet')},"
                            f"{data_arg}")
    else:
        local = int(name == "with_local")
        c = config_lib.load(f"{REPO / 'configs/repmlp/repmlpnet_cifar.py'}:local={local},{data_arg}")
    steps = int(epochs * num_train / batch)
    c.total_steps, c.epochs = steps, 0.0  # steps here: the cadences below derive from them
    c.optim.warmup_steps, c.optim.warmup_epochs = max(steps // 10, 1), 0.0
    c.eval_every_steps, c.eval_every_epochs = 0, 0.0
    c.checkpoint_every_steps = max(steps // 4, 1)
    c.log_every_steps = max(steps // 40, 1)
    return c


def plot(out: pathlib.Path, results: dict[str, Any], workdirs: dict[str, pathlib.Path]) -> None:
    from repjax.plot import plot_runs

    plot_runs(list(workdirs.values()), out=out / "curves.png", keys=["train/loss", "train/top1"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    names, labels = ["with_local", "without_local", "conv"], ["RepMLPNet", "no local", results["baseline"]]
    x = np.arange(3)
    axes[0].bar(x, [results[f"{n}_top1"] for n in names])
    axes[0].set_ylim(min(results[f"{n}_top1"] for n in names) - 5, None)
    axes[0].set_title("CIFAR-10 test top-1 (%)")
    axes[1].bar(x, [results[f"{n}_train_img_s"] for n in names])
    axes[1].set_title("training img/s (side by side)")
    for ax in axes[:2]:
        ax.set_xticks(x, labels)
    axes[2].bar([0, 1], [results["train_form_eval_img_s"], results["deploy_img_s"]])
    axes[2].set_xticks([0, 1], ["training form", "deploy form"])
    axes[2].set_title("RepMLPNet inference img/s")
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few steps of everything (< 5 minutes on 2 cores)")
    p.add_argument("--epochs", type=float, default=4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--baseline", default="resnet20", help="conv baseline: resnet20/32/44/56")
    p.add_argument("--out", default=str(REPO / "experiments/results/repmlp"))
    args = p.parse_args(argv)
    if not CIFAR.exists():
        raise FileNotFoundError(f"{CIFAR} not found (the shared CIFAR-10 ImageFolder beside the checkout)")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    num_train = len(data.get_source(f"folder:{CIFAR}", "train"))
    epochs = 30 * args.batch / num_train if args.quick else args.epochs
    configs = {name: _config(name, epochs, args.batch, args.baseline, num_train)
               for name in ("with_local", "without_local", "conv")}
    workdirs = {name: out / "runs" / name for name in configs}
    runs = {name: train(cfg, workdirs[name]) for name, cfg in configs.items()}

    # Locality Injection of the trained network; the deploy form must give the same predictions.
    mesh = sharding.make_mesh([("data", -1)])
    test = data.get_source(f"folder:{CIFAR}", "test")
    pp = configs["with_local"].data.eval_pp
    train_model = models.create("repmlpnet_cifar", num_classes=10)
    deploy_model = models.create("repmlpnet_cifar", num_classes=10, deploy=True)
    trained = restore_variables(configs["with_local"], workdirs["with_local"], 10, SHAPE)
    deployed = repmlp.reparameterize(trained, model=train_model)
    deploy_eval = classification.evaluate(deploy_model, deployed, test, batch_size=500, pp=pp, mesh=mesh)
    params = {name: param_count(restore_variables(c, workdirs[name], 10, SHAPE)["params"])
              for name, c in configs.items()}

    results: dict[str, Any] = {"quick": args.quick, "epochs": epochs, "batch": args.batch,
                               "baseline": args.baseline, "deploy_params": param_count(deployed["params"])}
    for name in configs:
        results |= {f"{name}_top1": 100 * runs[name]["test/top1"], f"{name}_params": params[name]}
    results["deploy_top1"] = 100 * deploy_eval["top1"]
    results["deploy_minus_train_form_top1"] = results["deploy_top1"] - results["with_local_top1"]

    rounds = 2 if args.quick else 3
    trainers = {name: bench.train_runner(models.create(c.model.name, num_classes=10, **c.model.kwargs), c.optim,
                                         batch=args.batch, image_shape=SHAPE, iters=3 if args.quick else 10)
                for name, c in configs.items()}
    train_rates = bench.interleaved({name: r for name, (r, _) in trainers.items()}, rounds)
    for name, (_, info) in trainers.items():
        results |= {f"{name}_train_img_s": train_rates[name], f"{name}_train_peak_memory_mb": info["peak_memory_mb"]}
    results["train_img_s"] = results["with_local_train_img_s"]
    infer = bench.interleaved({
        "train_form": bench.inference_runner(train_model, trained, batch=256, image_shape=SHAPE),
        "deploy": bench.inference_runner(deploy_model, deployed, batch=256, image_shape=SHAPE)}, rounds)
    results |= {"train_form_eval_img_s": infer["train_form"], "deploy_img_s": infer["deploy"],
                "deploy_speedup": infer["deploy"] / infer["train_form"],
                "local_gain_top1": results["with_local_top1"] - results["without_local_top1"]}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(out, results, workdirs)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
