"""From a config to a model, its optimizer and the (sharded) train state: shared by train, eval, experiments."""

from __future__ import annotations

import functools
import os
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from repjax import models, optim, sharding
from repjax.data import augment
from repjax.step import TrainState, init_state


class Built(NamedTuple):
    model: nn.Module
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    make_state: Callable[[], TrainState]  # jit with out_shardings=state_sharding to initialise in place
    state_sharding: Any
    abstract_state: Any  # ShapeDtypeStructs carrying the shardings (what checkpoints restore onto)
    trainable: Any = None  # bool tree like the params when optim.rules freeze some (gradients of those only)


def example_shape(source: Any, pp: str) -> tuple[int, ...]:
    """Shape of one preprocessed image (what the model is initialised with)."""
    return tuple(np.shape(augment.build(pp)(source[0]["image"], np.random.default_rng(0))))


def build_model(config, num_classes: int) -> nn.Module:
    return models.create(config.model.name, num_classes=num_classes, dtype=jnp.dtype(config.dtype),
                         **config.model.kwargs)


def build(config, num_classes: int, image_shape: tuple[int, ...], mesh: Mesh) -> Built:
    """Model, optimizer and state layout of `config` on `mesh` (nothing is allocated yet)."""
    model = build_model(config, num_classes)
    sample = jnp.zeros((1, *image_shape), jnp.float32)
    abstract_params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), sample, train=False))["params"]
    tx, schedule = optim.build(config.optim, abstract_params, config.total_steps)
    make_state = functools.partial(init_state, model, tx, sample, config.seed, config.ema_decay > 0)
    abstract = jax.eval_shape(make_state)
    state_sharding = sharding.tree_shardings(abstract, mesh, config.sharding_rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding)
    rules = [tuple(r) for r in config.optim.rules]
    trainable = optim.trainable_mask(abstract_params, rules) if any(s.get("frozen") for _, s in rules) else None
    return Built(model, tx, schedule, make_state, state_sharding, abstract, trainable)


def load_init(config, state: TrainState, state_sharding: Any) -> TrainState:
    """Replaces parameters and BN statistics by imported weights (`config.init.path`)."""
    from repjax import io

    variables = io.load_variables(config.init.path, config.model.name, config.init.get("format", "auto"))
    params = jax.device_put(variables["params"], state_sharding.params)
    batch_stats = jax.device_put(variables.get("batch_stats", {}), state_sharding.batch_stats)
    return state.replace(params=params, batch_stats=batch_stats)


def restore_variables(config, workdir: str | os.PathLike, num_classes: int, image_shape: tuple[int, ...],
                      step: int | None = None) -> dict[str, Any]:
    """`{'params', 'batch_stats'}` of a run's checkpoint (the latest, or `step`), on one process's mesh."""
    from repjax import checkpoint

    built = build(config, num_classes, image_shape, sharding.make_mesh(config.mesh))
    with checkpoint.Checkpointer(pathlib.Path(workdir) / "checkpoints") as ckpt:
        restored = ckpt.restore(built.abstract_state, step)
    if restored is None:
        raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
    return restored[1].variables()
