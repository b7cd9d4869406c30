"""Side-by-side speed measurement: compiled runners timed in interleaved rounds (median img/s).

The machines this runs on are shared and noisy, so speed is only ever reported as a comparison measured in
one process: every runner is compiled and warmed up first, then the runners take turns, `rounds` times, and
each one's median rate is kept.

    runners = {"train": train_runner(model, config.optim, batch=128, image_shape=(32, 32, 3)),
               "deploy": inference_runner(deploy_model, deploy_vars, batch=256, image_shape=(32, 32, 3))}
    rates = interleaved(runners, rounds=3)
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from repjax import optim
from repjax.step import init_state, make_train_step


def param_count(params: Any) -> int:
    """Number of scalars in a tree of arrays (or ShapeDtypeStructs): the project's one parameter count."""
    return int(sum(x.size for x in jax.tree.leaves(params)))

Runner = Callable[[], float]  # one timed burst -> images per second


def images_per_second(fn: Callable[[], Any], n: int, images: int) -> float:
    """Images per second of `n` calls of `fn` (each `images` images), blocking on the last result: the
    project's one throughput timer (warm `fn` up first)."""
    start = time.perf_counter()
    for _ in range(n):
        out = fn()
    jax.block_until_ready(out)
    return n * images / (time.perf_counter() - start)


WARMUP_CALLS = 3  # a fresh XLA:CPU executable runs its first few calls slower, not only the compiling one


def best_seconds(fn: Callable[..., Any], *args: Any, repeats: int) -> float:
    """Fastest of `repeats` blocking calls `fn(*args)` after WARMUP_CALLS warm-up calls (the first compiles): the
    project's single-op timer, for probes where the minimum is the figure (`fastest_interleaved` compares
    several forms side by side; `interleaved` is for model throughput)."""
    for _ in range(WARMUP_CALLS):
        jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def fastest_interleaved(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Fastest blocking call of each zero-argument callable, in seconds: every one is warmed up (WARMUP_CALLS
    calls), then they take turns, `repeats` rounds, so that a slow stretch of the machine hits all alike. A turn
    is an untimed call and a timed one: the first takes back the caches and memory pages that the previous
    runner used (timed right after its 1.2 s 'boxsum' call, bench_dwconv's PeLK-101 piecewise FFT row took 217.6
    ms against 104.7 for its dense row; re-warmed, 112.2 against 111.9: results.json at f0f4f82 and 4d67edf)."""
    for call in calls.values():
        for _ in range(WARMUP_CALLS):
            jax.block_until_ready(call())
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, call in calls.items():
            jax.block_until_ready(call())
            start = time.perf_counter()
            jax.block_until_ready(call())
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _batch(batch: int, image_shape: tuple[int, ...], num_classes: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    return {"image": jnp.asarray(rng.normal(size=(batch, *image_shape)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32)}


def train_runner(model: nn.Module, optim_cfg: Any, *, batch: int, image_shape: tuple[int, ...], iters: int = 10,
                 num_classes: int = 10) -> tuple[Runner, dict[str, Any]]:
    """A runner of `iters` compiled train steps (donated state) and the step's XLA memory figures (MiB)."""
    data = _batch(batch, image_shape, num_classes)
    example = data["image"][:1]
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), example, train=False))["params"]
    tx, schedule = optim.build(optim_cfg, params, 1000)
    state = jax.jit(functools.partial(init_state, model, tx, example, 0, False))()
    step = jax.jit(make_train_step(model, tx, schedule), donate_argnums=0)
    mem = step.lower(state, data).compile().memory_analysis()
    info = {"peak_memory_mb": (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2**20,
            "params": param_count(state.params)}
    holder = {"state": state}

    def one() -> jax.Array:
        holder["state"], metrics = step(holder["state"], data)
        return metrics["loss"]

    one()
    return functools.partial(images_per_second, one, iters, batch), info


def inference_runner(model: nn.Module, variables: Any, *, batch: int, image_shape: tuple[int, ...],
                     iters: int = 10) -> Runner:
    """A runner of `iters` compiled eval-mode forward passes."""
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    x = jnp.zeros((batch, *image_shape), jnp.float32)
    jax.block_until_ready(fn(variables, x))
    return functools.partial(images_per_second, lambda: fn(variables, x), iters, batch)


def interleaved(runners: dict[str, Runner], rounds: int = 3) -> dict[str, float]:
    """Median img/s of each runner over `rounds` turns taken in alternation."""
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            rates[name].append(run())
    return {name: statistics.median(r) for name, r in rates.items()}
