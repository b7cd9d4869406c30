"""Distribution-shift evaluators on small generated data in the released layouts (A/R/O, V2, IN-9)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from repjax import config as config_lib, evals, models, sharding
from repjax.projects.lkrobust import inputs, shift

NAMES = ["n0001", "n0002", "n0003", "n0004"]


def _write(root, classes, per=3, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per):
            Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


@pytest.fixture(scope="module")
def setup():
    config = config_lib.defaults()
    config.data.source, config.data.eval_split = "synthetic:32x32x3,16,4", "test"
    config.data.eval_pp = "center_crop(32)|normalize(imagenet)"
    config.eval_batch_size = 8
    model = models.create("small_cnn", num_classes=4, width=4)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    return config, model, variables, sharding.make_mesh(config.mesh)


def test_average_precision_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(5):
        scores, pos = rng.integers(0, 6, 50).astype(float), rng.random(50) < 0.3  # with ties
        assert shift.average_precision(scores, pos) == pytest.approx(metrics.average_precision_score(pos, scores))
    assert shift.average_precision([3, 2, 1], [True, True, False]) == 1.0


def test_label_map():
    np.testing.assert_array_equal(shift.label_map(["n0003", "n0001"], NAMES), [2, 0])
    np.testing.assert_array_equal(shift.label_map(["0", "10", "2"], [f"n{i:04d}" for i in range(11)]), [0, 10, 2])
    with pytest.raises(ValueError, match="cannot map"):
        shift.label_map(["x", "y"], NAMES)


def test_imagenet_a_masking(setup, tmp_path):
    config, model, variables, mesh = setup
    _write(tmp_path / "a", NAMES[1:3])
    out = evals.get("imagenet_a")(model, variables, config, mesh, path=str(tmp_path / "a"), class_names=NAMES)
    ev = inputs.Evaluated(model, variables, config, mesh)
    logits, y = shift.set_logits(ev, shift.FlatFolder(tmp_path / "a"), None)
    masked = np.array([1, 2])[np.argmax(logits[:, 1:3], -1)]
    assert out["classes"] == 2 and out["images"] == 6
    assert out["top1"] == pytest.approx(np.mean(masked == y + 1))
    assert out["top1_unmasked"] == pytest.approx(np.mean(np.argmax(logits, -1) == y + 1))
    one = evals.get("imagenet_r")(model, variables, config, mesh, path=str(tmp_path / "a"), class_names=NAMES,
                                  mask="present", num_images=3)  # 3 evenly spread images: both classes present
    assert one["images"] == 3


def test_imagenet_v2_index_folders(setup, tmp_path):
    config, model, variables, mesh = setup
    _write(tmp_path / "v2", ["0", "3"])
    out = evals.get("imagenet_v2")(model, variables, config, mesh, path=str(tmp_path / "v2"),
                                   class_names=NAMES)
    ev = inputs.Evaluated(model, variables, config, mesh)
    logits, y = shift.set_logits(ev, shift.FlatFolder(tmp_path / "v2"), None)
    assert out["top1"] == pytest.approx(np.mean(np.argmax(logits, -1) == np.array([0, 3])[y]))


def test_imagenet_o_aupr(setup, tmp_path):
    config, model, variables, mesh = setup
    _write(tmp_path / "o", NAMES[:2])
    out = evals.get("imagenet_o")(model, variables, config, mesh, path=str(tmp_path / "o"), class_names=NAMES)
    assert out["ood_images"] == 6 and out["classes"] == 2 and 0 < out["in_images"] < 16
    base_rate = 6 / (6 + out["in_images"])
    assert 0 < out["aupr"] <= 1 and 0 < out["aupr_unmasked"] <= 1
    assert out["aupr"] >= base_rate * 0.5  # a sanity floor; exactness of AP is the sklearn test


def test_imagenet_9_gap(setup, tmp_path):
    config, _, _, mesh = setup
    model = models.create("small_cnn", num_classes=9, width=4)
    variables = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)), train=False)
    classes = [f"{i:02d}_c{i}" for i in range(9)]
    for k, v in enumerate(("original", "mixed_same", "mixed_rand")):
        _write(tmp_path / "in9" / v / "val", classes, per=2, seed=k)
    out = evals.get("imagenet_9")(model, variables, config, mesh, path=str(tmp_path / "in9"))
    assert set(out) == {"top1/original", "top1/mixed_same", "top1/mixed_rand", "bg_gap"}
    assert out["bg_gap"] == pytest.approx(out["top1/mixed_same"] - out["top1/mixed_rand"])
    ev = inputs.Evaluated(model, variables, config, mesh)
    logits, y = shift.set_logits(ev, shift.FlatFolder(tmp_path / "in9" / "mixed_rand" / "val"), None)
    assert out["top1/mixed_rand"] == pytest.approx(np.mean(np.argmax(logits, -1) == y))
    with pytest.raises(ValueError, match=r"in_to_in9\.json"):
        shift.in9_superclass(None, 1000)
    sup = shift.in9_superclass({"5": 2, "7": 0}, 10)
    assert sup[5] == 2 and sup[7] == 0 and sup[0] == -1
