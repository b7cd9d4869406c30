"""Training and inference speed of every model family: repjax against the same architecture in PyTorch.

    python experiments/bench_models.py                 # all rows, CPU, float32 (~30 min on 2 quiet cores)
                                                       # -> results.json, ratios.png, table.md (the README's)
    python experiments/bench_models.py --quick         # tiny variants, 1 round: a smoke test (seconds per row)
    python experiments/bench_models.py --only resnet20,repvgg_a0 --rounds 5
    python experiments/bench_models.py --only resnet20 --rounds 3 --iters 3 --update   # re-measure one row in place
    python experiments/bench_models.py --dtype bf16 --torch-device cuda    # on a GPU (experiments/bench_gpu.sh)

For each row: the repjax model from the registry (`repjax.models.create`) and its PyTorch reference
(`experiments/torch_models.py`, built from the repjax module's own fields; the two parameter counts must be
equal or the row is refused), the same batch, input size, dtype and thread count
(`torch.set_num_threads` = the CPU count, which is XLA:CPU's intra-op pool), and
- training: one full step each -- forward, cross-entropy, backward, optimizer update, BatchNorm statistics
  -- ending with the loss on the host (a logged step). repjax: `repjax.step.make_train_step`, jitted with the
  state donated. PyTorch: eager, `zero_grad(set_to_none=True)`, `loss.item()`.
- inference: eval mode (running BN statistics); repjax jitted `model.apply(train=False)`, PyTorch eager under
  `torch.inference_mode()`.
All runners of a row (or of a row group: the RepOpt-VGG / RepVGG pair) are compiled and warmed up first, then
take turns `rounds` times; each keeps its median images/s, and a ratio is repjax / PyTorch (> 1: repjax faster).

Peak memory: repjax from XLA's buffer assignment of the compiled step (`memory_analysis()`: arguments +
outputs - donated aliases + temporaries: exact for the program, excludes the runtime); PyTorch from the
profiler's allocator events of one step (`profile_memory=True`: running sum of allocations minus frees, at
op granularity) plus what is live before the step (parameters, buffers, optimizer state, the batch). Both
count tensors only, not the framework's own code or caches.

Optimizers: SGD (momentum 0.9, weight decay 1e-4 on conv/linear weights, none on BN and biases as the
official RepVGG/RepOpt code) for the convnets and RepMLPNet; AdamW (lr 1e-3, wd 0.05) for ConvNeXt / SLaK /
PeLK / ViT, their papers' optimizer. RepOpt-VGG trains its target form with RepOpt-SGD (Grad Mult on the
block kernels, nesterov; random positive scales: speed does not depend on their values) against RepVGG's
training form with nesterov SGD, on the same deploy architecture (RepVGG-B0 depths and widths).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

from repjax import config as config_lib, models, optim  # noqa: E402
from repjax.step import init_state, make_train_step  # noqa: E402

OUT = REPO / "experiments" / "results" / "bench_models"
B0 = dict(num_blocks=(4, 6, 16, 1), widths=(64, 64, 128, 256, 1280))  # RepVGG-B0 (a=1, b=2.5)
TINY_VGG = dict(num_blocks=(1, 1), widths=(8, 8, 16), strides=(2, 2, 2))


@dataclasses.dataclass(frozen=True)
class Row:
    """One benchmark row. `group`: rows interleaved together (a comparison between rows)."""

    label: str
    model: str  # registry name
    kwargs: dict
    size: int
    batch: int
    optimizer: str = "sgd"  # sgd | adamw | repopt_sgd
    train: bool = True
    group: str = ""
    nesterov: bool = False


def rows(quick: bool) -> list[Row]:
    if quick:
        out = [Row("resnet20", "resnet20", {}, 16, 4),
               Row("repvgg_tiny", "repvgg_tiny", {}, 16, 4),
               Row("repvgg_tiny deploy", "repvgg_tiny", {"deploy": True}, 16, 4, train=False),
               Row("repvgg tiny-arch (pair)", "repvgg_b0", dict(TINY_VGG), 16, 4, group="repopt", nesterov=True),
               Row("repopt_vgg tiny-arch target (pair)", "repopt_vgg_b1", dict(TINY_VGG, mode="target"), 16, 4,
                   "repopt_sgd", group="repopt", nesterov=True),
               Row("repmlpnet_tiny", "repmlpnet_tiny", {}, 16, 4),
               Row("convnext_cifar", "convnext_cifar", {}, 32, 2, "adamw"),
               Row("slak_cifar", "slak_cifar", {}, 32, 2, "adamw"),
               Row("pelk_cifar", "pelk_cifar", {}, 32, 2, "adamw")]
    else:
        out = [Row("resnet20 (CIFAR, 32 px)", "resnet20", {}, 32, 128),
               Row("repvgg_a0 train form (64 px)", "repvgg_a0", {}, 64, 32),
               Row("repvgg_a0 deploy form (64 px)", "repvgg_a0", {"deploy": True}, 64, 32, train=False),
               Row("repvgg_b0 train form (32 px)", "repvgg_b0", {}, 32, 64, group="repopt32", nesterov=True),
               Row("repopt_vgg_b0 target, RepOpt-SGD (32 px)", "repopt_vgg_b1", dict(B0, mode="target"), 32, 64,
                   "repopt_sgd", group="repopt32", nesterov=True),
               Row("repvgg_b0 train form (224 px)", "repvgg_b0", {}, 224, 8, group="repopt224", nesterov=True),
               Row("repopt_vgg_b0 target, RepOpt-SGD (224 px)", "repopt_vgg_b1", dict(B0, mode="target"), 224, 8,
                   "repopt_sgd", group="repopt224", nesterov=True),
               Row("repmlpnet_imagenette (64 px)", "repmlpnet_imagenette", {"image_size": 64}, 64, 32),
               Row("convnext_imagenette (64 px)", "convnext_imagenette", {}, 64, 32, "adamw"),
               Row("slak_imagenette (64 px)", "slak_imagenette", {}, 64, 32, "adamw"),
               Row("pelk_imagenette (64 px)", "pelk_imagenette", {}, 64, 32, "adamw")]
    # the ViT row: `vit_imagenette`, the 12-block ViT-Ti/8 backbone of the Dyn-Adapter experiments
    out.append(Row("vit (small variant)", "vit_imagenette", {"image_size": 32} if quick else {}, 32 if quick else 64,
                   2 if quick else 32, "adamw"))
    return out


# ---------------------------------------------------------------------------------------------- repjax side


def _scales(model: Any) -> dict:
    """Random positive RepOpt scales for every target block (s, t; d where the block has an identity)."""
    from repjax.projects.repopt.repopt_vgg import block_specs

    rng = np.random.default_rng(0)
    out = {}
    for b in block_specs(model.num_blocks, model.widths, model.strides):
        entry = {"s": rng.uniform(0.5, 1.5, b.out_ch), "t": rng.uniform(0.5, 1.5, b.out_ch)}
        if b.identity:
            entry["d"] = rng.uniform(0.5, 1.5, b.out_ch)
        out[b.name] = entry
    return out


def optim_config(row: Row, model: Any) -> Any:
    from repjax.projects.repopt.grad_mult import NO_DECAY, repopt_sgd_rules

    cfg = config_lib.defaults().optim
    cfg.schedule = "constant"
    if row.optimizer == "adamw":
        cfg.name, cfg.lr, cfg.weight_decay = "adamw", 1e-3, 0.05
    else:
        cfg.lr, cfg.weight_decay, cfg.nesterov = 0.1, 1e-4, row.nesterov
        cfg.rules = (repopt_sgd_rules(_scales(model)) if row.optimizer == "repopt_sgd"
                     else [(NO_DECAY + r"|(^|/)rbr_identity/", {"weight_decay": 0.0})])
    return cfg


def _jax_memory_mb(compiled: Any) -> float:
    m = compiled.memory_analysis()
    live = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return live / 2**20


def jax_runners(row: Row, model: Any, images: np.ndarray, labels: np.ndarray, num_classes: int, iters: int):
    """(train runner or None, inference runner, info) for the repjax model."""
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels.astype(np.int32))}
    example = batch["image"][:1]
    info: dict[str, Any] = {}
    train_run = None
    if row.train:
        params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), example, train=False))["params"]
        tx, schedule = optim.build(optim_config(row, model), params, 1000)
        state = jax.jit(functools.partial(init_state, model, tx, example, 0, False))()
        step = jax.jit(make_train_step(model, tx, schedule), donate_argnums=0)
        compiled = step.lower(state, batch).compile()
        info["repjax_train_peak_mb"] = _jax_memory_mb(compiled)
        holder = {"state": state}

        def train_one() -> None:
            holder["state"], metrics = compiled(holder["state"], batch)
            float(metrics["loss"])

        train_run = functools.partial(_rate, train_one, iters, row.batch)
        variables = jax.tree.map(jnp.copy, {"params": state.params, **(
            {"batch_stats": state.batch_stats} if state.batch_stats else {})})  # the step donates `state`
    else:
        variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), example, train=False))()
    info["params"] = int(sum(x.size for x in jax.tree.leaves(variables["params"])))
    infer = jax.jit(lambda v, x: model.apply(v, x, train=False))
    compiled_infer = infer.lower(variables, batch["image"]).compile()
    info["repjax_infer_peak_mb"] = _jax_memory_mb(compiled_infer)

    def infer_one() -> None:
        compiled_infer(variables, batch["image"]).block_until_ready()

    return train_run, functools.partial(_rate, infer_one, iters, row.batch), info


# ---------------------------------------------------------------------------------------------- torch side


def torch_runners(row: Row, model: Any, images: np.ndarray, labels: np.ndarray, iters: int, device: str,
                  dtype: str):
    import torch
    import torch_models

    torch.manual_seed(0)
    net = torch_models.build(model).to(device)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
    y = torch.from_numpy(labels.astype(np.int64)).to(device)
    autocast = functools.partial(torch.autocast, device_type=device.split(":")[0], dtype=torch.bfloat16,
                                 enabled=dtype == "bf16")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    info: dict[str, Any] = {"torch_params": torch_models.param_count(net)}
    train_run = None
    if row.train:
        decay = [p for p in net.parameters() if p.ndim > 1]
        no_decay = [p for p in net.parameters() if p.ndim <= 1]
        if row.optimizer == "adamw":
            opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
        else:
            opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=0.1, momentum=0.9, nesterov=row.nesterov)
        mults = _torch_grad_mults(net, model) if row.optimizer == "repopt_sgd" else []

        def train_one() -> float:
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = torch.nn.functional.cross_entropy(net(x).float(), y)
            loss.backward()
            for p, m in mults:  # RepOpt-SGD: Grad Mult on the raw gradient, before decay and momentum
                p.grad.mul_(m)
            opt.step()
            return loss.item()

        train_one()
        info["torch_train_peak_mb"] = _torch_peak_mb(train_one, net, opt, (x, y))
        train_run = functools.partial(_rate, train_one, iters, row.batch)

    def infer_one() -> None:
        net.eval()
        with torch.inference_mode(), autocast():
            net(x)
        sync()
        net.train()

    infer_one()
    info["torch_infer_peak_mb"] = _torch_peak_mb(infer_one, net, None, (x,))
    return train_run, functools.partial(_rate, infer_one, iters, row.batch), info


def _torch_grad_mults(net: Any, model: Any) -> list:
    """(conv weight, Grad Mult in OIHW) for each plain block, from the same scales as the repjax side."""
    import torch

    from repjax.projects.repopt.grad_mult import mult_tensor

    scales = _scales(model)
    out = []
    for sc, block in zip(scales.values(), net.blocks, strict=True):
        w = block.conv.weight
        shape = (w.shape[2], w.shape[3], w.shape[1], w.shape[0])
        m = np.asarray(mult_tensor(shape, sc["s"], sc["t"], "d" in sc, 2.0)).transpose(3, 2, 0, 1)
        out.append((w, torch.from_numpy(m.copy()).to(w.device)))
    return out


def _torch_peak_mb(fn: Callable[[], Any], net: Any, opt: Any, inputs: tuple) -> float:
    """Tensors live before the call + the peak of the allocator's running balance during it (profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    def nbytes(t: Any) -> int:
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    base = sum(nbytes(t) for t in [*net.parameters(), *net.buffers(), *inputs])
    if opt is not None:
        base += sum(nbytes(v) for s in opt.state.values() for v in s.values())
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    cur = peak = 0
    field = "self_device_memory_usage" if inputs[0].is_cuda else "self_cpu_memory_usage"
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += getattr(e, field, 0) or 0
        peak = max(peak, cur)
    return (base + peak) / 2**20


