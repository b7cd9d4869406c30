"""Small shared building blocks: PyTorch-compatible conv padding, BatchNorm defaults, ConvBN.

Padding is explicit and symmetric (k // 2 on each side), as in PyTorch's `padding=k//2`. Flax's "SAME"
differs for strided convs on even inputs (it pads 0 before and 1 after), which shifts the sampling grid
and breaks parity with imported PyTorch weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any
Size = int | tuple[int, int]

# Kaiming/He normal, fan_in, untruncated: torch.nn.init.kaiming_normal_ defaults (relu gain sqrt(2)).
he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def pair(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def torch_padding(kernel_size: Size) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric `k // 2` padding per spatial axis (PyTorch `padding=k//2`)."""
    kh, kw = pair(kernel_size)
    return (kh // 2, kh // 2), (kw // 2, kw // 2)


def batch_norm(train: bool, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.BatchNorm:
    """BatchNorm with the project's defaults (flax momentum 0.9 == PyTorch momentum 0.1, eps 1e-5)."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                        param_dtype=jnp.float32, name=name)


class ConvBN(nn.Module):
    """Conv (no bias, symmetric padding) -> BatchNorm -> optional activation.

    Variables: `conv/kernel` (HW(I/g)O) and `bn/{scale,bias}` + `bn/{mean,var}` in batch_stats.
    """

    features: int
    kernel_size: Size = 3
    strides: int = 1
    groups: int = 1
    act: Callable[[jnp.ndarray], jnp.ndarray] | None = nn.relu
    dtype: Dtype = jnp.float32
    kernel_init: Callable = he_normal

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        x = nn.Conv(self.features, pair(self.kernel_size), strides=self.strides,
                    padding=torch_padding(self.kernel_size), feature_group_count=self.groups, use_bias=False,
                    dtype=self.dtype, param_dtype=jnp.float32, kernel_init=self.kernel_init, name="conv")(x)
        x = batch_norm(train, self.dtype, name="bn")(x)
        return x if self.act is None else self.act(x)
