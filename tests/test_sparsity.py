"""Dynamic sparsity: exact zeros, fixed density, magnitude prune / random regrow at zero, rules, checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repjax import config as config_lib, models, optim
from repjax.checkpoint import Checkpointer
from repjax.projects.pelk import sparsity as sp
from repjax.step import init_state, make_train_step

SPEC = ("dynamic_sparsity", {"sparsity": 0.5, "init": "uniform", "update_every": 3, "prune_rate": 0.3,
                             "schedule": "constant", "seed": 0})


def _tree(seed: int = 0) -> dict:
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"conv": {"kernel": jax.random.normal(k[0], (3, 3, 4, 6)), "bias": jnp.zeros(6)},
            "head": {"kernel": jax.random.normal(k[1], (6, 5))}}


def _grads(i: int, tree: dict) -> dict:
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(100 + i), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _run(tx, params, steps: int):
    """Yields (params before, update, params after, state before, state after) for each step."""
    state, update = tx.init(params), jax.jit(tx.update)  # jitted: eager dispatch made these tests slow
    for i in range(steps):
        updates, new_state = update(_grads(i, params), state, params)
        new_params = jax.tree.map(lambda p, u: p + u, params, updates)
        yield params, updates, new_params, state, new_state
        params, state = new_params, new_state


def test_erk_and_uniform_densities():
    shapes = [(3, 3, 3, 8), (3, 3, 8, 16), (64, 10), (1, 10)]
    d = sp.erk_densities(shapes, 0.5)
    sizes = np.array([np.prod(s) for s in shapes])
    assert float(np.dot(d, sizes) / sizes.sum()) == pytest.approx(0.5)
    assert max(d) == 1.0 and all(0 < x <= 1 for x in d)
    assert d[1] < d[0]  # larger layers are sparser
    assert sp.layer_densities(shapes, 0.3, "uniform") == [0.7] * 4
    with pytest.raises(ValueError, match="SNIP is not implemented"):
        sp.layer_densities(shapes, 0.3, "snip")


def test_masked_zero_density_fixed_prune_smallest_regrow_at_zero():
    tx = sp.dynamic_sparsity(**SPEC[1])
    params = _tree()
    active0 = None
    prune_steps = 0
    for i, (p, u, new, s, new_s) in enumerate(_run(tx, params, 9)):
        m_old, m_new = s.masks["conv"]["kernel"], new_s.masks["conv"]["kernel"]
        assert s.masks["conv"]["bias"].shape == ()  # 1-D leaves stay dense
        for path in (("conv", "kernel"), ("head", "kernel")):
            m, w = new_s.masks[path[0]][path[1]], new[path[0]][path[1]]
            assert np.all(np.asarray(w)[~np.asarray(m)] == 0.0)  # inactive weights are exactly zero
        active = {k: int(v["kernel"].sum()) for k, v in new_s.masks.items()}
        active0 = active0 or active
        assert active == active0  # density fixed through prune / regrow
        assert active["conv"] == round(0.5 * 3 * 3 * 4 * 6)
        w = np.where(m_old, p["conv"]["kernel"] + u["conv"]["kernel"], 0.0)  # post-step weights
        if (i + 1) % 3:
            np.testing.assert_array_equal(m_old, m_new)
            continue
        prune_steps += 1
        m_old, m_new = np.asarray(m_old), np.asarray(m_new)
        n = round(0.3 * m_old.sum())
        dropped, grown = m_old & ~m_new, m_new & ~m_old
        assert dropped.sum() == grown.sum() == n
        mags = np.abs(w[m_old])
        assert np.max(np.abs(w[dropped])) <= np.sort(mags)[n]  # the n smallest active magnitudes
        assert np.all(np.asarray(new["conv"]["kernel"])[grown] == 0.0)  # regrown start from zero
        kept = m_old & m_new
        np.testing.assert_allclose(np.asarray(new["conv"]["kernel"])[kept], w[kept], rtol=1e-6)
    assert prune_steps == 3


def test_deterministic_given_seed():
    def masks(seed):
        tx = sp.dynamic_sparsity(**{**SPEC[1], "seed": seed})
        return [np.asarray(m) for m in jax.tree.leaves(list(_run(tx, _tree(), 6))[-1][-1].masks)]

    a, b, c = masks(0), masks(0), masks(1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_cosine_prune_rate():
    assert float(sp.prune_rate_at(jnp.array(0), 0.3, "cosine", 100)) == pytest.approx(0.3)
    assert float(sp.prune_rate_at(jnp.array(50), 0.3, "cosine", 100)) == pytest.approx(0.15)
    assert float(sp.prune_rate_at(jnp.array(150), 0.3, "cosine", 100)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="decay_steps"):
        sp.dynamic_sparsity(schedule="cosine")


def _cfg(rules: list):
    c = config_lib.defaults().optim
    c.name, c.lr, c.weight_decay, c.schedule, c.momentum = "sgd", 0.1, 1e-3, "constant", 0.9
    c.rules = rules
    return c


def test_inside_optim_build_other_groups_untouched():
    params = {**_tree(), "frozen": {"kernel": jnp.ones((4, 4))}}
    base_rules = [("^frozen/", {"frozen": True}), ("^conv/kernel$", {})]
    sparse_rules = [("^frozen/", {"frozen": True}), ("^conv/kernel$", {"final_transforms": [SPEC]})]
    dense_tx, _ = optim.build(_cfg(base_rules), params, 10)
    sparse_tx, _ = optim.build(_cfg(sparse_rules), params, 10)
    dense, sparse = list(_run(dense_tx, params, 4)), list(_run(sparse_tx, params, 4))
    for (_, du, _, _, _), (_, su, new, _, st) in zip(dense, sparse):
        np.testing.assert_array_equal(su["head"]["kernel"], du["head"]["kernel"])  # default group: plain SGD
        np.testing.assert_array_equal(su["conv"]["bias"], du["conv"]["bias"])
        assert not np.any(su["frozen"]["kernel"])
        (state,) = sp.sparsity_states(st)
        assert set(sp.mask_densities(st)) == {"conv/kernel"}
        assert np.all(np.asarray(new["conv"]["kernel"])[~np.asarray(state.masks["conv"]["kernel"])] == 0)
    report = sp.density_report(sparse[-1][2])
    assert report["layers"]["conv/kernel"] == pytest.approx(0.5)
    assert report["layers"]["head/kernel"] == 1.0 and report["params"] == 216 + 6 + 30 + 16
    assert report["nonzero_params"] == 108 + 30 + 16 + int(np.count_nonzero(sparse[-1][2]["conv"]["bias"]))


def test_train_step_and_checkpoint_round_trip(tmp_path):
    model = models.create("small_cnn", num_classes=3, width=4)
    v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False))  # tree
    spec = ("dynamic_sparsity", {**SPEC[1], "init": "erk", "sparsity": 0.6, "update_every": 2})
    tx, schedule = optim.build(_cfg([(r"kernel$", {"final_transforms": [spec]})]), v["params"], 10)
    state = jax.jit(lambda: init_state(model, tx, jnp.zeros((1, 8, 8, 3)), 0, False))()
    # init_state applies the masks: sparse from step 0
    assert sp.density_report(state.params)["density"] == pytest.approx(0.4, abs=0.01)
    for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(sp.apply_masks(state.params, state.opt_state))):
        np.testing.assert_array_equal(x, y)
    step = jax.jit(make_train_step(model, tx, schedule))
    rng = np.random.default_rng(0)
    batches = [{"image": rng.normal(size=(8, 8, 8, 3)).astype(np.float32),
                "label": rng.integers(0, 3, 8).astype(np.int32)} for _ in range(6)]
    for b in batches[:3]:
        state, _ = step(state, b)
    with Checkpointer(tmp_path, save_every_steps=1) as ckpt:
        ckpt.save(3, state, force=True)
        ckpt.wait()
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        _, restored, _ = ckpt.restore(abstract)
    (a,), (b,) = sp.sparsity_states(state.opt_state), sp.sparsity_states(restored.opt_state)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
    for b_ in batches[3:]:
        state, _ = step(state, b_)
        restored, _ = step(restored, b_)
    for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored.params)):
        np.testing.assert_array_equal(x, y)
    report, masks = sp.density_report(state.params), jax.tree.leaves(a.masks)
    active = sum(int(m.sum()) for m in masks if m.ndim) / sum(m.size for m in masks if m.ndim)
    assert active == pytest.approx(0.4, abs=0.01)  # ERK at 60% sparsity overall
    assert report["density"] <= active  # regrown weights may still be exactly zero
    assert sp.mask_densities(state.opt_state).keys() == report["layers"].keys()


def test_sparsity_evaluator():
    from repjax import evals

    params = {"conv": {"kernel": jnp.array([[0.0, 1.0], [2.0, 0.0]]), "bias": jnp.array([0.0, 3.0])}}
    out = evals.get("sparsity")(None, {"params": params}, None, None, layers=True)
    assert out == {"params": 6, "nonzero_params": 3, "density": 0.5, "density/conv/kernel": 0.5}
