"""Structural re-parameterization algebra on Flax-layout kernels (pure array functions).

Layouts: conv kernels are HWIO, grouped kernels HW(I/g)O; every per-channel factor indexes the OUTPUT
channel, i.e. the last axis. Kernel sizes may be rectangular (1xk, kx1) as long as they are odd, so that
a kernel has a centre and zero padding keeps it centred (RepVGG, PeLK and RepMLPNet all rely on this).

The identities used (RepVGG paper Eq. 3-4): for a conv K followed by eval-mode BN (gamma, beta, mu,
sigma^2, eps), with t = gamma / sqrt(sigma^2 + eps),

    BN(x * K + b) = x * (K t) + (beta + (b - mu) t),

and convolution is linear in the kernel, so parallel branches with the same stride and centred padding
merge into one kernel (the sum of the zero-padded kernels) plus the sum of the biases.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from repjax.nn.conv import pair

Array = jnp.ndarray
Size = int | tuple[int, int]


def fuse_conv_bn(kernel: Array, bias: Array | None, scale: Array, bn_bias: Array, mean: Array, var: Array,
                 eps: float = 1e-5) -> tuple[Array, Array]:
    """Folds an eval-mode BatchNorm into the preceding conv (RepVGG Eq. 3).

    Args:
      kernel: conv kernel [..., O] (HWIO, HW(I/g)O, or a Dense [I, O]); the BN acts on the last axis.
      bias: conv bias [O] or None.
      scale, bn_bias, mean, var: BN gamma, beta and running statistics, each [O].
      eps: BN epsilon.
    Returns:
      (kernel * t, bn_bias + (bias - mean) * t) with t = scale / sqrt(var + eps).
    """
    t = scale / jnp.sqrt(var + eps)
    b = -mean if bias is None else bias - mean
    return kernel * t, bn_bias + b * t


def pad_kernel(kernel: Array, size: Size) -> Array:
    """Zero-pads the spatial axes (0, 1) of an HW.. kernel to `size`, keeping it centred.

    `size` is an int (square) or (height, width); each target dim must exceed the kernel's by an even amount.
    """
    kh, kw = kernel.shape[:2]
    th, tw = pair(size)
    dh, dw = th - kh, tw - kw
    if dh < 0 or dw < 0 or dh % 2 or dw % 2:
        raise ValueError(f"cannot centre a {kh}x{kw} kernel in {th}x{tw}: the size difference must be even and >= 0")
    pads = [(dh // 2, dh // 2), (dw // 2, dw // 2)] + [(0, 0)] * (kernel.ndim - 2)
    return jnp.pad(kernel, pads)


def identity_kernel(channels: int, size: Size = 3, groups: int = 1, dtype=jnp.float32) -> Array:
    """The HW(C/g)C kernel of a (grouped) conv that maps x to x: K[centre, o mod (C/g), o] = 1.

    With `groups == channels` this is the depthwise identity [kh, kw, 1, C].
    """
    kh, kw = pair(size)
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"identity kernel needs odd sizes, got {kh}x{kw}")
    if channels % groups:
        raise ValueError(f"channels={channels} not divisible by groups={groups}")
    per_group = channels // groups
    k = np.zeros((kh, kw, per_group, channels), np.float32)
    out = np.arange(channels)
    k[kh // 2, kw // 2, out % per_group, out] = 1.0
    return jnp.asarray(k, dtype)


def merge_branches(branches: Sequence[tuple[Array, Array | None]]) -> tuple[Array, Array]:
    """Sums parallel (kernel, bias) branches into one: kernels zero-padded (centred) to the largest H and W.

    All branches must share the stride, the I/O channel layout and centred ("same"-style) padding;
    a bias of None counts as zero. Returns (kernel, bias).
    """
    if not branches:
        raise ValueError("merge_branches needs at least one branch")
    th = max(k.shape[0] for k, _ in branches)
    tw = max(k.shape[1] for k, _ in branches)
    out_ch = branches[0][0].shape[-1]
    kernel = sum(pad_kernel(k, (th, tw)) for k, _ in branches)
    bias = sum(jnp.zeros((out_ch,), kernel.dtype) if b is None else b for _, b in branches)
    return kernel, bias
