"""Public depthwise-convolution entry points and the algorithm registry (skeleton: native only)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from repjax.registry import Registry

METHODS: Registry = Registry("depthwise conv method")


def _check(x: jax.Array, kernel: jax.Array) -> None:
    kh, kw, one, c = kernel.shape
    if one != 1 or c != x.shape[-1] or kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"depthwise_conv needs x [N,H,W,C] and an odd-sized kernel [kh,kw,1,C]; "
                         f"got x {x.shape}, kernel {kernel.shape}")


@METHODS.register("native")
def native(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """XLA's grouped convolution (feature_group_count = C): the reference algorithm."""
    kh, kw, _, c = kernel.shape
    return lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1), ((kh // 2, kh // 2), (kw // 2, kw // 2)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


def choose(x_shape: Sequence[int], kernel_shape: Sequence[int]) -> str:
    """The algorithm 'auto' uses for these shapes on the current backend."""
    return "native"


def depthwise_conv(x: jax.Array, kernel: jax.Array, method: str = "auto") -> jax.Array:
    """Depthwise 'same' convolution of x [N, H, W, C] with kernel [kh, kw, 1, C]."""
    _check(x, kernel)
    name = choose(x.shape, kernel.shape) if method == "auto" else method
    fn: Callable = METHODS.get(name)
    return fn(x, kernel)


def expand_piecewise(theta: jax.Array, sizes: Sequence[int]) -> jax.Array:
    """Dense kernel [k, k, ...] from shared parameters theta [k', k', ...]: cell (a, b) of the separable grid
    `sizes` (k' cell sizes summing to k, the same on both axes) takes the value theta[a, b] (PeLK Eq. 1)."""
    sizes = tuple(int(s) for s in sizes)
    if theta.shape[0] != len(sizes) or theta.shape[1] != len(sizes):
        raise ValueError(f"theta {theta.shape} does not match a grid of {len(sizes)} cells")
    k = sum(sizes)
    reps = jnp.asarray(sizes)
    return jnp.repeat(jnp.repeat(theta, reps, axis=0, total_repeat_length=k), reps, axis=1, total_repeat_length=k)


def piecewise_conv(x: jax.Array, theta: jax.Array, sizes: Sequence[int], method: str = "auto") -> jax.Array:
    """`depthwise_conv(x, expand_piecewise(theta, sizes))`, possibly without materialising the dense kernel."""
    return depthwise_conv(x, expand_piecewise(theta, sizes), method)
