"""What differentiating only the trainable subtree saves: PETL training step, frozen backbone, side by side.

    PYTHONPATH=. python experiments/bench_frozen.py [--quick] [--model vit_imagenette] [--batch 64]
        [--hosts adapter,lora] [--steps 10] [--rounds 3] [--out experiments/results/bench_frozen.json]

Both steps use the same optimizer with the backbone frozen by `optim.rules` (no update, no optimizer state);
`full` differentiates every parameter (the frozen leaves' gradients are computed, then discarded by
`set_to_zero`), `trainable` differentiates only the host and the classifier (`repjax.step.trainable_grad`).
Reported per host: XLA's memory analysis of each compiled step (temporary buffers: the activations and gradients
live during the step), XLA's FLOP count, and the median step time over interleaved rounds (machine noise hits
both alike; quote the ratio).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp

from repjax import config as config_lib, models, optim
from repjax.models import vit
from repjax.nn import petl
from repjax.step import TrainState, make_train_step

REPO = pathlib.Path(__file__).resolve().parents[1]


def compiled_step(model, params, rules, batch, frozen_grad: bool):
    cfg = config_lib.defaults().optim
    cfg.name, cfg.lr, cfg.weight_decay, cfg.rules, cfg.schedule = "adamw", 1e-3, 1e-4, rules, "constant"
    tx, schedule = optim.build(cfg, params, 1000)
    mask = optim.trainable_mask(params, rules) if frozen_grad else None
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={}, opt_state=tx.init(params),
                       ema_params=None, rng=jax.random.key_data(jax.random.key(0)))
    step = jax.jit(make_train_step(model, tx, schedule, trainable=mask))
    compiled = step.lower(state, batch).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    info = {"temp_mib": mem.temp_size_in_bytes / 2**20, "argument_mib": mem.argument_size_in_bytes / 2**20,
            "gflops": float(cost["flops"]) / 1e9}
    return compiled, state, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="vit_test, batch 8, 3 steps x 2 rounds")
    ap.add_argument("--model", default="vit_imagenette")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hosts", default="adapter,lora,repadapter")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "experiments/results/bench_frozen.json"))
    args = ap.parse_args()
    if args.quick:
        args.model, args.batch, args.steps, args.rounds = "vit_test", 8, 3, 2
    size = models.variant(args.model).input_size
    backbone = models.create(args.model, num_classes=10)
    bv = jax.jit(lambda: backbone.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))()
    batch = {"image": jax.random.normal(jax.random.key(1), (args.batch, size, size, 3)),
             "label": jnp.arange(args.batch) % 10}
    results = {"model": args.model, "batch": args.batch, "image_size": size, "backend": jax.default_backend(),
               "hosts": {}}
    for kind in args.hosts.split(","):
        model = backbone.clone(petl=dict(kind=kind))
        params = vit.attach_backbone(bv, model, rng=2)["params"]
        rules = petl.optim_rules(kind)
        runs = {name: compiled_step(model, params, rules, batch, frozen) for name, frozen in
                (("full", False), ("trainable", True))}
        times: dict[str, list[float]] = {name: [] for name in runs}
        states = {name: run[1] for name, run in runs.items()}
        for name, (compiled, _, _) in runs.items():  # warm-up
            states[name] = jax.block_until_ready(compiled(states[name], batch)[0])
        for _ in range(args.rounds):
            for name, (compiled, _, _) in runs.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    states[name], metrics = compiled(states[name], batch)
                float(metrics["loss"])
                times[name].append((time.perf_counter() - start) / args.steps)
        row = {name: {**runs[name][2], "step_ms": 1e3 * statistics.median(times[name])} for name in runs}
        row["speedup"] = row["full"]["step_ms"] / row["trainable"]["step_ms"]
        row["temp_memory_ratio"] = row["trainable"]["temp_mib"] / row["full"]["temp_mib"]
        row["flops_ratio"] = row["trainable"]["gflops"] / row["full"]["gflops"]
        results["hosts"][kind] = row
        print(f"{kind:11s} step {row['full']['step_ms']:8.1f} -> {row['trainable']['step_ms']:8.1f} ms "
              f"(x{row['speedup']:.2f}), temp memory {row['full']['temp_mib']:.1f} -> "
              f"{row['trainable']['temp_mib']:.1f} MiB (x{row['temp_memory_ratio']:.2f}), "
              f"GFLOPs {row['full']['gflops']:.2f} -> {row['trainable']['gflops']:.2f}", flush=True)
    out = pathlib.Path(args.out)
    if not args.quick:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
