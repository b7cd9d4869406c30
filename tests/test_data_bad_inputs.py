"""Bad input data: class folders that disagree between splits, undecodable / truncated / oversized images,
damaged CIFAR-10 archives. Each gives one clear error naming the classes or the file, or (opt-in) is skipped
with a count in the log; nothing trains silently on wrong labels."""

import logging
import struct
import tarfile
import traceback
import zlib

import numpy as np
import pytest
from PIL import Image

from repjax import data
from repjax.data import cifar10 as cifar10_lib, pipeline
from repjax.data.folder import FolderSource

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def _save(path, array=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), 9, np.uint8) if array is None else array).save(path)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG file whose header declares `width x height` RGB pixels (its pixel data is a few bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def _assert_short(error: BaseException) -> None:
    """What the user sees: a few frames, no chained thread-pool / Pillow / tarfile traceback."""
    text = "".join(traceback.format_exception(error))
    assert "During handling" not in text and "direct cause" not in text, text
    assert len(traceback.extract_tb(error.__traceback__)) < 8, text


# ------------------------------------------------------------------ class folders that disagree between splits


def test_split_missing_a_class_is_refused_naming_it(tmp_path):
    for split in ("train", "val"):
        for c in ("cat", "dog", "eel"):
            _save(tmp_path / split / c / "0.png")
    (tmp_path / "val" / "dog" / "0.png").unlink()  # an empty class folder counts as missing
    (tmp_path / "val" / "eel" / "0.png").unlink()
    (tmp_path / "val" / "eel").rmdir()
    for split in ("train", "val"):  # either split is refused: labels would differ between them
        with pytest.raises(data.DataError, match=r"split 'val' lacks 'dog', 'eel'"):
            data.get_source(f"folder:{tmp_path}", split)
    allow = data.SourceOptions(allow_missing_classes=True)
    val = data.get_source(f"folder:{tmp_path}", "val", allow)
    assert val.class_names == ["cat", "dog", "eel"] and len(val) == 1


def test_class_spelled_differently_is_refused_even_when_missing_classes_are_allowed(tmp_path):
    _save(tmp_path / "train" / "Cat" / "0.png")
    _save(tmp_path / "train" / "dog" / "0.png")
    _save(tmp_path / "test" / "cat" / "0.png")
    _save(tmp_path / "test" / "dog" / "0.png")
    for options in (None, data.SourceOptions(allow_missing_classes=True)):
        with pytest.raises(data.DataError, match=r"spelled differently.*'Cat' in train / 'cat' in test"):
            data.get_source(f"folder:{tmp_path}", "test", options)


def test_hidden_folders_are_neither_splits_nor_classes(tmp_path):
    for split in ("train", "test"):
        _save(tmp_path / split / "a" / "0.png")
        _save(tmp_path / split / "b" / "0.png")
    _save(tmp_path / "train" / ".ipynb_checkpoints" / "0.png")
    _save(tmp_path / ".cache" / "x" / "0.png")
    src = data.get_source(f"folder:{tmp_path}", "train")
    assert src.class_names == ["a", "b"] and len(src) == 2


def test_config_reaches_the_source(tmp_path):
    from repjax import config as config_lib

    cfg = config_lib.defaults()
    assert data.SourceOptions.from_config(cfg) == data.SourceOptions()
    cfg.data.skip_bad_files, cfg.data.allow_missing_classes = True, True
    config_lib.validate(cfg)
    assert data.SourceOptions.from_config(cfg) == data.SourceOptions(True, True)
    _save(tmp_path / "train" / "a" / "0.png")
    _save(tmp_path / "test" / "b" / "0.png")
    cfg.data.source = f"folder:{tmp_path}"
    assert data.from_config(cfg, "test").class_names == ["a", "b"]


# ------------------------------------------------------------------ undecodable images


@pytest.fixture
def bad_folder(tmp_path):
    """4 good images and 4 bad ones: truncated PNG, garbage .jpg, a 30000x30000 and a 10000x10000 header."""
    rng = np.random.default_rng(0)
    good = {}
    for i in range(4):
        good[i] = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
        _save(tmp_path / "train" / ("a" if i < 2 else "b") / f"good{i}.png", good[i])
    _save(tmp_path / "train" / "a" / "trunc.png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    raw = (tmp_path / "train" / "a" / "trunc.png").read_bytes()
    (tmp_path / "train" / "a" / "trunc.png").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "train" / "b" / "garbage.jpg").write_bytes(b"not an image at all" * 10)
    (tmp_path / "train" / "b" / "bomb.png").write_bytes(_png_header_only(30000, 30000))
    (tmp_path / "train" / "b" / "big.png").write_bytes(_png_header_only(10000, 10000))  # PIL only warns here
    return tmp_path, good


BAD = ("trunc.png", "garbage.jpg", "bomb.png", "big.png")


@pytest.mark.parametrize("name", BAD)
def test_each_bad_image_names_its_file(bad_folder, name):
    root, _ = bad_folder
    src = FolderSource(root, "train", cache=False)
    assert len(src) == 8
    index = next(i for i, f in enumerate(src.files) if f.endswith(name))
    with pytest.raises(data.DataError, match=rf"cannot decode image '.*{name}'"):
        src[index]


def test_bad_images_in_the_cached_pipeline_give_one_short_error(bad_folder):
    root, _ = bad_folder
    src = data.get_source(f"folder:{root}", "train")
    with pytest.raises(data.DataError) as info:
        pipeline.train_batches(src, global_batch_size=4, seed=0, pp="resize((6, 5))")
    message = str(info.value)
    assert message.startswith("4 of 8 image(s) do not decode (set data.skip_bad_files=True")
    assert "trunc.png" in message and "skip_bad_files" in message
    _assert_short(info.value)


def test_bad_image_in_the_streaming_pipeline_names_the_file(bad_folder):
    root, _ = bad_folder
    src = FolderSource(root, "train", cache=False)
    it = pipeline.eval_batches(src, global_batch_size=8, pp="resize((6, 5))")
    with pytest.raises(data.DataError, match=r"cannot decode image '.*\.(png|jpg)'") as info:
        next(it)
    _assert_short(info.value)


@pytest.mark.parametrize("cache", [True, False])
def test_skip_bad_files_drops_them_with_a_count_in_the_log(bad_folder, cache, caplog):
    root, good = bad_folder
    options = data.SourceOptions(skip_bad_files=True)
    with caplog.at_level(logging.WARNING, logger="repjax.data.folder"):
        src = FolderSource(root, "train", cache=cache, options=options)
    assert "Skipped 4 undecodable file(s) of 8" in caplog.text
    assert len(src) == 4 and src.skipped == 4
    assert [src[i]["label"] for i in range(4)] == [0, 0, 1, 1]
    for i in range(4):
        np.testing.assert_array_equal(src[i]["image"], good[i])
    arrays = src.as_arrays()
    assert (arrays is not None) == cache
    if cache:
        np.testing.assert_array_equal(arrays[0], np.stack([good[i] for i in range(4)]))
        np.testing.assert_array_equal(arrays[1], [0, 0, 1, 1])
    batch = next(pipeline.train_batches(src, global_batch_size=4, seed=0, pp="resize((6, 5))"))
    assert batch["image"].shape == (4, 6, 5, 3)


# ------------------------------------------------------------------ damaged CIFAR-10 archives


def _tiny_cifar(folder):
    folder.mkdir(parents=True)
    record = np.zeros(cifar10_lib.RECORD, np.uint8)
    record[0] = 3
    for name in [*cifar10_lib.FILES["train"], *cifar10_lib.FILES["test"]]:
        (folder / name).write_bytes(np.tile(record, 4).tobytes())
    (folder / cifar10_lib.META).write_text("\n".join(f"c{i}" for i in range(10)) + "\n")


def test_truncated_or_garbage_cifar10_names_the_file(tmp_path):
    folder = tmp_path / "ok" / "cifar-10-batches-bin"
    _tiny_cifar(folder)
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-bin")
    assert len(data.get_source(f"cifar10:{archive}", "test")) == 4
    raw = archive.read_bytes()
    cases = {"cut.tar.gz": raw[: len(raw) * 2 // 3], "garbage.tar.gz": b"\x1f\x8b" + bytes(range(256)) * 40}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        cifar10_lib.load.cache_clear()
        with pytest.raises(data.DataError, match=rf"CIFAR-10 archive '.*{name}' is truncated or damaged") as info:
            data.get_source(f"cifar10:{tmp_path / name}", "train")
        _assert_short(info.value)
    # A truncated batch file in the extracted folder, and one whose labels are not CIFAR-10 labels.
    batch = folder / "data_batch_3.bin"
    batch.write_bytes(batch.read_bytes()[:-100])
    cifar10_lib.load.cache_clear()
    with pytest.raises(data.DataError, match=r"data_batch_3\.bin' of 12192 bytes is not a \(non-zero\) multiple"):
        data.get_source(f"cifar10:{folder}", "train")
    (folder / "test_batch.bin").write_bytes(bytes([200]) + bytes(cifar10_lib.RECORD - 1))
    with pytest.raises(data.DataError, match=r"test_batch\.bin' holds label 200, but batches\.meta\.txt names 10"):
        data.get_source(f"cifar10:{folder}", "test")
