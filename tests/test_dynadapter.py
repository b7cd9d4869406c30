"""Dyn-Adapter: exit wiring, loss schedule, bidirectional sparsity, early-exit policy and FLOPs (spec §7).

A toy staged backbone (the protocol of `repjax.projects.dynadapter.exits`) keeps these fast; the real ViT is
checked in `tests/test_dynadapter_vit.py`.
"""

from __future__ import annotations

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest

from repjax import optim
from repjax.projects.dynadapter import early_exit as ee, flops
from repjax.projects.dynadapter.exits import MultiExit, exit_blocks, head_kinds, head_macs, stage_petl
from repjax.projects.dynadapter.loss import exit_weights, multi_exit_loss
from repjax.projects.dynadapter.sparsity import gradient_gate, random_grad_mask, stage_rates


class Toy(nn.Module):
    """Pixels as tokens (plus a CLS token: their mean), residual tanh blocks with per-block dropout, linear head."""

    depth: int = 6
    num_classes: int = 5
    width: int = 8
    rates: tuple[float, ...] = ()

    def setup(self):
        self.proj = nn.Dense(self.width)
        self.blocks = [nn.Dense(self.width) for _ in range(self.depth)]
        self.drops = [nn.Dropout(self.rates[i] if self.rates else 0.0) for i in range(self.depth)]
        self.norm = nn.LayerNorm()
        self.classifier = nn.Dense(self.num_classes)

    def embed(self, x, train=False):
        t = self.proj(x.reshape(x.shape[0], -1, x.shape[-1]))
        return jnp.concatenate([jnp.mean(t, axis=1, keepdims=True), t], axis=1)

    def block(self, i, x, train=False):
        return x + self.drops[i](jnp.tanh(self.blocks[i](x)), deterministic=not train)

    def head(self, x, train=False):
        return self.classifier(self.norm(x)[:, 0])

    def __call__(self, x, train=False):
        x = self.embed(x, train)
        for i in range(self.depth):
            x = self.block(i, x, train)
        return self.head(x, train)


def _model(**kw):
    return MultiExit(Toy(**kw.pop("toy", {})), num_classes=5, interval=2, **kw)


X = jnp.asarray(np.random.default_rng(1).normal(size=(16, 4, 4, 3)), jnp.float32)
Y = jnp.arange(16) % 5


def _init(model):
    v = jax.jit(model.init)({"params": jax.random.key(0), "dropout": jax.random.key(0)}, X)
    # non-zero exit heads (they are zero-initialised) so that the logits say something; numpy noise: no
    # per-shape JAX random compiles
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda a: a + np.float32(0.3) * rng.normal(size=a.shape).astype(np.float32), v)


# ------------------------------------------------------------------ exits


def test_exit_wiring_and_balanced_heads():
    assert exit_blocks(12, 3) == (3, 6, 9, 12) and exit_blocks(12, 4) == (4, 8, 12)
    with pytest.raises(ValueError, match="divide the depth"):
        exit_blocks(12, 5)
    assert head_kinds(4) == ("mlp", "mlp", "linear", "backbone")
    assert head_kinds(3, mlp_exits=1, last_exit="own") == ("mlp", "linear", "linear")
    model = _model()
    v = _init(model)
    assert set(v["params"]) == {"backbone", "exit_1", "exit_2"}  # the third exit is the backbone's head
    assert "fc1" in v["params"]["exit_1"] and "fc1" not in v["params"]["exit_2"]
    outs = jax.jit(model.apply)(v, X)
    assert len(outs) == 3 and all(o.shape == (16, 5) for o in outs)
    # every exit sees the tokens after its block: rebuild by hand from the backbone's methods
    bb, bv = Toy(), {"params": v["params"]["backbone"]}

    @jax.jit
    def by_hand(v, x):
        t = bb.apply(bv, x, method=bb.embed)
        for i in range(2):
            t = bb.apply(bv, i, t, method=bb.block)
        return model.apply(v, t, method=lambda m, t: m.heads[0](t)), bb.apply(bv, x), \
            model.apply(v, x, method=model.final)

    head, host, final = by_hand(v, X)
    np.testing.assert_allclose(outs[0], head, rtol=1e-6)
    np.testing.assert_allclose(outs[-1], host, rtol=1e-6)  # last exit = the host's forward
    np.testing.assert_allclose(outs[-1], final, rtol=1e-6)


