"""RepOptimizers: RepOpt-SGD on the plain model == SGD on the CSLA model; Grad Mult; re-init; scales; configs.

Everything runs in float32 on `repopt_vgg_tiny` (8x8 inputs): stage0 3->8 (stride 1, no identity), stage1_0
and stage1_1 8->8 (identity), stage2_0 8->8 stride 2 (in == out but no identity), stage3_0 8->16 stride 2.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repjax import config as config_lib, models, optim
from repjax.projects.repopt import grad_mult as repopt, repopt_vgg as rv, scales as scale_files
from repjax.step import TrainState, make_train_step

NUM_CLASSES = 5
IDENTITY_BLOCKS = ("stage1_0", "stage1_1")


def _model(mode: str) -> rv.RepOptVGG:
    return models.create("repopt_vgg_tiny", mode=mode, num_classes=NUM_CLASSES)


_INITS: dict = {}


def _init(model: rv.RepOptVGG, seed: int = 0) -> tuple[dict, dict]:
    """`model.init` (params, batch_stats); memoized per (model, seed) unless the model reads `init_scales` from a
    file. The arrays are immutable; callers get fresh dict containers."""
    key = (model, seed)
    v = _INITS.get(key) if not model.init_scales else None
    if v is None:
        v = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8, 8, 3)), train=False)
        if not model.init_scales:
            _INITS[key] = v
    v = jax.tree.map(lambda a: a, v)
    return v["params"], v["batch_stats"]


def _randomize(params: dict, stats: dict, rng: np.random.Generator, negative: bool = True,
               positive_only: bool = False) -> tuple[dict, dict]:
    """Nonuniform s, t (one negative entry unless `positive_only`), d, BN affine and running statistics."""
    params, stats = jax.tree.map(np.array, params), jax.tree.map(np.array, stats)
    for name in rv.block_names(params):
        p, s = params[name], stats[name]
        for key in ("scale_conv", "scale_1x1"):
            v = rng.uniform(0.3, 1.6, p[key].shape).astype(np.float32)
            if not positive_only:
                v *= rng.choice([1.0, -1.0], p[key].shape, p=[0.8, 0.2])
            p[key] = v
        if "scale_identity" in p:
            p["scale_identity"] = rng.uniform(0.3, 1.5, p["scale_identity"].shape).astype(np.float32)
        p["bn"]["scale"] = rng.uniform(0.5, 1.5, p["bn"]["scale"].shape).astype(np.float32)
        p["bn"]["bias"] = rng.uniform(-0.2, 0.2, p["bn"]["bias"].shape).astype(np.float32)
        s["bn"]["mean"] = rng.uniform(-0.1, 0.1, s["bn"]["mean"].shape).astype(np.float32)
        s["bn"]["var"] = rng.uniform(0.5, 1.5, s["bn"]["var"].shape).astype(np.float32)
    if negative and not positive_only:
        params["stage1_1"]["scale_conv"][0] = -0.7
        params["stage3_0"]["scale_1x1"][1] = -1.1
    return jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, stats)


def _optim_cfg(name: str, lr: float, wd: float, rules: list, clip: float = 0.0):
    c = config_lib.defaults().optim
    c.name, c.lr, c.weight_decay, c.schedule, c.clip_norm = name, lr, wd, "constant", clip
    c.momentum, c.nesterov = 0.9, True
    c.rules = rules
    return c


def _batches(n: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
             "label": rng.integers(0, NUM_CLASSES, 16).astype(np.int32)} for _ in range(n)]


def _train(model, params, stats, cfg, batches):
    """Trains through the repo's own `optim.build` + `make_train_step`; yields (state, loss) after every step."""
    tx, schedule = optim.build(cfg, params, len(batches))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats, opt_state=tx.init(params),
                       ema_params=None, rng=jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(model, tx, schedule))
    for batch in batches:
        state, metrics = step(state, batch)
        yield state, float(metrics["loss"])


