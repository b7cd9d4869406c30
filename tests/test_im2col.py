"""repjax.nn.im2col: a convolution on a map smaller than its kernel as patches @ kernel == lax.conv_general_dilated
(values and both gradients, float32, rtol 1e-5 / atol 1e-5 of unit-scale data), and `Conv` routes to it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repjax.nn import conv as rconv, im2col


def _normal(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _reference(x, kernel, strides, padding):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("hw,ksize,strides,padding", [
    ((2, 2), (3, 3), (1, 1), "SAME"),             # RepVGG stage 3 at 32 px
    ((2, 2), (3, 3), (2, 2), ((1, 1), (1, 1))),   # its strided last block: 2x2 -> 1x1
    ((1, 1), (3, 3), (1, 1), "SAME"),             # only the centre tap sees data
    ((2, 3), (3, 5), (1, 2), ((2, 0), (1, 3))),   # uneven padding, strides and kernel
    ((4, 4), (3, 3), (1, 1), "VALID"),            # the general case is the same formula
    ((3, 2), (3, 3), (2, 1), "SAME"),
])
def test_patches_conv_matches_lax(hw, ksize, strides, padding):
    x = _normal((5, *hw, 6), 0)
    kernel = _normal((*ksize, 6, 7), 1)
    y, vjp = jax.vjp(lambda a, k: im2col.patches_conv(a, k, strides, padding), x, kernel)
    y_ref, vjp_ref = jax.vjp(lambda a, k: _reference(a, k, strides, padding), x, kernel)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = _normal(y.shape, 2)
    for got, want in zip(vjp(dy), vjp_ref(dy), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_smaller_than_kernel_looks_at_both_maps():
    assert im2col.smaller_than_kernel((1, 2, 9, 1), (3, 3), (1, 1), "SAME")  # input height
    assert im2col.smaller_than_kernel((1, 4, 4, 1), (3, 3), (2, 2), ((1, 1), (1, 1)))  # output 2x2
    assert im2col.smaller_than_kernel((1, 9, 9, 1), (3, 3), (1, 1), "VALID") is False  # 7x7 out
    assert im2col.smaller_than_kernel((1, 5, 5, 1), (3, 3), (1, 1), "VALID") is False  # 3x3 out
    assert im2col.smaller_than_kernel((1, 5, 5, 1), (3, 3), (2, 2), ((1, 1), (1, 1))) is False  # 3x3 out


def test_patches_conv_refuses_what_it_does_not_cover():
    with pytest.raises(ValueError, match="groups unsupported"):
        im2col.patches_conv(jnp.ones((1, 2, 2, 4)), jnp.ones((3, 3, 2, 4)), (1, 1), "SAME")
    with pytest.raises(ValueError, match="does not fit"):
        im2col.patches_conv(jnp.ones((1, 2, 2, 4)), jnp.ones((3, 3, 4, 4)), (1, 1), "VALID")


def test_conv_routes_small_maps_to_patches(monkeypatch):
    calls = []
    original = im2col.patches_conv
    monkeypatch.setattr(rconv.im2col, "patches_conv", lambda *a: calls.append(a[0].shape) or original(*a))
    small, large = _normal((4, 2, 2, 8), 0), _normal((4, 5, 5, 8), 0)
    dense = rconv.Conv(8, (3, 3))
    v = dense.init(jax.random.key(0), small)
    y = dense.apply(v, small)
    np.testing.assert_allclose(y, _reference(small, v["params"]["kernel"], (1, 1), "SAME") + v["params"]["bias"],
                               rtol=1e-5, atol=1e-5)
    assert calls == [(4, 2, 2, 8)] * 2  # init and apply
    calls.clear()
    rconv.Conv(8, (3, 3), strides=2).apply(v, _normal((4, 4, 4, 8), 0))  # 4x4 -> 2x2: output smaller than kernel
    assert calls == [(4, 4, 4, 8)]
    calls.clear()
    dense.apply(v, large)  # maps as large as the kernel: XLA's convolution
    rconv.Conv(8, (3, 3), strides=2, padding="VALID").apply(v, _normal((4, 7, 7, 8), 0))  # 7x7 -> 3x3
    rconv.Conv(8, (3, 3), feature_group_count=2).init(jax.random.key(0), small)  # grouped: XLA's convolution
    rconv.Conv(8, (1, 1)).init(jax.random.key(0), small)  # a 1x1 kernel is never larger than a map
    assert not calls
