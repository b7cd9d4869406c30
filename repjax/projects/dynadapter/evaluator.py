"""`early_exit` evaluator: per-exit accuracy, budgeted operating point, accuracy-FLOPs curve, wall-clock.

    config.evals.ee = dict(type="early_exit", val_split="val200", target=0.5, measure="max_softmax")

Thresholds are calibrated on `val_split` (never on the evaluated split) for budgets given as fractions of the
host's full forward (`MultiExit.final`: every block and the backbone head, no early heads). Stage costs
are XLA's cost analysis of each jitted stage (FLOPs / 2 = MACs, so LayerNorms and softmaxes are included;
`repjax.projects.dynadapter.flops` has the analytic ViT counts) and include the stage's exit head, so the
cumulative cost of exit k counts every head evaluated up to k.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from repjax import data
from repjax.data import pipeline
from repjax.evals import EVALUATORS
from repjax.projects.dynadapter import early_exit as ee


def _flops(fn, *args) -> float:
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


def stage_costs(model, variables: dict[str, Any], image_shape: tuple[int, ...]) -> tuple[list[float], float]:
    """(MACs of each stage incl. its head, MACs of the host's full forward) for one image, from XLA."""
    x: Any = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    costs = []
    for k in range(model.num_exits):
        def fn(v, inp, k=k):
            return model.apply(v, k, inp, method=model.stage)

        costs.append(_flops(fn, variables, x) / 2)
        x = jax.eval_shape(fn, variables, x)[0]
    full = _flops(lambda v, inp: model.apply(v, inp, method=model.final), variables,
                  jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)) / 2
    return costs, full


def exit_logits(model, variables: dict[str, Any], source: Any, *, batch_size: int, pp: str
                ) -> tuple[list[np.ndarray], np.ndarray]:
    """All exits' logits over every example of `source` (padding rows dropped)."""
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    outs: list[list[np.ndarray]] = []
    labels = []
    for batch in pipeline.eval_batches(source, global_batch_size=batch_size, pp=pp):
        keep = np.asarray(batch.get("mask", np.ones(len(batch["label"]))), bool)
        logits = jax.device_get(fn(variables, jnp.asarray(batch["image"])))
        outs.append([np.asarray(z)[keep] for z in logits])
        labels.append(np.asarray(batch["label"])[keep])
    return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))], np.concatenate(labels)


def wallclock(model, variables: dict[str, Any], images: np.ndarray, thresholds: Sequence[float],
              measure: str = "max_softmax", batch_size: int = 64, repeats: int = 3) -> dict[str, float]:
    """Seconds per pass over `images` of the staged early-exit path and of the full host forward, side by side."""
    stage_fns = [lambda x, k=k: model.apply(variables, k, x, method=model.stage) for k in range(model.num_exits)]
    runner = ee.StagedRunner(stage_fns, thresholds, measure, ee.default_buckets(batch_size))
    full = jax.jit(lambda x: model.apply(variables, x, method=model.final))
    runner.warmup(images[0])
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    padded = [np.concatenate([b, np.zeros((batch_size - len(b), *b.shape[1:]), b.dtype)]) for b in batches]
    jax.block_until_ready(full(jnp.asarray(padded[0])))
    t = ee.timed({"full": lambda: [full(jnp.asarray(b)) for b in padded],
                  "staged": lambda: [runner(jnp.asarray(b)) for b in batches]}, repeats)
    return {"full_s": t["full"], "staged_s": t["staged"], "speedup": t["full"] / t["staged"]}


@EVALUATORS.register("early_exit")
def early_exit(model, variables: dict[str, Any], config, mesh, *, val_split: str = "val200",
               split: str | None = None, source: str | None = None, target: float = 0.5,
               budgets: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), measure: str = "max_softmax",
               timing: bool = False) -> dict[str, Any]:
    """Early-exit metrics of a `MultiExit` model (see the module docstring)."""
    del mesh
    if not hasattr(model, "num_exits"):
        raise ValueError(f"early_exit evaluator needs a MultiExit model, got {type(model).__name__}")
    spec = source or config.data.source
    val_src, test_src = data.get_source(spec, val_split), data.get_source(spec, split or config.data.eval_split)
    kw = dict(batch_size=config.eval_batch_size, pp=config.data.eval_pp)
    val_logits, _ = exit_logits(model, variables, val_src, **kw)
    test_logits, labels = exit_logits(model, variables, test_src, **kw)
    image_shape = pipeline.eval_batches(test_src, global_batch_size=1, pp=config.data.eval_pp).__next__()[
        "image"].shape[1:]
    costs, full = stage_costs(model, variables, tuple(image_shape))
    cum = np.cumsum(costs)
    points = ee.curve(val_logits, test_logits, labels, cum, [b * full for b in budgets], measure)
    t = ee.calibrate(np.stack([ee.confidence(z, measure) for z in val_logits]), cum, target * full)
    op = ee.simulate(test_logits, labels, t, cum, measure)
    out: dict[str, Any] = {f"top1_exit_{k + 1}": float(np.mean(np.argmax(z, -1) == labels))
                           for k, z in enumerate(test_logits)}
    out.update({"full_macs": full, "exit_macs": [float(c) for c in cum], "target": target, "top1": op["top1"],
                "macs": op["macs"], "flops_ratio": op["macs"] / full, "thresholds": [float(x) for x in t],
                "exit_fraction": [float(x) for x in op["exit_fraction"]], "curve": points})
    if timing:
        images = np.concatenate([b["image"] for b in pipeline.eval_batches(test_src, global_batch_size=64,
                                                                           pp=config.data.eval_pp)])[:len(test_src)]
        out.update({f"wallclock_{k}": v for k, v in wallclock(model, variables, images, t, measure).items()})
    return out
