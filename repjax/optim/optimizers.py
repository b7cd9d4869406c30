"""Base update rules by name. Each returns the transform that turns (pre-processed) gradients into updates.

Signature: `fn(cfg, learning_rate, weight_decay, post=()) -> optax.GradientTransformation`, where
`learning_rate` is a schedule already multiplied by the parameter group's `lr_mult`, `weight_decay` the
group's value, and `post` transforms applied to the rule's update direction (after momentum / Adam moments)
before decoupled weight decay and the learning rate (RepOpt-AdamW multiplies the direction again there).
A factory without `post` keeps working; it is then called without it and cannot take `post_transforms`.

`TRANSFORMS` holds the gradient transforms that `optim.rules` name (`fn(params, cfg, **kwargs)`); it lives
here so that modules registering transforms can import it without importing `repjax.optim` itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import optax

from repjax.registry import Registry

OPTIMIZERS = Registry("optimizer")
TRANSFORMS = Registry("gradient transform")
Post = Sequence[optax.GradientTransformation]


@OPTIMIZERS.register("sgd")
def sgd(cfg, learning_rate: optax.ScalarOrSchedule, weight_decay: float,
        post: Post = ()) -> optax.GradientTransformation:
    """PyTorch SGD: coupled L2 decay (g + wd * w), heavy-ball or Nesterov momentum, no dampening."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
        optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov) if cfg.momentum else optax.identity(),
        *post,
        optax.scale_by_learning_rate(learning_rate),
    )


@OPTIMIZERS.register("adamw")
def adamw(cfg, learning_rate: optax.ScalarOrSchedule, weight_decay: float,
          post: Post = ()) -> optax.GradientTransformation:
    """AdamW (Loshchilov & Hutter): decoupled decay, scaled by the learning rate as in PyTorch."""
    return optax.chain(
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        *post,
        optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
        optax.scale_by_learning_rate(learning_rate),
    )
