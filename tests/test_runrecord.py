"""A run's record: range checks, config-file errors, the workdir lock and config history, sealed checkpoints
with fallback, metrics rewind, exit statuses, evaluation of a run's own config and step, start-up timeout."""

import json
import os
import socket
import subprocess
import sys
import threading

import jax.numpy as jnp
import numpy as np
import pytest

from repjax import checkpoint, cli, config as config_lib, distributed, evals, workdir as workdir_lib
from repjax.build import build_model
from repjax.checkpoint import CheckpointDamagedError, Checkpointer
from repjax.metrics import MetricWriter, read_metrics


def _fails(argv, capsys, *names, program="train"):
    """`cli.parse(argv)` exits with status 2 and one short error naming every one of `names` (no traceback)."""
    with pytest.raises(SystemExit) as e:
        cli.parse(argv, need_workdir=False, program=program)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)
    return err


# ------------------------------------------------------------------------------------------ config checks

def _bad_value(rng: config_lib.Range) -> float:
    return rng.lo - 1 if rng.lo is not None else rng.hi + 1


def test_every_numeric_key_is_range_checked():
    numeric = [k for k, v in config_lib.flatten(config_lib.defaults()).items()
               if isinstance(v, int | float) and not isinstance(v, bool)]
    assert sorted(numeric) == sorted(config_lib.RANGES), "a numeric key without a range in config.RANGES"
    for key, rng in config_lib.RANGES.items():
        config = config_lib.defaults()
        default = config_lib.get(config, key)
        bad = type(default)(_bad_value(rng))
        config_lib.set_value(config, key, bad)
        with pytest.raises(ValueError, match=f"'{key}' must be in"):
            config_lib.validate(config)
    config = config_lib.defaults()
    config.optim.lr = float("inf")
    with pytest.raises(ValueError, match=r"'optim.lr' must be finite"):
        config_lib.validate(config)


def test_zero_counts_fail_on_the_command_line(capsys):
    for key in ("keep_checkpoints", "batch_size", "eval_batch_size", "log_every_steps", "checkpoint_every_steps"):
        _fails([f"--config.{key}=0"], capsys, key)
    _fails(["--config.optim.lr=-0.1"], capsys, "optim.lr")
    _fails(["--config.conv_chunked_wgrad=maybe"], capsys, "conv_chunked_wgrad")
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer("/nonexistent/never-created", max_to_keep=0)


def test_malformed_mesh_and_sharding_specs(capsys):
    _fails(['--config.mesh=[("data", 0)]'], capsys, "'mesh' entry 0")
    _fails(['--config.mesh=[("data", -1), ("fsdp", -1)]'], capsys, "at most one axis of size -1")
    _fails(['--config.mesh=[("data", -1), ("data", 1)]'], capsys, "distinct")
    _fails(['--config.mesh=[("data",)]'], capsys, "'mesh' entry 0")
    _fails(['--config.sharding_rules=[("(", "replicate")]'], capsys, "'sharding_rules' entry 0", "bad regex")
    _fails(['--config.sharding_rules=[(".*", "fsdp:model")]'], capsys, "no axis 'model'")
    _fails(['--config.sharding_rules=[(".*", ("model", None))]'], capsys, "'model' is not a mesh axis")
    _fails(['--config.sharding_rules=[(".*", "shard")]'], capsys, "unknown rule 'shard'")


