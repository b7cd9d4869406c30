"""`synthetic[:HxWxC,N,classes]`: random uint8 images for tests, deterministic by (split, index).

Default `synthetic:32x32x3,256,10`. Each image is noise plus a brightness offset set by its label, so a model
can learn it. Splits `train` and `test` hold different images.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from repjax.data.base import DEFAULT_OPTIONS, SOURCES, SourceOptions, check_split

SPLITS = ("train", "test")


class SyntheticSource:
    """Random images generated on demand; nothing is stored."""

    def __init__(self, shape: tuple[int, int, int], size: int, num_classes: int, split_id: int):
        self.shape, self.size, self.split_id = shape, size, split_id
        self.num_classes = num_classes
        self.class_names = [f"class_{i}" for i in range(num_classes)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} examples")
        rng = np.random.default_rng([self.split_id, index])
        label = int(rng.integers(self.num_classes))
        offset = label * 128 // max(self.num_classes - 1, 1)
        image = (rng.integers(0, 128, self.shape) + offset).astype(np.uint8)
        return {"image": image, "label": label}


def parse(arg: str | None) -> tuple[tuple[int, int, int], int, int]:
    """`"32x32x3,256,10"` -> ((32, 32, 3), 256, 10); missing trailing parts keep their defaults."""
    shape, size, classes = (32, 32, 3), 256, 10
    parts = [p.strip() for p in arg.split(",")] if arg else []
    try:
        if len(parts) > 3:
            raise ValueError
        if parts and parts[0]:
            dims = tuple(int(d) for d in parts[0].lower().split("x"))
            if len(dims) != 3:
                raise ValueError
            shape = dims
        if len(parts) > 1:
            size = int(parts[1])
        if len(parts) > 2:
            classes = int(parts[2])
    except ValueError:
        raise ValueError(f"Bad spec 'synthetic:{arg}'; expected 'synthetic:HxWxC,N,classes', "
                         "e.g. 'synthetic:32x32x3,256,10'") from None
    return shape, size, classes  # type: ignore[return-value]


@SOURCES.register("synthetic")
def synthetic(arg: str | None, split: str, options: SourceOptions = DEFAULT_OPTIONS) -> SyntheticSource:
    shape, size, classes = parse(arg)
    check_split("synthetic", split, SPLITS)
    return SyntheticSource(shape, size, classes, SPLITS.index(split))
