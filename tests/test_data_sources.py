"""Data sources: digits, synthetic, folder, cifar10 binary, and get_source's errors."""

import io
import pathlib
import tarfile

import numpy as np
import pytest
from PIL import Image

from repjax import data
from repjax.data import cifar10 as cifar10_lib
from repjax.data.folder import FolderSource

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_digits_split_is_fixed_and_complete():
    from sklearn.datasets import load_digits

    train, test = data.get_source("digits", "train"), data.get_source("digits", "test")
    assert (len(train), len(test)) == (1497, 300)
    assert train.num_classes == 10 and train.class_names[3] == "3"
    example = train[0]
    assert example["image"].shape == (8, 8, 1) and example["image"].dtype == np.uint8
    # Every sklearn image appears exactly once over the two splits, with its label, scaled 0..16 -> 0..255.
    ref = load_digits()
    order = np.random.default_rng(0).permutation(len(ref.images))
    for split, offset in ((train, 0), (test, 1497)):
        for i in (0, 7, len(split) - 1):
            j = order[offset + i]
            np.testing.assert_array_equal(split[i]["image"][..., 0], np.round(ref.images[j] * 255 / 16))
            assert split[i]["label"] == ref.target[j]
    assert max(int(train[i]["image"].max()) for i in range(50)) == 255


def test_get_source_errors():
    with pytest.raises(KeyError, match="digits"):  # suggestion for a typo
        data.get_source("digit", "train")
    with pytest.raises(data.UnknownSplitError, match="available: train, test"):
        data.get_source("digits", "validation")
    with pytest.raises(FileNotFoundError, match=r"missing_dir.*<split>/<class>"):
        data.get_source("folder:/nonexistent/missing_dir", "train")
    with pytest.raises(FileNotFoundError, match=r"cifar-10-binary.tar.gz"):
        data.get_source("cifar10:/nonexistent/cifar", "train")
    with pytest.raises(ValueError, match="synthetic:HxWxC"):
        data.get_source("synthetic:32x32,8", "train")


def test_synthetic_is_deterministic_and_parsed():
    src = data.get_source("synthetic:6x5x2,20,4", "train")
    assert len(src) == 20 and src.num_classes == 4
    a, b = src[3], data.get_source("synthetic:6x5x2,20,4", "train")[3]
    assert a["image"].shape == (6, 5, 2) and a["image"].dtype == np.uint8
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["label"] == b["label"]
    assert not np.array_equal(src[3]["image"], data.get_source("synthetic:6x5x2,20,4", "test")[3]["image"])
    assert {src[i]["label"] for i in range(20)} <= set(range(4))
    default = data.get_source("synthetic", "test")
    assert len(default) == 256 and default[0]["image"].shape == (32, 32, 3)


