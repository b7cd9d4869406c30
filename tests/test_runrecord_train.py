"""The run record end to end on digits: fallback from a damaged checkpoint without repeated metrics rows,
refused config changes, evaluation of a workdir with its own config and step, save before eval, pre-flight
checks of the eval split and evaluators, exit statuses, the workdir lock and the multi-process start-up limit."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from repjax import (
    checkpoint,
    config as config_lib,
    eval as eval_lib,
    sharding,
    train as train_lib,
    workdir as workdir_lib,
)
from repjax.build import build, restore_variables
from repjax.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(**top):
    c = config_lib.defaults()
    c.total_steps, c.batch_size, c.eval_batch_size = 8, 32, 100
    c.log_every_steps, c.checkpoint_every_steps = 1, 2
    c.ema_decay = 0.9  # the workdir's own config evaluates the EMA parameters; the default config would not
    for key, value in top.items():
        c[key] = value
    return c


def _flip_byte(step_dir: pathlib.Path) -> None:
    path = max((p for p in step_dir.rglob("*") if p.is_file() and p.name != checkpoint.MANIFEST),
               key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _train_rows(workdir):
    return [(r["step"], r["train/loss"]) for r in read_metrics(workdir) if "train/loss" in r]


def test_fallback_config_record_and_eval(tmp_path, capsys):
    config = _config()
    full = train_lib.train(config, tmp_path / "full")
    split = tmp_path / "split"
    assert train_lib.train(config, split, stop_after=6)["status"] == "stopped"
    _flip_byte(split / "checkpoints" / "6")  # the newest checkpoint is damaged
    capsys.readouterr()
    resumed = train_lib.train(config, split)
    err = capsys.readouterr()
    assert f"{split / 'checkpoints' / '6'} is damaged" in err.err and "Resumed from step 4" in err.out
    assert "Traceback" not in err.err and resumed["step"] == 8
    assert [p.name.split("-")[0] for p in (split / "checkpoints.damaged").iterdir()] == ["6"]
    a, b = (restore_variables(config, d, 10, (8, 8, 1)) for d in (tmp_path / "full", split))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert _train_rows(split) == _train_rows(tmp_path / "full")  # steps 5, 6 logged once, same values
    assert [r["step"] for r in read_metrics(split) if "test/top1" in r] == [8]
    assert not (split / "lock.json").exists()

    # A changed learning rate is refused and nothing of the record changes.
    before = {n: (split / n).read_bytes() for n in ("config.json", "metrics.jsonl")}
    changed = _config()
    changed.optim.lr = 0.05
    with pytest.raises(workdir_lib.ConfigChangedError, match=r"optim\.lr \(0\.1 -> 0\.05\)"):
        train_lib.train(changed, split)
    assert {n: (split / n).read_bytes() for n in before} == before
    assert not (split / "config_changes.jsonl").exists()

    # Evaluation of a workdir: its own config (EMA parameters), the asked step, overrides recorded.
    run = str(tmp_path / "full")
    own = eval_lib.evaluate(workdir=run, throughput=False)
    assert own["step"] == 8 and own["config_overrides"] == {}
    assert own["top1"] == pytest.approx(full["test/ema_top1"], abs=1e-9)
    other = workdir_lib.run_config(run)
    other.eval_batch_size = 50
    at4 = eval_lib.evaluate(other, workdir=run, step=4, throughput=False)
    assert at4["step"] == 4 and at4["config_overrides"] == {"eval_batch_size": 50}
    with pytest.raises(FileNotFoundError, match=r"step 5 .*available: \[4, 6, 8\]"):
        eval_lib.evaluate(workdir=run, step=5, throughput=False)
    eval_lib.main(["--workdir", run, "--checkpoint", "6"])
    eval_lib.main(["--workdir", run, "--config.eval_batch_size=20"])
    records = [json.loads(line) for line in (tmp_path / "full" / "evals.jsonl").read_text().splitlines()]
    assert [r["checkpoint"] for r in records] == [6, 8]  # appended, never overwritten
    assert records[1]["result"]["config_overrides"] == {"eval_batch_size": 20}
    assert records[1]["result"]["top1"] == pytest.approx(full["test/ema_top1"], abs=1e-9)
    assert "Traceback" not in capsys.readouterr().err


def test_save_before_eval_and_preflight(tmp_path, monkeypatch):
    bad = _config(total_steps=4)
    bad.evals.x = config_lib.mlc.ConfigDict({"type": "classification", "splitt": "test"})
    with pytest.raises(ValueError, match=r"evals\.x.*splitt"):
        train_lib.train(bad, tmp_path / "a")
    bad = _config(total_steps=4)
    bad.data.eval_split = "validation"
    with pytest.raises(KeyError, match="validation"):  # UnknownSplitError
        train_lib.train(bad, tmp_path / "b")
    for name in ("a", "b"):  # nothing ran, nothing recorded: the corrected config is a new start
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == []

    def failing_eval(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(train_lib, "_evaluate", failing_eval)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train_lib.train(_config(total_steps=4, eval_every_steps=2), tmp_path / "c")
    config = _config(total_steps=4, eval_every_steps=2)
    abstract = build(config, 10, (8, 8, 1), sharding.make_mesh(config.mesh)).abstract_state
    with checkpoint.Checkpointer(tmp_path / "c" / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [2] and ckpt.verify(2) is None  # saved before the evaluation that failed
        assert ckpt.restore(abstract)[2] == {}  # no data-iterator state: the data position is the step
    assert not (tmp_path / "c" / "lock.json").exists()


def test_exit_statuses_and_lock(tmp_path, monkeypatch, capsys):
    for status, code in (("preempted", 3), ("stopped", 4)):
        monkeypatch.setattr(train_lib, "train", lambda *a, s=status, **k: {"status": s, "step": 1})
        with pytest.raises(SystemExit) as e:
            train_lib.main(["--workdir", str(tmp_path / "x")])
        assert e.value.code == code
    monkeypatch.setattr(train_lib, "train", lambda *a, **k: {"status": "finished", "step": 1})
    train_lib.main(["--workdir", str(tmp_path / "x")])  # returns: status 0
    monkeypatch.undo()

    with workdir_lib.WorkdirLock(tmp_path / "busy"), pytest.raises(SystemExit) as e:
        train_lib.main(["--workdir", str(tmp_path / "busy")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"in use by pid {os.getpid()}" in err and len(err.strip().splitlines()) == 1


def test_missing_peer_is_named(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "repjax.train", "--workdir", str(tmp_path), "--coordinator",
                          f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", "0", "--init_timeout", "2"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "processes [1] of 2 did not arrive within 2 s" in out.stderr and "Check failure" not in out.stderr
