"""Writes any repjax source as an ArrayRecord TFDS dataset, without TensorFlow.

    python -m repjax.data.tfds_prepare --source folder:../shared/data/cifar10 --name cifar10_folder \\
        --data_dir ~/tensorflow_datasets [--splits train,test] [--limit N]

then read it with `get_source('tfds:cifar10_folder@<data_dir>', 'test')`. A small `GeneratorBasedBuilder`
(not registered in TFDS's global registry) yields each example with its image already encoded as PNG by
Pillow (lossless, so images read back equal the source's), which keeps TensorFlow out of the write path;
`disable_shuffling` keeps the source's order. With `limit`, a split keeps `limit` evenly spaced examples
(source indices `(j * len) // limit`), so every class of a class-sorted folder is represented. Each record
also stores its source `index`.
"""

from __future__ import annotations

import argparse
import io
import pathlib
import re
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from repjax.data import get_source
from repjax.data.tfds_source import _import_tfds


def subset(n: int, limit: int | None) -> np.ndarray:
    """Source indices kept: all, or `limit` evenly spaced ones."""
    if limit is None or limit >= n:
        return np.arange(n)
    return (np.arange(limit) * n) // limit


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="png")
    return buffer.getvalue()


def _examples(source: Any, indices: np.ndarray, num_threads: int) -> Iterator[tuple[int, dict[str, Any]]]:
    def encode(i: int) -> dict[str, Any]:
        example = source[int(i)]
        return {"image": _png(np.asarray(example["image"], np.uint8)), "label": int(example["label"]),
                "index": int(i)}

    with ThreadPoolExecutor(num_threads) as pool:
        for start in range(0, len(indices), 1024):  # bounded memory, order kept
            yield from enumerate(pool.map(encode, indices[start:start + 1024]), start)


def prepare(source: str, name: str, data_dir: str | pathlib.Path, *, splits: Sequence[str] = ("train", "test"),
            limit: int | None = None, version: str = "1.0.0", overwrite: bool = False,
            num_threads: int = 4) -> pathlib.Path:
    """Writes `splits` of the repjax source spec `source` as TFDS dataset `name` in `data_dir`; returns its
    directory `<data_dir>/<name>/<version>`."""
    tfds = _import_tfds()
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"TFDS dataset name {name!r} must be snake_case ([a-z][a-z0-9_]*)")
    sources = {split: get_source(source, split) for split in splits}
    first = next(iter(sources.values()))
    channels = np.asarray(first[0]["image"]).shape[-1]
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, channels), encoding_format="png"),
        "label": tfds.features.ClassLabel(names=list(first.class_names)),
        "index": tfds.features.Scalar(np.int64),
    })
    target = pathlib.Path(data_dir).expanduser() / name / version
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to rebuild it")
        shutil.rmtree(target)
    dataset_name = name

    class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = dataset_name
        VERSION = tfds.core.Version(version)

        def _info(self) -> Any:
            return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True,
                                         description=f"repjax source {source!r}" + (f", {limit} per split"
                                                                                     if limit else ""))

        def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
            return {split: self._generate_examples(split) for split in splits}

        def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
            src = sources[split]
            return _examples(src, subset(len(src), limit), num_threads)

    builder = Builder(data_dir=str(pathlib.Path(data_dir).expanduser()), file_format="array_record")
    builder.download_and_prepare()
    return pathlib.Path(builder.data_dir)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="repjax source spec, e.g. folder:../shared/data/cifar10")
    parser.add_argument("--name", required=True, help="TFDS dataset name (snake_case)")
    parser.add_argument("--data_dir", required=True, help="TFDS data_dir to write into")
    parser.add_argument("--splits", default="train,test", help="comma-separated splits (default train,test)")
    parser.add_argument("--limit", type=int, default=None, help="keep N evenly spaced examples per split")
    parser.add_argument("--version", default="1.0.0")
    parser.add_argument("--overwrite", action="store_true", help="rebuild if it exists")
    args = parser.parse_args(argv)
    path = prepare(args.source, args.name, args.data_dir, splits=args.splits.split(","), limit=args.limit,
                   version=args.version, overwrite=args.overwrite)
    print(f"Prepared {path}; read it with get_source('tfds:{args.name}@{args.data_dir}', split)")


if __name__ == "__main__":
    main()
