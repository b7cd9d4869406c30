"""Large-kernel robustness on Imagenette (Chen et al., ICML'24, reproduced at a CPU budget).

    python experiments/lk_robustness.py [--quick] [--epochs 8] [--image_size 64] [--images 500]

Models of one training budget and recipe (configs/pelk/lk_imagenette.py), all on the `convnext_imagenette`
layout (stem 4x4/4, depths 2-2-4-2, widths 48-384) except the ResNet and the ViT:
  small3   3x3 depthwise kernels                   small7   7x7 (ConvNeXt)
  dense    dense K-K/2-K/4-3 kernels + 5x5, BN     pelk     peripheral kernels of the same sizes (PeLK)
  resnet   ResNet-20 (CIFAR layout, 3 stages)      vit      `vit_imagenette` (12-block ViT-Ti, patch 8)
and the kernel sweep: the dense backbone with first-stage kernel K = 3, 7, 13, 21, 31 (31 = the largest
useful on the 16x16 first map at 64 px; later stages min(K, 15), min(K, 7), 3).

Each model gets: clean top-1; Imagenette-C (the 15 corruptions x 5 severities generated on the fly at the
input resolution, cached; baseline declared = the ResNet's errors, so its mCE is 100%); FGSM (eps 0.1-0.4
scaled to [0.002, 0.03] here: the small models have little margin) and PGD (5 steps, alpha eps/4, random
start) accuracy curves; random/salient/non-salient occlusion (input-gradient saliency of each model itself,
patch 4 px = a 16x16 grid); the band-noise sweep 0..pi (window 0.1 pi, eps 0.1); lesion curves of stage 3;
kernel attention distances (large-kernel models); ERF area ratios. Writes `results.json` (per model
`clean_top1`, `mce`, `fgsm_acc`, `pgd_acc`, ...; `kernel_sweep` = [{kernel, clean_top1, mce, run}]), the README's
tables (`tables.md`) and one PNG per analysis under --out. Each model's analyses are kept in models/<name>.json
with what they were computed from, so an interrupted evaluation phase resumes at the first unfinished model.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

import numpy as np

from repjax import config as config_lib, evals, models, sharding
from repjax.build import restore_variables
from repjax.metrics import read_metrics
from repjax.projects import import_all
from repjax.projects.lkrobust import corruptions as C
from repjax.projects.lkrobust.attacks import plot_curves
from repjax.projects.lkrobust.imagenet_c import plot_bars
from repjax.train import train

REPO = pathlib.Path(__file__).resolve().parents[1]
IMAGENETTE = REPO.parent / "shared/data/imagenette"
DIMS = (48, 96, 192, 384)
FGSM_EPS = (0.002, 0.005, 0.01, 0.02, 0.03)
PGD_EPS = (0.001, 0.002, 0.004, 0.008)
SWEEP = (3, 7, 13, 21, 31)


def stage_kernels(k: int) -> tuple[int, ...]:
    return (k, min(k, 15), min(k, 7), 3)


def variants(kernel: int) -> dict[str, tuple[str, dict[str, Any]]]:
    """{name: (registered model, kwargs)}."""
    out = {
        "small3": ("convnext_imagenette", dict(dims=DIMS, kernel_sizes=(3, 3, 3, 3))),
        "small7": ("convnext_imagenette", dict(dims=DIMS, kernel_sizes=(7, 7, 7, 7))),
        "dense": ("convnext_imagenette", dict(dims=DIMS, kernel_sizes=stage_kernels(kernel), small_kernel=5,
                                              use_bn=True)),
        "pelk": ("pelk_imagenette", dict(dims=DIMS, kernel_sizes=stage_kernels(kernel), small_kernel=5)),
        "resnet": ("resnet20", {}),
        "vit": ("vit_imagenette", {}),
    }
    return out


def make_config(model: str, kwargs: dict[str, Any], args: argparse.Namespace, steps: int) -> Any:
    c = config_lib.load(f"{REPO / 'configs/pelk/lk_imagenette.py'}:model={model},image_size={args.image_size},"
                        f"batch={args.batch},data=folder:{IMAGENETTE}")
    if model.startswith("resnet"):  # the CIFAR ResNet has no image_size: it pools globally
        del c.model.kwargs["image_size"]
    c.model.kwargs.update(kwargs)
    c.epochs, c.optim.warmup_epochs, c.eval_every_epochs = 0, 0, 0  # lengths in steps here (`--quick`: 6)
    c.total_steps = steps
    c.optim.warmup_steps = max(steps // 10, 1)
    c.eval_every_steps = 0
    c.checkpoint_every_steps = max(steps // 2, 1)
    c.log_every_steps = max(steps // 20, 1)
    return c


def evaluate(name: str, c: Any, workdir: pathlib.Path, args: argparse.Namespace, out: pathlib.Path,
             baseline: Any, corruptions: tuple[str, ...], severities: tuple[int, ...], full: bool) -> dict[str, Any]:
    """Every analysis of one trained model; PNGs under out/<analysis>_<name>.png."""
    shape = (args.image_size, args.image_size, 3)
    variables = restore_variables(c, workdir, 10, shape)
    model = models.create(c.model.name, num_classes=10, **c.model.kwargs)
    mesh = sharding.make_mesh([("data", -1)])
    n = args.images
    res: dict[str, Any] = {}
    ic = evals.get("imagenet_c")(model, variables, c, mesh, corruptions=corruptions, severities=severities,
                                 num_images=n, baseline=baseline, cache_dir=str(out / "cache"),
                                 save=str(out / f"imagenette_c_{name}"))
    res["clean_top1"] = ic["clean_top1"]
    res["mean_corrupted_top1"] = ic["mean_corrupted_top1"]
    res["mce"] = ic.get("mce")
    res["relative_mce"] = ic.get("relative_mce")
    res["corruption_top1"] = {k.split("/")[1]: v for k, v in ic.items() if k.count("/") == 1 and k.startswith("top1")}
    if not full:
        return res
    fg = evals.get("adversarial")(model, variables, c, mesh, attack="fgsm", eps=FGSM_EPS, num_images=n,
                                  save=str(out / f"fgsm_{name}"))
    pg = evals.get("adversarial")(model, variables, c, mesh, attack="pgd", eps=PGD_EPS, num_images=n,
                                  save=str(out / f"pgd_{name}"))
    res["fgsm_acc"] = {f"{e:g}": fg[f"top1/{e:g}"] for e in FGSM_EPS}
    res["pgd_acc"] = {f"{e:g}": pg[f"top1/{e:g}"] for e in PGD_EPS}
    occ = evals.get("occlusion")(model, variables, c, mesh, patch_size=max(1, args.image_size // 16),
                                 num_images=n, save=str(out / f"occlusion_{name}"))
    res["occlusion"] = {k.removeprefix("top1/"): v for k, v in occ.items() if k.startswith("top1/")}
    fq = evals.get("frequency_noise")(model, variables, c, mesh, num_images=n, save=str(out / f"frequency_{name}"))
    res["frequency_drop"] = {k.removeprefix("drop/"): v for k, v in fq.items() if k.startswith("drop/")}
    stage = {"resnet": 1, "vit": 0}.get(name, 2)  # ResNet-20: 3 stages; the ViT: one stage of 12 blocks
    les = evals.get("lesion")(model, variables, c, mesh, stage=stage, draws=3 if args.quick else 10,
                              num_images=n, save=str(out / f"lesion_{name}"))
    res["lesion"] = {k.removeprefix("top1/"): v for k, v in les.items() if k.startswith("top1/")}
    res["lesion_stage"] = stage
    if name in ("dense", "pelk"):
        ka = evals.get("kernel_attention")(model, variables, c, mesh, save=str(out / f"kernel_attention_{name}"))
        res["kernel_attention"] = {"distance": ka["distance"], "distance_norm": ka["distance_norm"]}
    erf = evals.get("erf")(model, variables, c, mesh, image_size=2 * args.image_size,
                           num_images=4 if args.quick else 32, save=str(out / f"erf_{name}"))
    res["erf"] = {k: v for k, v in erf.items() if k.startswith("ratio")}
    return res


def evaluate_cached(name: str, c: Any, workdir: pathlib.Path, args: argparse.Namespace, out: pathlib.Path,
                    baseline: Any, corruptions: tuple[str, ...], severities: tuple[int, ...],
                    full: bool) -> dict[str, Any]:
    """`evaluate`, kept in out/models/<name>.json with what it was computed from (the run's config, its last
    step, the analysis settings): an interrupted evaluation phase restarts at the first model not finished, and
    a result from another run or other settings is never reused."""
    config = json.loads(json.dumps(c.to_dict()).replace(str(IMAGENETTE), "../shared/data/imagenette"))  # portable
    key = {"config": config, "last_step": max((r.get("step", 0) for r in read_metrics(workdir)), default=0),
           "images": args.images, "quick": args.quick, "baseline": baseline and pathlib.Path(baseline).read_text(),
           "corruptions": list(corruptions), "severities": list(severities), "full": full}
    path = out / "models" / f"{name}.json"
    if path.exists() and (out / f"imagenette_c_{name}.json").exists():  # that table: the next models' baseline
        kept = json.loads(path.read_text())
        if kept["key"] == json.loads(json.dumps(key, default=float)):
            return kept["result"]
    result = evaluate(name, c, workdir, args, out, baseline, corruptions, severities, full)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"key": key, "result": result}, indent=1, default=float) + "\n")
    return result


def summary_plots(out: pathlib.Path, results: dict[str, Any]) -> None:
    names = [n for n in results["models"]]
    m = results["models"]
    plot_bars({n: 100 * m[n]["mce"] for n in names}, out / "mce.png", ylabel="mCE (%)", reference=100,
              title=f"Imagenette-C mCE (baseline: {results['baseline']})")
    for key, label in (("fgsm_acc", "FGSM eps"), ("pgd_acc", "PGD eps")):
        plot_curves({n: ([float(e) for e in m[n][key]], [100 * v for v in m[n][key].values()]) for n in names},
                    out / f"{key}.png", xlabel=label)
    plot_curves({n: ([float(k) for k in m[n]["frequency_drop"]], [100 * v for v in m[n]["frequency_drop"].values()])
                 for n in names}, out / "frequency.png", xlabel="noise frequency (x pi)", ylabel="top-1 drop")
    for mode in ("random", "salient", "non_salient"):
        plot_curves({n: ([float(k.split("/")[1]) for k in m[n]["occlusion"] if k.startswith(mode + "/")],
                         [100 * v for k, v in m[n]["occlusion"].items() if k.startswith(mode + "/")]) for n in names},
                    out / f"occlusion_{mode}.png", xlabel="dropped fraction / lambda")
    plot_curves({n: ([int(k) for k in m[n]["lesion"]], [100 * v for v in m[n]["lesion"].values()]) for n in names},
                out / "lesion.png", xlabel="units removed (stage 3; ResNet: stage 2; ViT: any block)")
    sweep = results["kernel_sweep"]
    plot_curves({"clean top-1": ([s["kernel"] for s in sweep], [100 * s["clean_top1"] for s in sweep]),
                 "mCE": ([s["kernel"] for s in sweep], [100 * s["mce"] for s in sweep])},
                out / "kernel_sweep.png", xlabel="first-stage kernel K", ylabel="%")


def markdown_tables(results: dict[str, Any], clean_full: dict[str, Any]) -> str:
    """The README's tables from `results` (top-1 in %, on `images` val images unless said otherwise)."""
    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    fg, pg = [f"{e:g}" for e in (FGSM_EPS[0], FGSM_EPS[2], FGSM_EPS[-1])], [f"{e:g}" for e in (PGD_EPS[1], PGD_EPS[-1])]
    header = ("| model | clean (full val) | clean | corrupted | mCE | rel. mCE | " + " | ".join(
        [f"FGSM {e}" for e in fg] + [f"PGD {e}" for e in pg]) + " | occl. 50% | salient / non-sal. drop 0.5 | "
        "lesion 1 / all (n) | band noise worst drop | ERF 20% area | kernel attn. distance (norm.) |")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, r in results["models"].items():
        ka, most = r.get("kernel_attention"), max(r["lesion"], key=int)  # most: every removable block gone
        worst = max(r["frequency_drop"].items(), key=lambda kv: kv[1])
        rows.append(" | ".join([
            f"| {name}", pct(clean_full.get(name)), pct(r["clean_top1"]), pct(r["mean_corrupted_top1"]), pct(r["mce"]),
            pct(r["relative_mce"]), *(pct(r["fgsm_acc"][e]) for e in fg), *(pct(r["pgd_acc"][e]) for e in pg),
            pct(r["occlusion"]["random/0.5"]), f"{pct(r['occlusion']['salient/0.5'])} / "
            f"{pct(r['occlusion']['non_salient/0.5'])}", f"{pct(r['lesion']['1'])} / {pct(r['lesion'][most])} ({most})",
            f"{pct(worst[1])} at {worst[0]} pi", f"{r['erf']['ratio_0.2']:.3f}",
            "-" if ka is None else f"{ka['distance']:.2f} ({ka['distance_norm']:.2f})"]) + " |")
    sweep = ["| first-stage K | clean (full val) | clean | mCE |", "|---|---|---|---|"]
    for s in results["kernel_sweep"]:
        name = s.get("run", f"sweep_{s['kernel']}")
        sweep.append(f"| {s['kernel']} | {pct(clean_full.get(name))} | {pct(s['clean_top1'])} | {pct(s['mce'])} |")
    return "\n".join(rows) + "\n\n" + "\n".join(sweep) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="6 steps of batch 16, 40 images, 3 corruptions at severity 3, kernel sweep 3 and 31 only")
    p.add_argument("--epochs", type=float, default=8)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--kernel", type=int, default=31, help="first-stage kernel of the dense / pelk models")
    p.add_argument("--images", type=int, default=500, help="val images per analysis")
    p.add_argument("--out", default=str(REPO / "experiments/results/lk_robustness"))
    args = p.parse_args(argv)
    if not IMAGENETTE.exists():
        raise FileNotFoundError(f"{IMAGENETTE} not found (the shared Imagenette ImageFolder beside the checkout)")
    import_all()
    if args.quick:
        args.images, args.batch = min(args.images, 40), min(args.batch, 16)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = 6 if args.quick else int(args.epochs * 9469 / args.batch)
    corruptions = ("gaussian_noise", "defocus_blur", "fog") if args.quick else C.COMMON
    severities = (3,) if args.quick else (1, 2, 3, 4, 5)
    runs = {name: make_config(model, kw, args, steps) for name, (model, kw) in variants(args.kernel).items()}
    kernels = (SWEEP[0], SWEEP[-1]) if args.quick else SWEEP
    sweep = {k: make_config("convnext_imagenette", variants(k)["dense"][1], args, steps) for k in kernels}
    # a sweep point with the config of a model above (K = --kernel: `dense`) reuses that model's run and results
    alias = {k: next((n for n, r in runs.items() if r.to_dict() == c.to_dict()), None) for k, c in sweep.items()}
    workdirs = {name: out / "runs" / name for name in [*runs, *(f"sweep_{k}" for k in sweep if not alias[k])]}
    for name, c in [*runs.items(), *((f"sweep_{k}", c) for k, c in sweep.items() if not alias[k])]:
        train(c, workdirs[name])
    (out / "clean_top1.json").write_text(json.dumps({  # each run's final eval (full val split), before analyses
        name: next((r["test/top1"] for r in reversed(read_metrics(w)) if "test/top1" in r), None)
        for name, w in workdirs.items()}, indent=1) + "\n")
    results: dict[str, Any] = {"quick": args.quick, "steps": steps, "epochs": steps * args.batch / 9469,
                               "image_size": args.image_size, "images": args.images, "baseline": "resnet",
                               "corruptions": list(corruptions), "severities": list(severities), "models": {}}
    # the declared baseline: the ResNet's Imagenette-C errors (its first, corruption-only pass writes that table)
    evaluate_cached("resnet_baseline", runs["resnet"], workdirs["resnet"], args, out, None, corruptions, severities,
                    False)
    baseline_json = str(out / "imagenette_c_resnet_baseline.json")
    for name, c in runs.items():
        results["models"][name] = evaluate_cached(name, c, workdirs[name], args, out, baseline_json, corruptions,
                                                  severities, True)
    results["kernel_sweep"] = []
    for k, c in sweep.items():
        r = results["models"][alias[k]] if alias[k] else evaluate_cached(
            f"sweep_{k}", c, workdirs[f"sweep_{k}"], args, out, baseline_json, corruptions, severities, False)
        results["kernel_sweep"].append({"kernel": k, "clean_top1": r["clean_top1"], "mce": r["mce"],
                                        "run": alias[k] or f"sweep_{k}"})
    for name, r in results["models"].items():
        results[name] = {k: r[k] for k in ("clean_top1", "mce", "fgsm_acc", "pgd_acc")}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    summary_plots(out, results)
    (out / "tables.md").write_text(markdown_tables(results, json.loads((out / "clean_top1.json").read_text())))
    print(json.dumps({n: results[n] for n in results["models"]} | {"kernel_sweep": results["kernel_sweep"]},
                     indent=1, default=float))
    return results


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
