"""Locality Injection algebra for RepMLP / RepMLPNet (Ding et al., CVPR'22; pure array functions).

A partitioned spatial FC ("FC3") with S share-sets holds S matrices W[s] of shape (hw, hw) indexed
[input position p, output position q] (positions row-major in an h x w partition). A depthwise conv with
kernel K (HWIO, [kh, kw, 1, S]) and zero padding k//2 run inside one partition is the same linear map
(the paper's identity trick: M is the conv applied to the identity, i.e. to the hw one-hot images):

    M[s, p, q] = K[yp - yq + kh//2, xp - xq + kw//2, 0, s]   (0 where the offset falls outside K),

computed here analytically (`conv_to_fc`); `conv_to_fc_onehot` computes it by running the conv on the hw
one-hot images, as the paper describes. BN after FC3 or after a conv folds into it per set (as RepVGG
Eq. 3, `repjax.nn.reparam.fuse_conv_bn`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jnp.ndarray


def conv_to_fc(kernel: Array, h: int, w: int) -> Array:
    """Depthwise kernel [kh, kw, 1, S] (odd sizes) -> equivalent FC matrices [S, hw_in, hw_out] on h x w."""
    kh, kw = kernel.shape[:2]
    if kh % 2 == 0 or kw % 2 == 0 or kernel.shape[2] != 1:
        raise ValueError(f"need an odd-sized depthwise HW1S kernel, got {kernel.shape}")
    ys, xs = np.divmod(np.arange(h * w), w)
    dy = ys[:, None] - ys[None, :] + kh // 2  # [p, q]
    dx = xs[:, None] - xs[None, :] + kw // 2
    valid = (dy >= 0) & (dy < kh) & (dx >= 0) & (dx < kw)
    taps = kernel[np.clip(dy, 0, kh - 1), np.clip(dx, 0, kw - 1), 0, :]  # [p, q, S]
    return jnp.transpose(jnp.where(valid[..., None], taps, 0), (2, 0, 1))


def conv_to_fc_onehot(kernel: Array, h: int, w: int) -> Array:
    """`conv_to_fc` by applying the conv (zero padding k//2, groups S) to each one-hot h x w image."""
    kh, kw, _, s = kernel.shape
    eye = jnp.eye(h * w, dtype=kernel.dtype).reshape(h * w, h, w, 1)
    images = jnp.broadcast_to(eye, (h * w, h, w, s))  # image p: impulse at p in every set
    out = lax.conv_general_dilated(images, kernel, (1, 1), ((kh // 2, kh // 2), (kw // 2, kw // 2)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=s)
    return jnp.transpose(out.reshape(h * w, h * w, s), (2, 0, 1))


def fuse_fc_bn(kernel: Array, scale: Array, bias: Array, mean: Array, var: Array,
               eps: float = 1e-5) -> tuple[Array, Array]:
    """Folds BN(S) after FC3 (kernel [S, hw, hw]) into per-set scaled matrices and a bias [S, hw]."""
    t = scale / jnp.sqrt(var + eps)
    b = bias - mean * t
    return kernel * t[:, None, None], jnp.broadcast_to(b[:, None], (kernel.shape[0], kernel.shape[-1]))


def inject(fc_kernel: Array, fc_bias: Array, convs: Sequence[tuple[Array, Array]], h: int,
           w: int) -> tuple[Array, Array]:
    """FC3 (kernel [S, hw, hw], bias [S, hw]) plus BN-fused conv branches [(kernel HW1S, bias S)] -> one FC."""
    for k, b in convs:
        fc_kernel = fc_kernel + conv_to_fc(k, h, w)
        fc_bias = fc_bias + b[:, None]
    return fc_kernel, fc_bias
