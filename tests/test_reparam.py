"""Re-parameterization algebra (repjax.nn.reparam), float32 on tiny shapes.

Tolerance: every "equal outputs" check asserts max|a - b| <= 1e-5 * max(1, max|reference|) (float32
round-off on sums of at most a few hundred products); kernel placement checks are exact.
BN statistics are random (mean ~ N(0, 1), var ~ U(0.1, 2), gamma ~ U(-1.5, 1.5), beta ~ N(0, 1)), not the
init values.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repjax.nn.reparam import fuse_conv_bn, identity_kernel, merge_branches, pad_kernel

TOL = 1e-5


def conv(x, kernel, stride=1, groups=1, bias=None):
    """NHWC conv with centred symmetric padding (kh//2, kw//2), as in PyTorch."""
    kh, kw = kernel.shape[:2]
    y = jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((kh // 2, kh // 2), (kw // 2, kw // 2)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
                                     precision=jax.lax.Precision.HIGHEST)
    return y if bias is None else y + bias


def assert_close(a, ref, tol=TOL):
    err = float(jnp.max(jnp.abs(a - ref)))
    assert err <= tol * max(1.0, float(jnp.max(jnp.abs(ref)))), err


def randn(rng, *shape):
    """Random normals drawn with numpy (no per-shape JAX compiles)."""
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


def random_bn(rng, c):
    return {k: jnp.asarray(v, jnp.float32) for k, v in dict(
        scale=rng.uniform(-1.5, 1.5, c), bias=rng.normal(size=c), mean=rng.normal(size=c),
        var=rng.uniform(0.1, 2.0, c)).items()}


@pytest.mark.parametrize("kh,kw,channels,groups,stride,with_bias", [
    (3, 3, 4, 1, 1, False), (1, 1, 4, 1, 2, False), (3, 3, 4, 2, 2, True), (1, 5, 8, 4, 1, True),
    (5, 1, 8, 8, 1, False),
])
def test_fuse_conv_bn_equals_conv_then_eval_bn(kh, kw, channels, groups, stride, with_bias):
    """conv(+bias) -> flax BatchNorm (eval, running stats) == conv with the fused kernel and bias."""
    rng = np.random.default_rng(0)
    x = randn(rng, 2, 8, 8, channels)
    kernel = randn(rng, kh, kw, channels // groups, channels) * 0.3
    bias = randn(rng, channels) if with_bias else None
    bn = random_bn(rng, channels)
    bn_mod = nn.BatchNorm(use_running_average=True, epsilon=1e-5)
    ref = bn_mod.apply({"params": {"scale": bn["scale"], "bias": bn["bias"]},
                        "batch_stats": {"mean": bn["mean"], "var": bn["var"]}},
                       conv(x, kernel, stride, groups, bias))
    k2, b2 = fuse_conv_bn(kernel, bias, bn["scale"], bn["bias"], bn["mean"], bn["var"], 1e-5)
    assert k2.shape == kernel.shape and b2.shape == (channels,)
    assert_close(conv(x, k2, stride, groups, b2), ref)


def test_pad_kernel_places_kernel_at_centre():
    k = jnp.arange(1 * 3 * 2 * 2, dtype=jnp.float32).reshape(1, 3, 2, 2) + 1
    p = pad_kernel(k, (3, 5))
    assert p.shape == (3, 5, 2, 2)
    np.testing.assert_array_equal(p[1, 1:4], k[0])
    assert float(jnp.abs(p).sum()) == float(k.sum())
    assert pad_kernel(k, (1, 3)) is not None and pad_kernel(jnp.ones((1, 1, 2, 3)), 5).shape == (5, 5, 2, 3)
    for bad in [4, (1, 4), (1, 1)]:
        with pytest.raises(ValueError):
            pad_kernel(k, bad)


@pytest.mark.parametrize("shape,size,stride", [((1, 1), 3, 2), ((1, 3), 3, 1), ((3, 1), (5, 5), 2), ((3, 3), 7, 1)])
def test_pad_kernel_conv_equivalence(shape, size, stride):
    """conv with a small kernel (pad k//2) == conv with the centred, zero-padded kernel (pad K//2)."""
    rng = np.random.default_rng(1)
    x, k = randn(rng, 2, 9, 8, 3), randn(rng, *shape, 3, 5)
    assert_close(conv(x, pad_kernel(k, size), stride), conv(x, k, stride))


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
@pytest.mark.parametrize("size", [3, 1, (1, 5), (3, 1)])
def test_identity_kernel_is_identity(groups, size):
    """K[centre, o mod (C/g), o] = 1, and the grouped conv with it returns its input exactly."""
    c = 8
    k = identity_kernel(c, size, groups)
    kh, kw = (size, size) if isinstance(size, int) else size
    assert k.shape == (kh, kw, c // groups, c) and k.dtype == jnp.float32
    assert float(k.sum()) == c and all(float(k[kh // 2, kw // 2, o % (c // groups), o]) == 1 for o in range(c))
    x = randn(np.random.default_rng(2), 2, 6, 6, c)
    np.testing.assert_array_equal(conv(x, k, 1, groups), x)


def test_identity_kernel_rejects_bad_args():
    with pytest.raises(ValueError):
        identity_kernel(8, 2)
    with pytest.raises(ValueError):
        identity_kernel(6, 3, groups=4)
    assert identity_kernel(4, 3, dtype=jnp.bfloat16).dtype == jnp.bfloat16


@pytest.mark.parametrize("stride,groups", [(1, 1), (2, 1), (1, 2), (2, 4)])
def test_merge_branches_equals_sum_of_convs(stride, groups):
    """Sum of parallel convs (3x3, 1x1, 1x3, 3x1, 5x5, identity; some biased) == one conv with the merged kernel."""
    c = 8
    rng = np.random.default_rng(3)
    x = randn(rng, 2, 10, 10, c)
    shapes = [(3, 3), (1, 1), (1, 3), (3, 1), (5, 5)]
    branches = [(randn(rng, *s, c // groups, c), randn(rng, c) if i % 2 == 0 else None) for i, s in enumerate(shapes)]
    if stride == 1:
        branches.append((identity_kernel(c, 1, groups), None))
    ref = sum(conv(x, k, stride, groups, b) for k, b in branches)
    kernel, bias = merge_branches(branches)
    assert kernel.shape == (5, 5, c // groups, c) and bias.shape == (c,)
    assert_close(conv(x, kernel, stride, groups, bias), ref)


def test_merge_branches_rectangular_and_bn_fused():
    """1xk + kx1 merge into kxk (PeLK/ACNet-style); BN-fused branches merge like plain ones."""
    c, rng = 4, np.random.default_rng(4)
    x = randn(rng, 1, 7, 7, c)
    kh, kv = randn(rng, 1, 5, c, c), randn(rng, 5, 1, c, c)
    bns = [random_bn(rng, c), random_bn(rng, c)]
    fused = [fuse_conv_bn(k, None, b["scale"], b["bias"], b["mean"], b["var"]) for k, b in zip([kh, kv], bns)]
    ref = sum((conv(x, k) - b["mean"]) * b["scale"] / jnp.sqrt(b["var"] + 1e-5) + b["bias"]
              for k, b in zip([kh, kv], bns))
    kernel, bias = merge_branches(fused)
    assert kernel.shape == (5, 5, c, c)
    assert_close(conv(x, kernel, 1, 1, bias), ref)
    with pytest.raises(ValueError):
        merge_branches([])
