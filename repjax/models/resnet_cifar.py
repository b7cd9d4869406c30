"""CIFAR ResNet-20/32/44/56/110 (He et al. 2016, section 4.2) with option-A shortcuts.

Layout: a 3x3 stem conv (16 channels), three stages of n basic blocks (16/32/64 channels, the first block of
stages 2 and 3 has stride 2), global average pooling and a linear head; depth = 6n + 2. Option-A shortcuts
are parameter free: stride-2 subsampling `x[:, ::2, ::2]` plus zero channels, half before and half after
the existing ones (what the akamaster PyTorch weights were trained with).

The family contract (`repjax.models.family`; the file a new family copies): `macs`, `from_torch` / `to_torch`
(akamaster key names: `conv1`, `bn1`, `layer2.0.conv1`, `linear`; the map lives here, beside the Flax names it
refers to, so that renaming a submodule and its map is one change; `repjax.io.torch` stays model agnostic),
`infer` (the head size a file holds), `FAMILY`, and every variant registered with `register`. One form only:
no `reparameterize` / `deploy`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from repjax.io import torch as tio
from repjax.models import Family, abstract_variables, register
from repjax.nn.layers import ConvBN, Dtype, he_normal

STAGE_WIDTHS = (16, 32, 64)


def blocks_per_stage(depth: int) -> int:
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
    return (depth - 2) // 6


def shortcut_a(x: jnp.ndarray, features: int, strides: int) -> jnp.ndarray:
    """Option-A identity shortcut: subsample by `strides`, zero-pad channels to `features` (half each side)."""
    if strides > 1:
        x = x[:, ::strides, ::strides, :]
    extra = features - x.shape[-1]
    if extra < 0:
        raise ValueError(f"option-A shortcut cannot reduce channels ({x.shape[-1]} -> {features})")
    if extra:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return x


class BasicBlock(nn.Module):
    """Two 3x3 ConvBNs with an option-A identity shortcut; ReLU after the sum."""

    features: int
    strides: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        y = ConvBN(self.features, strides=self.strides, dtype=self.dtype, name="conv_bn1")(x, train)
        y = ConvBN(self.features, act=None, dtype=self.dtype, name="conv_bn2")(y, train)
        return nn.relu(y + shortcut_a(x, self.features, self.strides).astype(y.dtype))


class ResNetCifar(nn.Module):
    """CIFAR ResNet; `width` multiplies the 16/32/64 channels. Returns float32 logits."""

    depth: int = 20
    num_classes: int = 10
    width: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        n = blocks_per_stage(self.depth)
        x = ConvBN(STAGE_WIDTHS[0] * self.width, dtype=self.dtype, name="stem")(x, train)
        for s, features in enumerate(STAGE_WIDTHS):
            for b in range(n):
                strides = 2 if s > 0 and b == 0 else 1
                x = BasicBlock(features * self.width, strides, self.dtype, name=f"stage{s + 1}_block{b}")(x, train)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=he_normal,
                     name="head")(x)
        return x.astype(jnp.float32)


# ------------------------------------------------------------------ the family contract


def macs(model: ResNetCifar, height: int, width: int | None = None) -> int:
    """Multiply-accumulates of one image: the 3x3 convs and the head (option-A shortcuts are free)."""
    h, w = height, width or height
    n, c_in, total = blocks_per_stage(model.depth), 3, 0
    for s, base in enumerate(STAGE_WIDTHS):
        c = base * model.width
        if s == 0:
            total += 9 * c_in * c * h * w  # stem
            c_in = c
        for b in range(n):
            if s > 0 and b == 0:
                h, w = (h + 1) // 2, (w + 1) // 2
            total += 9 * c_in * c * h * w + 9 * c * c * h * w
            c_in = c
    return total + c_in * model.num_classes


def torch_rules(model: ResNetCifar) -> list[tio.Rule]:
    """Key map from an akamaster-style PyTorch state_dict to this module's variables."""

    def conv_bn(conv: str, bn: str, path: tuple[str, ...]) -> list[tio.Rule]:
        return tio.conv(conv, (*path, "conv")) + tio.bn(bn, (*path, "bn"))

    rules = conv_bn("conv1", "bn1", ("stem",))
    for s in range(1, 4):
        for b in range(blocks_per_stage(model.depth)):
            t, f = f"layer{s}.{b}", (f"stage{s}_block{b}",)
            rules += conv_bn(f"{t}.conv1", f"{t}.bn1", (*f, "conv_bn1"))
            rules += conv_bn(f"{t}.conv2", f"{t}.bn2", (*f, "conv_bn2"))
    return rules + tio.linear("linear", ("head",))


def infer_config(state_dict: Mapping[str, np.ndarray]) -> dict[str, int]:
    """(depth, num_classes, width) read off a PyTorch state_dict's keys and shapes."""
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"layer1\.(\d+)\.", k))}
    if "conv1.weight" not in state_dict or "linear.weight" not in state_dict or not blocks:
        raise ValueError("not a CIFAR ResNet state_dict: needs conv1.weight, layer1.*, linear.weight")
    return dict(depth=6 * (max(blocks) + 1) + 2, num_classes=int(state_dict["linear.weight"].shape[0]),
                width=max(1, int(state_dict["conv1.weight"].shape[0]) // STAGE_WIDTHS[0]))


def infer(state_dict: Mapping[str, np.ndarray], model: ResNetCifar) -> ResNetCifar:
    """`model` with the file's number of classes (depth and width stay: a mismatch fails the import)."""
    return model.clone(num_classes=infer_config(state_dict)["num_classes"])


def from_torch(state_dict: Mapping[str, np.ndarray], model: ResNetCifar) -> dict:
    """Imports a PyTorch CIFAR ResNet state_dict -> {'params', 'batch_stats'} of `model` (numpy float32, strict)."""
    return tio.from_torch_state_dict(state_dict, torch_rules(model), abstract_variables(model, 32))


def to_torch(variables: Mapping, model: ResNetCifar) -> dict[str, np.ndarray]:
    """Exports {'params', 'batch_stats'} to an akamaster-style PyTorch state_dict (numpy arrays)."""
    return tio.to_torch_state_dict(variables, torch_rules(model))


FAMILY = Family("resnet_cifar", ResNetCifar, tiny="resnet8", macs=macs, from_torch=from_torch, to_torch=to_torch,
                infer=infer)


@register("resnet8", FAMILY, input_size=32)
def resnet8(**kw) -> ResNetCifar:
    """ResNet-8 (one block per stage): the family's test-size variant."""
    return ResNetCifar(depth=8, **kw)


@register("resnet20", FAMILY, input_size=32)
def resnet20(**kw) -> ResNetCifar:
    """ResNet-20 (0.27M params); kwargs: num_classes=10, dtype=float32, width=1."""
    return ResNetCifar(depth=20, **kw)


@register("resnet32", FAMILY, input_size=32)
def resnet32(**kw) -> ResNetCifar:
    """ResNet-32 (0.46M params)."""
    return ResNetCifar(depth=32, **kw)


@register("resnet44", FAMILY, input_size=32)
def resnet44(**kw) -> ResNetCifar:
    """ResNet-44 (0.66M params)."""
    return ResNetCifar(depth=44, **kw)


@register("resnet56", FAMILY, input_size=32)
def resnet56(**kw) -> ResNetCifar:
    """ResNet-56 (0.85M params)."""
    return ResNetCifar(depth=56, **kw)


@register("resnet110", FAMILY, input_size=32)
def resnet110(**kw) -> ResNetCifar:
    """ResNet-110 (1.7M params)."""
    return ResNetCifar(depth=110, **kw)
