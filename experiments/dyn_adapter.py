"""Dyn-Adapter reproduction on mini-VTAB: each host (Adapter, LoRA, RepAdapter) against its Dyn- version.

    python experiments/dyn_adapter.py --quick            # smoke run: digits, 6-block random-init ViT, 40 steps
    python experiments/dyn_adapter.py [--init vit.npz] [--tasks cifar10,digits,dsprites_loc,dsprites_ori,count]

Protocol (VTAB-1k, V-PETL style; spec §5.3, §7.9): for every task and host,
  1. search: train on train800 for every learning rate of `--lrs`, score on val200; the host and its Dyn-
     version each keep their best rate; the Dyn- search model also fixes the early-exit thresholds: calibrated
     on val200 for `--target` (fraction of the host's full-forward MACs); with one rate the host search is skipped;
  2. final: retrain on train800val200 with the chosen rate, evaluate on test once: `host_top1`; `dyn_top1` is
     the Dyn- model at the val200-calibrated thresholds, `dyn_flops_ratio` its expected MACs (every head
     evaluated counts; analytic ViT counts, `repjax.projects.dynadapter.flops`) over the host's full forward;
     `dyn_wallclock_speedup` the staged early-exit path (jitted stages, survivors compacted into padded
     buckets) against the host's full forward, timed side by side on the test images.
Same budget: the host and the Dyn- version get the same steps, batch, optimizer and learning-rate grid.

The Dyn- version (`repjax.projects.dynadapter`): exits every `--interval` blocks with balanced heads, the
multi-exit loss with the cosine lambda schedule, stage-dependent adapter dropout and the random masked gradient
update (keep probability `--keep`) before AdamW's moments: every one of these defaults is an assumption (the
paper's values are unknown). Backbone: `--init` (a flat .npz of ViT params keyed 'a/b/c', e.g. from
`--pretrain_steps` on Imagenette with `--save_init`) or a random init (`--quick`). Writes `results.json`
(per task, per host, and averaged) and `curve.png` (accuracy-FLOPs curves) under `--out`.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import pathlib
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from flax import traverse_util

from repjax import data, optim
from repjax.models.vit import ViT
from repjax.nn import petl as petl_lib
from repjax.projects.dynadapter import early_exit as ee, flops
from repjax.projects.dynadapter.exits import MultiExit, exit_blocks, head_macs, stage_petl
from repjax.projects.dynadapter.loss import multi_exit_loss

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared/data"
HOSTS = ("adapter", "lora", "repadapter")
MEAN = np.asarray([0.485, 0.456, 0.406], np.float32)  # ImageNet mean/std (the PETL repos' VTAB default)
STD = np.asarray([0.229, 0.224, 0.225], np.float32)


# ------------------------------------------------------------------ data


def load(task: str, split: str, size: int, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(float images [N,size,size,3] normalised, labels, num_classes) of a mini-VTAB split."""
    src = data.get_source(f"minivtab:{task}@{SHARED}", split)
    images, labels = src.as_arrays()
    if limit is not None and len(images) > limit:  # evenly spaced, so every class stays represented
        keep = (np.arange(limit) * len(images)) // limit
        images, labels = images[keep], labels[keep]
    x = jnp.asarray(images, jnp.float32) / 255.0
    if x.shape[1] != size:
        x = jax.image.resize(x, (len(x), size, size, 3), "bicubic")
    return np.asarray((x - MEAN) / STD), np.asarray(labels, np.int32), src.num_classes


# ------------------------------------------------------------------ models


def vit(args: argparse.Namespace, num_classes: int, petl: dict | None) -> ViT:
    return ViT(num_classes=num_classes, image_size=args.image_size, patch_size=args.patch, width=args.width,
               depth=args.depth, num_heads=args.heads, petl=petl)


def host_spec(host: str) -> dict[str, Any]:
    return {"kind": host, "dim": 8}


def dyn_model(args: argparse.Namespace, host: str, num_classes: int) -> MultiExit:
    spec = stage_petl(host_spec(host), args.depth, args.interval)
    return MultiExit(vit(args, num_classes, spec), num_classes=num_classes, interval=args.interval,
                     head_hidden=args.head_hidden)


def trainable_regex(host: str) -> str:
    return "|".join([petl_lib.host_regex(host), r"(^|/)classifier/", r"^exit_\d+/"])


