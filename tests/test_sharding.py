"""Data-parallel and FSDP steps on 8 simulated CPU devices equal the single-device step."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding

from repjax import config as config_lib, optim, sharding
from repjax.step import init_state, make_train_step


class TinyBNNet(nn.Module):
    """Conv -> BN -> ReLU -> Dense: enough to exercise sharded BN statistics and gradients."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(16, (3, 3), use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x).mean(axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


def _run(mesh_axes, rules, devices, steps=3):
    model = TinyBNNet()
    cfg = config_lib.defaults().optim
    mesh = sharding.make_mesh(mesh_axes, devices)
    sample = jnp.zeros((1, 8, 8, 3))
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), sample, train=False))["params"]
    tx, schedule = optim.build(cfg, params, 100)
    make = functools.partial(init_state, model, tx, sample, 0, False)
    state_sh = sharding.tree_shardings(jax.eval_shape(make), mesh, rules)
    state = jax.jit(make, out_shardings=state_sh)()
    batch_sh = NamedSharding(mesh, sharding.batch_spec(mesh))
    step = jax.jit(make_train_step(model, tx, schedule), in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, sharding.replicated(mesh)))
    rng = np.random.default_rng(0)
    losses, norms = [], []
    for _ in range(steps):
        batch = {"image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
                 "label": rng.integers(0, 10, size=16).astype(np.int32)}
        state, metrics = step(state, sharding.global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    return state, np.array(losses), np.array(norms)


@pytest.mark.parametrize("mesh_axes,rules", [
    ([("data", 8), ("fsdp", 1)], [(".*", "replicate")]),
    ([("data", 2), ("fsdp", 4)], [(".*", "fsdp")]),
], ids=["data_parallel", "fsdp"])
def test_sharded_step_equals_single_device(mesh_axes, rules):
    """Loss, gradient norms, parameters, optimizer state and BN statistics agree after 3 steps.

    Tolerance rtol=1e-5 / atol=1e-6: float32 sums are reduced in a different order across devices.
    """
    ref, ref_loss, ref_norm = _run([("data", 1), ("fsdp", 1)], [(".*", "replicate")], jax.devices()[:1])
    got, loss, norm = _run(mesh_axes, rules, jax.devices())
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm, ref_norm, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(got, ref, rtol=1e-5, atol=1e-6)
    # The BN running mean moved away from its zero init: statistics were actually computed.
    assert np.abs(np.asarray(got.batch_stats["BatchNorm_0"]["mean"])).max() > 1e-3


def test_fsdp_rule_shards_largest_divisible_dim():
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
    tree = {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 16, 32), jnp.float32)},
            "bias": jax.ShapeDtypeStruct((6,), jnp.float32)}
    sh = sharding.tree_shardings(tree, mesh, [("kernel", "fsdp"), (".*", "fsdp")])
    assert sh["conv"]["kernel"].spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert sh["bias"].spec == jax.sharding.PartitionSpec()  # 6 is not divisible by 4: replicated


def test_mesh_errors():
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.make_mesh([("data", 2), ("fsdp", 3)])
    with pytest.raises(ValueError, match="At most one"):
        sharding.make_mesh([("data", -1), ("fsdp", -1)])


def test_optimizer_rules_frozen_lr_mult_and_decay():
    cfg = config_lib.defaults().optim
    cfg.momentum = 0.0
    cfg.weight_decay = 0.1
    cfg.schedule = "constant"
    cfg.rules = [("^frozen/", dict(frozen=True)), ("^fast/", dict(lr_mult=10.0, weight_decay=0.0))]
    params = {"frozen": {"w": jnp.ones(3)}, "fast": {"w": jnp.ones(3)}, "plain": {"w": jnp.ones(3)}}
    tx, _ = optim.build(cfg, params, 10)
    state = tx.init(params)
    # Frozen parameters carry no optimizer state at all.
    assert all("frozen" not in sharding.path_str(p) or leaf.size == 0
               for p, leaf in jax.tree_util.tree_leaves_with_path(state) if hasattr(leaf, "size"))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["frozen"]["w"], 0.0)
    np.testing.assert_allclose(updates["fast"]["w"], -1.0, rtol=1e-6)  # 10 * 0.1 * (1 + 0)
    np.testing.assert_allclose(updates["plain"]["w"], -0.11, rtol=1e-6)  # 0.1 * (1 + 0.1 * 1)
    with pytest.raises(ValueError, match="unknown keys"):
        cfg.rules = [("x", dict(lr_mul=2.0))]
        optim.build(cfg, params, 10)


def test_clipping_ignores_frozen_parameters():
    cfg = config_lib.defaults().optim
    cfg.momentum, cfg.weight_decay, cfg.schedule, cfg.lr, cfg.clip_norm = 0.0, 0.0, "constant", 1.0, 1.0
    cfg.rules = [("^frozen/", dict(frozen=True))]
    params = {"frozen": {"w": jnp.zeros(4)}, "train": {"w": jnp.zeros(4)}}
    tx, _ = optim.build(cfg, params, 10)
    grads = {"frozen": {"w": jnp.full(4, 100.0)}, "train": {"w": jnp.full(4, 0.25)}}
    updates, _ = tx.update(grads, tx.init(params), params)
    # Norm of the trainable grads is 0.5 < 1: no clipping, although the frozen grads are huge.
    np.testing.assert_allclose(updates["train"]["w"], -0.25, rtol=1e-6)
    assert optax.tree.norm(updates["frozen"]) == 0
