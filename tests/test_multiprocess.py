"""Two processes on 127.0.0.1 (CPU collectives) follow the same loss trajectory as one process."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

STEPS = 6
OVERRIDES = [f"--config.total_steps={STEPS}", "--config.log_every_steps=1", "--config.batch_size=32",
             "--config.checkpoint_every_steps=100", "--config.eval_batch_size=64"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, cpu_devices, extra=()):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "repjax.train", "--workdir", str(workdir), "--cpu_devices", str(cpu_devices),
           *OVERRIDES, *extra]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    single = _launch(tmp_path / "one", cpu_devices=4)
    out, _ = single.communicate(timeout=300)
    assert single.returncode == 0, out

    port = _free_port()
    procs = [_launch(tmp_path / "two", cpu_devices=2,
                     extra=["--coordinator", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)])
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out

    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:  # same global batches, same devices count (4): float32 reduction-order tolerance
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), (step, one, two)