def _max_rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _csla_vs_repopt(optimizer: str, lr: float, wd: float, steps: int, positive_only: bool, seed: int = 0):
    """Trains CSLA (frozen s, t) and the plain model with RepOpt side by side; returns per-step pairs."""
    csla, target = _model("csla"), _model("target")
    params, stats = _randomize(*_init(csla, seed), np.random.default_rng(seed), positive_only=positive_only)
    scales = rv.extract_scales(params, csla)
    rules = repopt.repopt_sgd_rules(scales) if optimizer == "sgd" else repopt.repopt_adamw_rules(scales)
    a = _train(csla, params, stats, _optim_cfg(optimizer, lr, wd, repopt.hs_rules(csla=True)), _batches(steps))
    b = _train(target, rv.csla_to_target(params), stats, _optim_cfg(optimizer, lr, wd, rules), _batches(steps))
    return params, list(zip(a, b))


# ------------------------------------------------------------------------------------------------ (a) SGD


def test_repopt_sgd_equals_sgd_on_csla_model():
    """20 steps, Nesterov momentum 0.9, lr 0.05, wd 0.01 (also on the CSLA identity d, not on BN or s, t).

    After every step the CSLA weights mapped to the equivalent kernel equal the plain model's kernels
    elementwise to rtol 1e-4 / atol 1e-6, and their max difference is below 1e-5 of the kernel's max
    magnitude (observed: 4e-7 after 20 steps; float32 rounding of two mathematically equal computations).
    BN parameters, running statistics, head and losses agree to rtol 1e-4 / atol 1e-6. Covers s, t with
    negative entries, blocks with and without identity (stride 1 / stride 2 with in == out / channel change)
    and randomized BN statistics (running averages compared after every step).
    """
    init, pairs = _csla_vs_repopt("sgd", lr=0.05, wd=0.01, steps=20, positive_only=False)
    assert min(np.min(init[n]["scale_conv"]) for n in rv.block_names(init)) < 0
    for (cs, closs), (ts, tloss) in pairs:
        np.testing.assert_allclose(tloss, closs, rtol=1e-4)
        equiv = rv.csla_to_target(cs.params)
        for name in rv.block_names(equiv):
            kernel, ref = ts.params[name]["conv"]["kernel"], equiv[name]["conv"]["kernel"]
            np.testing.assert_allclose(kernel, ref, rtol=1e-4, atol=1e-6, err_msg=name)
            assert _max_rel(kernel, ref) < 1e-5, name
            for k in ("scale", "bias"):
                np.testing.assert_allclose(ts.params[name]["bn"][k], cs.params[name]["bn"][k], rtol=1e-4, atol=1e-6)
        chex.assert_trees_all_close(ts.batch_stats, cs.batch_stats, rtol=1e-4, atol=1e-6)
        for k in ("kernel", "bias"):
            np.testing.assert_allclose(ts.params["linear"][k], cs.params["linear"][k], rtol=1e-4, atol=1e-6)
    final = pairs[-1][0][0].params
    for name in rv.block_names(final):  # s, t stayed constant; d was trained (and decayed)
        np.testing.assert_array_equal(final[name]["scale_conv"], init[name]["scale_conv"])
        np.testing.assert_array_equal(final[name]["scale_1x1"], init[name]["scale_1x1"])
    for name in IDENTITY_BLOCKS:
        assert np.max(np.abs(final[name]["scale_identity"] - init[name]["scale_identity"])) > 1e-4


def test_plain_sgd_without_grad_mult_differs():
    """Control for the test above: the same run without the Grad Mult drifts far from the CSLA model (> 1%)."""
    csla, target = _model("csla"), _model("target")
    params, stats = _randomize(*_init(csla), np.random.default_rng(0))
    batches = _batches(5)
    *_, (cs, _) = _train(csla, params, stats, _optim_cfg("sgd", 0.05, 0.01, repopt.hs_rules(csla=True)), batches)
    *_, (ts, _) = _train(target, rv.csla_to_target(params), stats,
                         _optim_cfg("sgd", 0.05, 0.01, [(repopt.NO_DECAY, {"weight_decay": 0.0})]), batches)
    ref = rv.csla_to_target(cs.params)["stage1_1"]["conv"]["kernel"]
    assert _max_rel(ts.params["stage1_1"]["conv"]["kernel"], ref) > 1e-2


# ------------------------------------------------------------------------------------------------ (b) AdamW


