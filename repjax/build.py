"""From a config to a model, its optimizer and the (sharded) train state: shared by train, eval, experiments."""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import re
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
    """The model of `config`; a keyword argument it does not take is a ValueError naming it."""
    try:
        return models.create(config.model.name, num_classes=num_classes, dtype=jnp.dtype(config.dtype),
                             **config.model.kwargs)
    except TypeError as e:
        if "argument" not in str(e):
            raise
        raise ValueError(f"model {config.model.name!r} rejects config.model.kwargs "
                         f"{dict(config.model.kwargs)}: {str(e).partition('() ')[2] or e}") from None


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
    """Replaces parameters and BN statistics by imported weights (`config.init.path`).

    Every imported leaf must match the model's by path and shape, except those re-initialised (kept as the model
    initialised them): leaves whose "params/a/b/kernel" path matches a regex of `config.init.reinit` (searched,
    as optimizer and sharding rules are), and, with `config.init.reinit_mismatched_head`, the leaves of the one
    module whose shapes differ only in the last axis (a classifier head with another class count: the usual
    fine-tuning case). Any other difference is a `WeightImportError` listing each key.
    """
    from repjax import io

    init = config.init
    name, kwargs = config.model.name, dict(config.model.kwargs)
    loaded, variables = io.load_model(init.path, name, init.get("format", "auto"), **kwargs)
    family = models.variant(name).family
    if family.is_deploy(loaded) and not family.is_deploy(models.create(name, **kwargs)):
        raise ValueError(f"config.init.path={init.path!r} holds the deploy form of {name!r} but the config "
                         "builds the training form: set config.model.kwargs.deploy=True to evaluate it, or import "
                         "training-form weights to train")
    reinit = init.get("reinit", ())
    if isinstance(reinit, str) or not all(isinstance(r, str) for r in reinit):
        raise ValueError(f"config.init.reinit must be a list of regexes, got {reinit!r}")
    merged = merge_init(variables, state.variables(), reinit=list(reinit),
                        reinit_mismatched_head=bool(init.get("reinit_mismatched_head", False)),
                        what=str(init.path))
    params = jax.device_put(merged["params"], state_sharding.params)
    batch_stats = jax.device_put(merged.get("batch_stats", {}), state_sharding.batch_stats)
    ema = None if state.ema_params is None else jax.device_put(merged["params"], state_sharding.ema_params)
    return state.replace(params=params, batch_stats=batch_stats, ema_params=ema)


def merge_init(imported: Any, current: Any, *, reinit: list[str] = (), reinit_mismatched_head: bool = False,
               what: str = "imported weights") -> dict[str, Any]:
    """`current` (the model's initial variables) with every leaf taken from `imported` (cast to the model's
    dtype) except the re-initialised ones (see `load_init`); strict otherwise, all problems in one error."""
    from repjax.io.torch import raise_weight_problems

    path_str = sharding.path_str

    def flat(tree: Any) -> dict[str, Any]:
        leaves = jax.tree_util.tree_flatten_with_path({k: v for k, v in dict(tree).items() if v is not None})[0]
        return {path_str(p): v for p, v in leaves}

    have, want = flat(imported), flat(current)
    try:
        patterns = [re.compile(r) for r in reinit]
    except re.error as e:
        raise ValueError(f"config.init.reinit: bad regex {e.pattern!r}: {e}") from None
    chosen = {k for k in want if any(p.search(k) for p in patterns)}
    unused = [r for r, p in zip(reinit, patterns) if not any(p.search(k) for k in want)]
    mismatched = {k for k in want if k in have and k not in chosen and np.shape(have[k]) != np.shape(want[k])}
    if reinit_mismatched_head and mismatched:
        head = {k for k in mismatched if _last_axis_only(np.shape(have[k]), np.shape(want[k]))}
        modules = {_module(k) for k in head}
        if len(modules) == 1 and head == {k for k in mismatched if _module(k) in modules}:
            chosen |= head
            mismatched -= head
    missing = [k for k in want if k not in have and k not in chosen]
    unexpected = [k for k in have if k not in want and not any(p.search(k) for p in patterns)]
    hint = ("" if not mismatched else " (fine-tuning with another class count? set config.init.reinit_mismatched_head"
            "=True or config.init.reinit=['<regex of the head>'] to re-initialise the head)")
    shapes = [f"{k}: {np.shape(have[k])} vs {np.shape(want[k])}" for k in sorted(mismatched)]
    raise_weight_problems([(f"shape mismatches, imported vs model{hint}", shapes),
                           ("model leaves missing from the import", missing),
                           ("imported leaves the model lacks", unexpected),
                           ("config.init.reinit regexes matching no model leaf", unused)],
                          f"initialising from {what!r}")
    out = {k: (want[k] if k in chosen else np.asarray(have[k]).astype(want[k].dtype)) for k in want}
    if chosen:
        logging.getLogger(__name__).info("init from %s: re-initialised %s", what, ", ".join(sorted(chosen)))
    return _unflatten(out, current)


def _last_axis_only(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) >= 1 and a[:-1] == b[:-1] and a[-1] != b[-1]


def _module(key: str) -> str:
    """"params/head/kernel" -> "head" (the module path, without collection and leaf name)."""
    return "/".join(key.split("/")[1:-1])


def _unflatten(flat: dict[str, Any], like: Any) -> dict[str, Any]:
    like = {k: v for k, v in dict(like).items() if v is not None}
    return jax.tree_util.tree_map_with_path(lambda p, _: flat[sharding.path_str(p)], like)


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
