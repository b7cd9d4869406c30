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
