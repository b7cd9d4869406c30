"""Training losses by name: the model's outputs and the batch in, per-example losses and metrics out.

A loss is a function registered with `@register(name, logits=...)`:

    fn(outputs, batch, **kwargs) -> (loss, metrics)

- `outputs`: what `model.apply(..., train=...)` returned: an array of logits [N, classes], or for a multi-exit
  model (Dyn-Adapter) a list / dict of exit logits.
- `batch`: the global batch (`image`, `label` as class ids [N] or probability vectors [N, classes] after mixup,
  and `mask` [N] in evaluation; the loss never needs to apply `mask` itself); in training also `step` (the
  optimizer step, a scalar) for losses whose weights follow a schedule (Dyn-Adapter's lambda_i(t)).
- `loss`: per-example losses [N] (float32). The train step optimizes their mean; the eval step sums them over
  the unmasked rows.
- `metrics`: `{name: per-example values [N]}` logged beside the loss (train: mean, eval: masked sum), e.g. the
  loss of each exit; `{}` when there is nothing more.
- `logits=`: `outputs -> [N, classes]`, the logits that top-1 / top-5 are computed on (default: `outputs`
  itself; a multi-exit loss names, e.g., its last exit).
- `kwargs`: the loss's settings, from `config.loss.kwargs` (free-form); `config.loss.label_smoothing` is passed
  as `label_smoothing` when non-zero, in training only (evaluation reports the plain loss).

`get(name, **kwargs)` returns the bound `Loss` (`(outputs, batch) -> (loss, metrics)` plus `.logits`) that
`repjax.step.make_train_step` / `make_eval_step` take; `from_config(config.loss, train)` builds it from a config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from repjax.registry import Registry

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
LOSSES = Registry("loss")
DEFAULT = "softmax_xent"


def _identity(outputs: Any) -> jax.Array:
    return outputs


@dataclasses.dataclass(frozen=True)
class Loss:
    """A registered loss bound to its settings: `loss(outputs, batch) -> (loss [N], metrics {name: [N]})`."""

    name: str
    fn: LossFn
    logits: Callable[[Any], jax.Array] = _identity
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __call__(self, outputs: Any, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        loss, metrics = self.fn(outputs, batch, **self.kwargs)
        if jnp.ndim(loss) != 1:
            raise ValueError(f"loss {self.name!r} must return per-example losses [N], got shape {jnp.shape(loss)}")
        return loss, dict(metrics)


def register(name: str, logits: Callable[[Any], jax.Array] | None = None) -> Callable[[LossFn], LossFn]:
    """Decorator: registers `fn(outputs, batch, **kwargs) -> (loss, metrics)` under `name` (module docstring)."""

    def add(fn: LossFn) -> LossFn:
        LOSSES.register(name, (fn, logits or _identity))
        return fn

    return add


def get(name: str = DEFAULT, **kwargs: Any) -> Loss:
    """The registered loss `name` bound to `kwargs` (unknown names raise with the known ones)."""
    from repjax import projects

    projects.import_all()  # projects register their losses on import
    fn, logits = LOSSES.get(name)
    return Loss(name, fn, logits, dict(kwargs))


def from_config(cfg: Any, train: bool = True) -> Loss:
    """`config.loss` -> `Loss`: `name` (default softmax_xent), `kwargs`, and `label_smoothing` in training."""
    kwargs = dict(cfg.get("kwargs", None) or {})
    smoothing = float(cfg.get("label_smoothing", 0.0) or 0.0)
    if train and smoothing:
        kwargs.setdefault("label_smoothing", smoothing)
    return get(cfg.get("name", DEFAULT) or DEFAULT, **kwargs)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example cross-entropy (float32); `labels` are class ids or (mixed) probability vectors, smoothed
    towards uniform by `label_smoothing` (`optax.smooth_labels`)."""
    logits = logits.astype(jnp.float32)
    targets = jax.nn.one_hot(labels, logits.shape[-1]) if labels.ndim == 1 else labels.astype(jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.losses.softmax_cross_entropy(logits, targets)


@register(DEFAULT)
def softmax_xent(outputs: jax.Array, batch: Mapping[str, jax.Array],
                 label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Softmax cross-entropy of one logits array, with optional label smoothing."""
    return softmax_cross_entropy(outputs, batch["label"], label_smoothing), {}

