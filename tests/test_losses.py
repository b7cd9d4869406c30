"""Pluggable losses: the registry, softmax_xent (optax) against the formula, a multi-exit loss through the steps."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from repjax import config as config_lib, losses
from repjax.step import init_state, make_eval_step, make_train_step


def test_softmax_xent_matches_formula_and_config():
    logits = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    labels = jnp.array([0, 2])
    logp = jax.nn.log_softmax(logits)
    eps = 0.1
    want = -((1 - eps) * logp[jnp.arange(2), labels] + eps / 3 * logp.sum(-1))
    cfg = config_lib.defaults().loss
    cfg.label_smoothing = eps
    loss, metrics = losses.from_config(cfg)(logits, {"label": labels})
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    assert metrics == {}
    plain, _ = losses.from_config(cfg, train=False)(logits, {"label": labels})  # evaluation: no smoothing
    np.testing.assert_allclose(plain, -logp[jnp.arange(2), labels], rtol=1e-6)
    with pytest.raises(KeyError, match="Unknown loss 'xent'"):
        losses.get("xent")


@losses.register("test_two_exits", logits=lambda outputs: outputs[-1])
def _two_exits(outputs, batch, weight=0.5):
    per_exit = [losses.softmax_cross_entropy(o, batch["label"]) for o in outputs]
    return weight * per_exit[0] + per_exit[1], {"exit0_loss": per_exit[0], "exit1_loss": per_exit[1]}


class _TwoExits(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        h = nn.Dense(8)(x.reshape(x.shape[0], -1))
        return [nn.Dense(3, name="exit0")(h), nn.Dense(3, name="exit1")(nn.relu(h))]


def test_multi_exit_loss_through_train_and_eval_steps():
    """A registered loss receives the list of exit logits; the step optimizes its mean, logs its metrics and
    computes top-1 on the logits it names; the eval step sums over the unmasked rows."""
    model, tx = _TwoExits(), optax.sgd(0.1)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(6, 2, 2, 1)), jnp.float32), "label": jnp.array([0, 1, 2, 0, 1, 2])}
    state = init_state(model, tx, batch["image"][:1], 0, False)
    loss = losses.get("test_two_exits", weight=0.25)
    _, metrics = jax.jit(make_train_step(model, tx, optax.constant_schedule(0.1), loss))(state, batch)
    outputs = model.apply(state.variables(), batch["image"])
    e0, e1 = (losses.softmax_cross_entropy(o, batch["label"]) for o in outputs)
    np.testing.assert_allclose(metrics["loss"], jnp.mean(0.25 * e0 + e1), rtol=1e-6)
    np.testing.assert_allclose(metrics["exit0_loss"], jnp.mean(e0), rtol=1e-6)
    np.testing.assert_allclose(metrics["top1"], jnp.mean(jnp.argmax(outputs[1], -1) == batch["label"]), rtol=1e-6)
    mask = jnp.array([1, 1, 1, 1, 0, 0], jnp.float32)
    sums = make_eval_step(model, loss)(state.variables(), {**batch, "mask": mask})
    np.testing.assert_allclose(sums["loss"], jnp.sum((0.25 * e0 + e1) * mask), rtol=1e-6)
    np.testing.assert_allclose(sums["exit1_loss"], jnp.sum(e1 * mask), rtol=1e-6)
    assert float(sums["count"]) == 4.0
