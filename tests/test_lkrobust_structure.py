"""Kernel attention distance (closed forms, un-merged kernels of the pelk families), feature-map variance and
lesion through method interception (identity replacement is exact)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repjax import config as config_lib, evals, models, sharding
from repjax.projects import import_all
from repjax.projects.lkrobust import inputs, structure as S

import_all()
KW = dict(depths=(1, 1, 2, 1), num_classes=3)


def _init(name, **kw):
    """The model and random variables of its shapes, drawn with numpy (running `init` costs a compile or an
    op-by-op dispatch of every initializer): kernels N(0, 1/fan_in), biases and means N(0, 0.1^2), scales,
    layer-scale gammas and variances U(0.5, 1.5)."""
    model = models.create(name, **{**KW, **kw})
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name, shape = str(getattr(path[-1], "key", path[-1])), leaf.shape
        if len(shape) >= 2:
            x = rng.normal(size=shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
        elif name in ("bias", "mean"):
            x = rng.normal(size=shape) * 0.1
        else:
            x = rng.uniform(0.5, 1.5, shape)
        return jnp.asarray(x, leaf.dtype)

    return model, jax.tree_util.tree_map_with_path(draw, abstract)


def _normal(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_distance_closed_forms():
    delta = np.zeros((7, 7, 1, 2))
    delta[3, 3] = [1.0, -4.0]
    np.testing.assert_array_equal(S.attention_distance(delta), 0)  # a centre delta has distance 0
    np.testing.assert_array_equal(S.attention_distance(delta, normalized=True), 0)
    ones = np.ones((3, 3, 1, 1))  # 4 edge taps at 1, 4 corners at sqrt 2, R = 1
    assert S.attention_distance(ones)[0] == pytest.approx((4 + 4 * np.sqrt(2)) / np.sqrt(2))
    assert S.attention_distance(ones, normalized=True)[0] == pytest.approx((4 + 4 * np.sqrt(2)) / np.sqrt(2) / 9)
    corners = np.zeros((5, 5, 1, 1))
    corners[0, 0] = corners[4, 4] = 2.0
    assert S.attention_distance(corners, normalized=True)[0] == pytest.approx(1.0)
    assert S.block_id("stages_2_3") == (2, 3) and S.block_id("stage3_block0") == (2, 0)
    assert S.block_id("blocks_4") == (0, 4) and S.block_id("mixer") is None


@pytest.mark.parametrize("name", ["convnext_cifar", "slak_cifar", "pelk_cifar", "replknet_cifar"])
def test_large_kernels_of_each_family(name):
    kw = dict(depths=(1, 1, 1, 1)) if name == "replknet_cifar" else {}
    model = models.create(name, **{**KW, **kw})
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    params = jax.tree.map(lambda a: np.ones(a.shape, a.dtype), shapes["params"])  # only shapes matter here
    kernels = S.large_kernels(model, params)
    assert kernels and all(k.shape[0] == k.shape[1] and k.shape[0] % 2 for k in kernels.values())
    assert all(np.all(S.attention_distance(k, normalized=True) > 0) for k in kernels.values())
    # centre deltas in the un-merged weights give distance 0 (theta's centre cell is 1x1)
    params = flax.traverse_util.flatten_dict(params)
    for path, v in params.items():
        if path[-1] in ("kernel", "theta") and len(path) > 1 and path[-2] in ("lk", "lk_h", "lk_w", "mixer"):
            z = np.zeros_like(v)
            z[v.shape[0] // 2, v.shape[1] // 2] = 1.0
            params[path] = z
    kernels = S.large_kernels(model, flax.traverse_util.unflatten_dict(params))
    assert all(np.all(S.attention_distance(k) == 0) for k in kernels.values())


@pytest.fixture(scope="module")
def setup():
    config = config_lib.defaults()
    config.data.source, config.data.eval_split = "synthetic:32x32x3,12,3", "test"
    config.data.eval_pp = "normalize(imagenet)"
    config.eval_batch_size = 12
    model, variables = _init("convnext_cifar", dims=(8, 16, 16, 32))
    return config, model, variables, sharding.make_mesh(config.mesh)


def test_feature_variance_matches_captured_outputs(setup):
    _, model, variables, _ = setup
    x = _normal((4, 32, 32, 3))
    names, var = S.feature_variances(model, variables, x)
    assert names == ["stages_0_0", "stages_1_0", "stages_2_0", "stages_2_1", "stages_3_0"]
    _, state = model.apply(variables, x, train=False, capture_intermediates=True, mutable=["intermediates"])
    out = state["intermediates"]["stages_2_1"]["__call__"][0]
    mean = np.asarray(out).mean(0).reshape(-1, out.shape[-1])
    assert float(var[3]) == pytest.approx(float(mean.var(0).mean()), rel=1e-5)


def test_lesion_identity_is_exact(setup):
    _, model, variables, _ = setup
    x = _normal((2, 32, 32, 3))
    blocks = S.feature_variances_names(model, variables, x)
    ref = model.apply(variables, x, train=False)  # eager like lesioned_logits here: bitwise comparable
    none = S.lesioned_logits(model, variables, x, jnp.zeros(len(blocks), bool), blocks)
    np.testing.assert_array_equal(none, ref)
    params = jax.tree.map(np.asarray, variables["params"])
    params["stages_2_0"]["gamma"] = np.zeros_like(params["stages_2_0"]["gamma"])  # an exact identity block
    params["stages_2_1"]["gamma"] = np.ones_like(params["stages_2_1"]["gamma"])
    v = {**variables, "params": params}
    base = model.apply(v, x, train=False)
    drop0 = jnp.array([b == "stages_2_0" for b in blocks])
    np.testing.assert_allclose(S.lesioned_logits(model, v, x, drop0, blocks), base, rtol=1e-6, atol=1e-6)
    drop1 = jnp.array([b == "stages_2_1" for b in blocks])
    assert not np.allclose(S.lesioned_logits(model, v, x, drop1, blocks), base, atol=1e-4)


def test_lesion_keeps_blocks_that_change_shape(setup):
    """ResNet-8 (one block per stage): the first block of stages 1 and 2 downsamples, so only stage 0's block
    can be replaced by the identity; asking for stage 1 is a clear error, not a broadcasting failure."""
    config, _, _, mesh = setup
    model = models.create("resnet8", num_classes=3)
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))()
    x = _normal((1, 32, 32, 3))
    assert S.feature_variances_names(model, variables, x) == ["stage1_block0", "stage2_block0", "stage3_block0"]
    assert S.shape_preserving_blocks(model, variables, x) == ["stage1_block0"]
    assert evals.get("lesion")(model, variables, config, mesh, stage=0, draws=1)["units"] == 1
    with pytest.raises(ValueError, match=r"no shape-preserving blocks in stage 1 \(stages with some: \[0\]\)"):
        evals.get("lesion")(model, variables, config, mesh, stage=1)


def test_structure_evaluators(setup, tmp_path):
    config, model, variables, mesh = setup
    clean = evals.get("classification")(model, variables, config, mesh)["top1"]
    out = evals.get("lesion")(model, variables, config, mesh, draws=3, save=str(tmp_path / "lesion"))
    assert out["units"] == 2 and out["top1/0"] == pytest.approx(clean) and (tmp_path / "lesion.png").exists()
    with pytest.raises(ValueError, match="no shape-preserving blocks in stage 7"):
        evals.get("lesion")(model, variables, config, mesh, stage=7)
    fv = evals.get("feature_variance")(model, variables, config, mesh, batches=2, batch=4, save=str(tmp_path / "fv"))
    assert len(fv) == 5 and all(v >= 0 for v in fv.values())
    ka = evals.get("kernel_attention")(model, variables, config, mesh, save=str(tmp_path / "ka"))
    assert 0 < ka["distance_norm"] < 1 and (tmp_path / "ka.png").exists() and (tmp_path / "ka_norm.png").exists()
    assert inputs.affine("normalize(imagenet)")[0][0] == pytest.approx(1 / 0.229)