def test_config_file_and_argument_errors_are_one_line(tmp_path, capsys):
    _fails(["--config", "configs/resnet_cifar10.py:depth=abc"], capsys, "'depth' must be int", "'abc'")
    _fails(["--config", "configs/resnet_cifar10.py:dpth=56"], capsys, "Unknown config argument 'dpth'")
    _fails(["--config", "configs/resnet_cifar10.py:epochs"], capsys, "'epochs' needs a value")
    none = tmp_path / "none.py"
    none.write_text("x = 1\n")
    _fails(["--config", str(none)], capsys, "defines no get_config")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(arg=None):\n    return undefined_name\n")
    _fails(["--config", str(broken)], capsys, f"{broken}:2", "NameError", "undefined_name")
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def get_config(arg=None)\n    pass\n")
    _fails(["--config", str(syntax)], capsys, f"{syntax}:1", "SyntaxError")
    typed = tmp_path / "typed.py"
    typed.write_text("from repjax import config as config_lib\n\ndef get_config(arg=None):\n"
                     "    c = config_lib.defaults()\n    c.batch_size = 'big'\n    return c\n")
    _fails(["--config", str(typed)], capsys, f"{typed}:5", "batch_size")
    _fails(["--config", str(tmp_path / "missing.py")], capsys, "not found")


def test_former_environment_switches_are_config_keys():
    from repjax.data import SourceOptions
    from repjax.nn import conv
    from repjax.train import configure

    config = config_lib.defaults()
    config.data.cache_gb, config.conv_chunked_wgrad = 0.5, "off"
    try:
        configure(config)
        assert SourceOptions.from_config(config).cache_limit_bytes == 2**29 and not conv.chunked_default()
    finally:
        configure(config_lib.defaults())
    assert SourceOptions.from_config(config_lib.defaults()).cache_limit_bytes == 2 * 2**30
    assert "stop_on_nan" not in config_lib.flatten(config_lib.defaults())  # was never read: removed


def test_unknown_model_keyword_is_named():
    config = config_lib.defaults()
    config.model.kwargs.widht = 3
    with pytest.raises(ValueError, match=r"small_cnn.*'widht'"):
        build_model(config, 10)


def test_epochs_resolve_from_the_source_length():
    config = config_lib.defaults()
    config.total_steps, config.epochs, config.batch_size = 0, 2.5, 100
    config.optim.warmup_epochs, config.eval_every_epochs = 0.5, 1.0
    resolved = config_lib.resolve_epochs(config, 1497)  # 14 full batches an epoch
    assert (resolved.total_steps, resolved.optim.warmup_steps, resolved.eval_every_steps) == (35, 7, 14)
    assert config.total_steps == 0  # a copy
    assert config_lib.resolve_epochs(resolved, 1497).to_dict() == resolved.to_dict()  # resolved is a fixed point
    config.total_steps = 10
    with pytest.raises(ValueError, match="Set one of 'total_steps' and 'epochs'"):
        config_lib.resolve_epochs(config, 1497)
    config.total_steps, config.epochs = 0, 0.0
    with pytest.raises(ValueError, match="Nothing to train"):
        config_lib.resolve_epochs(config, 1497)


def test_evals_entries_are_checked():
    config = config_lib.defaults()
    config.evals.a = config_lib.mlc.ConfigDict({"type": "classifcation"})
    config.evals.b = config_lib.mlc.ConfigDict({"type": "classification", "splt": "test"})
    config.evals.c = config_lib.mlc.ConfigDict({"type": "classification", "split": "nope"})
    config.evals.d = config_lib.mlc.ConfigDict({"type": "classification", "split": "test"})
    with pytest.raises(ValueError) as e:
        evals.check(config)
    msg = str(e.value)
    assert "evals.a" in msg and "did you mean 'classification'" in msg.lower()
    assert "evals.b" in msg and "splt" in msg and "evals.c.split" in msg and "evals.d" not in msg


# ------------------------------------------------------------------------------------------ workdir record

def test_lock_live_stale_and_foreign(tmp_path):
    with workdir_lib.WorkdirLock(tmp_path) as held:
        assert held.held and json.loads((tmp_path / "lock.json").read_text())["pid"] == os.getpid()
        with pytest.raises(workdir_lib.WorkdirLockedError, match=f"in use by pid {os.getpid()}"):
            workdir_lib.WorkdirLock(tmp_path).__enter__()
    assert not (tmp_path / "lock.json").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "lock.json").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with workdir_lib.WorkdirLock(tmp_path) as taken:  # the stale lock of a dead process is taken over
        assert taken.held
    (tmp_path / "lock.json").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(workdir_lib.WorkdirLockedError, match="on elsewhere"):
        workdir_lib.WorkdirLock(tmp_path).__enter__()


