"""Small maps: the depthwise conv as one [hw x hw] matrix per channel (RepMLP's Locality Injection identity).

On an h x w map a zero-padded depthwise conv is the linear map M[c, p, q] = K[yp - yq + kh//2, xp - xq + kw//2, c]
(`repjax.nn.locality.conv_to_fc`), so y[n, q, c] = sum_p x[n, p, c] M[c, p, q]: a batched matmul of (hw)^2
multiply-adds per image and channel instead of k^2 hw. It wins when hw < k^2 (late stages, where PeLK's
kernels exceed the map); the kernel gradient is the matching scatter-add of dM, done by autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from repjax.nn.dwconv._common import compute_dtype, crop_kernel
from repjax.nn.locality import conv_to_fc


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Depthwise 'same' conv through per-channel [hw, hw] matrices (exact; fp32 accumulation)."""
    n, h, w, c = x.shape
    dt = compute_dtype(x)
    m = conv_to_fc(crop_kernel(kernel, h, w).astype(dt), h, w)  # [C, hw_in, hw_out]
    y = jnp.einsum("npc,cpq->nqc", x.astype(dt).reshape(n, h * w, c), m)
    return y.reshape(n, h, w, c).astype(x.dtype)


def piecewise_matmul(x: jax.Array, theta: jax.Array, sizes: tuple[int, ...]) -> jax.Array:
    """`matmul` for a piecewise kernel (PeLK Eq. 1): the matrices gather theta directly (no dense kernel), so the
    theta gradient is one scatter-add instead of a scatter into k x k and a region sum."""
    n, h, w, c = x.shape
    k, dt = sum(sizes), compute_dtype(x)
    cell = np.repeat(np.arange(len(sizes)), sizes)  # tap -> cell index along one axis
    ys, xs = np.divmod(np.arange(h * w), w)
    dy = ys[:, None] - ys[None, :] + k // 2  # [p, q] tap offsets, as in conv_to_fc
    dx = xs[:, None] - xs[None, :] + k // 2
    valid = (dy >= 0) & (dy < k) & (dx >= 0) & (dx < k)
    taps = theta.astype(dt)[cell[np.clip(dy, 0, k - 1)], cell[np.clip(dx, 0, k - 1)], 0, :]  # [p, q, C]
    m = jnp.where(valid[..., None], taps, 0)
    y = jnp.einsum("npc,pqc->nqc", x.astype(dt).reshape(n, h * w, c), m)
    return y.reshape(n, h, w, c).astype(x.dtype)
