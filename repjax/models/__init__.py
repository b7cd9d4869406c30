"""Model registry: `create(name, **kwargs)` returns a Flax Linen module; `variant(name)` says its family.

Model files register their variants on import with `@register(name, FAMILY, input_size=...)` (the family
contract: `repjax.models.family`); `create` imports them all lazily so that
`repjax.models.create("resnet20", num_classes=10)` works without further imports.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import flax.linen as nn

from repjax.models.family import Family, Variant, abstract_variables
from repjax.registry import Registry

__all__ = ["MODELS", "Family", "Variant", "abstract_variables", "create", "families", "family_of", "names",
           "register", "variant"]

MODELS = Registry("model")
VARIANTS = Registry("model")  # name -> Variant (family and default input size)

# Generic families (used by several papers). Paper-specific families live in `repjax.projects`.
_MODEL_MODULES = ("resnet_cifar", "small_cnn", "vit")


def _import_all() -> None:
    from repjax import projects

    for name in _MODEL_MODULES:
        importlib.import_module(f"repjax.models.{name}")
    projects.import_all()


def register(name: str, family: Family, input_size: int, in_channels: int = 3) -> Callable:
    """Decorator: registers a variant factory `fn(**kwargs) -> module` under `name`, with its family."""

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS.register(name, fn)
        VARIANTS.register(name, Variant(name, family, input_size, in_channels))
        return fn

    return add


def create(name: str, **kwargs) -> nn.Module:
    """Builds the model registered as `name` with constructor overrides `kwargs`."""
    _import_all()
    return MODELS.get(name)(**kwargs)


def variant(name: str) -> Variant:
    """The family and default input size of the registered model `name`."""
    _import_all()
    return VARIANTS.get(name)


def families() -> list[Family]:
    """Every registered family once, in name order."""
    _import_all()
    unique = {VARIANTS.get(n).family.name: VARIANTS.get(n).family for n in VARIANTS.names()}
    return [unique[k] for k in sorted(unique)]


def family_of(model: nn.Module) -> Family | None:
    """The family whose module class `model` is an instance of (None if no family declares it)."""
    return next((f for f in families() if isinstance(model, f.module)), None)


def names() -> list[str]:
    _import_all()
    return MODELS.names()
