"""ERF: area ratios on synthetic maps, exact support of a conv stack (both feature paths), NaN skipping, plot,
and the registered evaluator end to end on the digits set."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repjax import config as config_lib, evals, models, sharding
from repjax.evals import erf as erf_lib

SIZE, DEPTH = 17, 3  # 3 stacked 3x3 convs: the centre output sees a 7x7 window


def _positive(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, 0.1, 1.0)


class ConvStack(nn.Module):
    """n 3x3 convs with positive kernels; no `features` argument (the intermediates path)."""

    n: int = DEPTH

    @nn.compact
    def __call__(self, x, train: bool = False):
        for _ in range(self.n):
            x = nn.relu(nn.Conv(4, (3, 3), padding="SAME", kernel_init=_positive)(x))
        return jnp.mean(x, axis=(1, 2))


class ConvStackFeatures(ConvStack):
    """The same stack exposing `features=True` (the stage-list API of the registry's models)."""

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        feats = []
        for _ in range(self.n):
            x = nn.relu(nn.Conv(4, (3, 3), padding="SAME", kernel_init=_positive)(x))
            feats.append(x)
        return feats if features else jnp.mean(x, axis=(1, 2))


def test_area_ratio_delta_and_uniform():
    delta = np.zeros((SIZE, SIZE))
    delta[SIZE // 2, SIZE // 2] = 5.0
    for side, ratio in erf_lib.area_ratios(delta).values():
        assert side == 1 and ratio == pytest.approx(1 / SIZE**2)
    n = 21
    for t, (side, ratio) in erf_lib.area_ratios(np.ones((n, n))).items():
        expected = next(s for s in range(1, n + 1, 2) if s * s >= t * n * n)  # closed form for a uniform map
        assert side == expected and ratio == pytest.approx(expected**2 / n**2)
    assert erf_lib.area_ratios(np.ones((n, n)), (1.0,))[1.0] == (n, 1.0)
    disp = erf_lib.display_map(np.array([[0.0, 9.0], [99.0, 0.0]]))
    np.testing.assert_allclose(disp, [[0, 0.5], [1, 0]])


@pytest.mark.parametrize("cls, feature", [(ConvStack, f"intermediates:Conv_{DEPTH - 1}"),
                                          (ConvStackFeatures, "features[-1]")])
def test_conv_stack_support(cls, feature):
    model = cls()
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, SIZE, SIZE, 3), minval=0.1, maxval=1.0)
    variables = model.init(jax.random.PRNGKey(0), x)
    result = erf_lib.erf_map(model, variables, [x[:1], x[1:]])
    assert result.feature == feature and result.images == 2 and result.skipped == 0
    c, r = SIZE // 2, DEPTH
    inside = np.zeros((SIZE, SIZE), bool)
    inside[c - r:c + r + 1, c - r:c + r + 1] = True
    assert np.all(result.map[inside] > 0) and np.all(result.map[~inside] == 0)  # support exactly (2n+1)^2
    side, ratio = erf_lib.area_ratios(erf_lib.display_map(result.map))[0.99]
    assert side <= 2 * r + 1 and ratio <= ((2 * r + 1) / SIZE) ** 2
    if cls is ConvStackFeatures:  # both paths pick the same tensor
        np.testing.assert_allclose(result.map, erf_lib.erf_map(ConvStack(), variables, [x]).map, rtol=1e-6)


def test_nan_maps_and_padding_are_skipped():
    maps = jnp.stack([jnp.ones((4, 4)), jnp.full((4, 4), jnp.nan), 3 * jnp.ones((4, 4)), 7 * jnp.ones((4, 4))])
    total, count = erf_lib.masked_sum(maps, jnp.array([True, True, True, False]))
    assert int(count) == 2
    np.testing.assert_array_equal(total, 4 * np.ones((4, 4)))
    model = ConvStack()
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, SIZE, SIZE, 3), minval=0.1, maxval=1.0)
    variables = model.init(jax.random.PRNGKey(0), x)
    padded = erf_lib.erf_map(model, variables, [(x, jnp.array([True, False]))])
    np.testing.assert_allclose(padded.map, erf_lib.erf_map(model, variables, [x[:1]]).map, rtol=1e-6)


def test_plot_writes_png(tmp_path):
    path = erf_lib.plot_erf(np.random.default_rng(0).random((9, 9)), tmp_path / "sub" / "erf.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluator_on_digits(tmp_path):
    config = config_lib.defaults()
    model = models.create("small_cnn", num_classes=10, width=4)
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)), train=False))()
    mesh = sharding.make_mesh(config.mesh)
    out = evals.get("erf")(model, variables, config, mesh, image_size=16, num_images=5, save=str(tmp_path / "erf"))
    assert out["images"] + out["skipped"] == 5 and out["feature"] == "intermediates:conv_bn3"
    assert all(0 < out[f"ratio_{t}"] <= 1 for t in erf_lib.THRESHOLDS)
    assert np.load(tmp_path / "erf.npy").shape == (16, 16) and (tmp_path / "erf.png").exists()
