"""The source protocol, the source registry and small shared helpers.

A source is random access: `len(src)`, `src[i] -> {'image': uint8 HWC ndarray, 'label': int}`, plus
`num_classes` and `class_names`. Sources that hold the whole split in memory as one uint8 array may also
offer `as_arrays() -> (images [N,H,W,C] uint8, labels [N] int) | None`; the pipeline then gathers and
augments whole batches at once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import numpy as np

from repjax.registry import Registry

SOURCES = Registry("data source")


@runtime_checkable
class Source(Protocol):
    """What the pipeline needs from a data source."""

    num_classes: int
    class_names: list[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """Settings every source factory receives (`config.data.<field>`; see `from_config`).

    skip_bad_files: drop files that do not decode (corrupt, truncated, oversized) instead of stopping, with a
      count in the log; such sources decode every file once when built, so that their length never changes.
    allow_missing_classes: accept an ImageFolder split that lacks some class folders of the other splits
      (labels are then the sorted union); by default that is an error, as is any class name spelled differently.
    """

    skip_bad_files: bool = False
    allow_missing_classes: bool = False
    cache_gb: float = 2.0  # folder/TFDS splits whose decoded size is below this are decoded once into memory

    @classmethod
    def from_config(cls, config: Any) -> SourceOptions:
        """From a full config (its `data` block), or from the `data` block itself."""
        block = config.data if hasattr(config, "data") else config
        return cls(**{f.name: type(f.default)(block.get(f.name, f.default)) for f in dataclasses.fields(cls)})

    @property
    def cache_limit_bytes(self) -> int:
        return int(self.cache_gb * 2**30)


DEFAULT_OPTIONS = SourceOptions()


class DataError(ValueError):
    """Bad input data (an undecodable image, a damaged archive, inconsistent class folders): the message names
    the file(s)."""


class UnknownSplitError(KeyError):
    """A split name the source does not have (the message lists those it has)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def check_split(spec: str, split: str, available: list[str] | tuple[str, ...]) -> None:
    """Raises `UnknownSplitError` naming the available splits when `split` is not one of them."""
    if split not in available:
        raise UnknownSplitError(f"Data source {spec!r} has no split {split!r}; available: {', '.join(available)}")


class ArraySource:
    """A split held in memory: uint8 images [N,H,W,C] and integer labels [N]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: list[str]):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N,H,W,C], got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, np.int64)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": int(self.labels[index])}

    def as_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.images, self.labels
