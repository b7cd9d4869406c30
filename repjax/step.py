"""Train state and the per-step functions that `train.py` jits with explicit shardings; the loss is pluggable
(`repjax.losses`: a registered loss receives the model's outputs and the batch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from repjax import losses
from repjax.optim.hooks import apply_init_hooks


class TrainState(struct.PyTreeNode):
    """Everything a training run carries from step to step (and saves in checkpoints)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any  # None when EMA is off
    rng: jax.Array  # raw uint32 key; per-step keys are folded from it

    def variables(self, ema: bool = False) -> dict[str, Any]:
        params = self.ema_params if ema and self.ema_params is not None else self.params
        return {"params": params, "batch_stats": self.batch_stats}


def init_state(model: nn.Module, tx: optax.GradientTransformation, sample: jax.Array, seed: int,
               ema: bool) -> TrainState:
    """Initial state; jit it with `out_shardings` to create parameters directly in place."""
    init_key, state_key = jax.random.split(jax.random.PRNGKey(seed))
    variables = model.init({"params": init_key, "dropout": init_key}, sample, train=False)
    opt_state = tx.init(variables["params"])
    params = apply_init_hooks(variables["params"], opt_state)  # e.g. dynamic sparsity: sparse from step 0
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=opt_state,
        ema_params=jax.tree.map(jnp.copy, params) if ema else None,
        rng=state_key,
    )


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the true class is among the top-k logits (ties broken towards lower class ids)."""
    if labels.ndim > 1:
        labels = jnp.argmax(labels, axis=-1)
    true = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    # Rank = number of classes scoring strictly higher, or equal with a lower index.
    ids = jnp.arange(logits.shape[-1])
    higher = (logits > true) | ((logits == true) & (ids[None, :] < labels[:, None]))
    return (jnp.sum(higher, axis=-1) < k).astype(jnp.float32)


def trainable_grad(fn: Callable, params: Any, trainable: Any | None, has_aux: bool = False) -> Callable:
    """`jax.value_and_grad(fn, has_aux)(params)` computing gradients of the `trainable` leaves only.

    `trainable` is a bool tree like `params` (`repjax.optim.trainable_mask`) or None (all). The frozen leaves
    enter `fn` as constants, so their weight gradients are never computed (activation gradients through
    frozen layers still are, where an earlier trainable leaf needs them); their entries in the returned
    gradient tree are zeros, which the optimizer's frozen groups (`optax.set_to_zero`) ignore.
    """
    if trainable is None:
        return jax.value_and_grad(fn, has_aux=has_aux)(params)
    leaves, treedef = jax.tree.flatten(params)
    mask = treedef.flatten_up_to(trainable)
    chosen = [i for i, m in enumerate(mask) if m]

    def on_trainable(subset):
        full = list(leaves)
        for i, leaf in zip(chosen, subset):
            full[i] = leaf
        return fn(treedef.unflatten(full))

    value, sub_grads = jax.value_and_grad(on_trainable, has_aux=has_aux)([leaves[i] for i in chosen])
    grads = [jnp.zeros_like(leaf) for leaf in leaves]
    for i, g in zip(chosen, sub_grads):
        grads[i] = g
    return value, treedef.unflatten(grads)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    loss: losses.Loss | None = None, ema_decay: float = 0.0, trainable: Any | None = None
                    ) -> Callable:
    """`(state, batch) -> (state, metrics)`: one optimizer step on a global batch, minimizing the mean of
    `loss` (default: `softmax_xent` without label smoothing); the loss's own metrics are logged as means.

    `trainable` (a bool tree like the params, from the optimizer's rules) restricts differentiation to the
    trainable leaves (`trainable_grad`); None differentiates every parameter.
    """
    loss = loss or losses.get()

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        dropout_key = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            outputs, updated = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
                mutable=["batch_stats"], rngs={"dropout": dropout_key})
            per_example, extra = loss(outputs, {**batch, "step": state.step})  # step: for scheduled losses
            return jnp.mean(per_example), (loss.logits(outputs), extra, updated.get("batch_stats", {}))

        (value, (logits, extra, batch_stats)), grads = trainable_grad(loss_fn, state.params, trainable, has_aux=True)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
        # Non-finite loss or update: the new state is unusable (checked on the host, one step late).
        finite = jnp.isfinite(value)
        for leaf in jax.tree.leaves(updates):  # elementwise: a norm would overflow on huge but finite values
            finite &= jnp.all(jnp.isfinite(leaf))
        metrics = {
            **{k: jnp.mean(v) for k, v in extra.items()},
            "finite": finite.astype(jnp.float32),
            "loss": value,
            "top1": jnp.mean(topk_correct(logits, batch["label"], 1)),
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
        }
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state, ema_params=ema)
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module, loss: losses.Loss | None = None) -> Callable:
    """`(variables, batch) -> sums`: summed loss (default: `softmax_xent`, no smoothing), the loss's metrics,
    top-1 / top-5 over the unmasked rows of a batch."""
    loss = loss or losses.get()

    def eval_step(variables: dict[str, Any], batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        outputs = model.apply(variables, batch["image"], train=False)
        logits = loss.logits(outputs)
        mask = batch.get("mask", jnp.ones(logits.shape[:1], jnp.float32)).astype(jnp.float32)
        per_example, extra = loss(outputs, batch)
        k5 = min(5, logits.shape[-1])
        return {
            **{k: jnp.sum(v * mask) for k, v in extra.items()},
            "loss": jnp.sum(per_example * mask),
            "top1": jnp.sum(topk_correct(logits, batch["label"], 1) * mask),
            "top5": jnp.sum(topk_correct(logits, batch["label"], k5) * mask),
            "count": jnp.sum(mask),
        }

    return eval_step
