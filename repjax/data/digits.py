"""`digits`: scikit-learn's 8x8 handwritten digits (1,797 images, ships with scikit-learn, no download).

Pixels 0..16 are scaled to uint8 0..255; images are 8x8x1. The train/test split is fixed: a permutation
seeded with 0, the first 1,497 images for `train` and the last 300 for `test`.
"""

from __future__ import annotations

import functools

import numpy as np

from repjax.data.base import DEFAULT_OPTIONS, SOURCES, ArraySource, SourceOptions, check_split

TEST_SIZE = 300
SPLIT_SEED = 0


@functools.cache
def _arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    return images[order], digits.target[order].astype(np.int64)


@SOURCES.register("digits")
def digits(arg: str | None, split: str, options: SourceOptions = DEFAULT_OPTIONS) -> ArraySource:
    if arg:
        raise ValueError(f"Data source 'digits' takes no argument, got 'digits:{arg}'")
    check_split("digits", split, ("train", "test"))
    images, labels = _arrays()
    part = slice(0, len(images) - TEST_SIZE) if split == "train" else slice(len(images) - TEST_SIZE, None)
    return ArraySource(images[part], labels[part], [str(d) for d in range(10)])