def test_repopt_adamw_matches_csla_adamw_for_positive_scales():
    """10 steps of AdamW (lr 1e-3, wd 0.05, eps 1e-8) with all scales > 0, power 1.

    Not exact by construction: CSLA-Adam moves each branch by a m/(|a| sqrt(v) + eps) and RepOpt-AdamW the
    merged kernel by M^2 m/(|M| sqrt(v) + eps); both are |a| m/sqrt(v) (summed over branches) only up to
    Adam's eps, a relative effect of about eps / (|a| sqrt(v)) per step (§1.6). Tolerance: max difference
    below 1e-5 of the kernel's max magnitude (observed 3e-7, float32 rounding dominating the eps effect);
    losses rtol 1e-5. A negative scale breaks it by orders of magnitude (next test).
    """
    _, pairs = _csla_vs_repopt("adamw", lr=1e-3, wd=0.05, steps=10, positive_only=True)
    for (cs, closs), (ts, tloss) in pairs:
        np.testing.assert_allclose(tloss, closs, rtol=1e-5)
        equiv = rv.csla_to_target(cs.params)
        for name in rv.block_names(equiv):
            assert _max_rel(ts.params[name]["conv"]["kernel"], equiv[name]["conv"]["kernel"]) < 1e-5, name


def test_repopt_adamw_with_negative_scale_does_not_match():
    """Documented limitation: CSLA-Adam gives |s| + |t| + 1 at the centre, RepOpt-AdamW |s + t + 1|: with one
    negative s or t entry the kernels differ by > 1e-2 of their scale after 10 steps (observed 3e-2)."""
    _, pairs = _csla_vs_repopt("adamw", lr=1e-3, wd=0.05, steps=10, positive_only=False)
    (cs, _), (ts, _) = pairs[-1]
    equiv = rv.csla_to_target(cs.params)
    errors = [_max_rel(ts.params[n]["conv"]["kernel"], equiv[n]["conv"]["kernel"]) for n in rv.block_names(equiv)]
    assert max(errors) > 1e-2


