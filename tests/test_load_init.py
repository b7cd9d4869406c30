"""`config.init.path`: fine-tuning from weights whose head has another class count (re-initialised by config),
and every other mismatch as one clear per-key error."""

import jax
import numpy as np
import pytest

from repjax import build as build_lib, config as config_lib, sharding
from repjax.io import torch as tio

SHAPE = (8, 8, 1)
PATH = "w.npz"


@pytest.fixture(scope="module")
def variables():
    """A 10-class small_cnn "checkpoint": random weights and BN statistics (no compilation: shapes only)."""
    from repjax import models

    model = models.create("small_cnn", num_classes=10, width=4)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(1), np.zeros((1, *SHAPE)), train=False))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), shapes)


@pytest.fixture
def weights(monkeypatch, variables):
    """`io.load_model` serving `variables` (importers themselves are tested in test_io_torch.py and the family
    contract test; here only what load_init does with their output)."""
    from repjax import io, models

    def load_model(p, name, fmt="auto", **kw):
        assert p == PATH
        return models.create(name, num_classes=10, **kw), variables

    monkeypatch.setattr(io, "load_model", load_model)
    return PATH, variables


def _config(**init):
    config = config_lib.defaults()
    config.model.kwargs.width = 4
    config.ema_decay = 0.99
    config.init.path = PATH
    config.init.update(init)
    return config


@pytest.fixture(scope="module")
def states():
    """num_classes -> (a train state with EMA standing for the model's initial one, its shardings). The values
    are random numpy arrays of the model's shapes: running `model.init` here would only add compile time."""
    out = {}
    rng = np.random.default_rng(1)
    for num_classes in (10, 5):
        built = build_lib.build(_config(), num_classes, SHAPE, sharding.make_mesh(_config().mesh))
        state = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), built.abstract_state)
        out[num_classes] = state.replace(ema_params=state.params), built.state_sharding
    return out


def _flat(tree):
    return {sharding.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_same_class_count_loads_everything(weights, states, variables):
    state, shardings = states[10]
    loaded = build_lib.load_init(_config(), state, shardings)
    got, want = _flat(loaded.variables()), _flat(variables)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_other_class_count_is_a_per_key_error_with_the_fix(weights, states):
    state, shardings = states[5]
    with pytest.raises(tio.WeightImportError, match=r"(?s)shape mismatches, imported vs model \(fine-tuning with "
                                                    r"another class count\? set config\.init\.reinit_mismatched_head"
                                                    r".*\(2\):\n    params/head/bias: \(10,\) vs \(5,\)\n"
                                                    r"    params/head/kernel: \(8, 10\) vs \(8, 5\)"):
        build_lib.load_init(_config(), state, shardings)


@pytest.mark.parametrize("init", [dict(reinit_mismatched_head=True), dict(reinit=["^params/head/"])])
def test_head_reinitialised_by_config(weights, states, variables, init):
    state, shardings = states[5]
    assert state.ema_params is not None
    before = _flat(state.variables())
    loaded = build_lib.load_init(_config(**init), state, shardings)
    got, want = _flat(loaded.variables()), _flat(variables)
    for k in got:
        if k.startswith("params/head/"):
            np.testing.assert_array_equal(got[k], before[k], err_msg=k)  # as the model initialised it
        else:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    ema = _flat(loaded.variables(ema=True))  # the EMA starts from the imported weights too
    for k in ema:
        np.testing.assert_array_equal(ema[k], got[k], err_msg=k)


def _tree(**shapes):
    out = {}
    for key, shape in shapes.items():
        node = out
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = np.zeros(shape, np.float32)
    return out


def test_every_other_mismatch_is_reported_per_key():
    model = _tree(params__stem__kernel=(3, 3, 3, 16), params__body__kernel=(3, 3, 16, 32),
                  params__head__kernel=(32, 5), params__head__bias=(5,), batch_stats__bn__mean=(16,))
    # A width change (not a head swap) mismatches in two modules: never re-initialised silently.
    wider = _tree(params__stem__kernel=(3, 3, 3, 24), params__body__kernel=(3, 3, 24, 32),
                  params__head__kernel=(32, 5), params__head__bias=(5,), batch_stats__bn__mean=(24,),
                  params__extra__kernel=(2,))
    with pytest.raises(tio.WeightImportError) as info:
        build_lib.merge_init(wider, model, reinit_mismatched_head=True, reinit=["^params/nothing"])
    message = str(info.value)
    for line in ("params/stem/kernel: (3, 3, 3, 24) vs (3, 3, 3, 16)", "params/body/kernel: (3, 3, 24, 32) vs",
                 "batch_stats/bn/mean: (24,) vs (16,)", "imported leaves the model lacks (1):\n    params/extra/kernel",
                 "regexes matching no model leaf (1):\n    ^params/nothing"):
        assert line in message, message
    partial = _tree(params__stem__kernel=(3, 3, 3, 16), params__head__kernel=(32, 5), params__head__bias=(5,),
                    batch_stats__bn__mean=(16,))
    with pytest.raises(tio.WeightImportError, match=r"model leaves missing from the import \(1\):\n    params/body"):
        build_lib.merge_init(partial, model)
    # A leaf chosen for re-initialisation may be absent from the import.
    merged = build_lib.merge_init(partial, model, reinit=["body"])
    assert merged["params"]["body"]["kernel"] is model["params"]["body"]["kernel"]
    with pytest.raises(ValueError, match=r"bad regex '\('"):
        build_lib.merge_init(partial, model, reinit=["("])
