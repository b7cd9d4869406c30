"""`tfds:` sources on datasets prepared here (without TensorFlow) by `repjax.data.tfds_prepare`.

Needs tensorflow-datasets, importlib_resources and array-record: skipped when tensorflow_datasets is not
importable, except under CI=true, where that is a failure.
"""

import importlib.util
import os
import sys

import numpy as np
import pytest

from repjax import data
from repjax.data import tfds_prepare


@pytest.fixture(scope="module")
def tfds_ok():
    if importlib.util.find_spec("tensorflow_datasets") is None:
        reason = "tensorflow_datasets is not installed (pip install tensorflow-datasets importlib_resources)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; under CI the tfds: path must be tested")
        pytest.skip(reason)


def test_missing_tensorflow_datasets_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        data.get_source("tfds:cifar10", "test")


@pytest.mark.shared_data
def test_prepared_cifar10_reads_back_like_the_folder(tfds_ok, shared_data, tmp_path):
    folder_spec = f"folder:{shared_data / 'cifar10'}"
    path = tfds_prepare.prepare(folder_spec, "cifar10_subset", tmp_path, splits=["test"], limit=120)
    assert path == tmp_path / "cifar10_subset" / "1.0.0"
    folder = data.get_source(folder_spec, "test")
    tfds_src = data.get_source(f"tfds:cifar10_subset@{tmp_path}", "test")
    assert len(tfds_src) == 120
    assert tfds_src.class_names == folder.class_names and tfds_src.num_classes == 10
    kept = tfds_prepare.subset(len(folder), 120)
    for j, i in enumerate(kept):
        np.testing.assert_array_equal(tfds_src[j]["image"], folder[int(i)]["image"])  # PNG: lossless
        assert tfds_src[j]["label"] == folder[int(i)]["label"]
    assert {tfds_src[j]["label"] for j in range(120)} == set(range(10))
    images, labels = tfds_src.as_arrays()  # the in-memory copy the pipeline uses
    np.testing.assert_array_equal(images, folder.as_arrays()[0][kept])
    np.testing.assert_array_equal(labels, folder.labels[kept])
    batch = next(data.pipeline.eval_batches(tfds_src, global_batch_size=32, pp="normalize(cifar10)"))
    assert batch["image"].shape == (32, 32, 32, 3)
    with pytest.raises(data.UnknownSplitError, match="available: test"):
        data.get_source(f"tfds:cifar10_subset@{tmp_path}", "train")


def test_prepare_digits_and_data_dir_from_env(tfds_ok, tmp_path, monkeypatch):
    tfds_prepare.main(["--source", "digits", "--name", "digits_small", "--data_dir", str(tmp_path),
                       "--splits", "train,test", "--limit", "40"])
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    train = data.get_source("tfds:digits_small", "train")
    digits = data.get_source("digits", "train")
    assert len(train) == 40 and train.class_names == digits.class_names
    for j, i in enumerate(tfds_prepare.subset(len(digits), 40)):
        np.testing.assert_array_equal(train[j]["image"], digits[int(i)]["image"])  # 8x8x1 kept
        assert train[j]["label"] == digits[int(i)]["label"]
    with pytest.raises(FileExistsError, match="overwrite"):
        tfds_prepare.prepare("digits", "digits_small", tmp_path, limit=40)


def test_unprepared_dataset_says_how_to_prepare(tfds_ok, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not prepared(.|\n)*tfds_prepare(.|\n)*tfds build"):
        data.get_source(f"tfds:not_prepared_here@{tmp_path}", "test")