def test_adamw_post_transform_order():
    """RepOpt-AdamW update = -lr (M * m_hat / (sqrt(v_hat) + eps) + wd w) with moments of M g (torch order).

    rtol 1e-4: optax computes the bias corrections 1 - b^t in float32 (relative error ~5e-5 for b2 = 0.999).
    """
    params = {"stage0": {"conv": {"kernel": jnp.full((3, 3, 1, 2), 0.5)}}}
    scales = {"stage0": {"s": np.array([2.0, 0.5]), "t": np.array([1.0, 3.0])}}
    lr, wd, eps = 0.1, 0.2, 1e-3
    cfg = _optim_cfg("adamw", lr, wd, repopt.repopt_adamw_rules(scales))
    cfg.eps = eps
    tx, _ = optim.build(cfg, params, 10)
    g = jnp.full((3, 3, 1, 2), 0.3)
    updates, _ = tx.update({"stage0": {"conv": {"kernel": g}}}, tx.init(params), params)
    m = np.asarray(repopt.mult_tensor((3, 3, 1, 2), scales["stage0"]["s"], scales["stage0"]["t"], False, 1.0))
    mg = m * 0.3  # first step: m_hat = M g, sqrt(v_hat) = |M g|
    expected = -lr * (m * mg / (np.abs(mg) + eps) + wd * 0.5)
    np.testing.assert_allclose(updates["stage0"]["conv"]["kernel"], expected, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ (c) Grad Mult


@pytest.mark.parametrize("power", [2.0, 1.0])
def test_grad_mult_three_cases_of_eq3(power):
    """Eq. 3 on hand-computed values, HWIO, per output channel; +1 only on the centre diagonal of identity
    blocks (exact: small integers and halves)."""
    s, t = np.array([2.0, -1.0], np.float32), np.array([3.0, 0.5], np.float32)
    expected = {  # (off-centre, centre i != o, centre i == o with identity) per output channel
        2.0: ([4.0, 1.0], [13.0, 1.25], [14.0, 2.25]),
        1.0: ([2.0, -1.0], [5.0, -0.5], [6.0, 0.5]),
    }[power]
    off, centre, diag = (np.array(v, np.float32) for v in expected)
    m = np.asarray(repopt.mult_tensor((3, 3, 2, 2), s, t, True, power))
    for p in range(3):
        for q in range(3):
            for i in range(2):
                for o in range(2):
                    want = off[o] if (p, q) != (1, 1) else diag[o] if i == o else centre[o]
                    assert m[p, q, i, o] == want, (p, q, i, o)
    m_no_id = np.asarray(repopt.mult_tensor((3, 3, 2, 2), s, t, False, power))
    np.testing.assert_array_equal(m_no_id[1, 1], np.broadcast_to(centre, (2, 2)))
    np.testing.assert_array_equal(m_no_id[0, 2], np.broadcast_to(off, (2, 2)))


def test_grad_mults_of_model_and_transform_in_multi_transform():
    """`grad_mults` gives no +1 to stride-2 / channel-changing blocks; the rule transform multiplies exactly the
    block kernels inside `optax.multi_transform` (other leaves and groups untouched)."""
    target = _model("target")
    params, _ = _init(target)
    rng = np.random.default_rng(0)
    scales = {b.name: {"s": rng.normal(size=b.out_ch), "t": rng.normal(size=b.out_ch)}
              | ({"d": np.ones(b.out_ch)} if b.identity else {}) for b in rv.model_block_specs(target)}
    assert {n for n, sc in scales.items() if "d" in sc} == set(IDENTITY_BLOCKS)
    mults = repopt.grad_mults(scales, params, 2.0)
    for name, sc in scales.items():
        m = np.asarray(mults[name]["conv"]["kernel"])
        s2, t2 = np.float32(sc["s"]) ** 2, np.float32(sc["t"]) ** 2
        np.testing.assert_allclose(m[0, 0], np.broadcast_to(s2, m.shape[2:]), rtol=1e-6)
        extra = np.eye(*m.shape[2:]) if "d" in sc else 0.0
        np.testing.assert_allclose(m[1, 1], np.broadcast_to(s2 + t2, m.shape[2:]) + extra, rtol=1e-6)
    cfg = _optim_cfg("sgd", 1.0, 0.0, repopt.repopt_sgd_rules(scales))
    cfg.momentum = 0.0
    tx, _ = optim.build(cfg, params, 10)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    for name in scales:
        np.testing.assert_allclose(updates[name]["conv"]["kernel"], -mults[name]["conv"]["kernel"], rtol=1e-6)
        np.testing.assert_allclose(updates[name]["bn"]["scale"], -1.0)
    np.testing.assert_allclose(updates["linear"]["kernel"], -1.0)


def test_grad_mult_scales_must_fit_the_model():
    params, _ = _init(_model("target"))
    scales = rv.extract_scales(_init(_model("hs"))[0])
    repopt.mult_table(params, scales)  # fits
    with pytest.raises(ValueError, match="no scales for"):
        repopt.mult_table(params, {k: v for k, v in scales.items() if k != "stage2_0"})
    with pytest.raises(ValueError, match="no parameter"):
        repopt.mult_table(params, scales | {"stage9_0": scales["stage0"]})
    with pytest.raises(ValueError, match="out channels"):
        repopt.mult_table(params, scales | {"stage3_0": scales["stage0"]})


# ------------------------------------------------------------------------------------------------ (d) re-init


def test_reinit_equals_csla_initial_equivalent_kernel():
    """W'(0) = s W3 + pad(t W1) + pad(diag d) with the target's own W3 and a fresh PyTorch-default W1; the plain
    model's eval-mode output equals the CSLA model holding the same W3, W1, s, t, d (randomized BN; rtol 1e-5)."""
    target, csla = _model("target"), _model("csla")
    tparams, stats = _init(target)
    for b in rv.model_block_specs(target):  # PyTorch default init: U(+-1/sqrt(fan_in)), fan_in = 9 C_in
        k = np.asarray(tparams[b.name]["conv"]["kernel"])
        assert np.max(np.abs(k)) <= 1 / np.sqrt(9 * b.in_ch) and np.std(k) > 0.4 / np.sqrt(9 * b.in_ch)
    hs_params, _ = _randomize(*_init(csla, 1), np.random.default_rng(1))
    scales = rv.extract_scales(hs_params, csla)
    key = jax.random.PRNGKey(7)
    reinit = rv.reinit_target(tparams, scales, key)
    cparams = rv.csla_params_for(tparams, scales, key)
    for b in rv.model_block_specs(target):
        w1 = np.asarray(cparams[b.name]["conv_1x1"]["kernel"])
        assert w1.shape == (1, 1, b.in_ch, b.out_ch) and np.max(np.abs(w1)) <= 1 / np.sqrt(b.in_ch)
        np.testing.assert_array_equal(cparams[b.name]["conv"]["kernel"], tparams[b.name]["conv"]["kernel"])
        k = np.asarray(reinit[b.name]["conv"]["kernel"])
        np.testing.assert_array_equal(k, rv.csla_to_target(cparams)[b.name]["conv"]["kernel"])
        np.testing.assert_allclose(k[0, 1], np.asarray(tparams[b.name]["conv"]["kernel"])[0, 1] * scales[b.name]["s"],
                                   rtol=1e-6)
    _, rstats = _randomize(cparams, stats, np.random.default_rng(2))
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 8, 8, 3)), jnp.float32)
    y_plain = target.apply({"params": reinit, "batch_stats": rstats}, x)
    y_csla = csla.apply({"params": cparams, "batch_stats": rstats}, x)
    np.testing.assert_allclose(y_plain, y_csla, rtol=1e-5, atol=1e-5)
    # Plain identity (1.0) instead of the searched d changes only the centre diagonal of identity blocks.
    plain_id = rv.reinit_target(tparams, scales, key, use_identity_scales=False)
    diff = np.asarray(plain_id["stage1_0"]["conv"]["kernel"] - reinit["stage1_0"]["conv"]["kernel"])
    np.testing.assert_allclose(np.diagonal(diff[1, 1]), 1.0 - scales["stage1_0"]["d"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(plain_id["stage2_0"]["conv"]["kernel"], reinit["stage2_0"]["conv"]["kernel"])


def test_reinit_refuses_trained_bn():
    tparams, _ = _init(_model("target"))
    scales = rv.extract_scales(_init(_model("hs"))[0])
    trained = jax.tree.map(lambda x: x, tparams)
    trained["stage1_1"] = {**trained["stage1_1"], "bn": {**trained["stage1_1"]["bn"],
                                                         "scale": trained["stage1_1"]["bn"]["scale"] * 1.1}}
    with pytest.raises(ValueError, match="from scratch"):
        rv.reinit_target(trained, scales, jax.random.PRNGKey(0))


def test_model_init_scales_npz(tmp_path):
    """`init_scales` re-initializes at `model.init` (the training path): same W3 as the plain init, off-centre
    s W3, centre s W3 + t W1 + d on the diagonal with |W1| <= 1/sqrt(C_in)."""
    hs_params, _ = _randomize(*_init(_model("hs"), 1), np.random.default_rng(1))
    scales = rv.extract_scales(hs_params)
    scale_files.save_scales(tmp_path / "s.npz", scales)
    loaded = scale_files.load_scales(tmp_path / "s.npz")
    assert jax.tree.map(np.shape, loaded) == jax.tree.map(np.shape, scales)
    plain, _ = _init(_model("target"), 3)
    model = models.create("repopt_vgg_tiny", mode="target", num_classes=NUM_CLASSES,
                          init_scales=str(tmp_path / "s.npz"))
    params, _ = _init(model, 3)
    for b in rv.model_block_specs(model):
        w3, k, sc = (np.asarray(plain[b.name]["conv"]["kernel"]), np.asarray(params[b.name]["conv"]["kernel"]),
                     scales[b.name])
        np.testing.assert_allclose(k[2, 0], w3[2, 0] * sc["s"], rtol=1e-6)
        rest = k[1, 1] - w3[1, 1] * sc["s"] - (np.diag(sc["d"]) if "d" in sc else 0.0)
        assert np.max(np.abs(rest / sc["t"])) <= 1 / np.sqrt(b.in_ch) + 1e-6
        assert np.max(np.abs(rest)) > 0
    wrong = {k: v for k, v in scales.items() if k != "stage0"}
    scale_files.save_scales(tmp_path / "w.npz", wrong)
    with pytest.raises(ValueError, match="missing blocks"):
        _init(models.create("repopt_vgg_tiny", mode="target", init_scales=str(tmp_path / "w.npz")))


# ------------------------------------------------------------------------------------------------ (e) clipping


def test_clipping_with_repopt_raises():
    params, _ = _init(_model("target"))
    scales = rv.extract_scales(_init(_model("hs"))[0])
    with pytest.raises(ValueError, match="clip"):
        optim.build(_optim_cfg("sgd", 0.1, 1e-4, repopt.repopt_sgd_rules(scales), clip=5.0), params, 10)
    optim.build(_optim_cfg("sgd", 0.1, 1e-4, repopt.hs_rules(), clip=5.0), _init(_model("hs"))[0], 10)  # HS may clip


# ------------------------------------------------------------------------------------------------ (f) scales


def test_extract_scales_from_hs_model_and_missing_blocks():
    model = _model("hs")
    params, _ = _init(model)
    scales = rv.extract_scales(params, model)
    assert list(scales) == ["stage0", "stage1_0", "stage1_1", "stage2_0", "stage3_0"]
    assert {n for n, sc in scales.items() if "d" in sc} == set(IDENTITY_BLOCKS)
    np.testing.assert_array_equal(scales["stage1_0"]["s"], 1.0)  # §1.5 init: 1 for a stage's first block,
    np.testing.assert_allclose(scales["stage1_1"]["t"], np.sqrt(2.0))  # sqrt(2 / i) after; d = 1
    np.testing.assert_array_equal(scales["stage1_1"]["d"], 1.0)
    assert scales["stage3_0"]["s"].shape == (16,)
    with pytest.raises(ValueError, match="missing"):  # a gap in a stage
        rv.extract_scales({k: v for k, v in params.items() if k != "stage1_0"})
    with pytest.raises(ValueError, match="missing"):  # the last block of a stage: caught against the model
        rv.extract_scales({k: v for k, v in params.items() if k != "stage1_1"}, model)
    with pytest.raises(ValueError, match="not an 'hs' or 'csla'"):
        rv.extract_scales(_init(_model("target"))[0])


def test_scales_from_official_keys():
    model = _model("hs")
    sd = {}
    for b in rv.model_block_specs(model):
        sd[f"{b.torch_prefix}.scale_conv.weight"] = np.full(b.out_ch, 0.5)
        sd[f"{b.torch_prefix}.scale_1x1.weight"] = np.full(b.out_ch, 0.25)
        if b.identity:
            sd[f"{b.torch_prefix}.scale_identity.weight"] = np.full(b.out_ch, 2.0)
    blocks = rv.expected_blocks(model)
    scales = scale_files.from_state_dict(sd, blocks)
    assert sum(len(v) for v in scales.values()) == len(sd) == 5 * 2 + 2
    np.testing.assert_array_equal(scales["stage1_1"]["d"], 2.0)
    with pytest.raises(ValueError, match=r"missing keys \(1\):\n    stage1\.1\.scale_identity\.weight"):
        scale_files.from_state_dict({k: v for k, v in sd.items() if k != "stage1.1.scale_identity.weight"}, blocks)
    with pytest.raises(ValueError, match="unexpected"):
        scale_files.from_state_dict(sd | {"stage4.0.scale_conv.weight": np.ones(3)}, blocks)


# ------------------------------------------------------------------------------------------------ models, configs


def test_modes_and_csla_constant_scales():
    x = jnp.ones((2, 8, 8, 3))
    hs_params, stats = _init(_model("hs"))
    assert set(hs_params["stage1_1"]) == {"conv", "conv_1x1", "bn", "scale_conv", "scale_1x1", "scale_identity"}
    assert set(hs_params["stage2_0"]) == {"conv", "conv_1x1", "bn", "scale_conv", "scale_1x1"}
    assert set(_init(_model("target"))[0]["stage1_1"]) == {"conv", "bn"}

    def grads(mode):
        def loss(p):
            y, _ = _model(mode).apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return jnp.sum(y ** 2)
        return jax.jit(jax.grad(loss))(hs_params)

    g_hs, g_csla = grads("hs"), grads("csla")
    assert float(jnp.abs(g_hs["stage1_1"]["scale_conv"]).sum()) > 0
    assert float(jnp.abs(g_csla["stage1_1"]["scale_conv"]).sum()) == 0
    assert float(jnp.abs(g_csla["stage1_1"]["scale_identity"]).sum()) > 0
    with pytest.raises(ValueError, match="mode"):
        _init(models.create("repopt_vgg_tiny", mode="repvgg"))


@pytest.mark.parametrize("name,millions", [("b1", 51.8), ("b2", 80.3), ("l1", 76.0), ("l2", 118.1)])
def test_param_counts_match_readme(name, millions):
    model = models.create(f"repopt_vgg_{name}", mode="target")
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))["params"]
    assert round(sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) / 1e6, 1) == millions


