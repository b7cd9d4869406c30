"""Training speed of CIFAR ResNet-20 (batch 128, 32x32): repjax vs PyTorch on the same machine.

    python experiments/bench_train.py [--steps 20] [--rounds 3] [--out experiments/results/bench_train.json]

Both frameworks run the same architecture and optimizer (SGD momentum 0.9, weight decay 1e-4, cross-entropy)
on the same batch, interleaved round by round so machine noise hits both alike; the figure to quote is the
ratio of the medians. Also reported: MFU (training FLOPs from XLA's cost analysis over the measured f32
matmul peak of this machine) and the input pipeline's images/s on the shared CIFAR-10 (or synthetic data).
Each step ends with the loss on the host in both frameworks (as a logged step would).
On CPU, repjax convolutions compute their weight gradient in batch chunks (`repjax.nn.conv`); run with
`--conv_chunked_wgrad off` (the config key of that name) to time the plain XLA convolution instead.
PyTorch runs in its default NCHW layout.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from repjax import config as config_lib, data, models, optim
from repjax.data import pipeline
from repjax.nn import conv
from repjax.step import init_state, make_train_step

REPO = pathlib.Path(__file__).resolve().parents[1]
BATCH = 128


def matmul_peak(sizes=(512, 1024, 2048), reps: int = 5) -> float:
    """Best measured float32 matmul FLOP/s on this backend."""
    best = 0.0
    for n in sizes:
        a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
        f = jax.jit(lambda x: x @ x)
        f(a).block_until_ready()
        start = time.perf_counter()
        for _ in range(reps):
            out = f(a)
        out.block_until_ready()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


def jax_trainer(images: np.ndarray, labels: np.ndarray):
    """(run(steps) -> seconds, flops_per_step) for the repjax ResNet-20 step."""
    cfg = config_lib.defaults().optim
    cfg.weight_decay, cfg.schedule = 1e-4, "constant"
    model = models.create("resnet20", num_classes=10)
    sample = jnp.zeros((1, 32, 32, 3))
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), sample, train=False))["params"]
    tx, schedule = optim.build(cfg, params, 1000)
    state = jax.jit(functools.partial(init_state, model, tx, sample, 0, False))()
    step = jax.jit(make_train_step(model, tx, schedule), donate_argnums=0)
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    compiled = step.lower(state, batch).compile()
    analysis = compiled.cost_analysis()
    flops = float((analysis[0] if isinstance(analysis, list | tuple) else analysis)["flops"])
    holder = {"state": state}

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            holder["state"], metrics = step(holder["state"], batch)
            float(metrics["loss"])
        return time.perf_counter() - start

    run(2)  # warm-up
    return run, flops


def torch_trainer(images: np.ndarray, labels: np.ndarray):
    import torch

    sys.path.insert(0, str(REPO / "experiments"))
    from torch_reference import train_step_fn

    torch.set_num_threads(os.cpu_count() or 1)
    _, step = train_step_fn(depth=20, weight_decay=1e-4)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(labels.astype(np.int64))

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            step(x, y)
        return time.perf_counter() - start

    run(2)
    return run


def input_pipeline_rate(source_spec: str, batches: int) -> dict[str, float]:
    source = data.get_source(source_spec, "train")
    start = time.perf_counter()
    it = pipeline.train_batches(source, global_batch_size=BATCH, seed=0, pp="pad_crop(4)|flip_lr|normalize(cifar10)")
    next(it)  # includes loading / caching the split
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return {"input_img_s": batches * BATCH / (time.perf_counter() - start), "input_first_batch_s": first}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per round and framework")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--input_batches", type=int, default=100)
    p.add_argument("--out", default=str(REPO / "experiments/results/bench_train.json"))
    p.add_argument("--conv_chunked_wgrad", choices=("auto", "on", "off"), default="auto")
    args = p.parse_args(argv)
    conv.set_chunked_default(args.conv_chunked_wgrad)

    rng = np.random.default_rng(0)
    images = rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, size=BATCH).astype(np.int32)
    peak = matmul_peak()
    run_jax, flops = jax_trainer(images, labels)
    run_torch = torch_trainer(images, labels)
    jax_rates, torch_rates = [], []
    for _ in range(args.rounds):  # interleaved: both frameworks see the same machine conditions
        jax_rates.append(args.steps * BATCH / run_jax(args.steps))
        torch_rates.append(args.steps * BATCH / run_torch(args.steps))
    jax_img_s, torch_img_s = statistics.median(jax_rates), statistics.median(torch_rates)
    shared = REPO.parent / "shared/data/cifar10"
    source = f"folder:{shared}" if shared.exists() else "synthetic:32x32x3,50000,10"
    result = {
        "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(), "batch": BATCH,
        "repjax_conv_chunked": conv.chunked_default(),
        "repjax_train_img_s": jax_img_s, "torch_train_img_s": torch_img_s,
        "ratio_repjax_over_torch": jax_img_s / torch_img_s,
        "repjax_rounds_img_s": jax_rates, "torch_rounds_img_s": torch_rates,
        "train_step_gflops": flops / 1e9, "matmul_peak_gflops": peak / 1e9,
        "mfu": flops * jax_img_s / BATCH / peak,
        "input_source": source.split(":")[0],
        **input_pipeline_rate(source, args.input_batches),
    }
    print(json.dumps(result, indent=2))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
