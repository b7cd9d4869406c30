"""Mini-VTAB: a VTAB-1k-style suite from data available offline, same protocol (800 train, 200 val, full test).

    minivtab:<task>[@<data_root>]   splits train800 | val200 | train800val200 | test;  images uint8 RGB

- `cifar10` (natural, 10 classes): CIFAR-10 from `<data_root>/cifar10` (ImageFolder). A fixed permutation
  (seed 0) of the official train split: its first 45,000 are the train pool, the last 5,000 the val pool (VTAB's
  CIFAR rule: val = the held-out last 10% of train). Test: the official 10,000. The ViT here is pre-trained
  on Imagenette, not on CIFAR.
- `digits` (natural, 10): scikit-learn's 8x8 digits (the `digits` source's fixed split), tiled to RGB.
  train800 = the first 800 of its 1,497 train images, val200 = the last 200 (disjoint); test: its 300.
- `dsprites_loc` (structured, 16): procedural dSprites-style sprites (square, ellipse, arrow; 6 scales, 40
  orientations, 32x32 positions) on 32x32 px; label: x position in 16 bins (VTAB's dsprites_loc rule).
- `dsprites_ori` (structured, 16): the same sprites; label: orientation (40 values over 360 degrees) in 16
  bins (VTAB's dsprites_ori rule; the square and the ellipse are rotation-symmetric, as in dSprites).
- `count` (structured, 8): procedural CLEVR-count-style scenes, 3..10 non-overlapping discs or squares of
  random colours on a random grey background, 32x32 px; label: count - 3 (VTAB's clevr_count rule).

Procedural tests hold 2,000 generated images. Procedural tasks are deterministic: the train/val pool (1,000
images: train800 then val200) and the test set are generated from `numpy.random.default_rng((SEED, task id,
split id))`; regenerating gives identical bytes.
"""

from __future__ import annotations

import functools
import math
import os
import pathlib

import numpy as np

from repjax.data.base import DEFAULT_OPTIONS, SOURCES, ArraySource, SourceOptions, check_split
from repjax.data.vtab import SPLITS

SEED = 20240719  # Dyn-Adapter's arXiv date, for want of a better one
PROCEDURAL_TEST = 2000
SIZE = 32
GROUPS = {"cifar10": "natural", "digits": "natural", "dsprites_loc": "structured", "dsprites_ori": "structured",
          "count": "structured"}
TASKS = tuple(GROUPS)
_TASK_ID = {name: i for i, name in enumerate(TASKS)}


def _rng(task: str, split_id: int) -> np.random.Generator:
    return np.random.default_rng((SEED, _TASK_ID[task], split_id))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size) + 0.5) / size
    return np.meshgrid(c, c)  # x (columns), y (rows) in (0, 1)


def render_sprite(shape: int, scale: float, angle: float, x: float, y: float, size: int = SIZE) -> np.ndarray:
    """Binary mask [size, size] of one sprite: 0 square, 1 ellipse, 2 arrow (the only one without rotational
    symmetry); `scale` is the half-extent as a fraction of the image, (x, y) its centre in (0, 1)."""
    gx, gy = _grid(size)
    dx, dy = gx - x, gy - y
    c, s = math.cos(angle), math.sin(angle)
    u, v = (c * dx + s * dy) / scale, (-s * dx + c * dy) / scale
    if shape == 0:
        return (np.maximum(abs(u), abs(v)) <= 0.8)
    if shape == 1:
        return (u ** 2 + (v / 0.5) ** 2) <= 1.0
    pts = np.asarray([(1.0, 0.0), (-0.8, 0.7), (-0.4, 0.0), (-0.8, -0.7)])  # arrow, pointing along +u
    tri = [(pts[0], pts[1], pts[2]), (pts[0], pts[2], pts[3])]  # two triangles (the arrow is not convex)
    inside = np.zeros_like(u, bool)
    for a, b, cc in tri:
        d1 = (u - b[0]) * (a[1] - b[1]) - (a[0] - b[0]) * (v - b[1])
        d2 = (u - cc[0]) * (b[1] - cc[1]) - (b[0] - cc[0]) * (v - cc[1])
        d3 = (u - a[0]) * (cc[1] - a[1]) - (cc[0] - a[0]) * (v - a[1])
        neg = (d1 < 0) | (d2 < 0) | (d3 < 0)
        pos = (d1 > 0) | (d2 > 0) | (d3 > 0)
        inside |= ~(neg & pos)
    return inside


