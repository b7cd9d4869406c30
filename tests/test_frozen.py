"""Freezing through the optimizer's rules: no update, no optimizer state, no gradient of frozen leaves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repjax import config as config_lib, models, optim
from repjax.models import vit
from repjax.nn import petl
from repjax.step import TrainState, make_train_step, trainable_grad


@pytest.fixture(scope="module")
def setup():
    """ViT test model with an adapter host on an initialised backbone, AdamW with the adapter rules (one set-up
    for both tests: nothing here is mutated)."""
    model = models.create("vit_test", petl=dict(kind="adapter"))
    backbone = models.create("vit_test")
    bv = jax.jit(lambda: backbone.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))()
    params = vit.attach_backbone(bv, model, rng=1)["params"]
    cfg = config_lib.defaults().optim
    cfg.name, cfg.lr, cfg.weight_decay, cfg.rules = "adamw", 1e-2, 0.05, petl.optim_rules("adapter")
    tx, schedule = optim.build(cfg, params, total_steps=10)
    mask = optim.trainable_mask(params, cfg.rules)
    image = np.random.default_rng(2).normal(size=(4, 16, 16, 3)).astype(np.float32)
    batch = {"image": jnp.asarray(image), "label": jnp.array([0, 1, 2, 3])}
    return model, params, tx, schedule, mask, batch


def test_trainable_grad_equals_full_gradient_on_trainable_leaves(setup):
    model, params, _, _, mask, batch = setup

    def loss(p):
        return jnp.mean(model.apply({"params": p}, batch["image"]) ** 2), 1.0

    (v_full, _), g_full = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    (v_sub, aux), g_sub = jax.jit(lambda p: trainable_grad(loss, p, mask, has_aux=True))(params)
    assert aux == 1.0 and np.isclose(v_full, v_sub, rtol=1e-6)
    for gf, gs, m in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_sub), jax.tree.leaves(mask)):
        np.testing.assert_allclose(gs, gf if m else np.zeros_like(gf), rtol=1e-5, atol=1e-7)
    assert any(np.abs(gf).max() > 0 for gf, m in zip(jax.tree.leaves(g_full), jax.tree.leaves(mask)) if not m)


def test_frozen_step_equals_full_gradient_step_and_keeps_backbone_bitwise(setup):
    model, params, tx, schedule, mask, batch = setup
    opt_state = tx.init(params)
    # Optimizer state exists only for the trainable leaves (the adapters and the classifier).
    state_size = sum(x.size for x in jax.tree.leaves(opt_state) if hasattr(x, "size") and x.ndim)
    trainable_size = sum(p.size for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m)
    assert state_size == 2 * trainable_size  # Adam's two moments
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={}, opt_state=opt_state,
                       ema_params=None, rng=jax.random.key_data(jax.random.key(0)))
    full, sub = state, state
    step_full = jax.jit(make_train_step(model, tx, schedule))
    step_sub = jax.jit(make_train_step(model, tx, schedule, trainable=mask))
    for _ in range(3):
        full, mf = step_full(full, batch)
        sub, ms = step_sub(sub, batch)
        np.testing.assert_allclose(ms["loss"], mf["loss"], rtol=1e-6)
    for a, b, p0, m in zip(jax.tree.leaves(sub.params), jax.tree.leaves(full.params), jax.tree.leaves(params),
                           jax.tree.leaves(mask)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        if not m:
            np.testing.assert_array_equal(a, p0)  # frozen: bitwise unchanged
    moved = [not np.array_equal(a, p0) for a, p0, m in zip(jax.tree.leaves(sub.params), jax.tree.leaves(params),
                                                           jax.tree.leaves(mask)) if m]
    assert all(moved)
