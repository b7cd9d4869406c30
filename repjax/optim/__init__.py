"""Optimizers from config: base rule by name, per-parameter groups by regex, registered transforms.

    tx, schedule = optim.build(config.optim, params, total_steps)

`TRANSFORMS` holds gradient transforms that rules can name; a factory has the signature
`fn(params, cfg, **kwargs) -> optax.GradientTransformation` and sees the whole parameter tree (to build
per-parameter constants); inside a group it receives updates where other groups' leaves are masked out.
Projects register their transforms (RepOptimizers' Grad Mult, SLaK's dynamic sparsity) when
`repjax.projects` is imported, which `build` does before looking names up.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from repjax.optim.optimizers import OPTIMIZERS, TRANSFORMS
from repjax.optim.rules import check_rules, group_labels, trainable_mask
from repjax.optim.schedules import make_schedule

__all__ = ["OPTIMIZERS", "TRANSFORMS", "build", "group_labels", "make_schedule", "trainable_mask"]


def _group(cfg, params: Any, spec: dict, schedule: optax.Schedule) -> optax.GradientTransformation:
    if spec.get("frozen"):
        return optax.set_to_zero()
    mult = float(spec.get("lr_mult", 1.0))
    lr = schedule if mult == 1.0 else (lambda step: mult * schedule(step))
    pre = _transforms(cfg, params, spec.get("transforms", ()))
    post = _transforms(cfg, params, spec.get("post_transforms", ()))
    final = _transforms(cfg, params, spec.get("final_transforms", ()))
    factory, wd = OPTIMIZERS.get(cfg.name), float(spec.get("weight_decay", cfg.weight_decay))
    base = factory(cfg, lr, wd, post=post) if post else factory(cfg, lr, wd)
    return optax.chain(*pre, base, *final)


def _transforms(cfg, params: Any, names: Any) -> list[optax.GradientTransformation]:
    from repjax import projects

    projects.import_all()
    return [TRANSFORMS.get(name)(params, cfg, **dict(kwargs)) for name, kwargs in names]


def build(cfg, params: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer for `params` described by the `config.optim` block."""
    rules = [tuple(r) for r in cfg.rules]
    check_rules(rules)
    schedule = make_schedule(cfg.schedule, cfg.lr, total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
    groups = {f"rule{i}": spec for i, (_, spec) in enumerate(rules)}
    groups["default"] = {}
    labels = group_labels(params, rules)
    used = set(jax.tree.leaves(labels))
    tx = optax.multi_transform(
        {name: _group(cfg, params, spec, schedule) for name, spec in groups.items() if name in used}, labels)
    if cfg.clip_norm:
        clip = optax.clip_by_global_norm(cfg.clip_norm)
        tx = optax.chain(optax.masked(clip, trainable_mask(params, rules)), tx)
    return tx, schedule
