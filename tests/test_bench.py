"""repjax.bench: interleaved medians, and runners that compile and report what they measure."""

import itertools

import jax
import jax.numpy as jnp
import pytest

from repjax import bench, config as config_lib, models


def test_interleaved_takes_turns_and_medians():
    order, counters = [], {"a": itertools.count(1), "b": itertools.count(10)}

    def runner(name):
        def run():
            order.append(name)
            return float(next(counters[name]))
        return run

    rates = bench.interleaved({"a": runner("a"), "b": runner("b")}, rounds=3)
    assert order == ["a", "b"] * 3
    assert rates == {"a": 2.0, "b": 11.0}


def test_runners_on_a_tiny_model():
    model = models.create("small_cnn", num_classes=10)
    cfg = config_lib.defaults().optim
    run, info = bench.train_runner(model, cfg, batch=4, image_shape=(8, 8, 3), iters=2)
    assert run() > 0 and info["peak_memory_mb"] > 0
    assert info["params"] == sum(x.size for x in jax.tree.leaves(
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False)["params"]))
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False)
    assert bench.inference_runner(model, variables, batch=4, image_shape=(8, 8, 3), iters=2)() > 0
    with pytest.raises(KeyError):
        bench.interleaved({"a": lambda: 1.0}, rounds=1)["b"]