def test_configs_load_and_build(tmp_path):
    hs = config_lib.load("configs/repopt/repopt_vgg_cifar.py:mode=hs,epochs=1")
    assert hs.model.kwargs.mode == "hs" and hs.optim.clip_norm == 5.0
    model = models.create(hs.model.name, num_classes=10, **hs.model.kwargs)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))["params"]
    optim.build(hs.optim, abstract, hs.total_steps)
    scales = rv.extract_scales(jax.tree.map(lambda s: np.ones(s.shape, s.dtype), abstract), model)
    scale_files.save_scales(tmp_path / "scales.npz", scales)
    tgt = config_lib.load(f"configs/repopt/repopt_vgg_cifar.py:mode=target,epochs=1,scales={tmp_path / 'scales.npz'}")
    assert tgt.optim.clip_norm == 0.0 and tgt.optim.nesterov
    model = models.create(tgt.model.name, num_classes=10, **tgt.model.kwargs)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))["params"]
    optim.build(tgt.optim, abstract, tgt.total_steps)
    with pytest.raises(ValueError, match="scales"):
        config_lib.load("configs/repopt/repopt_vgg_cifar.py:mode=target")
    for name in ("b1", "b2", "l1", "l2"):
        c = config_lib.load(f"configs/repopt/repopt_vgg_{name}.py:scales=x.npz,data=folder:/data/imagenet")
        assert c.model.name == f"repopt_vgg_{name}" and c.model.kwargs.init_scales == "x.npz"
        assert c.data.source == "folder:/data/imagenet" and c.optim.clip_norm == 0.0


