"""Int8 post-training quantization (fake-quant): quantizers, calibration, and models whose int8 accuracy is known
by construction (lossless grids; outliers that flip a known set of examples)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repjax import config as config_lib, data, evals, sharding
from repjax.evals import classification
from repjax.models import small_cnn
from repjax.projects.repopt import quant
from repjax.projects.repopt.quant import evaluator as quantization

# ----------------------------------------------------------------------------------------------------------
# Quantizers


def test_weight_quantizer_per_output_channel():
    rng = np.random.default_rng(0)
    for shape in [(3, 3, 4, 5), (7, 6)]:
        w = rng.normal(size=shape).astype(np.float32) * rng.uniform(0.01, 10, shape[-1]).astype(np.float32)
        w[..., 1] = 0.0  # an all-zero channel
        q, scale = quant.quantize_weight(jnp.asarray(w))
        amax = np.abs(w).reshape(-1, shape[-1]).max(0)
        np.testing.assert_allclose(scale, np.where(amax > 0, amax / 127, 1.0), rtol=1e-7)
        assert q.dtype == jnp.int8 and int(jnp.abs(q).max()) == 127
        assert np.all(np.abs(np.asarray(q)).reshape(-1, shape[-1]).max(0)[amax > 0] == 127)
        wq = np.asarray(quant.fake_quant_weight(jnp.asarray(w)))
        assert np.all(np.abs(w - wq) <= np.asarray(scale) / 2 * (1 + 1e-6))
        assert np.all(wq[..., 1] == 0) and np.all(np.isfinite(wq))
        np.testing.assert_allclose(quant.fake_quant_weight(jnp.asarray(wq)), wq, rtol=1e-6)  # idempotent
        # An outlier in one channel leaves the other channels' grids alone.
        w2 = w.copy()
        w2[..., 0] *= 1000
        wq2 = np.asarray(quant.fake_quant_weight(jnp.asarray(w2)))
        np.testing.assert_array_equal(wq2[..., 1:], wq[..., 1:])


def test_activation_quantizer_affine_and_symmetric():
    qp = quant.act_qparams(0.0, 2.55)  # post-ReLU: zero point 0, all 256 levels
    assert qp.zero_point == 0 and (qp.qmin, qp.qmax) == (0, 255) and qp.scale == pytest.approx(0.01)
    qp = quant.act_qparams(-1.0, 3.0)
    assert (qp.qmin, qp.qmax) == (0, 255) and qp.zero_point == round(1.0 / qp.scale)
    x = jnp.linspace(-1.0, 3.0, 1001)
    xq = quant.fake_quant_act(x, qp)
    assert float(jnp.max(jnp.abs(xq - x))) <= qp.scale / 2 * (1 + 1e-5)
    assert float(quant.fake_quant_act(jnp.zeros(()), qp)) == 0.0  # zero (padding) is exact
    assert float(quant.fake_quant_act(jnp.array(10.0), qp)) == pytest.approx(3.0, abs=qp.scale)  # clipped
    assert quant.act_qparams(0.5, 2.0).zero_point == 0  # range widened to include 0
    sym = quant.act_qparams(-2.0, 1.0, "symmetric")
    assert sym == quant.ActQParams(pytest.approx(2 / 127), 0, -127, 127)
    assert quant.act_qparams(0.0, 0.0).scale == 1.0
    with pytest.raises(ValueError, match="unknown activation"):
        quant.act_qparams(0, 1, "int4")


# ----------------------------------------------------------------------------------------------------------
# Calibration


class ShiftNet(nn.Module):
    """conv3x3 -> ReLU -> flatten -> dense (deploy form: no BN)."""

    classes: int = 3

    @nn.compact
    def __call__(self, x, train=False):
        h = nn.relu(nn.Conv(4, (3, 3), padding="SAME", name="conv")(x))
        return nn.Dense(self.classes, name="head")(h.reshape(h.shape[0], -1))


def _init(model, shape):
    return jax.jit(model.init)(jax.random.key(0), jnp.zeros(shape))


def test_calibrate_records_layer_input_ranges():
    model = ShiftNet()
    variables = _init(model, (1, 6, 6, 2))
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=(4, 6, 6, 2)).astype(np.float32) * s for s in (1.0, 3.0)]
    hidden = [np.maximum(model.apply(variables, b, capture_intermediates=True)[1]["intermediates"]["conv"]
                         ["__call__"][0], 0) for b in batches]
    ranges = quant.calibrate(model, variables, batches)
    assert set(ranges) == {"conv", "head"}
    xs, hs = np.concatenate(batches), np.concatenate(hidden)
    np.testing.assert_allclose(ranges["conv"], (xs.min(), xs.max()), rtol=1e-6)
    np.testing.assert_allclose(ranges["head"], (hs.min(), hs.max()), rtol=1e-6)
    pct = quant.calibrate(model, variables, [{"image": b} for b in batches], method="percentile", percentile=99.0)
    want = np.mean([np.percentile(b, [1.0, 99.0]) for b in batches], axis=0)
    np.testing.assert_allclose(pct["conv"], want, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown calibration"):
        quant.calibrate(model, variables, batches, method="kl")


class Twice(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        dense = nn.Dense(x.shape[-1], name="shared")
        return dense(nn.relu(dense(x)))


def test_repeated_module_calls_get_their_own_ranges():
    model = Twice()
    variables = _init(model, (1, 3))
    x = np.random.default_rng(2).normal(size=(8, 3)).astype(np.float32)
    ranges = quant.calibrate(model, variables, [x])
    assert set(ranges) == {"shared", "shared#1"} and ranges["shared#1"][0] >= 0
    out = quant.quantized_apply(model, variables, ranges, x)
    np.testing.assert_allclose(out, model.apply(variables, x), atol=0.05)
    with pytest.raises(KeyError, match="no calibrated range"):
        quant.quantized_apply(model, variables, {"shared": ranges["shared"]}, x)


# ----------------------------------------------------------------------------------------------------------
# Known int8 accuracy by construction


class _Arrays:
    """In-memory source (uint8 images, int labels)."""

    def __init__(self, images, labels, num_classes):
        self.images, self.labels, self.num_classes = images, labels, num_classes
        self.class_names = [str(i) for i in range(num_classes)]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": int(self.labels[i])}

    def as_arrays(self):
        return self.images, self.labels


def _lossless_shiftnet(rng):
    """ShiftNet whose weights and every layer input sit exactly on their int8 grids.

    Inputs k/256 (k uint8; range [0, 255/256] -> scale 2^-8). Each conv output channel copies one input channel
    at one tap with weight 127*2^-7 (scale 2^-7, q = 127), so its ReLU output is 127k*2^-15, on the grid of
    range [0, 255*127*2^-15] (scale 127*2^-15). Head: integers in [-127, 127] (each column reaching +-127) x 2^-6.
    """
    model = ShiftNet(classes=3)
    variables = _init(model, (1, 6, 6, 2))
    kernel = np.zeros((3, 3, 2, 4), np.float32)
    for o in range(4):
        kernel[rng.integers(3), rng.integers(3), o % 2, o] = 127 * 2.0**-7
    head = rng.integers(-127, 128, (144, 3)).astype(np.float32)
    head[rng.integers(144, size=3), np.arange(3)] = [127, -127, 127]
    params = {"conv": {"kernel": kernel, "bias": np.zeros(4, np.float32)},
              "head": {"kernel": head * 2.0**-6, "bias": rng.normal(size=3).astype(np.float32)}}
    assert jax.tree.structure(params) == jax.tree.structure(variables["params"])
    return model, {"params": jax.tree.map(jnp.asarray, params)}


def test_lossless_construction_is_bit_exact_through_the_evaluator():
    rng = np.random.default_rng(3)
    model, variables = _lossless_shiftnet(rng)
    images = rng.integers(0, 256, (40, 6, 6, 2), dtype=np.uint8)
    images[0, 2:4, 2:4, :] = 255  # the extremes reach every tap of the calibration batch
    pp = "value_range(0, 0.99609375)"  # k -> k * 2^-8 exactly
    x = images.astype(np.float32) / 256
    ranges = quant.calibrate(model, variables, [x[:20]])
    assert ranges["conv"] == (0.0, 255 / 256) and ranges["head"] == (0.0, 255 * 127 * 2.0**-15)
    qparams = quant.quantize_weights(variables["params"])
    chex.assert_trees_all_equal(qparams, variables["params"])
    logits = model.apply(variables, x)
    qlogits = jax.jit(lambda v, x: quant.quantized_apply(model, v, ranges, x))(variables, x)
    np.testing.assert_allclose(qlogits, logits, rtol=1e-6, atol=1e-6)
    # Whole-split int8 evaluation on the mesh (padded last batch): identical accuracy, full agreement.
    labels = rng.integers(0, 3, 40)
    mesh = sharding.make_mesh([("data", -1)])
    got = quantization.evaluate_int8(model, variables, ranges, _Arrays(images, labels, 3), batch_size=24, pp=pp,
                                     mesh=mesh)
    want = float(np.mean(np.argmax(np.asarray(logits), -1) == labels))
    assert got["count"] == 40 and got["agreement"] == 1.0
    assert got["top1"] == got["float_top1"] == pytest.approx(want, abs=1e-12) and got["top1_drop"] == 0.0
    assert got["loss"] == pytest.approx(got["float_loss"], rel=1e-6)


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(2, name="fc")(x)


def _signed_examples(rng, n=64):
    """x = (a, 0) with a = k * 2^-7, k in [-128, 127] (both ends present): on the affine grid of its range."""
    k = rng.integers(-128, 128, n)
    k[:2] = [-128, 127]
    k[k == 0] = 1
    x = np.stack([k * 2.0**-7, np.zeros(n)], 1).astype(np.float32)
    return x, (k > 0).astype(np.int32)  # labels = the float model's predictions


def _linear(kernel):
    bias = np.array([2.0**-9, 0.0], np.float32)  # class 0 wins ties and near-zero logits
    return Linear(), {"params": {"fc": {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.asarray(bias)}}}


def _top1(logits, labels):
    return float(np.mean(np.argmax(np.asarray(logits), -1) == labels))


def test_weight_outlier_in_a_channel_flips_a_known_fraction():
    x, labels = _signed_examples(np.random.default_rng(4))
    ranges = {"fc": (-1.0, 127 / 128)}  # scale 2^-7, zero point 128: inputs quantize exactly
    # Outlier in the other channel: per-channel scales keep class 1's weight 127*2^-7 exact -> no loss.
    model, variables = _linear([[0.0, 127 * 2.0**-7], [127.0, 0.0]])
    assert _top1(model.apply(variables, x), labels) == 1.0
    assert _top1(quant.quantized_apply(model, variables, ranges, x), labels) == 1.0
    # Outlier in class 1's own channel (scale 1): its informative weight 0.3 rounds to 0, its logit becomes 0
    # and every example is predicted class 0: int8 top-1 = fraction of class 0 exactly.
    model, variables = _linear([[0.0, 0.3], [0.0, 127.0]])
    assert _top1(model.apply(variables, x), labels) == 1.0
    assert _top1(quant.quantized_apply(model, variables, ranges, x), labels) == np.mean(labels == 0)


def test_activation_outlier_flips_a_known_fraction_and_percentile_recovers():
    x, labels = _signed_examples(np.random.default_rng(5), n=100)
    model, variables = _linear([[0.0, 127 * 2.0**-7], [0.0, 0.0]])  # feature 1 is ignored by the float model
    calib = x.copy()
    calib[7, 1] = 1000.0  # one outlier: the min/max scale becomes ~3.9, so every |a| < 1 rounds to 0
    assert _top1(model.apply(variables, calib), labels) == 1.0
    minmax = quant.calibrate(model, variables, [calib])
    assert minmax["fc"] == (-1.0, 1000.0)
    assert _top1(quant.quantized_apply(model, variables, minmax, x), labels) == np.mean(labels == 0)
    pct = quant.calibrate(model, variables, [calib], method="percentile", percentile=99.0)
    assert pct["fc"][1] < 1.0
    assert _top1(quant.quantized_apply(model, variables, pct, x), labels) == 1.0


# ----------------------------------------------------------------------------------------------------------
# Evaluator entry


def test_int8_ptq_evaluator_on_digits():
    config = config_lib.defaults()
    config.batch_size = 64
    source = data.get_source(config.data.source, config.data.eval_split)
    model = small_cnn.SmallCNN(num_classes=source.num_classes, width=8)
    image = source[0]["image"]
    variables = jax.jit(model.init, static_argnames="train")(jax.random.key(0), jnp.zeros((1, *image.shape)),
                                                             train=False)
    mesh = sharding.make_mesh(config.mesh)
    got = evals.get("int8_ptq")(model, variables, config, mesh, calib_batches=2, method="percentile")
    ref = classification.evaluate(model, variables, source, batch_size=config.eval_batch_size,
                                  pp=config.data.eval_pp, mesh=mesh)
    assert got["count"] == ref["count"] == len(source)
    assert got["float_top1"] == pytest.approx(ref["top1"], abs=1e-9)
    assert got["float_loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["top1_drop"] == pytest.approx(got["float_top1"] - got["top1"])
    assert 0.0 <= got["agreement"] <= 1.0 and 0.0 <= got["top1"] <= got["top5"] <= 1.0


def test_repvgg_deploy_form_needs_no_model_change():
    from repjax.projects.repopt import repvgg

    train_model, deploy_model = repvgg.repvgg_tiny(), repvgg.repvgg_tiny(deploy=True)
    x = np.random.default_rng(6).normal(size=(4, 16, 16, 3)).astype(np.float32)
    variables = repvgg.reparameterize(jax.jit(train_model.init, static_argnames="train")(
        jax.random.key(0), x[:1], train=False))
    ranges = quant.calibrate(deploy_model, variables, [x])
    blocks = [b.name for b in repvgg.block_specs(deploy_model)]
    assert set(ranges) == {f"{b}/rbr_reparam" for b in blocks} | {"linear"}  # incl. grouped convs
    assert all(ranges[f"{b}/rbr_reparam"][0] >= 0 for b in blocks[1:])  # post-ReLU inputs: zero point 0
    logits = deploy_model.apply(variables, x)
    qlogits = quant.quantized_apply(deploy_model, variables, ranges, x)
    assert float(jnp.linalg.norm(qlogits - logits) / jnp.linalg.norm(logits)) < 0.1
