"""Per-parameter rules by regex: which group a parameter belongs to, and what the group does.

`rules` is a list of `(regex, spec)`; the first regex found in a parameter's path (`conv1/kernel`,
relative to `params`) decides its group, unmatched parameters form the `default` group. A spec is a dict:

- `frozen=True`: no update and no optimizer state (the group runs `optax.set_to_zero`);
- `lr_mult=x`: the group's learning rate is `x` times the schedule;
- `weight_decay=x`: the group's decay, replacing `optim.weight_decay`;
- `transforms=[(name, kwargs), ...]`: registered gradient transforms applied to the group's gradients
  before the base optimizer (RepOpt gradient multipliers, gradient sparsity, ...);
- `post_transforms=[(name, kwargs), ...]`: registered transforms applied to the base optimizer's update
  direction (after momentum / Adam moments), before decoupled weight decay and the learning rate;
- `final_transforms=[(name, kwargs), ...]`: registered transforms applied to the group's final update (after
  the learning rate and weight decay), with the parameters: `optax.chain(*pre, base, *final)` (dynamic
  sparsity masks the update there).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax

from repjax.sharding import path_str

RULE_KEYS = frozenset({"frozen", "lr_mult", "weight_decay", "transforms", "post_transforms", "final_transforms"})


def check_rules(rules: Sequence[tuple[str, dict]]) -> None:
    for i, rule in enumerate(rules):
        if not (isinstance(rule, list | tuple) and len(rule) == 2):
            raise ValueError(f"optim.rules[{i}] must be (regex, dict), got {rule!r}")
        pattern, spec = rule
        re.compile(pattern)
        unknown = set(spec) - RULE_KEYS
        if unknown:
            raise ValueError(f"optim.rules[{i}] ({pattern!r}) has unknown keys {sorted(unknown)}; "
                             f"allowed: {sorted(RULE_KEYS)}")


def group_labels(params: Any, rules: Sequence[tuple[str, dict]]) -> Any:
    """A tree like `params` holding each leaf's group label: `rule<i>` or `default`."""
    compiled = [re.compile(pattern) for pattern, _ in rules]

    def label(path, _):
        name = path_str(path)
        for i, pattern in enumerate(compiled):
            if pattern.search(name):
                return f"rule{i}"
        return "default"

    return jax.tree_util.tree_map_with_path(label, params)


def trainable_mask(params: Any, rules: Sequence[tuple[str, dict]]) -> Any:
    """True for leaves that are not frozen by a rule."""
    frozen = {f"rule{i}" for i, (_, spec) in enumerate(rules) if spec.get("frozen")}
    return jax.tree.map(lambda lab: lab not in frozen, group_labels(params, rules))
