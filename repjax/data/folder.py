"""`folder:<path>`: an ImageFolder tree `<path>/<split>/<class>/*.{jpg,jpeg,png}` (any case).

Classes are the sorted class-folder names (label = index); every split must hold the same class folders, each
with at least one image: a class missing from a split, or spelled differently (case included), is a `DataError`
naming the classes, since training on the union would silently shift labels. `allow_missing_classes` (config
`data.allow_missing_classes`) accepts splits that lack some classes (a partial test set), labels then being the
sorted union; names that differ only in case are refused even then. Folders starting with "." are ignored.

Images decode lazily by index with Pillow (greyscale, palette, RGBA, CMYK -> RGB). A file that does not decode
(corrupt, truncated, more than `PIL.Image.MAX_IMAGE_PIXELS` pixels) is a `DataError` naming it; with
`skip_bad_files` (config `data.skip_bad_files`) every file is decoded once when the source is built and the bad
ones are dropped, with their count in the log. Small splits are cached: the first `as_arrays()` call (the
pipeline makes it) decodes every file once, in a thread pool, into one uint8 array (CIFAR-10's 50k JPEGs: a few
seconds, 150 MB). By default (`cache=None`) a split is cached when its decoded size is estimated below
`config.data.cache_gb` (default 2) GiB (`SourceOptions.cache_gb`).
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from repjax.data.base import DEFAULT_OPTIONS, SOURCES, DataError, SourceOptions, UnknownSplitError

EXTENSIONS = (".jpg", ".jpeg", ".png")
LAYOUT = "<path>/<split>/<class>/*.jpg|jpeg|png (e.g. cifar10/train/cat/0001.jpg)"
log = logging.getLogger(__name__)


def decode(path: str) -> np.ndarray:
    """Reads an image file as uint8 RGB [H,W,3]; `DataError` naming the file when it does not decode."""
    try:
        with Image.open(path) as img:
            pixels = img.width * img.height
            if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
                raise DataError(f"{img.width}x{img.height} pixels, more than PIL.Image.MAX_IMAGE_PIXELS = "
                                f"{Image.MAX_IMAGE_PIXELS} (a decompression bomb?)")
            if img.mode != "RGB":
                img = img.convert("RGB")
            return np.asarray(img, np.uint8)
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, zlib/struct errors...
        reason = str(e) if isinstance(e, DataError) else f"{type(e).__name__}: {e}"
        raise DataError(f"cannot decode image {path!r}: {reason}") from None


def _images_in(folder: pathlib.Path) -> list[str]:
    return sorted(e.path for e in _iter_images(folder)) if folder.is_dir() else []


def _iter_images(folder: pathlib.Path) -> Iterator[os.DirEntry]:
    return (e for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(EXTENSIONS))


def _visible_dirs(folder: pathlib.Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def class_names(root: pathlib.Path, splits: list[str], allow_missing: bool = False) -> list[str]:
    """The sorted class names of an ImageFolder tree, checked to agree over `splits` (see the module docstring)."""
    present = {s: {c for c in _visible_dirs(root / s) if any(True for _ in _iter_images(root / s / c))}
               for s in splits}
    union = sorted(set().union(*present.values()))
    by_fold: dict[str, list[str]] = {}
    for c in union:
        by_fold.setdefault(c.casefold(), []).append(c)
    clashes = [" / ".join(f"{c!r} in {', '.join(s for s in splits if c in present[s])}" for c in group)
               for group in by_fold.values() if len(group) > 1]
    if clashes:
        raise DataError(f"Image folder {str(root)!r}: class folders spelled differently between splits: "
                        f"{'; '.join(clashes)}; rename them to one spelling")
    lacking = {s: [c for c in union if c not in present[s]] for s in splits}
    lacking = {s: names for s, names in lacking.items() if names}
    if lacking and not allow_missing:
        detail = "; ".join(f"split {s!r} lacks {', '.join(map(repr, names[:20]))}"
                           f"{f' and {len(names) - 20} more' if len(names) > 20 else ''}"
                           for s, names in lacking.items())
        raise DataError(f"Image folder {str(root)!r}: the splits do not hold the same classes (a class folder "
                        f"without images counts as missing): {detail}. Labels would differ between splits; fix the "
                        "folders, or set data.allow_missing_classes=True if a split legitimately lacks classes")
    return union


class FolderSource:
    """One split of an ImageFolder tree."""

    def __init__(self, root: str | os.PathLike, split: str, *, cache: bool | None = None, num_threads: int = 8,
                 options: SourceOptions = DEFAULT_OPTIONS):
        root = pathlib.Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"Image folder {str(root)!r} does not exist; expected layout {LAYOUT}")
        splits = _visible_dirs(root)
        if split not in splits:
            raise UnknownSplitError(f"Image folder {str(root)!r} has no split {split!r}; available: "
                                    f"{', '.join(splits) or 'none'} (expected layout {LAYOUT})")
        self.cache_limit = options.cache_limit_bytes
        self.class_names = class_names(root, splits, options.allow_missing_classes)
        self.num_classes = len(self.class_names)
        self.files: list[str] = []
        labels = []
        for label, name in enumerate(self.class_names):
            found = _images_in(root / split / name)
            self.files += found
            labels += [label] * len(found)
        if not self.files:
            raise FileNotFoundError(f"No images under {str(root / split)!r}; expected layout {LAYOUT}")
        self.labels = np.asarray(labels, np.int64)
        self.num_threads = num_threads
        self.cache = cache  # None: decide by size on first as_arrays()
        self._images: np.ndarray | list[np.ndarray] | None = None
        self._lock = threading.Lock()
        self.skipped = 0  # files dropped by skip_bad_files
        if options.skip_bad_files:
            self._drop_bad_files(str(root / split))

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
                    self.cache = first.nbytes * len(self.files) <= self.cache_limit
                if self.cache:
                    self._images = _decode_all(tuple(self.files), first.shape, self.num_threads)
        return (self._images, self.labels) if isinstance(self._images, np.ndarray) else None

    def _drop_bad_files(self, where: str) -> None:
        """Decodes every file once (caching the split if `cache` allows) and drops those that fail."""
        if self.cache is not False:
            first = _first_good(self.files)
            if self.cache is None:
                self.cache = first.nbytes * len(self.files) <= self.cache_limit
        if self.cache:
            images, bad = _decode_all(tuple(self.files), first.shape, self.num_threads, skip_bad=True)
        else:
            bad = _bad_files(self.files, self.num_threads)
        if not bad:
            if self.cache:
                self._images = images
            return
        keep = np.setdiff1d(np.arange(len(self.files)), bad)
        log.warning("Skipped %d undecodable file(s) of %d under %s (data.skip_bad_files), e.g. %s", len(bad),
                    len(self.files), where, self.files[bad[0]])
        self.files = [self.files[i] for i in keep]
        self.labels = self.labels[keep]
        self.skipped = len(bad)
        if not self.files:
            raise DataError(f"No decodable images under {where!r}")
        if self.cache:
            self._images = images[keep] if isinstance(images, np.ndarray) else [images[i] for i in keep]
            if isinstance(self._images, np.ndarray):
                self._images.flags.writeable = False


def _first_good(files: list[str]) -> np.ndarray:
    for f in files:
        try:
            return decode(f)
        except DataError:
            continue
    raise DataError(f"None of the {len(files)} images under {os.path.dirname(os.path.dirname(files[0]))!r} decodes")


def _bad_files(files: list[str], num_threads: int) -> list[int]:
    """Indices of the files that do not decode (every file decoded once, in a thread pool)."""
    def ok(path: str) -> bool:
        try:
            decode(path)
            return True
        except DataError:
            return False

    with ThreadPoolExecutor(num_threads) as pool:
        return [i for i, good in enumerate(pool.map(ok, files, chunksize=64)) if not good]


def _decode_all(files: tuple[str, ...], shape: tuple[int, ...], num_threads: int, skip_bad: bool = False):
    """`_decode_cached` where every file decodes; raises `DataError` naming the bad files unless `skip_bad`,
    which returns (images, indices of bad files) instead (bad rows zero)."""
    images, errors = _decode_cached(files, shape, num_threads)
    if skip_bad:
        return images, sorted(errors)
    if errors:
        first = [errors[i] for i in sorted(errors)[:3]]
        raise DataError(f"{len(errors)} of {len(files)} image(s) do not decode (set data.skip_bad_files=True to "
                        f"skip them): " + "; ".join(first))
    return images


@functools.lru_cache(maxsize=4)  # sources built again for each evaluation reuse the decoded split
def _decode_cached(files: tuple[str, ...], shape: tuple[int, ...],
                   num_threads: int) -> tuple[np.ndarray | list[np.ndarray], dict[int, str]]:
    """Decodes every file in a thread pool into one array (a list if some shape differs from `shape`), and the
    error message of each file that does not decode (its row left zero)."""
    out = np.zeros((len(files), *shape), np.uint8)
    odd: dict[int, np.ndarray] = {}
    errors: dict[int, str] = {}

    def work(start: int, stop: int) -> None:
        for i in range(start, stop):
            try:
                image = decode(files[i])
            except DataError as e:
                errors[i] = str(e)
                continue
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
        return [odd.get(i, out[i]) for i in range(len(files))], errors
    return out, errors


@SOURCES.register("folder")
def folder(arg: str | None, split: str, options: SourceOptions = DEFAULT_OPTIONS) -> FolderSource:
    if not arg:
        raise ValueError(f"Data source 'folder' needs a path: 'folder:<path>' with layout {LAYOUT}")
    return FolderSource(arg, split, options=options)
