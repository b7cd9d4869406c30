"""Weight import: `load_variables(path, model_name)` for `config.init.path` and `repjax.eval`.

Model files register a converter per model name (`IMPORTERS.register("resnet20", fn)`) taking a PyTorch
state_dict (numpy arrays by key) and returning `{'params', 'batch_stats'}`; key maps live beside the
model they describe, generic converters in `repjax.io.torch`.
"""

from __future__ import annotations

import os
from typing import Any

from repjax.registry import Registry

IMPORTERS = Registry("weight importer")


def load_variables(path: str | os.PathLike, model_name: str, fmt: str = "auto") -> dict[str, Any]:
    """Reads a weight file and converts it to the variables of the registered model `model_name`."""
    from repjax import models
    from repjax.io import torch as tio

    if not os.path.exists(path):
        raise FileNotFoundError(f"Weight file not found: {path}")
    if fmt not in ("auto", "torch"):
        raise ValueError(f"Unknown weight format {fmt!r}: use 'torch' (a PyTorch state_dict, .npz or .pth)")
    models.names()  # imports every model file, which registers its importers
    return IMPORTERS.get(model_name)(tio.load_state_dict(path))
