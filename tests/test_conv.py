"""repjax.nn.conv: chunked-weight-gradient conv == lax.conv_general_dilated (values and both gradients)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repjax.nn import conv as rconv
from repjax.nn.layers import BatchNorm, ConvBN

PAD = ((1, 1), (1, 1))


def _normal(shape, seed):
    """numpy normals as float32 JAX arrays: jax.random would compile a threefry kernel per shape."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _reference(x, kernel, strides, padding, groups):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups)


@pytest.mark.parametrize("strides,groups,padding", [((1, 1), 1, PAD), ((2, 2), 1, PAD), ((1, 1), 4, PAD),
                                                    ((2, 2), 2, "SAME"), ((1, 2), 1, ((0, 1), (2, 0)))])
def test_chunked_conv_matches_lax(monkeypatch, strides, groups, padding):
    monkeypatch.setattr(rconv, "CHUNK_ELEMENTS", 2 * 9 * 9 * 8)  # 2 examples per chunk -> 6 chunks
    x = _normal((12, 9, 9, 8), 0)
    kernel = _normal((3, 3, 8 // groups, 12), 1)
    assert rconv.num_chunks(x.shape) == 6
    y, vjp = jax.vjp(lambda a, k: rconv.chunked_conv(a, k, strides, padding, groups), x, kernel)
    y_ref, vjp_ref = jax.vjp(lambda a, k: _reference(a, k, strides, padding, groups), x, kernel)
    dy = _normal(y.shape, 2)
    np.testing.assert_array_equal(y, y_ref)
    for got, want in zip(vjp(dy), vjp_ref(dy), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_num_chunks_divides_batch():
    assert rconv.num_chunks((128, 32, 32, 16)) == 16  # 8 examples (512 KiB) per chunk
    assert rconv.num_chunks((128, 8, 8, 64)) == 4
    assert rconv.num_chunks((6, 32, 32, 16)) == 1  # too small to split
    assert rconv.num_chunks((100, 32, 32, 16)) == 10  # largest divisor of 100 <= 12


@pytest.mark.parametrize("chunked", [True, False])
def test_conv_module_is_flax_conv(monkeypatch, chunked):
    monkeypatch.setattr(rconv, "CHUNK_ELEMENTS", 16 * 16 * 4)
    x = _normal((8, 16, 16, 4), 0)
    ours = rconv.Conv(6, (3, 3), strides=2, padding=PAD, feature_group_count=2, chunked=chunked)
    theirs = nn.Conv(6, (3, 3), strides=2, padding=PAD, feature_group_count=2)
    variables = theirs.init(jax.random.key(1), x)
    assert jax.tree.structure(ours.init(jax.random.key(1), x)) == jax.tree.structure(variables)

    def loss(module, v, a):
        return jnp.sum(jnp.tanh(module.apply(v, a)))

    np.testing.assert_allclose(ours.apply(variables, x), theirs.apply(variables, x), rtol=1e-5, atol=1e-5)
    got, want = (jax.grad(loss, argnums=(1, 2))(m, variables, x) for m in (ours, theirs))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4), got, want)


def test_config_switch():
    try:
        rconv.set_chunked_default("off")
        assert not rconv.chunked_default()
        rconv.set_chunked_default("on")
        assert rconv.chunked_default()
    finally:
        rconv.set_chunked_default("auto")
    assert rconv.chunked_default() == (jax.default_backend() == "cpu")
    with pytest.raises(ValueError, match="conv_chunked_wgrad"):
        rconv.set_chunked_default("1")


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_matches_flax(train):
    x = jax.random.normal(jax.random.key(1), (8, 6, 6, 5)) * 3 + 1
    ours = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, unbiased_var=False)
    theirs = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
    assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(theirs.init(jax.random.key(0), x))
    variables = {"params": {"scale": jnp.arange(5.0) + 0.5, "bias": jnp.arange(5.0) * 0.1},
                 "batch_stats": {"mean": jnp.full(5, 0.3), "var": jnp.full(5, 2.0)}}

    def run(module, params, a):
        y, stats = module.apply({**variables, "params": params}, a, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y)), (y, stats)

    def close(a, b):
        """max |a - b| <= 1e-5 * max |b| per array: the gradients are sums over the 288 positions of a channel
        (up to 254 in size), so an elementwise atol would be tight for them and loose for the outputs. Measured
        float32 error: at most 2e-6 * max |b| (the train-mode scale gradient)."""
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), (np.abs(a - b).max(), np.abs(b).max())

    (_, got), got_grad = jax.value_and_grad(run, argnums=(1, 2), has_aux=True)(ours, variables["params"], x)
    (_, want), want_grad = jax.value_and_grad(run, argnums=(1, 2), has_aux=True)(theirs, variables["params"], x)
    jax.tree.map(close, (got, got_grad), (want, want_grad))


