"""`int8_ptq`: simulated int8 post-training quantization accuracy, next to the float model's on the same pass.

Calibrates activation ranges on `calib_batches` training batches (eval preprocessing, no augmentation), fake-
quantizes every conv/dense kernel per output channel and every conv/dense input per tensor
(`repjax.projects.repopt.quant`), then evaluates float and int8 on the eval split. Give it a deploy-form
model (e.g. RepVGG with `deploy=True` and re-parameterized weights): BatchNorm layers that are not fused stay
in float.
"""

from __future__ import annotations

import itertools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from repjax import data, sharding
from repjax.data import pipeline
from repjax.evals import EVALUATORS
from repjax.losses import softmax_cross_entropy as cross_entropy
from repjax.projects.repopt import quant
from repjax.step import topk_correct


def _round_up(n: int, mesh: Mesh) -> int:
    return -(-n // mesh.size) * mesh.size


def calibration_ranges(model: nn.Module, variables: dict[str, Any], source: Any, *, batches: int, batch_size: int,
                       pp: str, seed: int, mesh: Mesh, method: str = "minmax",
                       percentile: float = 99.99) -> quant.Ranges:
    """Ranges from the first `batches` shuffled global batches of `source` (sharded over the mesh)."""
    stream = pipeline.train_batches(source, global_batch_size=_round_up(batch_size, mesh), seed=seed, pp=pp,
                                    process_index=jax.process_index(), process_count=jax.process_count())
    images = (sharding.global_batch({"image": b["image"]}, mesh) for b in itertools.islice(stream, batches))
    return quant.calibrate(model, variables, images, method=method, percentile=percentile)


def evaluate_int8(model: nn.Module, variables: dict[str, Any], ranges: quant.Ranges, source: Any, *,
                  batch_size: int, pp: str, mesh: Mesh, act_mode: str = "affine") -> dict[str, float]:
    """Int8 and float top-1/top-5/loss, and top-1 agreement between them, over every example of `source`."""
    qvariables = {**variables, "params": jax.jit(quant.quantize_weights, static_argnums=1)(
        variables["params"], tuple(sorted(quant.layer_paths(ranges))))}

    def step(variables, qvariables, batch):
        x, labels, mask = batch["image"], batch["label"], batch["mask"].astype(jnp.float32)
        logits = model.apply(variables, x, train=False)
        qlogits = quant.quantized_apply(model, qvariables, ranges, x, act_mode=act_mode, quantize_kernels=False)
        k5 = min(5, logits.shape[-1])
        agree = jnp.argmax(logits, -1) == jnp.argmax(qlogits, -1)
        return {"top1": jnp.sum(topk_correct(qlogits, labels, 1) * mask),
                "top5": jnp.sum(topk_correct(qlogits, labels, k5) * mask),
                "loss": jnp.sum(cross_entropy(qlogits, labels) * mask),
                "float_top1": jnp.sum(topk_correct(logits, labels, 1) * mask),
                "float_top5": jnp.sum(topk_correct(logits, labels, k5) * mask),
                "float_loss": jnp.sum(cross_entropy(logits, labels) * mask),
                "agreement": jnp.sum(agree * mask), "count": jnp.sum(mask)}

    step = jax.jit(step, out_shardings=sharding.replicated(mesh))
    totals: dict[str, float] = {}
    batches = pipeline.eval_batches(source, global_batch_size=_round_up(batch_size, mesh), pp=pp,
                                    process_index=jax.process_index(), process_count=jax.process_count())
    for local in batches:
        sums = jax.device_get(step(variables, qvariables, sharding.global_batch(local, mesh)))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(np.asarray(v))
    count = max(totals.pop("count", 0.0), 1.0)
    out = {"count": count, **{k: v / count for k, v in totals.items()}}
    out["top1_drop"] = out["float_top1"] - out["top1"]
    return out


@EVALUATORS.register("int8_ptq")
def int8_ptq(model: nn.Module, variables: dict[str, Any], config, mesh: Mesh, *, calib_batches: int = 8,
             calib_batch_size: int | None = None, calib_split: str | None = None, calib_pp: str | None = None,
             method: str = "minmax", percentile: float = 99.99, act_mode: str = "affine", split: str | None = None,
             source: str | None = None) -> dict[str, float]:
    """Evaluator entry. Calibration: `calib_batches` x `calib_batch_size` (default `config.batch_size`) images of
    `calib_split` (default the train split) with `calib_pp` (default the eval preprocessing); `method` is
    "minmax" or "percentile"; `act_mode` "affine" (uint8) or "symmetric" (int8). Returns int8 `top1`/`top5`/
    `loss`, the float `float_top1`/`float_top5`/`float_loss`, `top1_drop`, and `agreement` of top-1 predictions."""
    spec = source or config.data.source
    calib = data.from_config(config, calib_split or config.data.train_split, spec)
    ranges = calibration_ranges(model, variables, calib, batches=calib_batches,
                                batch_size=calib_batch_size or config.batch_size, pp=calib_pp or config.data.eval_pp,
                                seed=config.seed, mesh=mesh, method=method, percentile=percentile)
    evaluation = data.from_config(config, split or config.data.eval_split, spec)
    return evaluate_int8(model, variables, ranges, evaluation, batch_size=config.eval_batch_size,
                         pp=config.data.eval_pp, mesh=mesh, act_mode=act_mode)
