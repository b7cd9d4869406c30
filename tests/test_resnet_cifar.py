"""CIFAR ResNet and SmallCNN: registry, parameter counts, shapes/dtypes, BN train vs eval, option-A shortcut."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repjax.models import MODELS, resnet_cifar, small_cnn

# Exact trainable-parameter counts (conv + BN affine + linear), as in the paper's table (0.27M ... 1.7M).
PARAM_COUNTS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}


def _abstract(model, shape=(1, 32, 32, 3)):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _random(abstract, seed=0):
    """Random values of `abstract`'s shapes and dtypes, drawn with numpy (no init: it would compile a random
    kernel per shape): kernels N(0, 1/fan_in), BN scales and variances U(0.5, 1.5), biases and means N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = str(getattr(path[-1], "key", path[-1])), leaf.shape
        if len(shape) >= 2:
            x = rng.normal(size=shape) / np.sqrt(int(np.prod(shape[:-1])))
        elif name in ("scale", "var"):
            x = rng.uniform(0.5, 1.5, shape)
        else:
            x = rng.normal(size=shape) * 0.1
        return jnp.asarray(x, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _normal(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("depth", sorted(PARAM_COUNTS))
def test_registered_and_param_counts(depth):
    variables = _abstract(MODELS.get(f"resnet{depth}")())
    assert _count(variables["params"]) == PARAM_COUNTS[depth]
    # batch_stats: mean and var for every BN (2 per block + stem), i.e. 2x the BN affine params.
    assert set(variables) == {"params", "batch_stats"}


def test_paper_param_counts_rounded():
    assert round(PARAM_COUNTS[20] / 1e6, 2) == 0.27
    assert round(PARAM_COUNTS[56] / 1e6, 2) == 0.85


def test_width_and_num_classes():
    v = _abstract(resnet_cifar.resnet20(width=2, num_classes=100))
    assert v["params"]["stage3_block0"]["conv_bn1"]["conv"]["kernel"].shape == (3, 3, 64, 128)
    assert v["params"]["head"]["kernel"].shape == (128, 100)


def test_bad_depth():
    with pytest.raises(ValueError, match="6n"):
        _abstract(resnet_cifar.ResNetCifar(depth=21))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_shapes_and_dtype(dtype):
    model = resnet_cifar.ResNetCifar(depth=8, num_classes=7, dtype=dtype)
    x = _normal((2, 32, 32, 3))
    abstract = _abstract(model, x.shape)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(abstract))  # params stay float32
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(_random(abstract), x)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


def test_bn_train_vs_eval():
    model = resnet_cifar.ResNetCifar(depth=8)
    x = _normal((4, 32, 32, 3)) * 3 + 1
    variables = _random(_abstract(model, x.shape))
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    old, new = variables["batch_stats"]["stem"]["bn"], updates["batch_stats"]["stem"]["bn"]
    assert not np.allclose(old["mean"], new["mean"])  # train mode updates running statistics
    # Train mode normalises with batch statistics: an example's logits depend on the rest of the batch.
    solo = model.apply(variables, x[:1], train=True, mutable=["batch_stats"])[0]
    assert not np.allclose(logits[:1], solo, atol=1e-4)
    # Eval mode uses running statistics: per-example outputs, nothing mutated.
    full, one = model.apply(variables, x, train=False), model.apply(variables, x[:1], train=False)
    np.testing.assert_allclose(full[:1], one, rtol=1e-5, atol=1e-5)


def test_option_a_shortcut():
    x = _normal((2, 32, 32, 16), seed=0)
    y = resnet_cifar.shortcut_a(x, 32, 2)
    assert y.shape == (2, 16, 16, 32)
    np.testing.assert_array_equal(y[..., :8], 0)
    np.testing.assert_array_equal(y[..., 24:], 0)
    np.testing.assert_array_equal(y[..., 8:24], x[:, ::2, ::2, :])
    assert resnet_cifar.shortcut_a(x, 16, 1) is x
    # Odd spatial size: subsampling keeps ceil(n / 2), like the stride-2 3x3 conv with padding 1.
    assert resnet_cifar.shortcut_a(jnp.zeros((1, 7, 7, 4)), 8, 2).shape == (1, 4, 4, 8)


def test_block_shapes():
    model = resnet_cifar.ResNetCifar(depth=8)
    x = jnp.zeros((1, 30, 30, 3))
    shapes = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, train=False))
    assert shapes[0].shape == (1, 10)


@pytest.mark.parametrize("shape", [(3, 8, 8, 1), (2, 32, 32, 3)])
def test_small_cnn(shape):
    model = MODELS.get("small_cnn")(num_classes=10)
    assert isinstance(model, small_cnn.SmallCNN)
    x = _normal(shape, seed=0)
    variables = _random(_abstract(model, shape), seed=1)
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (shape[0], 10) and logits.dtype == jnp.float32
    assert set(updates) == {"batch_stats"}