def test_config_record_refuses_result_changes(tmp_path):
    config = config_lib.defaults()
    assert workdir_lib.record_config(tmp_path, config) is None
    original = (tmp_path / "config.json").read_text()
    assert workdir_lib.record_config(tmp_path, config) is None  # same config: nothing to record

    changed = config_lib.defaults()
    changed.optim.lr, changed.seed, changed.log_every_steps = 0.05, 1, 5
    with pytest.raises(workdir_lib.ConfigChangedError) as e:
        workdir_lib.record_config(tmp_path, changed)
    assert "optim.lr (0.1 -> 0.05)" in str(e.value) and "seed (0 -> 1)" in str(e.value)
    assert "log_every_steps" not in str(e.value) and "--allow_config_change" in str(e.value)
    assert (tmp_path / "config.json").read_text() == original and not (tmp_path / "config_changes.jsonl").exists()

    neutral = config_lib.defaults()
    neutral.log_every_steps, neutral.mesh = 5, [("data", 2), ("fsdp", -1)]
    assert "result-neutral" in workdir_lib.record_config(tmp_path, neutral)
    assert "allow_config_change" in workdir_lib.record_config(tmp_path, changed, allow_change=True)
    history = [json.loads(line) for line in (tmp_path / "config_changes.jsonl").read_text().splitlines()]
    assert [h["allowed"] for h in history] == [False, True]
    assert history[1]["changed"]["optim.lr"] == [0.1, 0.05]
    assert (tmp_path / "config.json").read_text() == original  # the start record never changes
    run = workdir_lib.run_config(tmp_path)
    assert run.optim.lr == 0.05 and run.seed == 1 and tuple(run.mesh[0]) == ("data", -1)  # the latest accepted
    assert history[0]["changed"]["mesh"] == [[["data", -1], ["fsdp", 1]], [["data", 2], ["fsdp", -1]]]
    config_lib.validate(run)
    assert workdir_lib.config_diff(run, changed) == {}


# ------------------------------------------------------------------------------------------ checkpoints

def _tree(i: int) -> dict:
    return {"w": jnp.full((64, 8), float(i)), "b": jnp.arange(8.0) + i}


def _abstract() -> dict:
    return {"w": np.zeros((64, 8), np.float32), "b": np.zeros(8, np.float32)}


def _largest(step_dir):
    return max((p for p in step_dir.rglob("*") if p.is_file() and p.name != checkpoint.MANIFEST),
               key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["flip", "truncate", "metadata", "stray", "unsealed"])
def test_damaged_latest_checkpoint_is_named_and_skipped(tmp_path, capsys, damage):
    directory = tmp_path / "ckpt"
    with Checkpointer(directory, save_every_steps=1, max_to_keep=5) as ckpt:  # asynchronous saves
        for step in (1, 2, 3):
            assert ckpt.save(step, _tree(step))
    bad = 3
    if damage == "flip":
        path = _largest(directory / "3")
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path = _largest(directory / "3")
        path.write_bytes(path.read_bytes()[:-7])
    elif damage == "metadata":
        (directory / "3" / "_CHECKPOINT_METADATA").write_text("{not json")
    elif damage == "stray":
        bad = 7
        (directory / "7" / "state").mkdir(parents=True)
    else:  # killed after orbax finished, before the manifest was written
        (directory / "3" / checkpoint.MANIFEST).unlink()
    with Checkpointer(directory) as ckpt:
        with pytest.raises(CheckpointDamagedError, match=f"{bad} is damaged"):
            ckpt.restore(_abstract(), step=bad)
        capsys.readouterr()
        step, state, _ = ckpt.restore(_abstract())  # evaluation: skipped, left in place
        assert step == (3 if damage == "stray" else 2)
        np.testing.assert_array_equal(state["w"], np.full((64, 8), float(step)))
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{directory / str(bad)} is damaged" in err[0] and "skipped" in err[0]
        assert (directory / str(bad)).exists()
        step, _, _ = ckpt.restore(_abstract(), set_aside=True)  # training: moved aside, saving continues
        assert not (directory / str(bad)).exists()
        assert [p.name.split("-")[0] for p in (tmp_path / "ckpt.damaged").iterdir()] == [str(bad)]
        assert ckpt.save(step + 1, _tree(step + 1), force=True)
        ckpt.wait()
        assert checkpoint.verify(directory / str(step + 1)) is None


