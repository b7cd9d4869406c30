"""MetricWriter files, ProgressBar plain output, summary, and the plot CLI."""

import io
import json

import jax.numpy as jnp
import numpy as np
import pytest

from repjax import plot
from repjax.metrics import MetricWriter, ProgressBar, read_metrics, summary


def test_writer_jsonl_config_tb(tmp_path):
    with MetricWriter(tmp_path) as w:
        w.write_hparams({"lr": 0.1, "mesh": (("data", -1),), "dtype": jnp.float32})
        w.write(1, {"train/loss": jnp.float32(2.5), "train/lr": np.float64(0.1), "phase": "warmup"})
        w.write(2, {"train/loss": 1.5, "ok": np.bool_(True)})
        with pytest.raises(ValueError, match="scalar"):
            w.write(3, {"hist": np.zeros(3)})
    rows = read_metrics(tmp_path)
    assert rows == [{"step": 1, "train/loss": 2.5, "train/lr": 0.1, "phase": "warmup"},
                    {"step": 2, "train/loss": 1.5, "ok": 1.0}]
    assert json.loads((tmp_path / "config.json").read_text())["mesh"] == [["data", -1]]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    with open(tmp_path / "metrics.jsonl", "a") as f:  # torn line from a crash is skipped
        f.write('{"step": 4, "train/lo')
    assert len(read_metrics(tmp_path)) == 2


def test_progress_plain_lines_and_summary():
    out = io.StringIO()  # not a TTY: plain lines
    bar = ProgressBar(100, initial_step=0, batch_size=32, print_every=50, file=out)
    for step in range(10, 101, 10):
        bar.update(step, {"train/loss": jnp.float32(1.0 / step)})
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["10/100", "60/100", "100/100"]
    assert "loss=" in lines[-1] and "img/s=" in lines[-1] and "eta=" in lines[-1]
    text = summary({"test/top1": 0.91234, "steps": 100}, title="Result")
    assert "Result" in text and "test/top1 : 0.9123" in text and "steps     : 100" in text


def test_plot_cli(tmp_path):
    for name, scale in (("a", 1.0), ("b", 2.0)):
        with MetricWriter(tmp_path / name, tensorboard=False) as w:
            for step in range(1, 31):
                w.write(step, {"train/loss": scale / step})
                if step % 10 == 0:  # eval at other steps
                    w.write(step, {"eval/top1": 0.1 * step / scale})
            w.write(30, {"train/loss": 0.0})  # resumed run logs a step again: last wins
    series = plot.load_series(tmp_path / "a")
    assert series["eval/top1"][0] == [10, 20, 30] and series["train/loss"][1][-1] == 0.0
    out = tmp_path / "curves.png"
    plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--keys", "loss,top1"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "a"), "--keys", "nope"])
