"""Top-1 / top-5 / loss over a whole split, sharded over the mesh like training."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from repjax import data, losses, sharding
from repjax.data import pipeline
from repjax.evals import EVALUATORS
from repjax.step import make_eval_step


def evaluate(model: nn.Module, variables: dict[str, Any], source: Any, *, batch_size: int, pp: str,
             mesh: Mesh, loss: losses.Loss | None = None) -> dict[str, float]:
    """Exact metrics over every example of `source` (the last batch is padded and masked); `loss` (default
    softmax_xent) also names the logits that top-1 / top-5 use."""
    step = jax.jit(make_eval_step(model, loss), out_shardings=sharding.replicated(mesh))
    batch_size = -(-batch_size // mesh.size) * mesh.size  # round up: padded rows are masked out
    totals: dict[str, float] = {}
    batches = pipeline.eval_batches(source, global_batch_size=batch_size, pp=pp,
                                         process_index=jax.process_index(),
                                         process_count=jax.process_count())
    for local in batches:
        sums = jax.device_get(step(variables, sharding.global_batch(local, mesh)))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(np.asarray(v))
    count = max(totals.pop("count", 0.0), 1.0)
    return {"count": count, **{k: v / count for k, v in totals.items()}}


@EVALUATORS.register("classification")
def classification(model: nn.Module, variables: dict[str, Any], config, mesh: Mesh, *,
                   split: str | None = None, source: str | None = None) -> dict[str, float]:
    """Evaluator entry: a split of the configured (or another) source."""
    src = data.from_config(config, split or config.data.eval_split, source)
    return evaluate(model, variables, src, batch_size=config.eval_batch_size, pp=config.data.eval_pp,
                    mesh=mesh, loss=losses.from_config(config.loss, train=False))
