"""repjax.bench: interleaved medians, and runners that compile and report what they measure."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
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
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False))
    assert info["params"] == sum(x.size for x in jax.tree.leaves(abstract["params"]))
    variables = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)  # speed only: values do not matter
    assert bench.inference_runner(model, variables, batch=4, image_shape=(8, 8, 3), iters=2)() > 0
    with pytest.raises(KeyError):
        bench.interleaved({"a": lambda: 1.0}, rounds=1)["b"]


@pytest.mark.slow
def test_bench_models_quick_writes_rows(tmp_path, monkeypatch):
    """experiments/bench_models.py --quick on its smallest row (RepOpt-VGG target + RepOpt-SGD, two blocks, widths
    8-16, batch 4 at 16 px, PyTorch reference included): the results.json layout only."""
    import importlib.util
    import json
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_models.py"
    spec = importlib.util.spec_from_file_location("bench_models", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_models", module)  # its dataclass looks its module up
    spec.loader.exec_module(module)
    module.main(["--quick", "--only", "repopt_vgg tiny-arch", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "results.json").read_text())
    keys = {"model", "repjax_train_img_s", "torch_train_img_s", "train_ratio", "repjax_infer_img_s",
            "torch_infer_img_s", "infer_ratio", "repjax_train_peak_mb", "torch_train_peak_mb", "params"}
    assert [r["model"] for r in report["rows"]] == ["repopt_vgg tiny-arch target (pair)"]
    for row in report["rows"]:
        assert keys <= set(row) and row["params"] == row["torch_params"]
        assert row["train_ratio"] > 0 and row["infer_ratio"] > 0 and row["torch_train_peak_mb"] > 0
    assert report["repopt_over_repvgg"] == [] and (tmp_path / "ratios.png").exists()  # one side of the pair only
    table = (tmp_path / "table.md").read_text().splitlines()
    assert len(table) == 3 and table[2].startswith("| repopt_vgg tiny-arch target (pair) (4) |")


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_every_bench_row_has_a_matching_torch_reference(quick, monkeypatch):
    """Each row of experiments/bench_models.py builds its repjax model and PyTorch reference with the same
    parameter count, and each quick row's reference maps the row's input size to logits (bench_models finds
    either only after compiling the rows before it; the GPU script runs every row)."""
    import importlib.util
    import pathlib
    import sys

    torch = pytest.importorskip("torch")
    path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_models.py"
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location("bench_models", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_models", module)
    spec.loader.exec_module(module)
    import torch_models

    for row in module.rows(quick):
        model = models.create(row.model, **row.kwargs)
        x = jnp.zeros((1, row.size, row.size, 3))
        shapes = jax.eval_shape(lambda m=model, a=x: m.init(jax.random.PRNGKey(0), a, train=False))
        net = torch_models.build(model)
        assert torch_models.param_count(net) == sum(a.size for a in jax.tree.leaves(shapes["params"])), row.label
        if quick:  # a forward of the reference at the row's size (the full rows are too slow for the suite)
            with torch.no_grad():
                assert net.eval()(torch.zeros(1, 3, row.size, row.size)).shape == (1, model.num_classes), row.label


def test_torch_vit_reference_matches_the_parameter_count():
    """experiments/torch_models.ViT (PyTorch's TransformerEncoderLayer) has the repjax ViT's parameter count,
    which bench_models requires of every row, and the logits shape; a PETL host or GAP pooling is refused."""
    import pathlib
    import sys

    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
    import torch_models

    model = models.create("vit_test", num_classes=7)
    size = model.image_size
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))["params"]
    net = torch_models.build(model)
    assert torch_models.param_count(net) == sum(x.size for x in jax.tree.leaves(params))
    assert net(torch.zeros(2, 3, size, size)).shape == (2, 7)
    with pytest.raises(ValueError, match="plain CLS"):
        torch_models.build(models.create("vit_test", pool="gap"))


def test_profile_step_names_each_thunk_by_its_layer():
    """experiments/profile_step.py: the compiled HLO index finds the convolution of a tiny jitted step with its
    JAX op name, `category` calls its transpose the input gradient, and `source` names it module/primitive."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
    import profile_step

    def loss(x, w):
        with jax.named_scope("stage3_12"), jax.named_scope("conv"):
            y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y**2)

    x, w = jnp.ones((4, 16, 16, 32)), jnp.ones((3, 3, 32, 32))  # large enough for a YNNPACK weight gradient
    index = profile_step.hlo_index(jax.jit(jax.grad(loss, (0, 1))).lower(x, w).compile().as_text())
    convs = [i for i in index.values() if "conv_general_dilated" in i["op_name"]]
    assert convs and {profile_step.source("", i) for i in convs} == {"conv/conv_general_dilated"}
    assert {"conv input grad", "conv weight grad"} <= {profile_step.category("", i, 4) for i in convs}
    assert profile_step.source("f.3", {"op_name": "jit(step)/jvp(Net)/stages_0_1/norm/rsqrt", "opcode": "fusion"}) \
        == "norm/rsqrt"
    assert profile_step.source("transpose_copy_fusion.45", {"op_name": "", "opcode": "fusion"}) == \
        "(transpose_copy_fusion)"


