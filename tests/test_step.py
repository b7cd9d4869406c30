"""Loss, metrics, schedules and compute dtype of the training step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repjax import config as config_lib, train as train_lib
from repjax.losses import softmax_cross_entropy as cross_entropy
from repjax.metrics import read_metrics
from repjax.optim.schedules import make_schedule
from repjax.step import topk_correct


def test_label_smoothing_matches_formula():
    logits = jnp.array([[2.0, 0.5, -1.0]])
    logp = jax.nn.log_softmax(logits)[0]
    eps = 0.1
    expected = -((1 - eps) * logp[0] + eps / 3 * logp.sum())
    np.testing.assert_allclose(cross_entropy(logits, jnp.array([0]), eps)[0], expected, rtol=1e-6)
    # Soft (mixup) targets are used as given.
    soft = jnp.array([[0.25, 0.75, 0.0]])
    np.testing.assert_allclose(cross_entropy(logits, soft)[0], -(0.25 * logp[0] + 0.75 * logp[1]), rtol=1e-6)


def test_topk_with_ties_counts_lower_index_first():
    logits = jnp.array([[1.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    np.testing.assert_array_equal(topk_correct(logits, jnp.array([1, 1]), 1), [0.0, 0.0])
    np.testing.assert_array_equal(topk_correct(logits, jnp.array([1, 1]), 2), [1.0, 1.0])
    np.testing.assert_array_equal(topk_correct(logits, jnp.array([0, 2]), 1), [1.0, 1.0])


def test_warmup_cosine_schedule():
    s = make_schedule("cosine", 1.0, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.55, rel=1e-5)  # halfway through the cosine: (1 + 0.1) / 2
    assert float(s(110)) == pytest.approx(0.1, rel=1e-5)
    with pytest.raises(ValueError, match="Unknown schedule"):
        make_schedule("step", 1.0, 10)


def test_bfloat16_compute_trains(tmp_path):
    """bf16 compute (parameters stay f32) follows the f32 run's loss closely over a few steps."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        c = config_lib.defaults()
        c.total_steps, c.batch_size, c.log_every_steps, c.dtype = 40, 64, 5, dtype
        train_lib.train(c, tmp_path / dtype)
        losses[dtype] = [r["train/loss"] for r in read_metrics(tmp_path / dtype) if "train/loss" in r]
    assert losses["bfloat16"] != losses["float32"]  # the compute dtype did change the arithmetic
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.05)
    assert losses["bfloat16"][-1] < 1.5  # it learned (chance is ln 10 = 2.30)