def test_scales_from_checkpoint_and_cli(tmp_path):
    """An HS run's latest checkpoint (`<workdir>/checkpoints/<step>/state`) -> scales .npz."""
    import orbax.checkpoint as ocp

    params, _ = _randomize(*_init(_model("hs")), np.random.default_rng(0))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "run" / "checkpoints" / "7" / "state", {"params": params, "step": 7})
    rv.main([str(tmp_path / "run"), str(tmp_path / "s.npz")])
    loaded = scale_files.load_scales(tmp_path / "s.npz")
    expected = rv.extract_scales(params)
    assert loaded.keys() == expected.keys()
    for name, sc in expected.items():
        for k, v in sc.items():
            np.testing.assert_array_equal(loaded[name][k], v)
    with pytest.raises(FileNotFoundError):
        scale_files.from_checkpoint(tmp_path / "nothing")


def test_target_to_deploy_equals_target_in_eval_mode():
    """RepOpt-VGG target (conv -> BN, randomized eval statistics) fused into the RepVGG deploy layout gives the
    same logits through `RepVGG(deploy=True)` with the same architecture (float32, rtol 1e-5 of the logit scale)."""
    arch = dict(num_blocks=(2, 1), widths=(8, 8, 16), strides=(1, 1, 2), num_classes=10)
    target = models.create("repopt_vgg_tiny", mode="target", **arch)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 16, 16, 3)), jnp.float32)
    variables = target.init(jax.random.PRNGKey(0), x, train=False)
    rng = np.random.default_rng(2)  # numpy: no per-shape JAX random compiles

    def randomize(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name.endswith("var"):
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), jnp.float32)
        if name.endswith(("mean", "bn/bias")):
            return jnp.asarray(rng.normal(size=leaf.shape) * 0.3, jnp.float32)
        if name.endswith("bn/scale"):
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
        return leaf

    variables = jax.tree_util.tree_map_with_path(randomize, variables)
    deploy = models.create("repvgg_tiny", deploy=True, groups_map=(), **arch)
    want = target.apply(variables, x, train=False)
    assert rv.deploy(target) == deploy
    got = deploy.apply(rv.reparameterize(variables, target), x, train=False)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