# ---------------------------------------------------------------------------------------------- timing


def _rate(fn: Callable[[], Any], n: int, images: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return n * images / (time.perf_counter() - start)


def bench_group(group: list[Row], rounds: int, iters: int, device: str, dtype: str) -> list[dict]:
    """Builds every runner of the group's rows, then interleaves them `rounds` times; one result per row."""
    runners: dict[str, Callable[[], float]] = {}
    results = []
    for row in group:
        kw = dict(row.kwargs, **({"dtype": jnp.bfloat16} if dtype == "bf16" else {}))
        model = models.create(row.model, **kw)
        num_classes = model.num_classes
        rng = np.random.default_rng(0)
        images = rng.standard_normal((row.batch, row.size, row.size, 3)).astype(np.float32)
        labels = rng.integers(0, num_classes, row.batch)
        t0 = time.time()
        jt, ji, info = jax_runners(row, model, images, labels, num_classes, iters)
        compile_s = time.time() - t0
        tt, ti, tinfo = torch_runners(row, model, images, labels, iters, device, dtype)
        if info["params"] != tinfo["torch_params"]:
            raise RuntimeError(f"{row.label}: repjax has {info['params']} parameters, the PyTorch reference "
                               f"{tinfo['torch_params']}: not the same architecture")
        info.update(tinfo)
        for kind, run in (("repjax_train", jt), ("torch_train", tt), ("repjax_infer", ji), ("torch_infer", ti)):
            if run is not None:
                run()  # one more warm-up burst each
                runners[f"{row.label}|{kind}"] = run
        results.append(dict(model=row.label, registry_name=row.model, kwargs=_jsonable(row.kwargs), image_size=row.size,
                            batch=row.batch, optimizer=row.optimizer, group=row.group or None,
                            repjax_compile_s=compile_s, **info))
        print(f"  built {row.label} ({compile_s:.0f} s compile)", flush=True)
    rates: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for k, run in runners.items():
            rates[k].append(run())
    for res in results:
        for kind in ("repjax_train", "torch_train", "repjax_infer", "torch_infer"):
            r = rates.get(f"{res['model']}|{kind}")
            res[f"{kind}_img_s"] = statistics.median(r) if r else None
            res[f"{kind}_rounds"] = r
        for kind in ("train", "infer"):
            j, t = res[f"repjax_{kind}_img_s"], res[f"torch_{kind}_img_s"]
            res[f"{kind}_ratio"] = j / t if j and t else None
    return results


def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def pairs(results: list[dict]) -> list[dict]:
    """RepOpt-VGG over RepVGG training speed per group, in each framework (the paper's claim)."""
    out = []
    for g in sorted({r["group"] for r in results if r["group"]}):
        rs = [r for r in results if r["group"] == g]
        rep = next((r for r in rs if r["optimizer"] == "repopt_sgd"), None)
        vgg = next((r for r in rs if r["optimizer"] != "repopt_sgd"), None)
        if rep is None or vgg is None:  # --only kept one side of the pair
            continue
        out.append({"group": g, "repjax_repopt_over_repvgg": rep["repjax_train_img_s"] / vgg["repjax_train_img_s"],
                    "torch_repopt_over_repvgg": rep["torch_train_img_s"] / vgg["torch_train_img_s"],
                    "repjax_peak_mb": {"repopt": rep["repjax_train_peak_mb"], "repvgg": vgg["repjax_train_peak_mb"]},
                    "torch_peak_mb": {"repopt": rep["torch_train_peak_mb"], "repvgg": vgg["torch_train_peak_mb"]}})
    return out


def plot(results: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = np.arange(len(results))
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(results)), 4.5))
    for off, kind in ((-0.2, "train"), (0.2, "infer")):
        vals = [r[f"{kind}_ratio"] or 0.0 for r in results]
        ax.bar(idx + off, vals, 0.4, label=f"{kind}: repjax / PyTorch")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("speed ratio (img/s repjax / img/s PyTorch)")
    ax.set_xticks(idx, [r["model"] for r in results], rotation=55, ha="right", fontsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: list[dict]) -> str:
    def f(v: float | None, spec: str = "8.1f") -> str:
        return format(v, spec) if v is not None else f"{'-':>{spec.split('.')[0]}s}"

    lines = [f"{'model':44s} {'jax tr':>8s} {'torch tr':>8s} {'ratio':>6s} {'jax inf':>8s} {'torch inf':>9s} "
             f"{'ratio':>6s} {'jax MB':>7s} {'torch MB':>8s}"]
    for r in results:
        jmb = r.get("repjax_train_peak_mb", r["repjax_infer_peak_mb"])
        tmb = r.get("torch_train_peak_mb", r["torch_infer_peak_mb"])
        lines.append(f"{r['model']:44s} {f(r['repjax_train_img_s'])} {f(r['torch_train_img_s'])} "
                     f"{f(r['train_ratio'], '6.2f')} {f(r['repjax_infer_img_s'])} {f(r['torch_infer_img_s'], '9.1f')} "
                     f"{f(r['infer_ratio'], '6.2f')} {f(jmb, '7.0f')} {f(tmb, '8.0f')}")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """The README table: images/s, ratios (bold where >= 1), training memory, and the RepOpt/RepVGG pairs."""
    def f(v: float | None, spec: str = ".1f", bold: bool = False) -> str:
        return "-" if v is None else f"**{v:{spec}}**" if bold and v >= 1 else f"{v:{spec}}"

    lines = ["| model (batch) | repjax train | PyTorch train | ratio | repjax infer | PyTorch infer | ratio | "
             "MB repjax / PyTorch |", "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        mb = (f"{r['repjax_train_peak_mb']:.0f} / {r['torch_train_peak_mb']:.0f}" if r.get("repjax_train_peak_mb")
              else f"{r['repjax_infer_peak_mb']:.0f} / {r['torch_infer_peak_mb']:.0f} (infer)")
        lines.append(f"| {r['model']} ({r['batch']}) | {f(r['repjax_train_img_s'])} | {f(r['torch_train_img_s'])} | "
                     f"{f(r['train_ratio'], '.2f', True)} | {f(r['repjax_infer_img_s'])} | "
                     f"{f(r['torch_infer_img_s'])} | {f(r['infer_ratio'], '.2f', True)} | {mb} |")
    pairs_ = [f"- RepOpt-VGG / RepVGG training speed ({p['group']}): repjax {p['repjax_repopt_over_repvgg']:.2f}x, "
              f"PyTorch {p['torch_repopt_over_repvgg']:.2f}x" for p in report["repopt_over_repvgg"]]
    return "\n".join(lines) + ("\n\n" + "\n".join(pairs_) if pairs_ else "") + "\n"


