"""Model cost: parameter count, FLOPs from XLA's cost analysis, and inference throughput.

XLA counts a multiply-add as 2 FLOPs; the papers' tables count multiply-accumulates (MACs), so both are
reported (`flops` and `macs = flops / 2`).
"""

from __future__ import annotations

import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from repjax.evals import EVALUATORS


def param_count(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def inference_flops(model: nn.Module, variables: dict[str, Any], image_shape: tuple[int, ...]) -> float:
    """FLOPs of one image's forward pass in eval mode, from the compiled XLA module."""
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    analysis = fn.lower(variables, x).compile().cost_analysis()
    if isinstance(analysis, list | tuple):  # older JAX returned one dict per device
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


def throughput(model: nn.Module, variables: dict[str, Any], image_shape: tuple[int, ...],
               batch_size: int = 64, iters: int = 10) -> float:
    """Inference images/s at `batch_size` (compiled, warmed up, blocking on results)."""
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    x = jnp.zeros((batch_size, *image_shape), jnp.float32)
    jax.block_until_ready(fn(variables, x))
    start = time.perf_counter()
    for _ in range(iters):
        out = fn(variables, x)
    jax.block_until_ready(out)
    return batch_size * iters / (time.perf_counter() - start)


@EVALUATORS.register("cost")
def cost(model: nn.Module, variables: dict[str, Any], config, mesh, *, image_shape: tuple[int, ...],
         batch_size: int = 64, iters: int = 10) -> dict[str, float]:
    flops = inference_flops(model, variables, tuple(image_shape))
    return {
        "params": param_count(variables["params"]),
        "flops": flops,
        "macs": flops / 2,
        "images_per_s": throughput(model, variables, tuple(image_shape), batch_size, iters),
    }
