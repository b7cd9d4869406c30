"""`tfds:<name>[@<data_dir>]`: a prepared TFDS dataset in ArrayRecord format, read with `tfds.data_source`.

Reading needs `tensorflow-datasets`, `importlib_resources`, `array-record` and Pillow, not TensorFlow.
`<name>` may carry a config/version (`cifar10/3.0.2`); `<data_dir>` defaults to `$TFDS_DATA_DIR`, then to
TFDS's own default (~/tensorflow_datasets). Splits accept TFDS slicing (`train[:10%]`). Like `folder:`, a split
whose decoded size is below `config.data.cache_gb` (default 2) GiB is decoded once into memory on the first
`as_arrays()` call (the pipeline makes it).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from repjax.data.base import DEFAULT_OPTIONS, SOURCES, SourceOptions, UnknownSplitError


def how_to_prepare(name: str, data_dir: str | None) -> str:
    where = data_dir or "<data_dir>"
    return (
        f"Prepare it as ArrayRecord, either from any repjax source without TensorFlow:\n"
        f"  python -m repjax.data.tfds_prepare --source folder:../shared/data/cifar10 --name {name} "
        f"--data_dir {where}\n"
        f"or with TFDS's own builder (needs `pip install repjax[tfds]`, i.e. tensorflow-cpu; put the original "
        f"archives in {where}/downloads/manual/):\n"
        f"  tfds build {name} --data_dir {where} --file_format array_record\n"
        f"then use 'tfds:{name}@{where}' (or set TFDS_DATA_DIR)."
    )


def _import_tfds() -> Any:
    try:
        import array_record  # noqa: F401  (ArrayRecord files)
        import importlib_resources  # noqa: F401  (needed by tfds.data_source, not a tfds dependency)
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "Data source 'tfds:' needs tensorflow_datasets: pip install tensorflow-datasets importlib_resources "
            f"array-record (or `pip install repjax[tfds]`); reading needs no TensorFlow. ({e})"
        ) from e
    return tfds


class TfdsSource:
    """Random access over one split of a prepared ArrayRecord TFDS dataset."""

    def __init__(self, name: str, split: str, data_dir: str | None = None, *, cache: bool | None = None,
                 cache_limit: int = DEFAULT_OPTIONS.cache_limit_bytes):
        self.cache_limit = cache_limit
        tfds = _import_tfds()
        data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            builder = None
        if builder is None or not builder.is_prepared():
            raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared in data_dir "
                                    f"{data_dir or '(TFDS default)'}.\n{how_to_prepare(name, data_dir)}")
        splits = sorted(builder.info.splits)
        if split.split("[")[0] not in splits:
            raise UnknownSplitError(f"TFDS dataset {name!r} has no split {split!r}; available: {', '.join(splits)}")
        try:
            self._data = builder.as_data_source(split)
        except NotImplementedError as e:  # prepared as TFRecord: no random access
            raise ValueError(f"TFDS dataset {name!r} in {builder.data_dir} is not in ArrayRecord format ({e}).\n"
                             f"{how_to_prepare(name, data_dir)}") from None
        features = builder.info.features
        if "image" not in features or "label" not in features:
            raise ValueError(f"TFDS dataset {name!r} needs 'image' and 'label' features, has {list(features)}")
        self.class_names = list(features["label"].names)
        self.num_classes = features["label"].num_classes
        self.cache = cache  # None: decide by size on first as_arrays()
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._arrays is not None:
            return {"image": self._arrays[0][index], "label": int(self._arrays[1][index])}
        record = self._data[int(index)]
        return {"image": np.asarray(record["image"], np.uint8), "label": int(record["label"])}

    def as_arrays(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(images, labels) decoded once into memory when caching is on and all images share one shape."""
        with self._lock:
            if self._arrays is None and self.cache is not False:
                first = self[0]["image"]
                if self.cache is None:
                    self.cache = first.nbytes * len(self) <= self.cache_limit
                if self.cache:
                    self._arrays = self._decode_all(first.shape)
                    self.cache = self._arrays is not None
        return self._arrays

    def _decode_all(self, shape: tuple[int, ...], chunk: int = 512) -> tuple[np.ndarray, np.ndarray] | None:
        images = np.empty((len(self), *shape), np.uint8)
        labels = np.empty(len(self), np.int64)
        uniform = True

        def work(start: int) -> None:
            nonlocal uniform
            for i, record in enumerate(self._data.__getitems__(range(start, min(start + chunk, len(self)))), start):
                if record["image"].shape != shape:
                    uniform = False
                    return
                images[i], labels[i] = record["image"], record["label"]

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(work, range(0, len(self), chunk)))
        return (images, labels) if uniform else None


@SOURCES.register("tfds")
def tfds_source(arg: str | None, split: str, options: SourceOptions = DEFAULT_OPTIONS) -> TfdsSource:
    if not arg:
        raise ValueError("Data source 'tfds' needs a dataset name: 'tfds:<name>' or 'tfds:<name>@<data_dir>'")
    name, _, data_dir = arg.partition("@")
    return TfdsSource(name, split, data_dir or None, cache_limit=options.cache_limit_bytes)
