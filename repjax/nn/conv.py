"""2D convolution whose weight gradient is computed in batch chunks: a drop-in for Flax `nn.Conv`.

XLA:CPU lowers a convolution's weight gradient to one convolution contracting over the whole batch and
image (batch 128 at 32x32 is a 131072-long contraction), which Eigen runs at a fraction of the speed of the
forward convolution. Splitting the batch into chunks of about 512 KiB of input each and summing the chunks'
weight gradients is the same sum in a different order and runs 2-4x faster there (see
`experiments/bench_train.py`). The forward pass and the input gradient are `lax.conv_general_dilated` and
its own transpose, unchanged.

The chunked gradient is used by default on the CPU backend only; `config.conv_chunked_wgrad = "off"` (or
`chunked=False`) uses the plain XLA convolution everywhere, `"on"` forces it on (`set_chunked_default`).
A dense convolution whose input or output map is smaller than its kernel is one matrix product over patches
instead (`repjax.nn.im2col`: XLA:CPU runs those, or their input gradient, 6-52x slower than that product).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from repjax.nn import dwconv, im2col

Padding = str | Sequence[tuple[int, int]]
DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
CHUNK_ELEMENTS = 2**17  # input elements per batch chunk (512 KiB of float32): measured best on XLA:CPU


def pair(size: int | Sequence[int]) -> tuple[int, int]:
    """`k` -> `(k, k)`; a pair passes through as ints (kernel sizes, strides). Re-exported by `repjax.nn.layers`."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding, groups: int) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=DIMENSION_NUMBERS,
                                    feature_group_count=groups)


def num_chunks(x_shape: Sequence[int]) -> int:
    """Number of batch chunks for the weight gradient: the largest divisor of the batch giving chunks of
    at least CHUNK_ELEMENTS input elements (1 = no chunking)."""
    batch, per_example = x_shape[0], max(1, x_shape[1] * x_shape[2] * x_shape[3])
    target = max(1, batch * per_example // CHUNK_ELEMENTS)
    return max(k for k in range(1, min(batch, target) + 1) if batch % k == 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def chunked_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding,
                 groups: int) -> jax.Array:
    """`lax.conv_general_dilated` (NHWC, HWIO) with the weight gradient summed over batch chunks."""
    return _conv(x, kernel, strides, padding, groups)


def _fwd(x, kernel, strides, padding, groups):
    return _conv(x, kernel, strides, padding, groups), (x, kernel)


def _kernel_grad(x, dy, kernel, strides, padding, groups):
    _, vjp = jax.vjp(lambda w: _conv(x, w, strides, padding, groups), kernel)
    return vjp(dy)[0]


def _bwd(strides, padding, groups, residuals, dy):
    x, kernel = residuals
    _, x_vjp = jax.vjp(lambda x_: _conv(x_, kernel, strides, padding, groups), x)
    (dx,) = x_vjp(dy)
    k = num_chunks(x.shape)
    # Chunk j holds examples j, j + k, j + 2k, ...: with the batch sharded over devices every chunk
    # stays evenly spread over them (contiguous chunks would each live on one device).
    xs, dys = x.reshape(-1, k, *x.shape[1:]), dy.reshape(-1, k, *dy.shape[1:])
    dkernel = sum(_kernel_grad(xs[:, j], dys[:, j], kernel, strides, padding, groups) for j in range(k))
    return dx, dkernel


chunked_conv.defvjp(_fwd, _bwd)


def _is_depthwise_same(cin: int, cout: int, groups: int, ksize: tuple[int, int], strides: tuple[int, ...],
                       padding: Padding) -> bool:
    kh, kw = ksize
    centred = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    return (groups == cin == cout > 1 and kh % 2 == 1 and kw % 2 == 1 and tuple(strides) == (1, 1)
            and (padding == "SAME" or padding == centred))


_CHUNKED_MODE = "auto"  # config.conv_chunked_wgrad, set by train/eval through `set_chunked_default`


def set_chunked_default(mode: str) -> None:
    """`"auto"` (chunk on the CPU backend only), `"on"` or `"off"`: what `Conv(chunked=None)` does."""
    global _CHUNKED_MODE
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"conv_chunked_wgrad must be 'auto', 'on' or 'off', got {mode!r}")
    _CHUNKED_MODE = mode


def chunked_default() -> bool:
    """Whether `Conv` chunks its weight gradient when not told (`set_chunked_default`; auto: CPU backend)."""
    if _CHUNKED_MODE != "auto":
        return _CHUNKED_MODE == "on"
    return jax.default_backend() == "cpu"


class Conv(nn.Module):
    """NHWC 2D convolution with the `nn.Conv` variables (`kernel` HW(I/g)O, optional `bias`).

    Supports what this project's models use: explicit or string padding, strides, feature groups.
    `chunked`: weight gradient over batch chunks (`chunked_conv`); None picks `chunked_default()`.
    A depthwise 'same' convolution (groups == in == out channels, stride 1, odd kernel, centred zero padding)
    goes through `repjax.nn.dwconv.depthwise_conv` with `depthwise_method` (the project's one depthwise op).
    A dense (one group) convolution with a map smaller than its kernel is `repjax.nn.im2col.patches_conv`.
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Padding = "SAME"
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    chunked: bool | None = None
    depthwise_method: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        strides = pair(self.strides)
        padding = self.padding if isinstance(self.padding, str) else tuple(tuple(p) for p in self.padding)
        groups = self.feature_group_count
        if x.shape[-1] % groups or self.features % groups:
            raise ValueError(f"channels {x.shape[-1]} -> {self.features} not divisible by groups={groups}")
        kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1] // groups, self.features),
                            self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        dtype = self.dtype or jnp.result_type(x, kernel)
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        chunked = chunked_default() if self.chunked is None else self.chunked
        if _is_depthwise_same(x.shape[-1], self.features, groups, (kh, kw), strides, padding):
            y = dwconv.depthwise_conv(x, kernel, self.depthwise_method)
        elif groups == 1 and im2col.smaller_than_kernel(x.shape, (kh, kw), strides, padding):
            y = im2col.patches_conv(x, kernel, strides, padding)
        elif chunked and num_chunks(x.shape) > 1:
            y = chunked_conv(x, kernel, strides, padding, groups)
        else:
            y = _conv(x, kernel, strides, padding, groups)
        return y if bias is None else y + bias.astype(dtype)