def test_head_macs_and_pooling():
    assert head_macs("mlp", 768, 50, 64) == 768 * 64 + 64 * 50
    assert head_macs("linear", 768, 50) == 768 * 50
    gap = _model(pool="gap")
    v = _init(gap)
    assert gap.apply(v, X)[0].shape == (16, 5)


# ------------------------------------------------------------------ loss


def test_exit_weight_schedules():
    lam = exit_weights(0, 4, schedule="linear", total_steps=100, normalize="none")
    np.testing.assert_allclose(lam, [1, 1, 1, 1])
    lam = exit_weights(100, 4, schedule="linear", total_steps=100, normalize="none")
    np.testing.assert_allclose(lam, [0.25, 0.5, 0.75, 1.0])
    lam = exit_weights(50, 2, schedule="cosine", total_steps=100, start=(1, 0), end=(0, 1), normalize="none")
    np.testing.assert_allclose(lam, [0.5, 0.5], atol=1e-6)
    lam = exit_weights(25, 2, schedule="cosine", total_steps=100, start=(1, 0), end=(0, 1), normalize="none")
    np.testing.assert_allclose(lam, [0.5 + 0.5 * math.cos(math.pi / 4), 0.5 - 0.5 * math.cos(math.pi / 4)],
                               atol=1e-6)
    for step in (0, 37, 100, 1000):
        assert float(jnp.sum(exit_weights(step, 4, total_steps=100))) == pytest.approx(4.0)
        assert float(jnp.sum(exit_weights(step, 4, total_steps=100, normalize="sum_1"))) == pytest.approx(1.0)
    np.testing.assert_allclose(exit_weights(70, 3, schedule="constant", total_steps=100), [1, 1, 1])
    with pytest.raises(ValueError, match="schedule"):
        exit_weights(0, 3, schedule="step")
    with pytest.raises(ValueError, match="3 entries for 4 exits"):
        exit_weights(0, 4, start=(1, 1, 1))


def test_constant_weights_give_plain_multi_exit_training():
    outs = [jax.random.normal(jax.random.key(i), (16, 5)) for i in range(3)]
    loss, metrics = multi_exit_loss(outs, {"label": Y}, step=7, schedule="constant", total_steps=10)
    plain = sum(optax.softmax_cross_entropy_with_integer_labels(o, Y).mean() for o in outs)
    assert float(loss) == pytest.approx(float(plain), rel=1e-6)
    assert {"lambda_1", "lambda_3", "loss_exit_2", "top1_exit_3", "top1", "loss"} <= set(metrics)
    _, m = multi_exit_loss(outs, {"label": Y}, step=10, schedule="linear", total_steps=10, normalize="none")
    assert float(m["lambda_1"]) == pytest.approx(1 / 3)  # logged value = the schedule's


def test_multi_exit_is_a_registered_loss():
    from repjax import losses

    outs = [jax.random.normal(jax.random.key(i), (16, 5)) for i in range(3)]
    loss = losses.get("multi_exit", schedule="linear", total_steps=10)
    per_example, metrics = loss(outs, {"label": Y, "step": jnp.asarray(5)})
    mean, ref = multi_exit_loss(outs, {"label": Y}, step=5, schedule="linear", total_steps=10)
    assert per_example.shape == (16,) and float(jnp.mean(per_example)) == pytest.approx(float(mean), rel=1e-6)
    assert float(jnp.mean(metrics["lambda_2"])) == pytest.approx(float(ref["lambda_2"]))
    np.testing.assert_array_equal(loss.logits(outs), outs[-1])


# ------------------------------------------------------------------ forward sparsity