def updated(path: pathlib.Path, new: dict) -> dict:
    """The report at `path` with `new`'s rows put in place of those with the same label (appended otherwise);
    each replaced or added row records the command that measured it, and the settings must agree."""
    if not path.exists():
        raise SystemExit(f"--update: no {path} to update")
    old = json.loads(path.read_text())
    keys = ("backend", "torch_device", "dtype", "torch_threads", "rounds", "iters_per_round", "quick")
    if {k: old.get(k) for k in keys} != {k: new[k] for k in keys}:
        raise SystemExit(f"--update: {path} was measured with other settings "
                         f"({ {k: old.get(k) for k in keys} } vs { {k: new[k] for k in keys} })")
    rows_ = {r["model"]: r for r in old["rows"]}
    for r in new["rows"]:
        rows_[r["model"]] = {**r, "command": new["command"]}
    merged = list(rows_.values())
    return {**old, "rows": merged, "repopt_over_repvgg": pairs(merged),
            "updates": [*old.get("updates", []), {"command": new["command"], "rows": [r["model"] for r in new["rows"]],
                                                  "seconds": new["seconds"]}]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny variants and sizes, 1 round, 1 step per burst")
    ap.add_argument("--only", default="", help="comma-separated registry names or label prefixes to run")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5, help="steps per timed burst")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--torch-device", default="cpu", help="cpu, or cuda on a GPU machine")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (XLA:CPU uses every core)")
    ap.add_argument("--out", type=pathlib.Path, default=OUT)
    ap.add_argument("--update", action="store_true",
                    help="replace only the measured rows (same label) in an existing --out/results.json")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rounds, iters = (1, 1) if args.quick else (args.rounds, args.iters)
    selected = rows(args.quick)
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        selected = [r for r in selected if any(r.model == k or r.label.startswith(k) for k in keys)]
        if not selected:
            raise SystemExit(f"--only {args.only!r} matches no row")
    groups: dict[str, list[Row]] = {}
    for r in selected:
        groups.setdefault(r.group or r.label, []).append(r)
    t0 = time.time()
    results: list[dict] = []
    for name, group in groups.items():
        print(f"[{time.time() - t0:5.0f} s] {name}", flush=True)
        results += bench_group(group, rounds, iters, args.torch_device, args.dtype)
    report = {"backend": jax.default_backend(), "jax_device": jax.devices()[0].device_kind,
              "torch_device": args.torch_device, "dtype": args.dtype, "cpu_count": os.cpu_count(),
              "torch_threads": args.threads, "jax_version": jax.__version__, "torch_version": torch.__version__,
              "rounds": rounds, "iters_per_round": iters, "quick": args.quick,
              "command": "python experiments/bench_models.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "memory": {"repjax": "XLA memory_analysis of the compiled program (args + outputs - aliases + temps)",
                         "torch": "live tensors before the step + peak allocator balance (torch.profiler)"},
              "seconds": time.time() - t0, "rows": results, "repopt_over_repvgg": pairs(results)}
    if args.update:
        report = updated(args.out / "results.json", report)
        results = report["rows"]
    print(table(results))
    for p in report["repopt_over_repvgg"]:
        print(f"RepOpt/RepVGG training speed ({p['group']}): repjax {p['repjax_repopt_over_repvgg']:.2f}, "
              f"PyTorch {p['torch_repopt_over_repvgg']:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(results, args.out / "ratios.png")
    (args.out / "table.md").write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