def _save(path: pathlib.Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def test_folder_layout_modes_and_cache(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (5, 4), dtype=np.uint8)
    rgba = rng.integers(0, 256, (5, 4, 4), dtype=np.uint8)
    _save(tmp_path / "train" / "zebra" / "a.PNG", rgb)
    _save(tmp_path / "train" / "ant" / "b.png", grey)
    _save(tmp_path / "train" / "ant" / "c.png", rgba)
    _save(tmp_path / "train" / "ant" / "d.JPEG", rgb)
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    _save(tmp_path / "test" / "zebra" / "e.jpg", rgb)
    _save(tmp_path / "test" / "bee" / "f.png", rgb)  # a class only in test: refused unless allowed explicitly
    _save(tmp_path / "test" / "ant" / "g.png", rgb)
    with pytest.raises(data.DataError, match=r"split 'train' lacks 'bee'.*allow_missing_classes"):
        data.get_source(f"folder:{tmp_path}", "train")
    allow = data.SourceOptions(allow_missing_classes=True)
    src = data.get_source(f"folder:{tmp_path}", "train", allow)  # then it still gets its sorted index
    assert src.class_names == ["ant", "bee", "zebra"] and src.num_classes == 3
    assert len(src) == 4
    assert [src[i]["label"] for i in range(4)] == [0, 0, 0, 2]
    np.testing.assert_array_equal(src[0]["image"], np.repeat(grey[..., None], 3, axis=-1))
    np.testing.assert_array_equal(src[1]["image"], rgba[..., :3])
    assert src[2]["image"].shape == (5, 4, 3)  # JPEG: lossy, shape only
    np.testing.assert_array_equal(src[3]["image"], rgb)
    lazy = [src[i]["image"] for i in range(4)]
    images, labels = src.as_arrays()  # cached now
    for i in range(4):
        np.testing.assert_array_equal(images[i], lazy[i])
        np.testing.assert_array_equal(src[i]["image"], lazy[i])
    np.testing.assert_array_equal(labels, [0, 0, 0, 2])
    assert FolderSource(tmp_path, "train", cache=False, options=allow).as_arrays() is None
    with pytest.raises(data.UnknownSplitError, match="available: test, train"):
        data.get_source(f"folder:{tmp_path}", "val")


def test_folder_mixed_shapes_are_not_stacked(tmp_path):
    _save(tmp_path / "train" / "a" / "x.png", np.zeros((4, 4, 3), np.uint8))
    _save(tmp_path / "train" / "a" / "y.png", np.full((6, 3, 3), 7, np.uint8))
    src = FolderSource(tmp_path, "train", cache=True)
    assert src.as_arrays() is None
    assert src[1]["image"].shape == (6, 3, 3) and src[1]["image"][0, 0, 0] == 7


def _cifar_bytes(images_hwc: np.ndarray, labels: np.ndarray) -> bytes:
    chw = images_hwc.transpose(0, 3, 1, 2).reshape(len(labels), -1)
    return np.concatenate([labels[:, None].astype(np.uint8), chw], axis=1).tobytes()


@pytest.fixture
def tiny_cifar(tmp_path):
    """A CIFAR-10 binary release in miniature (3 records per batch file), as a folder and as a .tar.gz."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    arrays = {}
    for name in [*cifar10_lib.FILES["train"], *cifar10_lib.FILES["test"]]:
        images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, 3)
        arrays[name] = (images, labels)
        (folder / name).write_bytes(_cifar_bytes(images, labels))
    names = CIFAR_CLASSES
    (folder / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    archive = tmp_path / "archive" / "cifar-10-binary.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            raw = path.read_bytes()
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{path.name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return tmp_path, archive, arrays, names


def test_cifar10_binary_folder_and_archive(tiny_cifar):
    root, archive, arrays, names = tiny_cifar
    for spec in (f"cifar10:{root}", f"cifar10:{root / 'cifar-10-batches-bin'}", f"cifar10:{archive}",
                 f"cifar10:{archive.parent}"):
        train, test = data.get_source(spec, "train"), data.get_source(spec, "test")
        assert (len(train), len(test)) == (15, 3)
        assert train.class_names == names and train.num_classes == 10
        for k in (0, 1, 2):
            images, labels = arrays[f"data_batch_{k + 1}.bin"]
            np.testing.assert_array_equal(train[3 * k + 2]["image"], images[2])
            assert train[3 * k + 2]["label"] == labels[2]
        np.testing.assert_array_equal(test.as_arrays()[0], arrays["test_batch.bin"][0])
    with pytest.raises(data.UnknownSplitError, match="train, test"):
        data.get_source(f"cifar10:{archive}", "val")


def test_cifar10_rejects_truncated_batch(tmp_path):
    with pytest.raises(ValueError, match="3073"):
        cifar10_lib.parse_records(b"\0" * 3000)


@pytest.mark.shared_data
def test_shared_folders(shared_data):
    cifar = data.get_source(f"folder:{shared_data / 'cifar10'}", "test")
    assert len(cifar) == 10_000
    assert cifar.class_names == CIFAR_CLASSES
    example = cifar[5000]
    assert example["image"].shape == (32, 32, 3) and example["label"] == 5
    imagenette = data.get_source(f"folder:{shared_data / 'imagenette'}", "val")
    assert len(imagenette) == 3925 and imagenette.class_names[0] == "n01440764"
    assert imagenette[0]["image"].shape == (224, 224, 3)