def test_stage_dropout_per_block_and_only_in_training():
    assert stage_rates(4) == pytest.approx((0.3, 0.2333333, 0.1666667, 0.1))
    spec = stage_petl({"kind": "adapter", "dim": 8}, depth=6, interval=2, rates=(0.5, 0.2, 0.0))
    assert spec["dropout"] == (0.5, 0.5, 0.2, 0.2, 0.0, 0.0)
    with pytest.raises(ValueError, match="2 rates for 3 stages"):
        stage_petl({"kind": "lora"}, 6, 2, rates=(0.1, 0.1))
    model = _model(toy=dict(rates=spec["dropout"]))
    v = _init(model)
    rngs = {"dropout": jax.random.key(3)}
    apply = jax.jit(lambda v, train, rngs: model.apply(v, X, train=train, rngs=rngs), static_argnums=1)
    train = apply(v, True, rngs)
    evals = [apply(v, False, {}) for _ in range(2)]
    assert not np.allclose(train[0], evals[0][0])  # stage 1 drops in training
    np.testing.assert_array_equal(evals[0][0], evals[1][0])  # evaluation is deterministic
    # stage 3 has rate 0: with the earlier stages detached from randomness it would be exact; here check that
    # a model whose rates are all zero is unchanged by train=True
    plain = _model()
    pv = _init(plain)
    both = jax.jit(lambda v: (plain.apply(v, X, train=True, rngs=rngs), plain.apply(v, X)))(pv)
    for a, b in zip(*both, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


# ------------------------------------------------------------------ backward sparsity: optax transform

PARAMS = {"a": jnp.ones((64, 64)), "b": {"c": jnp.ones((1000,))}}


def _grads(seed=0):
    return jax.tree.map(lambda p: jax.random.normal(jax.random.key(seed), p.shape), PARAMS)


def test_grad_mask_identity_at_p1_and_keep_rate():
    g = _grads()
    tx = random_grad_mask(1.0)
    out, _ = tx.update(g, tx.init(PARAMS))
    jax.tree.map(np.testing.assert_array_equal, out, g)
    tx = random_grad_mask(0.3, levels=[("^b/", 0.8)])
    out, _ = jax.jit(tx.update)(g, tx.init(PARAMS))
    keep_a = float(jnp.mean(out["a"] != 0))
    keep_b = float(jnp.mean(out["b"]["c"] != 0))
    assert abs(keep_a - 0.3) < 0.03 and abs(keep_b - 0.8) < 0.04  # 4096 and 1000 draws: > 3 sigma
    kept = out["a"] != 0
    np.testing.assert_allclose(out["a"][kept], g["a"][kept] / 0.3, rtol=1e-6)  # 1/p rescaling
    no_rescale = random_grad_mask(0.3, rescale=False)
    out2, _ = no_rescale.update(g, no_rescale.init(PARAMS))
    np.testing.assert_array_equal(out2["a"] != 0, kept)  # same key: same mask
    np.testing.assert_allclose(out2["a"][kept], g["a"][kept], rtol=0)


def test_grad_mask_is_unbiased_and_tensor_granularity():
    g = {"w": jnp.full((20_000,), 2.0)}
    tx = random_grad_mask(0.25)
    state = tx.init(g)
    total = jnp.zeros(20_000)
    for _ in range(8):
        out, state = tx.update(g, state)
        total = total + out["w"]
    assert float(jnp.mean(total / 8)) == pytest.approx(2.0, rel=0.02)  # E[m g / p] = g
    tx = random_grad_mask(0.5, granularity="tensor")
    state = tx.init(g)
    outs = []
    for _ in range(20):
        out, state = tx.update(g, state)
        outs.append(np.unique(np.asarray(out["w"])))
    assert all(len(u) == 1 and u[0] in (0.0, 4.0) for u in outs) and len({float(u[0]) for u in outs}) == 2


def test_grad_mask_deterministic_and_resumes_bitwise():
    tx = optax.chain(random_grad_mask(0.5, seed=3), optax.adam(1e-2))
    step = jax.jit(tx.update)

    def run(state, params, steps, offset):
        for i in range(steps):
            upd, state = step(_grads(offset + i), state, params)
            params = optax.apply_updates(params, upd)
        return params, state

    full, _ = run(tx.init(PARAMS), PARAMS, 4, 0)
    half, state = run(tx.init(PARAMS), PARAMS, 2, 0)
    restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state)  # what a checkpoint round trip gives
    resumed, _ = run(restored, half, 2, 2)
    jax.tree.map(np.testing.assert_array_equal, full, resumed)
    again, _ = run(tx.init(PARAMS), PARAMS, 4, 0)
    jax.tree.map(np.testing.assert_array_equal, full, again)
    other, _ = run(optax.chain(random_grad_mask(0.5, seed=4), optax.adam(1e-2)).init(PARAMS), PARAMS, 4, 0)
    assert not np.array_equal(full["a"], other["a"])


