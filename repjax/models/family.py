"""The model-family contract: what every family provides, and the registry that knows it.

A *family* is one model file (`repjax/models/resnet_cifar.py`, `repjax/projects/repopt/repvgg.py`, ...): one
Flax Linen module class, its variants registered by name, and these pure functions, all with one signature:

    macs(model, height, width) -> int                       analytic multiply-accumulates of one image in the
                                                            inference (deploy) form, the papers' convention
    reparameterize(variables, model) -> variables           training form -> deploy form (two-form families)
    deploy(model) -> model                                  the deploy-form module of a training-form module
    from_torch(state_dict, model) -> variables              a released PyTorch state_dict, strictly
    to_torch(variables, model) -> state_dict                the inverse (numpy arrays by PyTorch key)
    infer(state_dict, model) -> model                       `model` in the form a state_dict holds (optional)

`infer` adapts `model` (a registered variant, possibly with constructor overrides) to a file: the form (training
or deploy) and the sizes a file may legitimately change (the head's classes); the architecture stays the
variant's, so a file of another depth fails the strict import with its shape mismatches listed.
`macs` counts convolutions and matmuls (BN, activations and other elementwise operations not counted); the
contract test holds it to XLA's count of the deploy model with the reference depthwise algorithm.

`variables` is always the dict `model.init` returns (`{'params'}` plus `{'batch_stats'}` where the module has
BatchNorm); `reparameterize` returns exactly the collections of `deploy(model).init`, so the result can be
applied by the deploy model as it is. A family with one form leaves `reparameterize` and `deploy` as None.
`state_dict` is a flat `{key: numpy array}` (see `repjax.io.torch.load_state_dict`); a family whose users hold
other layouts (ViT: big_vision `.npz`) accepts them in the same `from_torch` by their keys.

A new family copies `repjax/models/resnet_cifar.py`: define the module, the functions above, a `FAMILY =
Family(...)`, and register each variant with `@register("name", FAMILY, input_size=...)`. The shared contract
test (`tests/test_family_contract.py`) then checks it: create, init, reparameterize == training form in eval
mode, PyTorch round trip, MACs against XLA's count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Variables = dict[str, Any]
StateDict = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family's implementation of the contract (see the module docstring)."""

    name: str
    module: type[nn.Module]
    tiny: str  # a registered small variant: what the shared contract test builds
    macs: Callable[[nn.Module, int, int], int]
    from_torch: Callable[[Mapping[str, np.ndarray], nn.Module], Variables] | None = None
    to_torch: Callable[[Mapping[str, Any], nn.Module], StateDict] | None = None
    reparameterize: Callable[[Mapping[str, Any], nn.Module], Variables] | None = None
    deploy: Callable[[nn.Module], nn.Module] | None = None
    infer: Callable[[Mapping[str, np.ndarray], nn.Module], nn.Module] | None = None

    def __post_init__(self):
        if (self.reparameterize is None) != (self.deploy is None):
            raise ValueError(f"family {self.name!r}: reparameterize and deploy come together (or neither)")
        if (self.from_torch is None) != (self.to_torch is None):
            raise ValueError(f"family {self.name!r}: from_torch and to_torch come together (or neither)")

    @property
    def has_deploy_form(self) -> bool:
        return self.reparameterize is not None

    def is_deploy(self, model: nn.Module) -> bool:
        """Whether `model` is this family's deploy form (`deploy` leaves it unchanged)."""
        return self.has_deploy_form and self.deploy(model) == model

    def infer_model(self, state_dict: Mapping[str, np.ndarray], model: nn.Module) -> nn.Module:
        """`infer(state_dict, model)` where the family has it, else `model`."""
        return self.infer(state_dict, model) if self.infer is not None else model


@dataclasses.dataclass(frozen=True)
class Variant:
    """A registered model name: its family and the input size its variables are built for by default."""

    name: str
    family: Family
    input_size: int
    in_channels: int = 3


def abstract_variables(model: nn.Module, height: int, width: int | None = None, in_channels: int = 3) -> Variables:
    """`ShapeDtypeStruct`s of `model.init` on one `height x width` image (no computation, no memory)."""
    shape = (1, height, width or height, in_channels)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape, jnp.float32), train=False))
