"""Shared helpers: argument checks, exact kernel cropping, cast rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check(x: jax.Array, kernel: jax.Array) -> None:
    """Raises unless x is [N,H,W,C] and kernel an odd-sized depthwise HWIO kernel [kh,kw,1,C]."""
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(f"depthwise_conv needs x [N,H,W,C] and kernel [kh,kw,1,C]; got {x.shape}, {kernel.shape}")
    kh, kw, one, c = kernel.shape
    if one != 1 or c != x.shape[-1] or kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"depthwise_conv needs x [N,H,W,C] and an odd-sized kernel [kh,kw,1,C]; "
                         f"got x {x.shape}, kernel {kernel.shape}")


def cropped_size(k: int, n: int) -> int:
    """Kernel extent that matters on a map of extent n: taps at offsets beyond n-1 only ever read zero padding."""
    return min(k, 2 * n - 1)


def crop_kernel(kernel: jax.Array, h: int, w: int) -> jax.Array:
    """Central (2h-1)x(2w-1) part of a kernel larger than the map; exact, and the cropped taps get zero gradient."""
    kh, kw = kernel.shape[:2]
    ch, cw = cropped_size(kh, h), cropped_size(kw, w)
    if (ch, cw) == (kh, kw):
        return kernel
    i, j = (kh - ch) // 2, (kw - cw) // 2
    return kernel[i:i + ch, j:j + cw]


def compute_dtype(x: jax.Array) -> jnp.dtype:
    """Non-native algorithms accumulate in float32 (bf16/fp16 inputs are upcast, the result cast back)."""
    return jnp.promote_types(x.dtype, jnp.float32)
