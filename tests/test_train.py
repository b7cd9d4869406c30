"""End-to-end training on the real (tiny) digits data: resume equality, preemption, NaN stop."""

import itertools
import os
import signal
import threading
import time

import jax
import numpy as np
import pytest

from repjax import checkpoint, config as config_lib, sharding, train as train_lib
from repjax.build import build, restore_variables
from repjax.metrics import read_metrics


def _config(**overrides):
    c = config_lib.defaults()
    c.total_steps = 12
    c.batch_size = 32
    c.log_every_steps = 2
    c.checkpoint_every_steps = 4
    c.eval_batch_size = 100
    c.data.train_pp = "pad_crop(1)|normalize(digits)"  # randomness in the data path must resume too
    c.ema_decay = 0.9
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _final_params(workdir, config):
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints")
    step = ckpt.latest_step()
    state = ckpt.restore(_abstract(config))[1]
    ckpt.close()
    return step, state


def _abstract(config):
    """The state layout train() restores onto (digits: 8x8x1 images, 10 classes)."""
    return build(config, 10, (8, 8, 1), sharding.make_mesh(config.mesh)).abstract_state


def _assert_same_state(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_equals_uninterrupted(tmp_path):
    config = _config()
    full = train_lib.train(config, tmp_path / "full")
    part = train_lib.train(config, tmp_path / "split", stop_after=5)
    assert part["status"] == "stopped" and part["step"] == 5
    resumed = train_lib.train(config, tmp_path / "split")
    assert resumed["step"] == full["step"] == 12
    final = _final_params(tmp_path / "full", config)[1]
    _assert_same_state(final, _final_params(tmp_path / "split", config)[1])
    assert resumed["test/top1"] == full["test/top1"]
    _assert_same_state(final.variables(), restore_variables(config, tmp_path / "split", 10, (8, 8, 1)))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        restore_variables(config, tmp_path / "empty", 10, (8, 8, 1))
    # Metrics of the resumed run continue where the first part stopped.
    steps = [r["step"] for r in read_metrics(tmp_path / "split") if "train/loss" in r]
    assert steps == [2, 4, 5, 6, 8, 10, 12]
    # Training time adds up over the parts: the log's elapsed time grows across the resume (step 5 ends the
    # first part), and each result's train_seconds covers its part up to its end.
    elapsed = [r[train_lib.ELAPSED] for r in read_metrics(tmp_path / "split") if "train/loss" in r]
    assert all(a < b for a, b in itertools.pairwise(elapsed))
    assert elapsed[2] <= part["train_seconds"]
    assert resumed["train_seconds"] >= elapsed[-1]
    assert resumed["train_img_s"] == pytest.approx(12 * config.batch_size / resumed["train_seconds"])
    # Evaluating the finished run again keeps its training time (it trains no step).
    again = train_lib.train(config, tmp_path / "split")
    assert again["train_seconds"] == pytest.approx(elapsed[-1], rel=0.05) and again["test/top1"] == full["test/top1"]


def test_sigterm_saves_and_resumes(tmp_path):
    config = _config(total_steps=400, log_every_steps=1, checkpoint_every_steps=1000)
    workdir = tmp_path / "run"

    def preempt():  # SIGTERM as soon as the first metrics line exists
        deadline = time.time() + 120
        while time.time() < deadline and not (workdir / "metrics.jsonl").exists():
            time.sleep(0.01)
        while time.time() < deadline and "train/loss" not in (workdir / "metrics.jsonl").read_text():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=preempt, daemon=True).start()
    first = train_lib.train(config, workdir)
    assert first["status"] == "preempted" and 0 < first["step"] < 400
    assert checkpoint.Checkpointer(workdir / "checkpoints").latest_step() == first["step"]
    second = train_lib.train(config, workdir)
    assert second["step"] == 400
    train_lib.train(config, tmp_path / "full")
    _assert_same_state(_final_params(workdir, config)[1], _final_params(tmp_path / "full", config)[1])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = _config(checkpoint_every_steps=1, log_every_steps=5, ema_decay=0.0)
    config.optim.lr = 1e30  # parameters explode after the first update
    config.optim.schedule = "constant"
    with pytest.raises(train_lib.NonFiniteLossError, match=r"at step (\d+)") as err:
        train_lib.train(config, tmp_path)
    bad_step = int(err.value.args[0].split("at step ")[1].split(";")[0])
    step, state = _final_params(tmp_path, config)
    assert step == bad_step - 1
    assert f"last good checkpoint is step {step}" in str(err.value)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_init_weights_load_once_and_resume_builds_no_fresh_state(tmp_path, monkeypatch):
    """A new run loads `init.path` before recording its config; a resumed run restores its checkpoint straight
    into the abstract state: no initialisation is built, and the init weights are not read again."""
    calls = {"make_state": 0, "load_init": 0}
    real_build = train_lib.build

    def counting_build(*args, **kwargs):
        built = real_build(*args, **kwargs)
        make = built.make_state

        def make_state():
            calls["make_state"] += 1
            return make()

        return built._replace(make_state=make_state)  # Built is a NamedTuple

    def fake_load_init(config, state, state_sharding):
        calls["load_init"] += 1
        return state

    monkeypatch.setattr(train_lib, "build", counting_build)
    monkeypatch.setattr(train_lib, "load_init", fake_load_init)
    config = _config(total_steps=4, **{"init.path": "weights.npz"})
    assert train_lib.train(config, tmp_path / "run", stop_after=2)["status"] == "stopped"
    assert calls == {"make_state": 1, "load_init": 1}
    assert train_lib.train(config, tmp_path / "run")["step"] == 4
    assert calls == {"make_state": 1, "load_init": 1}