def test_bench_models_update_replaces_rows_in_place(tmp_path, monkeypatch):
    """--update: a re-measured row replaces the row of the same label (others kept, order kept, the command
    recorded); a report measured with other settings is refused."""
    import importlib.util
    import json
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_models.py"
    spec = importlib.util.spec_from_file_location("bench_models", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_models", module)
    spec.loader.exec_module(module)
    settings = dict(backend="cpu", torch_device="cpu", dtype="fp32", torch_threads=2, rounds=3, iters_per_round=3,
                    quick=False)
    rows = [{"model": m, "group": None, "train_ratio": 0.5} for m in ("a", "b")]
    (tmp_path / "results.json").write_text(json.dumps({**settings, "command": "all", "rows": rows}))
    new = {**settings, "command": "--only b", "seconds": 1.0, "rows": [{"model": "b", "group": None, "train_ratio": 2}]}
    merged = module.updated(tmp_path / "results.json", new)
    assert [(r["model"], r["train_ratio"]) for r in merged["rows"]] == [("a", 0.5), ("b", 2)]
    assert merged["rows"][1]["command"] == "--only b" and merged["updates"][0]["rows"] == ["b"]
    with pytest.raises(SystemExit, match="other settings"):
        module.updated(tmp_path / "results.json", {**new, "rounds": 5})


def test_profile_step_gives_an_op_less_fusion_the_op_name_of_its_bitcast():
    """XLA:CPU's YNNPACK fusion of a weight gradient has no op name; the bitcast reading it has (HLO as printed
    by jax 0.10's compiled `as_text()`)."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
    import profile_step

    hlo = """
  %ynn_fusion = f32[32,3,3,32]{3,2,1,0} fusion(%t.1, %t), kind=kCustom, calls=%fused_computation, backend_config={}
  %bitcast = f32[3,3,32,32]{3,1,0,2} bitcast(%ynn_fusion), metadata={op_name="jit(f)/transpose(jvp(Net))/stage1/conv/conv_general_dilated" stack_frame_id=3}
"""  # noqa: E501
    info = profile_step.hlo_index(hlo)["ynn_fusion"]
    assert info["op_name"].endswith("stage1/conv/conv_general_dilated")
    assert profile_step.category("ynn_fusion", info, batch=8) == "conv weight grad"


def test_best_seconds_warms_up_and_keeps_the_fastest_call(monkeypatch):
    calls, clock = [], iter([0.0, 3.0, 10.0, 11.0, 20.0, 22.0])  # bursts of 3, 1 and 2 seconds
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    assert bench.best_seconds(lambda x: calls.append(x) or x, 7, repeats=3) == 1.0
    assert calls == [7] * (bench.WARMUP_CALLS + 3)  # the untimed warm-up calls, then the timed ones


def test_fastest_interleaved_takes_turns(monkeypatch):
    order = []
    clock = iter([0.0, 5.0, 5.0, 6.0, 6.0, 8.0, 8.0, 12.0])  # a: 5 then 2 s; b: 1 then 4 s
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    best = bench.fastest_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=2)
    assert best == {"a": 2.0, "b": 1.0}
    # warm-up calls, then per round and runner an untimed call and a timed one
    assert order == ["a"] * bench.WARMUP_CALLS + ["b"] * bench.WARMUP_CALLS + ["a", "a", "b", "b"] * 2