def dsprites(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images [n,32,32,3] uint8, x-position index 0..31, orientation index 0..39), latent factors uniform."""
    shape = rng.integers(0, 3, n)
    scale = rng.integers(0, 6, n)
    ori = rng.integers(0, 40, n)
    px, py = rng.integers(0, 32, n), rng.integers(0, 32, n)
    images = np.zeros((n, SIZE, SIZE, 3), np.uint8)
    for i in range(n):
        half = 0.1 + 0.02 * scale[i]
        mask = render_sprite(int(shape[i]), half, 2 * math.pi * ori[i] / 40, 0.2 + 0.6 * px[i] / 31,
                             0.2 + 0.6 * py[i] / 31)
        images[i][mask] = 255
    return images, px, ori


def counting(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(images [n,32,32,3] uint8, counts 3..10): non-overlapping discs and squares (radius 2-3 px)."""
    gx, gy = _grid(SIZE)
    gx, gy = gx * SIZE, gy * SIZE
    counts = rng.integers(3, 11, n)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i in range(n):
        image = np.full((SIZE, SIZE, 3), rng.integers(60, 140), np.uint8)
        placed: list[tuple[float, float, float]] = []
        while len(placed) < counts[i]:
            r = float(rng.uniform(2.0, 3.2))
            cx, cy = rng.uniform(r + 0.5, SIZE - r - 0.5, 2)
            if all((cx - x) ** 2 + (cy - y) ** 2 > (r + q + 1.5) ** 2 for x, y, q in placed):
                placed.append((float(cx), float(cy), r))
                if rng.integers(2):
                    mask = (gx - cx) ** 2 + (gy - cy) ** 2 <= r * r
                else:
                    mask = np.maximum(abs(gx - cx), abs(gy - cy)) <= r * 0.85
                image[mask] = rng.integers(150, 256, 3).astype(np.uint8) * (rng.random(3) > 0.3)
        images[i] = image
    return images, counts


@functools.cache
def _procedural(task: str, split_id: int) -> tuple[np.ndarray, np.ndarray]:
    n = 1000 if split_id == 0 else PROCEDURAL_TEST
    rng = _rng(task, split_id)
    if task == "count":
        images, counts = counting(n, rng)
        labels = counts - 3
    else:
        images, px, ori = dsprites(n, rng)
        labels = px * 16 // 32 if task == "dsprites_loc" else ori * 16 // 40
    images.flags.writeable = False
    return images, labels.astype(np.int64)


def _take(split: str, pool_train: np.ndarray, pool_val: np.ndarray) -> np.ndarray:
    if split == "train800":
        return pool_train[:800]
    if split == "val200":
        return pool_val[:200]
    return np.concatenate([pool_train[:800], pool_val[:200]])


def _data_root(root: str | None) -> pathlib.Path:
    root = root or os.environ.get("REPJAX_SHARED_DATA")
    if not root:
        raise ValueError("minivtab:cifar10 needs the shared data folder: 'minivtab:cifar10@<data_root>' "
                         "(holding cifar10/{train,test}/<class>/) or $REPJAX_SHARED_DATA")
    return pathlib.Path(root)


@functools.cache
def _cifar(root: str, split: str) -> ArraySource:
    from repjax.data.folder import FolderSource

    source = FolderSource(str(pathlib.Path(root) / "cifar10"), "test" if split == "test" else "train", cache=False)
    if split == "test":
        index = np.arange(len(source))
    else:
        order = np.random.default_rng(0).permutation(len(source))
        cut = len(source) * 9 // 10
        index = _take(split, order[:cut], order[cut:])
    images = np.stack([source[int(i)]["image"] for i in index])
    return ArraySource(images, source.labels[index], source.class_names)


def _rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


@SOURCES.register("minivtab")
def minivtab(arg: str | None, split: str, options: SourceOptions = DEFAULT_OPTIONS) -> ArraySource:
    task, _, root = (arg or "").partition("@")
    if task not in GROUPS:
        raise ValueError(f"Data source 'minivtab' needs a task: 'minivtab:<task>[@<data_root>]', one of "
                         f"{', '.join(TASKS)}; got {arg!r}")
    check_split(f"minivtab:{arg}", split, SPLITS)
    if task == "cifar10":
        return _cifar(str(_data_root(root or None).resolve()), split)
    if task == "digits":
        from repjax.data.digits import digits as digits_source

        source = digits_source(None, "test" if split == "test" else "train", options)
        images, labels = source.as_arrays()
        if split != "test":
            index = _take(split, np.arange(800), np.arange(len(images) - 200, len(images)))
            images, labels = images[index], labels[index]
        return ArraySource(_rgb(images), labels, source.class_names)
    images, labels = _procedural(task, 1 if split == "test" else 0)
    if split != "test":
        index = _take(split, np.arange(800), np.arange(800, 1000))
        images, labels = images[index], labels[index]
    num_classes = 8 if task == "count" else 16
    return ArraySource(np.ascontiguousarray(images), labels, [str(i) for i in range(num_classes)])
