"""Learning-rate schedules: linear warmup, then cosine / linear / constant."""

from __future__ import annotations

import optax


def make_schedule(name: str, lr: float, total_steps: int, warmup_steps: int = 0,
                  min_lr_ratio: float = 0.0) -> optax.Schedule:
    """Warmup from 0 to `lr` over `warmup_steps`, then decay to `lr * min_lr_ratio` at `total_steps`."""
    end = lr * min_lr_ratio
    decay_steps = max(total_steps - warmup_steps, 1)
    if name == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=min_lr_ratio)
    elif name == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    elif name == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"Unknown schedule {name!r}: use cosine, linear or constant")
    if warmup_steps <= 0:
        return decay
    warmup = optax.linear_schedule(0.0, lr, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])