def test_checkpoint_names_available_steps(tmp_path):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(4, _tree(4), force=True)
        ckpt.save(8, _tree(8), force=True)
        with pytest.raises(FileNotFoundError, match=r"step 5 .*available: \[4, 8\]"):
            ckpt.restore(_abstract(), step=5)


# ------------------------------------------------------------------------------------------ metrics

def test_torn_line_and_rewind(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False) as w:
        for step in (1, 2, 3):
            w.write(step, {"train/loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "train/lo')  # a crash mid-write
    with MetricWriter(tmp_path, tensorboard=False) as w:
        w.write(4, {"train/loss": 4.0})
        assert w.rewind(lambda r: r["step"] <= 2) == 2
        w.write(3, {"train/loss": 30.0})
    assert read_metrics(tmp_path) == [{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 2.0},
                                      {"step": 3, "train/loss": 30.0}]


def _events(path):
    """The Event protos of one TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    data, out, i = path.read_bytes(), [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        out.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
        i += 12 + n + 4
    return out


def test_rewind_purges_repeated_tensorboard_steps(tmp_path):
    """A resumed run's TensorBoard file starts with a SessionLog START at the purge step: TensorBoard drops the
    earlier files' events from that step on, so repeated steps are not drawn twice."""
    with MetricWriter(tmp_path) as w:
        for step in (1, 2, 3):
            w.write(step, {"train/loss": float(step)})
    with MetricWriter(tmp_path) as w:
        w.rewind(lambda r: r["step"] <= 2, purge_from=3)
        w.write(3, {"train/loss": 30.0})
    resumed = [f for f in (tmp_path / "tb").iterdir()
               if any(e.HasField("summary") and e.summary.value[0].simple_value == 30.0 for e in _events(f))]
    assert len(resumed) == 1
    events = [e for e in _events(resumed[0]) if e.HasField("session_log") or e.HasField("summary")]
    assert (events[0].step, events[0].session_log.status) == (3, 1)  # SessionLog.START at step 3, first
    assert [(e.step, e.summary.value[0].simple_value) for e in events[1:]] == [(3, 30.0)]


# ------------------------------------------------------------------------------------------ start-up

def test_rendezvous_names_missing_processes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    errors: dict[int, str] = {}

    def run(pid: int) -> None:
        try:
            distributed.rendezvous(f"127.0.0.1:{port}", 3, pid, timeout=2)
            errors[pid] = "ok"
        except distributed.StartupError as e:
            errors[pid] = str(e)

    threads = [threading.Thread(target=run, args=(pid,)) for pid in (0, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "processes [1] of 3 did not arrive within 2 s (arrived: [0, 2])" in errors[0]
    assert errors[2].startswith("process 2: start-up failed: processes [1]")
    with pytest.raises(distributed.StartupError, match=r"process 0 at 127.0.0.1.* did not answer"):
        distributed.rendezvous(f"127.0.0.1:{port}", 2, 1, timeout=0.5)
    with pytest.raises(distributed.StartupError, match="needs --num_processes"):
        distributed.initialize(f"127.0.0.1:{port}")
