"""Every shipped config, and every run config an experiment script builds, loads, validates and resolves its
epochs: a script that trains many models must not fail on its first `train` call after minutes of set-up."""

import importlib.util
import pathlib
import sys
import types

import pytest

from repjax import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(REPO) for p in (REPO / "configs").rglob("*.py"))
NEEDS = {"repopt_vgg_": "scales=x.npz"}  # RepOpt-VGG targets refuse to build without searched scales


def _arg(path: pathlib.Path) -> str:
    return next((arg for prefix, arg in NEEDS.items() if path.stem.startswith(prefix) and "cifar" not in path.stem),
                "")


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_config_loads_validates_and_resolves(path, monkeypatch):
    monkeypatch.chdir(REPO)
    arg = _arg(path)
    config = config_lib.load(f"{path}:{arg}" if arg else str(path))
    config_lib.validate(config)
    resolved = config_lib.resolve_epochs(config, 9469)
    assert resolved.total_steps >= 1


def _script(name: str, monkeypatch) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_lk_robustness_run_configs_resolve(quick, monkeypatch):
    lk = _script("lk_robustness", monkeypatch)
    args = types.SimpleNamespace(image_size=64, batch=16 if quick else 128)
    steps = 6 if quick else int(8 * 9469 / 128)
    named = {**lk.variants(31), **{f"sweep_{k}": lk.variants(k)["dense"] for k in lk.SWEEP}}
    for name, (model, kwargs) in named.items():
        config = lk.make_config(model, kwargs, args, steps)
        config_lib.validate(config)
        assert config_lib.resolve_epochs(config, 9469).total_steps == steps, name


def test_shared_recipe_refuses_an_unknown_augmentation(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(config_lib.ConfigFileError, match="aug must be one of"):
        config_lib.load("configs/vit_imagenette.py:aug=medium")


def test_lk_robustness_tables_have_one_row_per_model_and_kernel(monkeypatch):
    lk = _script("lk_robustness", monkeypatch)
    occ = {f"{m}/{v}": 0.2 for m in ("random", "salient", "non_salient") for v in (0.5,)}
    model = {"clean_top1": 0.5, "mean_corrupted_top1": 0.3, "mce": 0.9, "relative_mce": None,
             "fgsm_acc": {f"{e:g}": 0.1 for e in lk.FGSM_EPS}, "pgd_acc": {f"{e:g}": 0.1 for e in lk.PGD_EPS},
             "occlusion": occ, "frequency_drop": {"0.00": 0.01, "0.70": 0.04}, "lesion": {"0": 0.5, "1": 0.4, "2": 0.3},
             "erf": {"ratio_0.2": 0.1}}
    results = {"models": {"a": model, "b": {**model, "kernel_attention": {"distance": 3.0, "distance_norm": 0.5}}},
               "kernel_sweep": [{"kernel": 3, "clean_top1": 0.4, "mce": 1.0, "run": "sweep_3"}]}
    table, sweep = lk.markdown_tables(results, {"a": 0.6, "sweep_3": 0.45}).split("\n\n")
    lines = table.splitlines()
    assert len(lines) == 4 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert lines[2].startswith("| a | 60.0 | 50.0 |") and "4.0 at 0.70 pi" in lines[2] and "3.00 (0.50)" in lines[3]
    assert "40.0 / 30.0 (2)" in lines[2]  # lesion: one block, every removable block
    assert sweep.splitlines()[2] == "| 3 | 45.0 | 40.0 | 100.0 |"


def test_lk_robustness_keeps_analyses_only_for_the_same_run_and_settings(monkeypatch, tmp_path):
    """evaluate_cached: a second call with the same run, step and settings reuses the kept result; another
    image count, a newer step or a missing Imagenette-C table recomputes it."""
    lk = _script("lk_robustness", monkeypatch)
    calls, step = [], {"now": 10}
    monkeypatch.setattr(lk, "read_metrics", lambda workdir: [{"step": step["now"]}])

    def fake_evaluate(name, c, workdir, args, out, baseline, corruptions, severities, full):
        calls.append(args.images)
        (out / f"imagenette_c_{name}.json").write_text("{}")
        return {"clean_top1": 0.5}

    monkeypatch.setattr(lk, "evaluate", fake_evaluate)
    config = lk.make_config("resnet20", {}, types.SimpleNamespace(image_size=32, batch=16), 6)

    def run(images):
        args = types.SimpleNamespace(images=images, quick=True)
        return lk.evaluate_cached("m", config, tmp_path, args, tmp_path, None, ("fog",), (3,), False)

    assert run(40) == run(40) == {"clean_top1": 0.5} and calls == [40]
    run(30)
    step["now"] = 11
    run(30)
    (tmp_path / "imagenette_c_m.json").unlink()
    run(30)
    assert calls == [40, 30, 30, 30]
    kept = (tmp_path / "models" / "m.json").read_text()
    assert str(lk.IMAGENETTE) not in kept and "folder:../shared/data/imagenette" in kept  # no machine path
