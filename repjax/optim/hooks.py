"""Init hook for optimizer-side ideas that also constrain the initial parameters.

A transform whose state must shape the parameters before the first step (SLaK's dynamic sparsity: weights
sparse from step 0) gives its state a method `init_params(params) -> params`. `init_state` calls
`apply_init_hooks(params, tx.init(params))`, so the training step never needs to know which transforms exist.
"""

from __future__ import annotations

from typing import Any

import jax


def _has_hook(x: Any) -> bool:
    return callable(getattr(x, "init_params", None)) and not isinstance(x, type)


def apply_init_hooks(params: Any, opt_state: Any) -> Any:
    """`params` passed through `init_params` of every optimizer state that defines it, in tree order."""
    for state in jax.tree.leaves(opt_state, is_leaf=_has_hook):
        if _has_hook(state):
            params = state.init_params(params)
    return params
