"""Checkpointer round trips (sharded, typed/raw keys, None leaves), pruning, policy, errors; PreemptionGuard."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from repjax.checkpoint import Checkpointer, CheckpointMismatchError, PreemptionGuard, sync_flag


class State(struct.PyTreeNode):
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: object
    ema_params: dict | None
    rng: jax.Array


TX = optax.sgd(0.1, momentum=0.9)


def _make(rows: int = 8, key=None) -> State:
    params = {"dense": {"kernel": jnp.arange(rows * 4, dtype=jnp.float32).reshape(rows, 4)}, "bias": jnp.ones(4)}
    return State(step=jnp.array(7, jnp.int32), params=params, batch_stats={}, opt_state=TX.init(params),
                 ema_params=None, rng=jax.random.key(3) if key is None else key)


def _abstract(state: State) -> State:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _close(a, b) -> None:
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture
def sharded_state() -> State:
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    state = _make()
    shard = lambda x: NamedSharding(mesh, P("data", "model") if x.ndim == 2 else P())
    return jax.device_put(state, jax.tree.map(shard, state))


def test_round_trip_sharded(tmp_path, sharded_state):
    assert jax.device_count() == 8
    with Checkpointer(tmp_path, save_every_steps=10) as ckpt:
        assert ckpt.restore(_abstract(sharded_state)) is None
        assert ckpt.save(10, sharded_state, {"data": {"epoch": np.int64(2)}, "lr": np.float32(0.5)})
        ckpt.wait()
        step, restored, extra = ckpt.restore(_abstract(sharded_state))
    assert step == 10 and extra == {"data": {"epoch": 2}, "lr": 0.5}
    assert isinstance(restored, State) and restored.ema_params is None and restored.batch_stats == {}
    assert isinstance(restored.opt_state[0], optax.TraceState)
    jax.tree.map(_close, restored, sharded_state)
    kernel = restored.params["dense"]["kernel"]
    assert kernel.sharding == sharded_state.params["dense"]["kernel"].sharding
    assert len(kernel.addressable_shards) == 8


@pytest.mark.parametrize("saved_typed,wanted_typed", [(True, False), (False, True), (False, False)])
def test_typed_and_raw_keys(tmp_path, saved_typed, wanted_typed):
    typed = jax.random.key(5)
    state = _make(key=typed if saved_typed else jax.random.key_data(typed))
    target = _make(key=typed if wanted_typed else jax.random.key_data(typed))
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state, {}, force=True)
        _, restored, _ = ckpt.restore(_abstract(target))
    assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key) == wanted_typed
    _close(restored.rng, target.rng)


def test_keep_n_periodic_force(tmp_path):
    state = _make()
    with Checkpointer(tmp_path, max_to_keep=2, save_every_steps=5) as ckpt:
        saved = [s for s in range(1, 21) if ckpt.save(s, state, {"s": s})]
        assert saved == [5, 10, 15, 20]
        assert not ckpt.save(20, state, {}, force=True)  # never the same step twice
        assert ckpt.save(23, state, {"s": 23}, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [20, 23] and ckpt.latest_step() == 23
        assert ckpt.restore(_abstract(state), step=20)[2] == {"s": 20}
        with pytest.raises(FileNotFoundError, match="available"):
            ckpt.restore(_abstract(state), step=5)
    with Checkpointer(tmp_path) as again:  # a new manager sees what is on disk
        assert again.all_steps() == [20, 23]


def test_mismatch_names_keys_and_shapes(tmp_path):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, _make(rows=8), {}, force=True)
        other = _make(rows=6)
        other = other.replace(params={**other.params, "head": jnp.zeros(3)},
                              ema_params=other.params)
        with pytest.raises(CheckpointMismatchError) as err:
            ckpt.restore(_abstract(other))
    msg = str(err.value)
    assert "params/dense/kernel: checkpoint (8, 4) vs expected (6, 4)" in msg
    assert "params/head (3,)" in msg and "ema_params/bias" in msg


def test_preemption_guard():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.signum == signal.SIGTERM
        assert sync_flag(guard.requested)
    assert signal.getsignal(signal.SIGTERM) is before
    assert not sync_flag(False)