def split_params(params: Any, regex: str) -> tuple[dict, dict]:
    """(trainable, frozen) flat dicts keyed by 'a/b/c'."""
    import re

    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}
    pattern = re.compile(regex)
    train = {k: v for k, v in flat.items() if pattern.search(k)}
    return train, {k: v for k, v in flat.items() if k not in train}


def merge(train: dict, frozen: dict) -> Any:
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in {**frozen, **train}.items()})


def init_backbone(args: argparse.Namespace, host: str, num_classes: int, pretrained: dict | None) -> Any:
    """Host ViT params: the pre-trained backbone (classifier re-initialised) or a random init (seeded)."""
    model = vit(args, num_classes, host_spec(host))
    params = model.init(jax.random.key(args.seed), jnp.zeros((1, args.image_size, args.image_size, 3)))["params"]
    if pretrained:
        flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}
        for k in flat:
            if k in pretrained and not k.startswith("classifier/"):
                if pretrained[k].shape != flat[k].shape:
                    raise ValueError(f"--init {k}: shape {pretrained[k].shape}, the model has {flat[k].shape}")
                flat[k] = jnp.asarray(pretrained[k])
        params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    return params


# ------------------------------------------------------------------ training


def optimizer(args: argparse.Namespace, lr: float, steps: int, trainable: dict, dyn: bool):
    cfg = mlc.ConfigDict(dict(name="adamw", lr=lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=args.wd,
                              clip_norm=0.0, warmup_steps=max(steps // 10, 1), schedule="cosine",
                              min_lr_ratio=0.0, momentum=0.9, nesterov=False, rules=[]))
    if dyn and args.keep < 1.0:
        cfg.rules = [(".*", {"transforms": [("random_grad_mask", {"keep_prob": args.keep, "seed": args.seed})]})]
    return optim.build(cfg, trainable, steps)[0]


_COMPILED: dict[tuple, Any] = {}  # one jitted train step / forward per model, reused over tasks' runs


def _train_step(args: argparse.Namespace, model: Any, trainable: dict, dyn: bool) -> tuple[Any, Any]:
    """(tx, jitted step) for `model`; the learning rate is an argument (AdamW's update, decoupled decay
    included, is linear in it), so every learning rate and run of one model shares one compilation."""
    key = (id(model), dyn, args.steps, tuple(sorted(trainable)))
    if key not in _COMPILED:
        tx = optimizer(args, 1.0, args.steps, trainable, dyn)
        loss_kw = dict(schedule=args.schedule, total_steps=args.steps)

        @jax.jit
        def step(trainable, frozen, opt_state, i, lr, xb, yb):
            def loss_fn(t):
                out = model.apply({"params": merge(t, frozen)}, xb, train=True,
                                  rngs={"dropout": jax.random.fold_in(jax.random.key(args.seed + 1), i)})
                if dyn:
                    return multi_exit_loss(out, {"label": yb}, step=i, **loss_kw)[0]
                return optax.softmax_cross_entropy_with_integer_labels(out, yb).mean()

            loss, grads = jax.value_and_grad(loss_fn)(trainable)
            updates, opt_state = tx.update(grads, opt_state, trainable)
            updates = jax.tree.map(lambda u: lr * u, updates)
            return optax.apply_updates(trainable, updates), opt_state, loss

        _COMPILED[key] = (tx, step)
    return _COMPILED[key]


def train(args: argparse.Namespace, model: Any, params: Any, regex: str, x: np.ndarray, y: np.ndarray,
          lr: float, dyn: bool) -> tuple[Any, int]:
    """`args.steps` AdamW steps on (x, y); only the `regex` leaves get gradients (the frozen ones are an input
    of the step, not differentiated). Returns (params, number of trainable parameters)."""
    trainable, frozen = split_params(params, regex)
    tx, step = _train_step(args, model, trainable, dyn)
    opt_state = tx.init(trainable)
    rng = np.random.default_rng(args.seed)
    order = np.concatenate([rng.permutation(len(x)) for _ in range(args.steps * args.batch // len(x) + 1)])
    for i in range(args.steps):
        idx = order[i * args.batch:(i + 1) * args.batch]
        trainable, opt_state, _ = step(trainable, frozen, opt_state, i, lr, x[idx], y[idx])
    n = int(sum(np.prod(v.shape) for v in trainable.values()))
    return merge(trainable, frozen), n


def logits(model: Any, params: Any, x: np.ndarray, batch: int = 200) -> Any:
    key = ("forward", id(model))
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(lambda p, xb: model.apply({"params": p}, xb))
    fn = _COMPILED[key]
    pad = (-len(x)) % batch
    xp = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
    outs = [jax.device_get(fn(params, xp[i:i + batch])) for i in range(0, len(xp), batch)]
    if isinstance(outs[0], list):
        return [np.concatenate([o[k] for o in outs])[:len(x)] for k in range(len(outs[0]))]
    return np.concatenate(outs)[:len(x)]


def dyn_costs(args: argparse.Namespace, host: str, num_classes: int) -> tuple[np.ndarray, float]:
    """(cumulative MACs of each exit incl. every head so far, host full-forward MACs), analytic. LoRA and
    RepAdapter merge into the frozen layers (no inference cost); the Houlsby adapter stays (2 L D r)."""
    tokens = (args.image_size // args.patch) ** 2 + 1
    extra = flops.adapter_macs(tokens, args.width, 8) if host == "adapter" else 0
    exits = exit_blocks(args.depth, args.interval)
    stages = flops.stage_macs(exits, args.image_size, args.patch, args.width, adapter=extra)
    model = dyn_model(args, host, num_classes)
    heads = [head_macs("mlp" if k == "mlp" else "linear", args.width, num_classes, args.head_hidden)
             for k in model.kinds]
    full = sum(flops.stage_macs((args.depth,), args.image_size, args.patch, args.width, adapter=extra)) + \
        args.width * num_classes
    return ee.cumulative_macs(stages, heads), float(full)


def wallclock(args: argparse.Namespace, host_model: Any, host_params: Any, model: MultiExit, params: Any,
              x: np.ndarray, thresholds: np.ndarray) -> dict[str, float]:
    v = {"params": params}
    stage_fns = [lambda xb, k=k: model.apply(v, k, xb, method=model.stage) for k in range(model.num_exits)]
    runner = ee.StagedRunner(stage_fns, thresholds, "max_softmax", ee.default_buckets(args.eval_batch, args.bucket))
    full = jax.jit(lambda xb: host_model.apply({"params": host_params}, xb))
    runner.warmup(x[0])
    b = args.eval_batch
    batches = [x[i:i + b] for i in range(0, len(x) - len(x) % b, b)] or [x[:b]]
    jax.block_until_ready(full(jnp.asarray(batches[0])))
    t = ee.timed({"host": lambda: [full(jnp.asarray(xb)) for xb in batches],
                  "dyn": lambda: [runner(jnp.asarray(xb)) for xb in batches]}, args.repeats)
    return {"host_s": t["host"], "dyn_s": t["dyn"], "speedup": t["host"] / t["dyn"]}


def run_task(args: argparse.Namespace, task: str, pretrained: dict | None) -> dict[str, Any]:
    xtr, ytr, num_classes = load(task, "train800", args.image_size)
    xval, yval, _ = load(task, "val200", args.image_size)
    xall, yall, _ = load(task, "train800val200", args.image_size)
    xte, yte, _ = load(task, "test", args.image_size, args.test_limit)
    out: dict[str, Any] = {"num_classes": num_classes, "test_examples": len(xte)}
    for host in args.hosts:
        t0 = time.time()
        regex = trainable_regex(host)
        host_model = vit(args, num_classes, host_spec(host))
        dyn = dyn_model(args, host, num_classes)
        base = init_backbone(args, host, num_classes, pretrained)
        dyn_init = dyn.init({"params": jax.random.key(args.seed), "dropout": jax.random.key(0)},
                            jnp.zeros((1, args.image_size, args.image_size, 3)))["params"]
        dyn_init = {**dyn_init, "backbone": base}  # the same backbone and host init as the host run
        cum, full = dyn_costs(args, host, num_classes)
        # 1. search on val200 (trained on train800)
        search = {"host": {}, "dyn": {}}
        thresholds, val_logits = {}, {}
        for lr in args.lrs:
            if len(args.lrs) > 1:  # one rate: nothing to choose, the host's search run is skipped
                p, _ = train(args, host_model, base, regex, xtr, ytr, lr, dyn=False)
                search["host"][lr] = float(np.mean(np.argmax(logits(host_model, p, xval), -1) == yval))
            p, _ = train(args, dyn, dyn_init, regex, xtr, ytr, lr, dyn=True)
            val_logits[lr] = logits(dyn, p, xval)
            t = ee.calibrate(np.stack([ee.confidence(z) for z in val_logits[lr]]), cum, args.target * full)
            search["dyn"][lr] = ee.simulate(val_logits[lr], yval, t, cum)["top1"]
            thresholds[lr] = t
        lr_host = max(search["host"], key=search["host"].get) if search["host"] else args.lrs[0]
        lr_dyn = max(search["dyn"], key=search["dyn"].get)
        # 2. final on train800val200, test once
        p_host, n_host = train(args, host_model, base, regex, xall, yall, lr_host, dyn=False)
        host_top1 = float(np.mean(np.argmax(logits(host_model, p_host, xte), -1) == yte))
        p_dyn, n_dyn = train(args, dyn, dyn_init, regex, xall, yall, lr_dyn, dyn=True)
        test_logits = logits(dyn, p_dyn, xte)
        op = ee.simulate(test_logits, yte, thresholds[lr_dyn], cum)
        budgets = [f * full for f in np.linspace(cum[0] / full, 1.0, 9)]
        curve = ee.curve(val_logits[lr_dyn], test_logits, yte, cum, budgets)  # thresholds from the search model
        timing = wallclock(args, host_model, p_host, dyn, p_dyn, xte, thresholds[lr_dyn])
        out[host] = {
            "host_top1": host_top1, "dyn_top1": op["top1"], "dyn_flops_ratio": op["macs"] / full,
            "dyn_wallclock_speedup": timing["speedup"], "host_params": n_host, "dyn_params": n_dyn,
            "dyn_exit_top1": [float(np.mean(np.argmax(z, -1) == yte)) for z in test_logits],
            "dyn_exit_fraction": [float(f) for f in op["exit_fraction"]],
            "thresholds": [float(t) for t in thresholds[lr_dyn]], "lr_host": lr_host, "lr_dyn": lr_dyn,
            "search_val_top1": {k: {str(lr): v for lr, v in d.items()} for k, d in search.items()},
            "host_macs": full, "exit_macs": [float(c) for c in cum], "timing_s": timing,
            "curve": curve, "seconds": time.time() - t0,
        }
        print(f"{task:>13} {host:>10}: host {host_top1:.3f}  dyn {op['top1']:.3f} at {op['macs'] / full:.2f} "
              f"FLOPs, {timing['speedup']:.2f}x wall-clock ({time.time() - t0:.0f}s)", flush=True)
    return out


def pretrain(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """A brief supervised pre-training of the plain ViT on Imagenette (never on a mini-VTAB task)."""
    src = data.get_source(f"folder:{SHARED / 'imagenette'}", "train")
    rng = np.random.default_rng(args.seed)
    index = rng.choice(len(src), min(len(src), args.pretrain_images), replace=False)
    images = np.stack([np.asarray(jax.image.resize(jnp.asarray(src[int(i)]["image"], jnp.float32) / 255.0,
                                                   (args.image_size, args.image_size, 3), "bicubic"))
                       for i in index])
    x, y = (images - MEAN) / STD, src.labels[index].astype(np.int32)
    model = vit(args, 10, None)
    params = model.init(jax.random.key(args.seed), x[:1])["params"]
    saved = args.steps
    args.steps = args.pretrain_steps
    params, _ = train(args, model, params, ".*", x, y, args.pretrain_lr, dyn=False)
    args.steps = saved
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def summary(results: dict[str, Any], hosts: list[str]) -> dict[str, Any]:
    keys = ("host_top1", "dyn_top1", "dyn_flops_ratio", "dyn_wallclock_speedup", "host_params", "dyn_params")
    tasks = [t for t in results if t != "average"]
    return {h: {k: float(np.mean([results[t][h][k] for t in tasks])) for k in keys} for h in hosts}


def plot(results: dict[str, Any], hosts: list[str], path: pathlib.Path) -> None:
    from repjax.plot import new_figure, save_figure

    tasks = [t for t in results if t != "average"]
    fig = new_figure(4 * len(tasks), 3.4)
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        for h in hosts:
            r = results[task][h]
            pts = r["curve"]
            line, = ax.plot([p["macs"] / r["host_macs"] for p in pts], [p["top1"] for p in pts], "-o", ms=3,
                            label=f"Dyn-{h}")
            ax.scatter([r["dyn_flops_ratio"]], [r["dyn_top1"]], marker="*", s=80, color=line.get_color())
            ax.axhline(r["host_top1"], ls="--", lw=1, color=line.get_color())
        ax.set_title(task)
        ax.set_xlabel("expected FLOPs / host full forward")
        ax.set_ylabel("test top-1")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120, tight=False)


def main(argv: list[str] | None = None) -> None:
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints where a long run is
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 tasks, tiny ViT, few steps: a smoke run")
    p.add_argument("--tasks", default="cifar10,digits,dsprites_loc,dsprites_ori,count")
    p.add_argument("--hosts", default=",".join(HOSTS))
    p.add_argument("--out", default=str(REPO / "experiments/results/dyn_adapter"))
    p.add_argument("--init", default=None, help="flat .npz of pre-trained ViT params ('a/b/c' keys)")
    p.add_argument("--init_run", default=None, help="a repjax training workdir of the plain ViT (its latest "
                   "checkpoint), e.g. runs/vit_imagenette from configs/vit_imagenette.py")
    p.add_argument("--init_config", default=None, help="the --init_run's config (default: the one it recorded)")
    p.add_argument("--save_init", default=None, help="write the --pretrain_steps backbone here")
    p.add_argument("--pretrain_steps", type=int, default=0)
    p.add_argument("--pretrain_images", type=int, default=9469)
    p.add_argument("--pretrain_lr", type=float, default=1e-3)
    p.add_argument("--image_size", type=int, default=64, help="defaults: the vit_imagenette backbone")
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--interval", type=int, default=3)
    p.add_argument("--head_hidden", type=int, default=64)
    p.add_argument("--steps", type=int, default=1600, help="per training run (100 epochs of 1,000 at batch 64)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lrs", default="1e-3,1e-2")
    p.add_argument("--wd", type=float, default=1e-4)
    p.add_argument("--keep", type=float, default=0.9, help="random masked gradient keep probability (assumption)")
    p.add_argument("--schedule", default="cosine", help="lambda_i(t) schedule: constant | linear | cosine")
    p.add_argument("--target", type=float, default=0.5, help="FLOPs budget, fraction of the host's forward")
    p.add_argument("--test_limit", type=int, default=None)
    p.add_argument("--eval_batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bucket", type=int, default=8, help="smallest bucket of the staged path (powers of 2 up)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        # a smoke run of the whole protocol (every compile included) that a loaded 2-core CPU finishes: one
        # task, a 6-block ViT with exits after blocks 2/4/6, 40 steps, one learning rate
        args.tasks, args.width, args.heads, args.patch, args.image_size = "digits", 48, 2, 8, 32
        args.depth, args.interval = 6, 2
        args.steps, args.lrs, args.test_limit, args.repeats, args.bucket = 40, "3e-3", 256, 2, 32
    args.lrs = [float(x) for x in args.lrs.split(",")]
    args.hosts = args.hosts.split(",")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pretrained = None
    if args.init:
        pretrained = dict(np.load(args.init))
    elif args.init_run:
        from repjax import config as config_lib, workdir
        from repjax.build import restore_variables

        cfg = config_lib.load(args.init_config) if args.init_config else workdir.run_config(args.init_run)
        if cfg is None:
            raise FileNotFoundError(f"--init_run {args.init_run}: no config.json (not a repjax training workdir)")
        variables = restore_variables(cfg, args.init_run, 10, (args.image_size, args.image_size, 3))
        pretrained = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(variables["params"]).items()}
    elif args.pretrain_steps:
        pretrained = pretrain(args)
        if args.save_init:
            np.savez(args.save_init, **pretrained)
    results: dict[str, Any] = {}
    for task in args.tasks.split(","):
        results[task] = run_task(args, task, pretrained)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=float))  # partial, per task
    results["average"] = summary(results, args.hosts)
    results["config"] = {**vars(args), "out": str(out.resolve().relative_to(REPO)) if out.resolve().is_relative_to(REPO)
                                         else str(out)}  # no machine paths in a committed result
    results["backbone"] = args.init or args.init_run or (f"pretrained {args.pretrain_steps} steps on Imagenette"
                                        if args.pretrain_steps else "random init")
    plot({k: v for k, v in results.items() if k not in ("config", "backbone")}, args.hosts, out / "curve.png")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    for h, r in results["average"].items():
        print(f"average {h:>10}: host {r['host_top1']:.3f}  dyn {r['dyn_top1']:.3f} at "
              f"{r['dyn_flops_ratio']:.2f} FLOPs, {r['dyn_wallclock_speedup']:.2f}x wall-clock")
    print(f"wrote {out / 'results.json'} and {out / 'curve.png'}")


if __name__ == "__main__":
    main()