@pytest.mark.parametrize("shape", [(8, 1, 1, 5), (4, 3, 5, 6)])
def test_batch_norm_running_stats_match_torch(shape):
    """The default `unbiased_var=True` gives torch.nn.BatchNorm2d's running mean and var (unbiased n/(n-1))
    over five train steps on changing batches, float32, rtol 1e-6; with `unbiased_var=False` the running var
    differs (Flax). Outputs agree in both (same normalization)."""
    torch = pytest.importorskip("torch")
    c = shape[-1]
    rng = np.random.default_rng(0)
    tbn = torch.nn.BatchNorm2d(c, momentum=0.1, eps=1e-5).train()
    variables = BatchNorm(False, momentum=0.9).init(jax.random.key(0), jnp.zeros(shape))
    flax_like = variables
    step = jax.jit(lambda v, x, unbiased: BatchNorm(False, momentum=0.9, unbiased_var=unbiased).apply(
        v, x, mutable=["batch_stats"]), static_argnums=2)
    for _ in range(5):
        x = (rng.normal(size=shape) * rng.uniform(0.5, 3.0, c) + rng.normal(size=c)).astype(np.float32)
        with torch.no_grad():
            want = tbn(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
        y, stats = step(variables, x, True)
        variables = {**variables, **stats}
        flax_like = {**flax_like, **step(flax_like, x, False)[1]}
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(variables["batch_stats"]["mean"], tbn.running_mean.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(variables["batch_stats"]["var"], tbn.running_var.numpy(), rtol=1e-6)
    assert np.max(np.abs(flax_like["batch_stats"]["var"] - tbn.running_var.numpy())) > 1e-3


def test_conv_bn_uses_chunked_conv_on_cpu(monkeypatch):
    monkeypatch.setattr(rconv, "CHUNK_ELEMENTS", 8 * 8 * 3)
    calls = []
    monkeypatch.setattr(rconv, "chunked_conv", lambda *a: calls.append(1) or rconv._conv(*a))
    x = jnp.ones((4, 8, 8, 3))
    model = ConvBN(4)
    model.apply(model.init(jax.random.key(0), x, train=False), x, train=False)
    assert calls if jax.default_backend() == "cpu" else not calls


def test_depthwise_same_conv_goes_through_dwconv(monkeypatch):
    """groups == channels, stride 1, centred padding -> repjax.nn.dwconv (same values and gradients as XLA's
    grouped conv, max error 1e-5 of the scale); a strided or non-depthwise conv does not."""
    from repjax.nn import conv as conv_mod, dwconv

    calls = []
    original = dwconv.depthwise_conv
    monkeypatch.setattr(conv_mod.dwconv, "depthwise_conv", lambda *a: calls.append(1) or original(*a))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 9, 7, 6)), jnp.float32)
    dw = conv_mod.Conv(6, (5, 5), padding=((2, 2), (2, 2)), feature_group_count=6, chunked=False)
    v = dw.init(jax.random.PRNGKey(0), x)

    def ref(v, x):
        return jax.lax.conv_general_dilated(x, v["params"]["kernel"], (1, 1), ((2, 2), (2, 2)), feature_group_count=6,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC")) + v["params"]["bias"]

    def grads(f):
        return jax.grad(lambda v, x: jnp.sum(f(v, x) ** 2), argnums=(0, 1))(v, x)

    np.testing.assert_allclose(dw.apply(v, x), ref(v, x), atol=1e-5)
    g, g_ref = grads(dw.apply), grads(ref)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()))
    assert calls
    calls.clear()
    conv_mod.Conv(6, (3, 3), strides=2, padding=((1, 1), (1, 1)), feature_group_count=6).init(jax.random.PRNGKey(0), x)
    conv_mod.Conv(6, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=3).init(jax.random.PRNGKey(0), x)
    assert not calls
