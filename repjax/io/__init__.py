"""Weight import by model name, for `config.init.path` and `python -m repjax.eval`, through the family contract.

    model, variables = load_model("RepVGG-A0-train.pth", "repvgg_a0")   # the module in the file's form
    variables = load_variables("resnet20.npz", "resnet20")              # the variables only

The registered variant names its family (`repjax.models.variant`); the family's `infer` adapts the variant to
the file (training or deploy form, number of classes) and its `from_torch` converts strictly, so every family
with a PyTorch layout imports both of its forms with no registration beyond `repjax.models.register`.
Key maps live beside the model they describe, generic converters in `repjax.io.torch`.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn

FORMATS = ("auto", "torch")


def load_model(path: str | os.PathLike, model_name: str, fmt: str = "auto",
               **model_kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Reads a weight file for the registered model `model_name` (constructor overrides `model_kwargs`).

    Returns `(model, variables)`: the module in the form and with the head size the file holds, and its
    variables (numpy arrays). Raises `FileNotFoundError`, or `ValueError` naming the file, the model or the
    mismatching keys."""
    from repjax import models
    from repjax.io import torch as tio

    if not os.path.exists(path):
        raise FileNotFoundError(f"Weight file not found: {path}")
    if fmt not in FORMATS:
        raise ValueError(f"Unknown weight format {fmt!r}: use 'torch' (a PyTorch state_dict, .npz or .pth)")
    family = models.variant(model_name).family
    if family.from_torch is None:
        raise ValueError(f"model {model_name!r} (family {family.name!r}) has no weight importer")
    state_dict = tio.load_state_dict(path)
    model = family.infer_model(state_dict, models.create(model_name, **model_kwargs))
    return model, family.from_torch(state_dict, model)


def load_variables(path: str | os.PathLike, model_name: str, fmt: str = "auto", **model_kwargs: Any) -> dict[str, Any]:
    """The variables of `load_model(path, model_name, ...)`."""
    return load_model(path, model_name, fmt, **model_kwargs)[1]
