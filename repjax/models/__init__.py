"""Model registry: `create(name, **kwargs)` returns a Flax Linen module.

Model files register their variants on import; `create` imports them all lazily so that
`repjax.models.create("resnet20", num_classes=10)` works without further imports.
"""

from __future__ import annotations

import importlib

import flax.linen as nn

from repjax.registry import Registry

MODELS = Registry("model")

# Every module that registers models. Add a new family here.
_MODEL_MODULES = ("resnet_cifar", "small_cnn", "repvgg", "repopt_vgg", "repmlp", "lk_convnext", "replknet")


def _import_all() -> None:
    for name in _MODEL_MODULES:
        importlib.import_module(f"repjax.models.{name}")


def create(name: str, **kwargs) -> nn.Module:
    """Builds the model registered as `name` with constructor overrides `kwargs`."""
    _import_all()
    return MODELS.get(name)(**kwargs)


def names() -> list[str]:
    _import_all()
    return MODELS.names()
