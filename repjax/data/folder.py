"""`folder:<path>`: an ImageFolder tree `<path>/<split>/<class>/*.{jpg,jpeg,png}` (any case).

Classes are the sorted class-folder names over all splits (label = index). Images decode lazily by index with
Pillow (greyscale, palette, RGBA, CMYK -> RGB). Small splits are cached: the first `as_arrays()` call (the
pipeline makes it) decodes every file once, in a thread pool, into one uint8 array (CIFAR-10's 50k JPEGs: a few
seconds, 150 MB). By default (`cache=None`) a split is cached when its decoded size is estimated below
`config.data.cache_gb` (default 2) GiB (`set_cache_gb`).
"""

from __future__ import annotations

import functools
import os
import pathlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from repjax.data.base import SOURCES, UnknownSplitError

EXTENSIONS = (".jpg", ".jpeg", ".png")
LAYOUT = "<path>/<split>/<class>/*.jpg|jpeg|png (e.g. cifar10/train/cat/0001.jpg)"


def decode(path: str) -> np.ndarray:
    """Reads an image file as uint8 RGB [H,W,3]."""
    with Image.open(path) as img:
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img, np.uint8)


CACHE_GB = 2.0  # config.data.cache_gb, set by train/eval through `set_cache_gb`


def set_cache_gb(gb: float) -> None:
    global CACHE_GB
    CACHE_GB = float(gb)


def cache_limit_bytes() -> int:
    return int(CACHE_GB * 2**30)


class FolderSource:
    """One split of an ImageFolder tree."""

    def __init__(self, root: str | os.PathLike, split: str, *, cache: bool | None = None, num_threads: int = 8):
        root = pathlib.Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"Image folder {str(root)!r} does not exist; expected layout {LAYOUT}")
        splits = sorted(d.name for d in root.iterdir() if d.is_dir())
        if split not in splits:
            raise UnknownSplitError(f"Image folder {str(root)!r} has no split {split!r}; available: "
                                    f"{', '.join(splits) or 'none'} (expected layout {LAYOUT})")
        self.class_names = sorted({c.name for s in splits for c in (root / s).iterdir() if c.is_dir()})
        self.num_classes = len(self.class_names)
        self.files: list[str] = []
        labels = []
        for label, name in enumerate(self.class_names):
            folder = root / split / name
            found = sorted(e.path for e in os.scandir(folder) if e.name.lower().endswith(EXTENSIONS)) \
                if folder.is_dir() else []
            self.files += found
            labels += [label] * len(found)
        if not self.files:
            raise FileNotFoundError(f"No images under {str(root / split)!r}; expected layout {LAYOUT}")
        self.labels = np.asarray(labels, np.int64)
        self.num_threads = num_threads
        self.cache = cache  # None: decide by size on first as_arrays()
        self._images: np.ndarray | list[np.ndarray] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        image = self._images[index] if self._images is not None else decode(self.files[index])
        return {"image": image, "label": int(self.labels[index])}

    def as_arrays(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(images [N,H,W,3], labels [N]), decoding and caching the split on first call, when caching is on
        and every image has the same shape; otherwise None (then images decode per access)."""
        with self._lock:
            if self._images is None and self.cache is not False:
                first = decode(self.files[0])
                if self.cache is None:
                    self.cache = first.nbytes * len(self.files) <= cache_limit_bytes()
                if self.cache:
                    self._images = _decode_all(tuple(self.files), first.shape, self.num_threads)
        return (self._images, self.labels) if isinstance(self._images, np.ndarray) else None


@functools.lru_cache(maxsize=4)  # sources built again for each evaluation reuse the decoded split
def _decode_all(files: tuple[str, ...], shape: tuple[int, ...], num_threads: int) -> np.ndarray | list[np.ndarray]:
    """Decodes every file in a thread pool into one array (a list if some shape differs from `shape`)."""
    out = np.empty((len(files), *shape), np.uint8)
    odd: dict[int, np.ndarray] = {}

    def work(start: int, stop: int) -> None:
        for i in range(start, stop):
            image = decode(files[i])
            if image.shape == shape:
                out[i] = image
            else:
                odd[i] = image

    chunk = 512
    with ThreadPoolExecutor(num_threads) as pool:
        jobs = [pool.submit(work, s, min(s + chunk, len(files))) for s in range(0, len(files), chunk)]
        for job in jobs:
            job.result()
    out.flags.writeable = False
    if odd:
        return [odd.get(i, out[i]) for i in range(len(files))]
    return out


@SOURCES.register("folder")
def folder(arg: str | None, split: str) -> FolderSource:
    if not arg:
        raise ValueError(f"Data source 'folder' needs a path: 'folder:<path>' with layout {LAYOUT}")
    return FolderSource(arg, split)
