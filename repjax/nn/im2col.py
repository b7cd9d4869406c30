"""A convolution on a map smaller than its kernel, as one matrix product over image patches (im2col).

XLA:CPU runs a dense convolution whose input map is smaller than its kernel (a 3x3 convolution on the 2x2 or
1x1 maps that the last stages of a CIFAR-size RepVGG / ResNet reach) far below its speed on larger maps, and
likewise the input gradient of one whose output map is smaller than its kernel (`python
experiments/xla_cpu_probes.py`: 64x2x2x256 -> 256 in 45 ms forward, 7 GFLOP/s, against 1.1 ms as patches; the
input gradient of RepVGG-A0's strided 4x4 -> 2x2 last block at 64 px in 63 ms against 3.2 ms; on 3x3 maps the
patch form is still up to 1.3x faster, on 8x8 maps XLA's convolution is the faster one; the rule stays at "smaller
than the kernel", where the gap is 6-52x). The 2x2-map convolutions of stage 3 took about 90% of RepVGG-B0's
training step at 32 px before this path (`python experiments/profile_step.py repvgg_b0 --batch 64 --size 32`).
Written as patches times the reshaped kernel,

    y[n, p, q, o] = sum_{i, j, c} x_pad[n, s*p + i, s*q + j, c] * w[i, j, c, o]
                  = (P @ W)[(n, p, q), o],   P[(n, p, q), (i, j, c)] = x_pad[n, s*p + i, s*q + j, c],
                                             W[(i, j, c), o] = w[i, j, c, o]   (row-major reshape of HWIO),

it is the same sum in another order (equal up to float32 rounding, tested against `lax.conv_general_dilated`)
and its gradients are a matrix product, slices and a pad. The patch matrix holds kh*kw copies of the output
positions' receptive fields: on such small maps that is at most kh*kw times the input, a few hundred KiB.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax


def _pads(hw: Sequence[int], kernel_size: Sequence[int], strides: Sequence[int],
          padding: str | Sequence[tuple[int, int]]) -> Sequence[tuple[int, int]]:
    return lax.padtype_to_pads(hw, kernel_size, strides, padding) if isinstance(padding, str) else padding


def smaller_than_kernel(x_shape: Sequence[int], kernel_size: Sequence[int], strides: Sequence[int],
                        padding: str | Sequence[tuple[int, int]]) -> bool:
    """Whether the input or output map of a convolution of NHWC `x_shape` is smaller than the kernel in height
    or width: where XLA:CPU's convolution (forward, or input gradient) is slow."""
    pads = _pads(x_shape[1:3], kernel_size, strides, padding)
    for size, k, s, (lo, hi) in zip(x_shape[1:3], kernel_size, strides, pads, strict=True):
        if size < k or (size + lo + hi - k) // s + 1 < k:
            return True
    return False


def patches_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                 padding: str | Sequence[tuple[int, int]]) -> jax.Array:
    """`lax.conv_general_dilated(x, kernel, strides, padding)` for NHWC `x`, HWIO `kernel`, one feature group."""
    kh, kw, cin, cout = kernel.shape
    if x.shape[-1] != cin:
        raise ValueError(f"input has {x.shape[-1]} channels, kernel {kernel.shape} expects {cin} (groups unsupported)")
    sh, sw = strides
    pads = _pads(x.shape[1:3], (kh, kw), strides, padding)
    xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    oh, ow = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"kernel {kh}x{kw} does not fit the padded {xp.shape[1]}x{xp.shape[2]} map")
    taps = [xp[:, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw, :] for i in range(kh) for j in range(kw)]
    patches = jnp.concatenate(taps, axis=-1)  # (n, oh, ow, kh*kw*cin), tap-major like the HWIO reshape
    return jnp.dot(patches, kernel.reshape(kh * kw * cin, cout))
