"""Occlusion masks and band-limited noise: closed-form checks, and the evaluators end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repjax import config as config_lib, data, evals, models, sharding
from repjax.projects.lkrobust import frequency as F, inputs, occlusion as O


@pytest.fixture(scope="module")
def setup():
    config = config_lib.defaults()
    config.data.source, config.data.eval_split = "synthetic:28x28x3,10,3", "test"
    config.data.eval_pp = "normalize(imagenet)"
    config.eval_batch_size = 10
    model = models.create("small_cnn", num_classes=3, width=4)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 3)), train=False)
    return config, model, variables, sharding.make_mesh(config.mesh)


def test_random_drop_fraction():
    rng = np.random.default_rng(0)
    for i in range(10):  # 14x14 grid of 2-pixel patches on 28x28: the study's i * 196 // 10 patches
        keep = O.random_keep(14, 14, i / 10, rng)
        m = O.patch_mask(keep[None], 28, 28, 2)
        assert np.sum(~keep) == i * 196 // 10
        assert np.mean(m == 0) == pytest.approx(i * 196 // 10 / 196)


def test_salient_masks_edge_cases_and_minimality():
    sal = np.random.default_rng(1).random((3, 7, 7))
    x = np.random.default_rng(2).random((3, 14, 14, 3)).astype(np.float32) + 0.1
    fg = O.foreground(sal, 1.0)
    assert fg.all()  # lambda = 1: background drop keeps every patch, foreground drop removes every patch
    np.testing.assert_array_equal(x * O.patch_mask(fg, 14, 14, 2)[..., None], x)
    assert np.all(x * O.patch_mask(~fg, 14, 14, 2)[..., None] == 0)
    prev = np.zeros_like(fg)
    for lam in O.SALIENT_LEVELS[:-1]:
        fg = O.foreground(sal, lam)
        assert np.all(fg >= prev)  # nested
        prev = fg
        for b in range(3):
            mass = sal[b][fg[b]].sum() / sal[b].sum()
            smallest = sal[b][fg[b]].min()
            assert mass >= lam - 1e-9 and mass - smallest / sal[b].sum() < lam + 1e-9  # the top-lambda mass, minimal
    pix = np.ones((2, 9, 9))
    np.testing.assert_array_equal(O.patch_saliency(pix, 2, 2, 4), np.full((2, 2, 2), 16.0))  # border not in grid


def test_occlusion_evaluator(setup, tmp_path):
    config, model, variables, mesh = setup
    out = evals.get("occlusion")(model, variables, config, mesh, patch_size=2, save=str(tmp_path / "occ"))
    clean = inputs.Evaluated(model, variables, config, mesh)
    src_acc = evals.get("classification")(model, variables, config, mesh)["top1"]
    assert out["top1/random/0"] == pytest.approx(src_acc)  # nothing dropped = clean
    assert out["top1/non_salient/1"] == pytest.approx(src_acc)  # lambda = 1 background drop keeps all
    _, labels = inputs.load(data.get_source(config.data.source, "test"), range(10), "")
    black = clean.accuracy(np.zeros((10, 28, 28, 3), np.float32), labels)  # black in pixel space, then normalised
    assert out["top1/salient/1"] == pytest.approx(black)  # lambda = 1 foreground drop removes every patch
    assert out["patches"] == 196 and (tmp_path / "occ.png").exists()
    with pytest.raises(NotImplementedError, match="attention"):
        evals.get("occlusion")(model, variables, config, mesh, modes=("salient",), saliency="attention")


def test_band_mask_partition_and_noise_in_band():
    h, w, width = 24, 20, 0.1 * np.pi
    total = sum(F.band_mask(h, w, (i + 0.5) * width, width).astype(int) for i in range(10))
    np.testing.assert_array_equal(total, np.ones((h, w), int))  # bands tile [0, pi] exactly once
    assert F.band_mask(h, w, 0.0, width)[0, 0]  # f = 0 holds the DC component
    nyq = F.band_mask(h, w, np.pi, width)
    assert nyq[h // 2, 0] and nyq[0, w // 2] and not nyq[0, 0]  # f = pi holds the Nyquist components
    for f in (0.0, 0.3 * np.pi, np.pi):
        mask = F.band_mask(h, w, f, width)
        np.testing.assert_array_equal(mask, np.roll(mask[::-1, ::-1], (1, 1), (0, 1)))  # k -> -k symmetric
        rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
        noise = F.band_noise((2, h, w, 3), f, width, 0.1, rng_a)
        spec = np.fft.fft2(noise.astype(np.float64), axes=(1, 2))
        energy = np.abs(spec) ** 2
        assert energy[:, ~mask].sum() <= 1e-8 * energy.sum()  # the noise energy lies in its band
        delta = np.fft.fft2(0.1 * np.sign(rng_b.standard_normal((2, h, w, 3))), axes=(1, 2))
        kept = mask[None, :, :, None] & (np.abs(delta) > 1e-6)
        np.testing.assert_allclose(np.angle(spec[kept] / delta[kept]), 0, atol=1e-4)  # phase kept
        np.testing.assert_allclose(np.abs(spec[kept]), np.abs(delta[kept]), rtol=1e-4)  # amplitude kept
    rms = F.band_noise((1, h, w, 3), 0.5 * np.pi, width, 0.05, np.random.default_rng(0), scale="rms")
    assert np.sqrt(np.mean(rms.astype(np.float64) ** 2)) == pytest.approx(0.05, rel=1e-4)


def test_pass_filters_and_basis():
    x = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(F.pass_filter(x, np.pi, "low"), x, atol=1e-6)
    np.testing.assert_allclose(F.pass_filter(x, 0.0, "high"), x, atol=1e-6)
    low = F.pass_filter(x, 0.0, "low")  # only DC: the per-channel mean
    np.testing.assert_allclose(low, np.broadcast_to(x.mean((1, 2), keepdims=True), x.shape), atol=1e-6)
    u = F.fourier_basis(16, 16, 3, -5)
    assert np.linalg.norm(u) == pytest.approx(1.0)
    spec = np.abs(np.fft.fft2(u))
    assert spec[3, -5] > 0.1 and spec[-3, 5] > 0.1 and spec.sum() == pytest.approx(spec[3, -5] + spec[-3, 5])


def test_frequency_evaluators(setup, tmp_path):
    config, model, variables, mesh = setup
    run = evals.get("frequency_noise")
    out = run(model, variables, config, mesh, amplitude=0.0, centres=(0.0, np.pi))
    assert out["drop/0.00"] == 0 and out["drop/1.00"] == 0  # zero amplitude = clean
    out = run(model, variables, config, mesh, amplitude=0.5, save=str(tmp_path / "noise"))
    assert len([k for k in out if k.startswith("top1/")]) == 11 and (tmp_path / "noise.png").exists()
    filt = evals.get("frequency_filter")(model, variables, config, mesh, save=str(tmp_path / "filt"))
    assert filt["lowpass/1.00"] == pytest.approx(filt["clean_top1"])
    heat = evals.get("fourier_heatmap")(model, variables, config, mesh, points=3, save=str(tmp_path / "heat"))
    assert np.load(tmp_path / "heat.npy").shape == (3, 5) and 0 <= heat["mean_error"] <= 1
