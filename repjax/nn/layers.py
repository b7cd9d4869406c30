"""Small shared building blocks: PyTorch-compatible conv padding, BatchNorm, ConvBN.

Padding is explicit and symmetric (k // 2 on each side), as in PyTorch's `padding=k//2`. Flax's "SAME"
differs for strided convs on even inputs (it pads 0 before and 1 after), which shifts the sampling grid
and breaks parity with imported PyTorch weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from repjax.nn.conv import Conv, pair

__all__ = ["BatchNorm", "ConvBN", "Dtype", "Size", "batch_norm", "he_normal", "pair", "torch_padding"]

Dtype = Any
Size = int | tuple[int, int]

# Kaiming/He normal, fan_in, untruncated: torch.nn.init.kaiming_normal_ defaults (relu gain sqrt(2)).
he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def torch_padding(kernel_size: Size) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric `k // 2` padding per spatial axis (PyTorch `padding=k//2`)."""
    kh, kw = pair(kernel_size)
    return (kh // 2, kh // 2), (kw // 2, kw // 2)


class BatchNorm(nn.Module):
    """BatchNorm over all axes but the last, with `nn.BatchNorm`'s variables and arithmetic.

    Same statistics as `nn.BatchNorm` (one fused pass: var = E[x^2] - E[x]^2, clipped at 0), applied as one
    multiply-add `x * m + (bias - mean * m)` with `m = scale / sqrt(var + eps)`. That form's gradient needs fewer
    full-size temporaries than `(x - mean) * m + bias`, which makes a ResNet-20 training step about 8% faster on
    XLA:CPU.

    `unbiased_var` (default on) selects PyTorch's running statistics: `torch.nn.BatchNorm2d` normalizes with the
    biased batch variance but averages the unbiased one, var * n / (n - 1) with n = elements per channel, into
    `running_var`; Flax averages the biased one (`unbiased_var=False`). The official code of every family here
    is PyTorch, so the default follows it (after one step at batch 8 of 1x1 maps the two differ by 1/7 of the
    batch variance's share). The normalization itself is the same in both.
    """

    use_running_average: bool
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    unbiased_var: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            flat = x.astype(jnp.float32).reshape(-1, c)
            mean = jnp.mean(flat, axis=0)
            var = jnp.maximum(jnp.mean(flat * flat, axis=0) - mean * mean, 0.0)
            if not self.is_initializing():
                n = flat.shape[0]
                update = var * (n / max(n - 1, 1)) if self.unbiased_var else var
                ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * update
        mul = scale * lax.rsqrt(var + self.epsilon)
        y = x * mul + (bias - mean * mul)
        return y.astype(self.dtype or x.dtype)


def batch_norm(train: bool, dtype: Dtype = jnp.float32, name: str | None = None,
               unbiased_var: bool = True) -> BatchNorm:
    """BatchNorm with the project's defaults: PyTorch's (flax momentum 0.9 == PyTorch momentum 0.1, eps 1e-5,
    unbiased running variance)."""
    return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                     param_dtype=jnp.float32, unbiased_var=unbiased_var, name=name)


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
        x = Conv(self.features, pair(self.kernel_size), strides=self.strides,
                 padding=torch_padding(self.kernel_size), feature_group_count=self.groups, use_bias=False,
                 dtype=self.dtype, param_dtype=jnp.float32, kernel_init=self.kernel_init, name="conv")(x)
        x = batch_norm(train, self.dtype, name="bn")(x)
        return x if self.act is None else self.act(x)
