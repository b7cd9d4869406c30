"""VTAB-1k splits (TFDS split strings, txt lists) and the mini-VTAB tasks, on small generated data."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

from repjax import data
from repjax.data import vtab
from repjax.projects.dynadapter import minivtab


def test_split_strings_follow_task_adaptation():
    cifar = vtab.TASKS["cifar100"]
    sizes = {"train": 50_000, "test": 10_000}
    assert vtab.split_string(cifar, "train800", sizes) == "train[0:800]"
    assert vtab.split_string(cifar, "val200", sizes) == "train[45000:45200]"
    assert vtab.split_string(cifar, "train800val200", sizes) == "train[0:800]+train[45000:45200]"
    assert vtab.split_string(cifar, "test", sizes) == "test[0:10000]"
    eurosat = vtab.TASKS["eurosat"]
    assert vtab.split_string(eurosat, "val200", {"train": 27_000}) == "train[16200:16400]"
    assert vtab.split_string(eurosat, "test", {"train": 27_000}) == "train[21600:27000]"
    norb = vtab.TASKS["smallnorb_azi"]
    assert vtab.split_string(norb, "val200", {"train": 24_300, "test": 24_300}) == "test[0:200]"
    assert vtab.split_string(norb, "test", {"train": 24_300, "test": 24_300}) == "test[12150:24300]"
    assert vtab.split_string(vtab.TASKS["dtd"], "val200", {"train": 1880, "validation": 1880, "test": 1880}) \
        == "validation[0:200]"
    with pytest.raises(ValueError, match="fewer than 800"):
        vtab.split_string(cifar, "train800", {"train": 500, "test": 10})
    with pytest.raises(KeyError, match="available: train800"):
        vtab.split_string(cifar, "train", sizes)
    counts = {t.group: 0 for t in vtab.TASKS.values()}
    for t in vtab.TASKS.values():
        counts[t.group] += 1
    assert counts == {"natural": 7, "specialized": 4, "structured": 8}
    assert vtab.TASKS["dsprites_ori"].label({"label_orientation": 39}) == 15
    assert vtab.TASKS["dsprites_loc"].label({"label_x_position": 31}) == 15


@pytest.fixture(scope="module")
def tfds_ok():
    if importlib.util.find_spec("tensorflow_datasets") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("tensorflow_datasets is not installed; under CI the vtab: path must be tested")
        pytest.skip("tensorflow_datasets is not installed")


def test_vtab_tfds_source_on_generated_data(tfds_ok, tmp_path):
    from repjax.data import tfds_prepare

    # a 'cifar100'-named dataset with 1,200 train and 150 test images (10 classes, generated)
    tfds_prepare.prepare("synthetic:8x8x3,1200,10", "cifar100", tmp_path, splits=["train", "test"])
    expect = {"train800": 800, "val200": 120, "train800val200": 920, "test": 1200}
    with pytest.raises(ValueError, match="fewer than 200"):  # 10% of 1,200 is 120 < 200
        data.get_source(f"vtab:cifar100@{tmp_path}", "val200")
    src = data.get_source(f"vtab:cifar100@{tmp_path}", "train800")
    assert len(src) == expect["train800"] and src.split_string == "train[0:800]"
    assert src.num_classes == 100 and src[0]["image"].shape == (8, 8, 3)
    test = data.get_source(f"vtab:cifar100@{tmp_path}", "test")
    assert test.split_string.startswith("test[0:")
    labels = np.asarray([test[i]["label"] for i in range(len(test))])
    assert labels.min() >= 0 and labels.max() < 10
    with pytest.raises(NotImplementedError, match="kitti"):
        data.get_source(f"vtab:kitti@{tmp_path}", "test")
    with pytest.raises(ValueError, match="Unknown VTAB task"):
        data.get_source(f"vtab:imagenet@{tmp_path}", "test")


def test_vtab_val200_and_union_on_generated_data(tfds_ok, tmp_path):
    from repjax.data import tfds_prepare

    tfds_prepare.prepare("synthetic:8x8x3,2500,10", "cifar100", tmp_path, splits=["train", "test"])
    val = data.get_source(f"vtab:cifar100@{tmp_path}", "val200")
    both = data.get_source(f"vtab:cifar100@{tmp_path}", "train800val200")
    train = data.get_source(f"vtab:cifar100@{tmp_path}", "train800")
    assert (len(train), len(val), len(both)) == (800, 200, 1000)
    assert val.split_string == "train[2250:2450]"
    np.testing.assert_array_equal(both[800]["image"], val[0]["image"])
    np.testing.assert_array_equal(both[799]["image"], train[799]["image"])


def test_txt_list_layout(tmp_path):
    task = tmp_path / "dtd"
    (task / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train800", 6), ("val200", 3), ("train800val200", 9), ("test", 4)):
        lines = []
        for i in range(n):
            name = f"images/{split}_{i}.png"
            Image.fromarray(rng.integers(0, 255, (5, 7, 3), dtype=np.uint8)).save(task / name)
            lines.append(f"{name} {i % 47}")
        (task / f"{split}.txt").write_text("\n".join(lines) + "\n")
    src = data.get_source(f"vtab_txt:{task}", "val200")
    assert len(src) == 3 and src.num_classes == 47 and src[2]["label"] == 2
    assert src[0]["image"].shape == (5, 7, 3) and src[0]["image"].dtype == np.uint8
    (task / "test.txt").write_text("images/test_0.png\n")
    with pytest.raises(ValueError, match="line 1: expected 'path label'"):
        data.get_source(f"vtab_txt:{task}", "test")
    other = tmp_path / "mytask"
    other.mkdir()
    (other / "train800.txt").write_text("a.png 3\nb.png 4\n")
    assert data.get_source(f"vtab_txt:{other}", "train800").num_classes == 5  # inferred: max label + 1
    with pytest.raises(FileNotFoundError, match=r"val200\.txt"):
        data.get_source(f"vtab_txt:{other}", "val200")


@pytest.mark.parametrize("task,classes,test", [("digits", 10, 300), ("dsprites_loc", 16, 2000),
                                                ("dsprites_ori", 16, 2000), ("count", 8, 2000)])
def test_minivtab_protocol(task, classes, test):
    sizes = {s: len(data.get_source(f"minivtab:{task}", s)) for s in vtab.SPLITS}
    assert sizes == {"train800": 800, "val200": 200, "train800val200": 1000, "test": test}
    src = data.get_source(f"minivtab:{task}", "train800val200")
    images, labels = src.as_arrays()
    assert images.dtype == np.uint8 and images.shape[-1] == 3
    assert src.num_classes == classes and labels.min() == 0 and labels.max() == classes - 1
    val = data.get_source(f"minivtab:{task}", "val200")
    np.testing.assert_array_equal(images[800:], val.as_arrays()[0])


def test_minivtab_is_deterministic_and_labels_match_the_generator():
    for gen in (minivtab.counting, minivtab.dsprites):
        a, b = gen(40, minivtab._rng("count", 1)), gen(40, minivtab._rng("count", 1))
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    _, counts = minivtab.counting(3, np.random.default_rng(0))
    assert counts.min() >= 3 and counts.max() <= 10
    mask = minivtab.render_sprite(0, 0.15, 0.0, 0.5, 0.5)
    assert mask[16, 16] and not mask[0, 0]
    arrow = [minivtab.render_sprite(2, 0.2, a, 0.5, 0.5) for a in (0.0, np.pi)]
    assert not np.array_equal(*arrow)  # the arrow tells orientations apart over the full turn
    with pytest.raises(ValueError, match="one of cifar10"):
        data.get_source("minivtab:mnist", "test")


@pytest.mark.shared_data
def test_minivtab_cifar10(shared_data):
    train = data.get_source(f"minivtab:cifar10@{shared_data}", "train800")
    val = data.get_source(f"minivtab:cifar10@{shared_data}", "val200")
    assert (len(train), len(val), train.num_classes) == (800, 200, 10)
    assert len(set(train.labels.tolist())) == 10  # a shuffled pool, not the first class folder
