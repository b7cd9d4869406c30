"""A tiny, fast CNN for the default job (sklearn 8x8 digits); works for any input size and channel count.

conv3x3(w)-BN-ReLU, conv3x3(2w, stride 2)-BN-ReLU, conv3x3(2w)-BN-ReLU, global average pool, dense.
Family contract: one form and no PyTorch layout, so only `macs`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from repjax.models import Family, register
from repjax.nn.layers import ConvBN, Dtype


class SmallCNN(nn.Module):
    """Three ConvBN-ReLU layers and a linear head. Returns float32 logits."""

    num_classes: int = 10
    width: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        x = ConvBN(self.width, dtype=self.dtype, name="conv_bn1")(x, train)
        x = ConvBN(2 * self.width, strides=2, dtype=self.dtype, name="conv_bn2")(x, train)
        x = ConvBN(2 * self.width, dtype=self.dtype, name="conv_bn3")(x, train)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="head")(x)
        return x.astype(jnp.float32)


def macs(model: SmallCNN, height: int, width: int | None = None, in_channels: int = 3) -> int:
    """Multiply-accumulates of one image: three 3x3 convs and the head."""
    h, w, c = height, width or height, model.width
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    convs = 9 * in_channels * c * h * w + 9 * c * 2 * c * h2 * w2 + 9 * 2 * c * 2 * c * h2 * w2
    return convs + 2 * c * model.num_classes


FAMILY = Family("small_cnn", SmallCNN, tiny="small_cnn", macs=macs)


@register("small_cnn", FAMILY, input_size=8)
def small_cnn(**kw) -> SmallCNN:
    """SmallCNN; kwargs: num_classes=10, width=32, dtype=float32."""
    return SmallCNN(**kw)