def test_grad_mask_before_adam_moments_differs_from_masking_updates():
    g = _grads()
    before = optax.chain(random_grad_mask(0.5), optax.scale_by_adam())
    after = optax.chain(optax.scale_by_adam(), random_grad_mask(0.5))
    ub, sb = before.update(g, before.init(PARAMS))
    ua, sa = after.update(g, after.init(PARAMS))
    dropped = ub["a"] == 0
    np.testing.assert_array_equal(dropped, ua["a"] == 0)  # same mask, same step
    # before the moments: the dropped entries never reached Adam (nu = 0); after: Adam saw the full gradient
    assert float(jnp.max(jnp.abs(sb[1].nu["a"][dropped]))) == 0.0
    assert float(jnp.min(jnp.abs(sa[0].nu["a"][dropped]))) > 0.0
    # next step: with the mask before Adam, a dropped-then-kept entry still moves through mu (expected effect)
    ub2, _ = before.update(g, sb)
    assert float(jnp.mean(ub2["a"] != 0)) > 0.5


def test_grad_mask_registered_and_touches_only_trainable_leaves():
    cfg = mlc.ConfigDict(dict(name="adamw", lr=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=0.0,
                              warmup_steps=0, schedule="constant", min_lr_ratio=0.0, momentum=0.9,
                              nesterov=False,
                              rules=[("^b/", {"transforms": [("random_grad_mask", {"keep_prob": 0.5})]}),
                                     (".*", {"frozen": True})]))
    tx, _ = optim.build(cfg, PARAMS, 10)
    g = _grads()
    upd, _ = jax.jit(tx.update)(g, tx.init(PARAMS), PARAMS)
    assert float(jnp.max(jnp.abs(upd["a"]))) == 0.0  # frozen
    assert 0.4 < float(jnp.mean(upd["b"]["c"] != 0)) < 0.6  # masked, then Adam
    with pytest.raises(ValueError, match="unknown arguments"):
        optim.TRANSFORMS.get("random_grad_mask")(PARAMS, cfg, keep=0.5)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        random_grad_mask(0.0)


# ------------------------------------------------------------------ backward sparsity: in-model gate


def test_gradient_gate_masks_and_rescales_exactly():
    x = jnp.arange(1.0, 33.0).reshape(4, 8)
    key = jax.random.key(5)
    assert gradient_gate(x, key, 1.0) is x
    y, vjp = jax.vjp(lambda t: gradient_gate(t, key, 0.25), x)
    np.testing.assert_array_equal(y, x)  # identity forward
    (gx,) = vjp(jnp.ones_like(x))
    keep = jax.random.bernoulli(key, 0.25, x.shape)
    np.testing.assert_array_equal(gx, jnp.where(keep, 4.0, 0.0))
    (gs,) = jax.vjp(lambda t: gradient_gate(t, key, 0.5, rescale=False, granularity="sample"), x)[1](
        jnp.ones_like(x))
    assert all(len(np.unique(row)) == 1 for row in np.asarray(gs))  # one decision per example


def _grad_of_exit(model, v, exit_index):
    def loss(params):
        outs = model.apply({"params": params}, X, train=True, rngs={"dropout": jax.random.key(9)})
        return jnp.sum(outs[exit_index] ** 2)
    return jax.jit(jax.grad(loss))(v["params"])


def test_detach_and_gate_at_stage_boundaries():
    model = _model()
    v = _init(model)
    first = ("backbone", "blocks_0", "kernel")
    g = _grad_of_exit(model, v, 2)
    assert float(jnp.abs(g[first[0]][first[1]][first[2]]).sum()) > 0
    detached = _model(detach=True)
    g = _grad_of_exit(detached, v, 2)
    assert float(jnp.abs(g["backbone"]["blocks_0"]["kernel"]).sum()) == 0.0  # deep loss stops at the boundary
    assert float(jnp.abs(g["backbone"]["blocks_4"]["kernel"]).sum()) > 0  # its own stage still learns
    g1 = _grad_of_exit(detached, v, 0)
    assert float(jnp.abs(g1["backbone"]["blocks_0"]["kernel"]).sum()) > 0  # exit 1 trains stage 1
    gated = _model(gate_keep_prob=0.5)
    full = _grad_of_exit(model, v, 2)["backbone"]["blocks_0"]["kernel"]
    part = _grad_of_exit(gated, v, 2)["backbone"]["blocks_0"]["kernel"]
    assert not np.allclose(full, part)
    out_eval = jax.jit(gated.apply)(v, X)  # eval: no gate, no rng needed
    np.testing.assert_allclose(out_eval[2], jax.jit(model.apply)(v, X)[2], rtol=1e-6)


# ------------------------------------------------------------------ early exit


