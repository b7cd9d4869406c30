"""`cifar10:<path>`: the official CIFAR-10 *binary* release, read straight into memory.

`<path>` is `cifar-10-binary.tar.gz`, the extracted `cifar-10-batches-bin/` folder, or a folder holding either.
Each `.bin` file is a run of 3,073-byte records: 1 label byte, then 32x32x3 pixels stored channel-major (CHW).
`train` = data_batch_1..5.bin (50,000), `test` = test_batch.bin (10,000); class names from batches.meta.txt.
A truncated or damaged archive or file is a `DataError` naming it (`skip_bad_files` does not apply: a batch file
has no per-image boundaries to recover).
"""

from __future__ import annotations

import functools
import pathlib
import tarfile
import zlib

import numpy as np

from repjax.data.base import DEFAULT_OPTIONS, SOURCES, ArraySource, DataError, SourceOptions, check_split

ARCHIVE = "cifar-10-binary.tar.gz"
FOLDER = "cifar-10-batches-bin"
FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
META = "batches.meta.txt"
RECORD = 1 + 32 * 32 * 3
LAYOUT = (f"a path to {ARCHIVE}, to the extracted {FOLDER}/ folder (data_batch_1..5.bin, test_batch.bin, "
          f"{META}), or to a folder holding either")


def parse_records(raw: bytes, name: str = "batch") -> tuple[np.ndarray, np.ndarray]:
    """Binary records -> (uint8 images [N,32,32,3], int labels [N]); `name` is the file, for errors."""
    if len(raw) % RECORD or not raw:
        raise DataError(f"CIFAR-10 {name} of {len(raw)} bytes is not a (non-zero) multiple of the {RECORD}-byte "
                        "record: truncated or not a CIFAR-10 binary file")
    records = np.frombuffer(raw, np.uint8).reshape(-1, RECORD)
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), records[:, 0].astype(np.int64)


def _locate(path: pathlib.Path) -> pathlib.Path:
    for candidate in (path, path / FOLDER, path / ARCHIVE):
        if candidate.is_dir() and (candidate / META).exists():
            return candidate
        if candidate.is_file() and candidate.name.endswith((".tar.gz", ".tgz", ".tar")):
            return candidate
    raise FileNotFoundError(f"CIFAR-10 binary data not found at {str(path)!r}; expected {LAYOUT}")


def _read_files(location: pathlib.Path, names: list[str]) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    if location.is_dir():
        found = {n: (location / n).read_bytes() for n in names if (location / n).is_file()}
    else:
        try:
            with tarfile.open(location) as tar:  # one sequential pass over the (gzipped) archive
                for member in tar:
                    name = pathlib.PurePosixPath(member.name).name
                    if member.isfile() and name in names:
                        found[name] = tar.extractfile(member).read()  # type: ignore[union-attr]
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise DataError(f"CIFAR-10 archive {str(location)!r} is truncated or damaged ({type(e).__name__}: "
                            f"{e}); expected {LAYOUT}") from None
    missing = [n for n in names if n not in found]
    if missing:
        raise FileNotFoundError(f"{str(location)!r} lacks {', '.join(missing)}; expected {LAYOUT}")
    return found


@functools.cache
def load(path: str, split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(images, labels, class names) of one split; cached per (path, split)."""
    location = _locate(pathlib.Path(path))
    raw = _read_files(location, [*FILES[split], META])
    parts = [parse_records(raw[n], f"file {str(location / n)!r}") for n in FILES[split]]
    try:
        names = tuple(line.strip() for line in raw[META].decode().splitlines() if line.strip())
    except UnicodeDecodeError:
        raise DataError(f"{str(location / META)!r} is not a text list of class names") from None
    for n, (_, labels) in zip(FILES[split], parts):
        if labels.max() >= len(names):
            raise DataError(f"{str(location / n)!r} holds label {labels.max()}, but {META} names {len(names)} "
                            "classes: a damaged or foreign file")
    images = np.concatenate([p[0] for p in parts])
    images.flags.writeable = False
    return images, np.concatenate([p[1] for p in parts]), names


@SOURCES.register("cifar10")
def cifar10(arg: str | None, split: str, options: SourceOptions = DEFAULT_OPTIONS) -> ArraySource:
    if not arg:
        raise ValueError(f"Data source 'cifar10' needs a path: 'cifar10:<path>', {LAYOUT}")
    check_split(f"cifar10:{arg}", split, tuple(FILES))
    images, labels, names = load(str(pathlib.Path(arg).resolve()), split)
    return ArraySource(images, labels, list(names))
