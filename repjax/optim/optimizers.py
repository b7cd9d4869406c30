"""Base update rules by name. Each returns the transform that turns (pre-processed) gradients into updates.

Signature: `fn(cfg, learning_rate, weight_decay) -> optax.GradientTransformation`, where `learning_rate`
is a schedule already multiplied by the parameter group's `lr_mult`, and `weight_decay` the group's value.
"""

from __future__ import annotations

import optax

from repjax.registry import Registry

OPTIMIZERS = Registry("optimizer")


@OPTIMIZERS.register("sgd")
def sgd(cfg, learning_rate: optax.ScalarOrSchedule, weight_decay: float) -> optax.GradientTransformation:
    """PyTorch SGD: coupled L2 decay (g + wd * w), heavy-ball or Nesterov momentum, no dampening."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
        optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov) if cfg.momentum else optax.identity(),
        optax.scale_by_learning_rate(learning_rate),
    )


@OPTIMIZERS.register("adamw")
def adamw(cfg, learning_rate: optax.ScalarOrSchedule, weight_decay: float) -> optax.GradientTransformation:
    """AdamW (Loshchilov & Hutter): decoupled decay, scaled by the learning rate as in PyTorch."""
    return optax.chain(
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
        optax.scale_by_learning_rate(learning_rate),
    )