def test_confidence_measures():
    z = jnp.asarray([[0.0, 0.0], [10.0, -10.0]])
    np.testing.assert_allclose(ee.confidence(z, "max_softmax"), [0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(ee.confidence(z, "entropy"), [0.0, 1.0], atol=1e-6)
    with pytest.raises(ValueError, match="measure"):
        ee.confidence(z, "margin")


def _logits(n=300, exits=4, classes=6, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    outs = []
    for k in range(exits):  # deeper exits are more accurate and more confident
        z = rng.normal(0, 1, (n, classes))
        z[np.arange(n), labels] += 0.8 * (k + 1)
        outs.append(z)
    return outs, labels


def test_exit_policy_limits_and_monotone_flops():
    outs, labels = _logits()
    cum = ee.cumulative_macs([10, 10, 10, 10], [1, 1, 1, 1])
    np.testing.assert_allclose(cum, [11, 22, 33, 44])  # every head evaluated is paid
    last = ee.simulate(outs, labels, [np.inf] * 4, cum)
    assert last["top1"] == pytest.approx(np.mean(np.argmax(outs[-1], -1) == labels)) and last["macs"] == 44
    first = ee.simulate(outs, labels, [0.0] * 4, cum)
    assert first["top1"] == pytest.approx(np.mean(np.argmax(outs[0], -1) == labels)) and first["macs"] == 11
    costs = [ee.simulate(outs, labels, [t] * 4, cum)["macs"] for t in np.linspace(1.0, 0.0, 21)]
    assert all(a >= b for a, b in itertools.pairwise(costs))
    idx = ee.exit_index(np.stack([ee.confidence(z) for z in outs]), [0.6] * 3)
    assert idx.min() >= 0 and idx.max() <= 3


def test_calibrated_thresholds_meet_the_budget():
    outs, labels = _logits(seed=1)
    cum = ee.cumulative_macs([10, 10, 10, 10], [1, 1, 1, 1])
    scores = np.stack([ee.confidence(z) for z in outs])
    for budget in (15.0, 22.0, 30.0, 40.0):
        t = ee.calibrate(scores, cum, budget)
        cost = ee.simulate(outs, labels, t, cum)["macs"]
        assert cost <= budget + 1e-9 and cost >= budget - 6.0
        ts = ee.calibrate_shared(scores, cum, budget)
        assert ee.simulate(outs, labels, ts, cum)["macs"] <= budget + 1e-9
    assert np.all(np.isinf(ee.calibrate(scores, cum, 50.0)))
    points = ee.curve(outs, outs, labels, cum, [15.0, 25.0, 44.0])
    assert [p["macs"] <= p["budget_macs"] + 1e-9 for p in points] == [True] * 3


def test_staged_runner_matches_the_simulated_policy():
    model = _model()
    v = _init(model)
    outs = [np.asarray(o) for o in model.apply(v, X)]
    scores = np.stack([ee.confidence(z) for z in outs])
    t = [float(np.median(scores[0])), float(np.median(scores[1])), np.inf]
    sim = ee.simulate(outs, np.asarray(Y), t, [1, 2, 3])
    fns = [lambda x, k=k: model.apply(v, k, x, method=model.stage) for k in range(3)]
    runner = ee.StagedRunner(fns, t, buckets=(4, 8, 16))
    preds, exits = runner(np.asarray(X))
    np.testing.assert_array_equal(exits, sim["exit_index"])
    np.testing.assert_array_equal(preds, np.stack([np.argmax(z, -1) for z in outs])[exits, np.arange(16)])
    assert ee.default_buckets(64) == (8, 16, 32, 64) and ee.default_buckets(50) == (8, 16, 32, 50)


# ------------------------------------------------------------------ FLOPs


def test_vit_b16_macs_match_the_fvcore_figure():
    assert flops.vit_macs(12, 224, 16, 768, 1000) / 1e9 == pytest.approx(17.56, abs=0.005)
    assert flops.stage_macs([1, 2], 224, 16, 768)[1] / 1e9 == pytest.approx(1.454, abs=0.001)  # one block
    assert flops.adapter_macs(197, 768, 8) / 1e9 == pytest.approx(0.0024, abs=0.0001)
    cum = np.cumsum(flops.stage_macs(exit_blocks(12, 3), 224, 16, 768)) / 1e9
    np.testing.assert_allclose(cum, [4.48, 8.84, 13.20, 17.56], atol=0.005)
    cum4 = np.cumsum(flops.stage_macs(exit_blocks(12, 4), 224, 16, 768)) / 1e9
    np.testing.assert_allclose(cum4, [5.93, 11.75, 17.56], atol=0.005)
