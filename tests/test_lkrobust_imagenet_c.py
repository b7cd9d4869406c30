"""<name>-C on the fly (seeded, cached), the released ImageNet-C folder layout, CE / mCE / relative mCE."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from repjax import config as config_lib, data, evals, models, sharding
from repjax.projects.lkrobust import corruptions as C, imagenet_c as ic

SYN = "synthetic:32x32x3,12,3"


@pytest.fixture(scope="module")
def setup():
    config = config_lib.defaults()
    config.data.source, config.data.eval_split, config.data.eval_pp = SYN, "test", "normalize(imagenet)"
    config.eval_batch_size = 8
    model = models.create("small_cnn", num_classes=3, width=4)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    return config, model, variables, sharding.make_mesh(config.mesh)


def test_ce_closed_form():
    errors = {c: {s: e for s in range(1, 6)} for c, e in ic.ALEXNET_ERRORS.items()}
    m = ic.ce_metrics(errors, ic.ALEXNET_CLEAN_ERROR, ic.ALEXNET_ERRORS, ic.ALEXNET_CLEAN_ERROR)
    assert m["mce"] == pytest.approx(1.0) and m["relative_mce"] == pytest.approx(1.0)
    half = {"fog": {1: 0.2, 2: 0.4}}  # mean error 0.3 vs baseline 0.6 (clean 0.1 vs 0.2): CE 0.5, rel 0.5
    m = ic.ce_metrics(half, 0.1, {"fog": 0.6}, 0.2)
    assert m["ce/fog"] == pytest.approx(0.5) and m["rel_ce/fog"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="baseline has no error"):
        ic.ce_metrics({"snow": {1: 0.1}}, 0.1, {"fog": 0.6}, 0.2)
    with pytest.raises(ValueError, match="1000 ImageNet classes"):
        ic.baseline_errors("alexnet", 10, None)


def test_corrupt_source_is_seeded_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("REPJAX_CORRUPT_CACHE", str(tmp_path))
    src = data.get_source(f"corrupt:gaussian_noise/3:{SYN}", "test")
    base = data.get_source(SYN, "test")
    one = src[5]["image"]
    assert one.dtype == np.uint8 and not np.array_equal(one, base[5]["image"])
    ref = C.corrupt(base[5]["image"], "gaussian_noise", 3, ic.image_rngs(0, "gaussian_noise", 3, [5]))
    np.testing.assert_array_equal(one, ref)  # per-index seeding: same image alone or in the split
    with pytest.raises(ValueError, match="corrupt:<corruption>/<severity>"):
        data.get_source(f"corrupt:fog:{SYN}", "test")
    images = np.stack([base[i]["image"] for i in range(len(base))])
    key = {"k": 1}
    a = ic.cached_corrupt(images, np.arange(len(images)), "fog", 2, seed=0, cache_dir=tmp_path, key=key)
    assert len(list(tmp_path.glob("*/fog_2.npy"))) == 1
    b = ic.cached_corrupt(images, np.arange(len(images)), "fog", 2, seed=0, cache_dir=tmp_path, key=key)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[5], src.__class__(base, "fog", 2)[5]["image"])


def test_evaluator_on_the_fly_and_baseline_json(setup, tmp_path):
    config, model, variables, mesh = setup
    run = evals.get("imagenet_c")
    out = run(model, variables, config, mesh, corruptions=("contrast", "fog"), severities=(1, 5), baseline=None,
              save=str(tmp_path / "base"))
    assert set(out) >= {"clean_top1", "top1/fog/5", "top1/contrast", "mean_corrupted_top1"} and "mce" not in out
    assert (tmp_path / "base.png").exists()
    again = run(model, variables, config, mesh, corruptions=("contrast", "fog"), severities=(1, 5),
                baseline=str(tmp_path / "base.json"))
    assert again["mce"] == pytest.approx(1.0)  # a model against its own errors
    assert again["top1/fog/5"] == out["top1/fog/5"]  # deterministic by seed


def test_released_folder_layout(setup, tmp_path):
    config, model, variables, mesh = setup
    base = data.get_source(SYN, "test")
    root = tmp_path / "imagenet-c"
    for c in ("fog", "snow"):
        for s in (1, 2):
            for i in range(len(base)):
                ex = base[i]
                d = root / c / str(s) / base.class_names[ex["label"]]
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(C.corrupt(ex["image"], c, s, seed=i)).save(d / f"{i}.png")
    out = evals.get("imagenet_c")(model, variables, config, mesh, corruptions=("fog", "snow"), severities=(1, 2),
                                  released=str(root), baseline={"fog": 0.5, "snow": 0.5}, save=str(tmp_path / "r"))
    for c in ("fog", "snow"):
        errs = [1 - out[f"top1/{c}/{s}"] for s in (1, 2)]
        assert out[f"ce/{c}"] == pytest.approx(np.mean(errs) / 0.5)
    assert json.loads((tmp_path / "r.json").read_text())["errors"]["fog"]
    with pytest.raises(FileNotFoundError, match="released ImageNet-C folder"):
        ic.released_source(str(root), None, "frost", 1)
