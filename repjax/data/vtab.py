"""VTAB-1k (Zhai et al. 2019): the standard splits from TFDS, and the txt-list layout of the PyTorch PETL repos.

    vtab:<task>[@<data_dir>]       the task's TFDS dataset, splits train800 | val200 | train800val200 | test
    vtab_txt:<root>/<task>         `<root>/<task>/{train800,val200,train800val200,test}.txt`, lines `path label`

Splits (task_adaptation's definitions, spec §5.2): each task defines a *train*, a *val* and a *test* range of
TFDS splits; `train800` is the first 800 of train, `val200` the first 200 of val, `train800val200` their union
(TFDS `a+b`), `test` the whole test range. Percent ranges (`train[:90%]`) are turned into example indices with
the split's size (`n * pct // 100`), so a smaller generated dataset is split in the same proportions. Labels
of the structured tasks are derived from TFDS features as task_adaptation does (dSprites position/orientation
into 16 bins, CLEVR count - 3 and closest-object distance bins, smallNORB azimuth/elevation). KITTI's
closest-vehicle-distance binning is not implemented (its thresholds are not verified here): that task raises.

The txt layout is what NOAH's `get_vtab1k.py` writes and almost every PyTorch PETL repo reads: one `path
label` per line, `path` relative to `<root>/<task>/`; images decode to uint8 RGB.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

from repjax.data.base import DEFAULT_OPTIONS, SOURCES, SourceOptions, check_split
from repjax.data.folder import decode

SPLITS = ("train800", "val200", "train800val200", "test")
SIZES = {"train800": 800, "val200": 200}

# A range is (tfds split, start, stop): ints are example indices, floats percentages of the split, None = end.
Range = tuple[str, float | int | None, float | int | None]


@dataclasses.dataclass(frozen=True)
class Task:
    """One VTAB task: its TFDS dataset, class count, the train/val/test ranges and the label function."""

    tfds_name: str
    num_classes: int
    train: Range
    val: Range
    test: Range
    group: str  # natural | specialized | structured
    label: Callable[[dict[str, Any]], int] | None = None  # None: the `label` feature


def _bins(value: float, num_values: int, num_bins: int) -> int:
    return int(value) * num_bins // num_values


def _clevr_distance(record: dict[str, Any]) -> int:
    dist = float(np.min(np.asarray(record["objects"]["pixel_coords"])[:, 2]))
    return int(np.max(np.flatnonzero(np.asarray([0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0]) < dist)))


TASKS: dict[str, Task] = {
    # natural
    "caltech101": Task("caltech101:3.*.*", 102, ("train", None, 2754), ("train", 2754, None), ("test", None, None),
                       "natural"),
    "cifar100": Task("cifar100:3.*.*", 100, ("train", None, 90.0), ("train", 90.0, None), ("test", None, None),
                     "natural"),
    "dtd": Task("dtd:3.*.*", 47, ("train", None, None), ("validation", None, None), ("test", None, None), "natural"),
    "oxford_flowers102": Task("oxford_flowers102:2.*.*", 102, ("train", None, None), ("validation", None, None),
                              ("test", None, None), "natural"),
    "oxford_iiit_pet": Task("oxford_iiit_pet:3.*.*", 37, ("train", None, 80.0), ("train", 80.0, None),
                            ("test", None, None), "natural"),
    "svhn": Task("svhn_cropped:3.*.*", 10, ("train", None, 90.0), ("train", 90.0, None), ("test", None, None),
                 "natural"),
    "sun397": Task("sun397/tfds:4.*.*", 397, ("train", None, None), ("validation", None, None), ("test", None, None),
                   "natural"),
    # specialized
    "patch_camelyon": Task("patch_camelyon:2.*.*", 2, ("train", None, None), ("validation", None, None),
                           ("test", None, None), "specialized"),
    "eurosat": Task("eurosat/rgb:2.*.*", 10, ("train", None, 60.0), ("train", 60.0, 80.0), ("train", 80.0, None),
                    "specialized"),
    "resisc45": Task("resisc45:3.*.*", 45, ("train", None, 60.0), ("train", 60.0, 80.0), ("train", 80.0, None),
                     "specialized"),
    "diabetic_retinopathy": Task("diabetic_retinopathy_detection/btgraham-300:3.*.*", 5, ("train", None, None),
                                 ("validation", None, None), ("test", None, None), "specialized"),
    # structured
    "clevr_count": Task("clevr:3.*.*", 8, ("train", None, 90.0), ("train", 90.0, None), ("validation", None, None),
                        "structured", lambda r: len(np.asarray(r["objects"]["size"])) - 3),
    "clevr_dist": Task("clevr:3.*.*", 6, ("train", None, 90.0), ("train", 90.0, None), ("validation", None, None),
                       "structured", _clevr_distance),
    "dmlab": Task("dmlab:2.0.1", 6, ("train", None, None), ("validation", None, None), ("test", None, None),
                  "structured"),
    "kitti": Task("kitti:3.2.0", 4, ("train", None, None), ("validation", None, None), ("test", None, None),
                  "structured", None),
    "dsprites_loc": Task("dsprites:2.*.*", 16, ("train", None, 80.0), ("train", 80.0, 90.0), ("train", 90.0, None),
                         "structured", lambda r: _bins(r["label_x_position"], 32, 16)),
    "dsprites_ori": Task("dsprites:2.*.*", 16, ("train", None, 80.0), ("train", 80.0, 90.0), ("train", 90.0, None),
                         "structured", lambda r: _bins(r["label_orientation"], 40, 16)),
    "smallnorb_azi": Task("smallnorb:2.*.*", 18, ("train", None, None), ("test", None, 50.0), ("test", 50.0, None),
                          "structured", lambda r: int(r["label_azimuth"])),
    "smallnorb_ele": Task("smallnorb:2.*.*", 9, ("train", None, None), ("test", None, 50.0), ("test", 50.0, None),
                          "structured", lambda r: int(r["label_elevation"])),
}
UNSUPPORTED = {"kitti": "closest_vehicle_distance binning is not implemented (thresholds not verified here)"}


def _index(bound: float | int | None, size: int, default: int) -> int:
    if bound is None:
        return default
    if isinstance(bound, float):
        return size * round(bound) // 100
    return int(bound)


def split_string(task: Task, split: str, sizes: dict[str, int]) -> str:
    """The TFDS split string of a VTAB-1k split, given the examples in each TFDS split (`sizes`)."""
    check_split("vtab", split, SPLITS)

    def part(rng: Range, take: int | None) -> str:
        name, lo, hi = rng
        if name not in sizes:
            raise ValueError(f"VTAB task {task.tfds_name!r} needs TFDS split {name!r}; the dataset has "
                             f"{', '.join(sorted(sizes))}")
        start, stop = _index(lo, sizes[name], 0), _index(hi, sizes[name], sizes[name])
        if take is not None:
            if stop - start < take:
                raise ValueError(f"VTAB task {task.tfds_name!r}: range {rng} holds {stop - start} examples, "
                                 f"fewer than {take}")
            stop = start + take
        return f"{name}[{start}:{stop}]"

    if split == "test":
        return part(task.test, None)
    if split == "train800val200":
        return f"{part(task.train, 800)}+{part(task.val, 200)}"
    return part(task.train if split == "train800" else task.val, SIZES[split])


def _to_image(x: Any) -> np.ndarray:
    image = np.asarray(x)
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype != np.uint8:
        image = image.astype(np.uint8)
    if image.shape[-1] == 1 and image.max(initial=0) <= 1:  # dSprites stores 0/1 masks
        image = image * np.uint8(255)
    return image


class VtabTfdsSource:
    """One VTAB-1k split of a prepared TFDS dataset (random access, labels via the task's label function)."""

    def __init__(self, task_name: str, split: str, data_dir: str | None = None, *, builder: Any = None):
        if task_name not in TASKS:
            raise ValueError(f"Unknown VTAB task {task_name!r}; known: {', '.join(sorted(TASKS))}")
        if task_name in UNSUPPORTED:
            raise NotImplementedError(f"VTAB task {task_name!r}: {UNSUPPORTED[task_name]}")
        self.task = TASKS[task_name]
        builder = builder or _builder(self.task.tfds_name, data_dir)
        sizes = {name: info.num_examples for name, info in builder.info.splits.items()}
        self.split_string = split_string(self.task, split, sizes)
        self._data = builder.as_data_source(self.split_string)
        self.num_classes = self.task.num_classes
        features = builder.info.features
        if self.task.label is None and "label" in features and hasattr(features["label"], "names"):
            self.class_names = list(features["label"].names)
        else:
            self.class_names = [str(i) for i in range(self.num_classes)]

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._data[int(index)]
        label = int(record["label"]) if self.task.label is None else int(self.task.label(record))
        return {"image": _to_image(record["image"]), "label": label}


def _builder(tfds_name: str, data_dir: str | None) -> Any:
    """`tfds.builder(name)` when prepared there; else a dataset written under `<data_dir>/<name>/<version>/`
    (what `repjax.data.tfds_prepare` produces)."""
    from repjax.data.tfds_source import _import_tfds, how_to_prepare

    tfds = _import_tfds()
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
        if builder.is_prepared():
            return builder
    except (tfds.core.registered.DatasetNotFoundError, ValueError, AssertionError):
        pass
    if data_dir:
        base = pathlib.Path(data_dir).expanduser() / tfds_name.split(":")[0]
        found = sorted(base.glob("*/dataset_info.json"))
        if found:
            return tfds.builder_from_directory(str(found[-1].parent))
    plain = tfds_name.split(":")[0]
    raise FileNotFoundError(f"VTAB needs TFDS dataset {plain!r}, not prepared in {data_dir or '(TFDS default)'}.\n"
                            f"{how_to_prepare(plain, data_dir)}")


@SOURCES.register("vtab")
def vtab(arg: str | None, split: str, options: SourceOptions = DEFAULT_OPTIONS) -> VtabTfdsSource:
    if not arg:
        raise ValueError(f"Data source 'vtab' needs a task: 'vtab:<task>[@<data_dir>]', tasks: {', '.join(TASKS)}")
    task, _, data_dir = arg.partition("@")
    check_split(f"vtab:{arg}", split, SPLITS)
    return VtabTfdsSource(task, split, data_dir or None)


class TxtListSource:
    """`<task_dir>/<split>.txt` with lines `relative/path label` (NOAH / PETL layout), decoded lazily to RGB."""

    def __init__(self, task_dir: str | os.PathLike, split: str, num_classes: int | None = None):
        root = pathlib.Path(task_dir)
        check_split(f"vtab_txt:{task_dir}", split, SPLITS)
        listing = root / f"{split}.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"VTAB list {str(listing)!r} not found; expected <root>/<task>/{split}.txt "
                                    f"with lines 'path label'")
        self.files, labels = self._read(listing)
        self.root = root
        self.labels = np.asarray(labels, np.int64)
        if num_classes is None:
            task = TASKS.get(root.name)
            num_classes = task.num_classes if task else 1 + max(
                max(self._read(f)[1], default=-1) for f in root.glob("*.txt") if f.stem in SPLITS)
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= num_classes):
            raise ValueError(f"{str(listing)!r}: labels must be in [0, {num_classes}), got "
                             f"[{self.labels.min()}, {self.labels.max()}]")
        self.num_classes = int(num_classes)
        self.class_names = [str(i) for i in range(self.num_classes)]

    @staticmethod
    def _read(listing: pathlib.Path) -> tuple[list[str], list[int]]:
        files, labels = [], []
        for n, line in enumerate(listing.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ValueError(f"{str(listing)!r} line {n}: expected 'path label', got {line!r}")
            files.append(parts[0])
            labels.append(int(parts[1]))
        return files, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": decode(str(self.root / self.files[int(index)])), "label": int(self.labels[int(index)])}


@SOURCES.register("vtab_txt")
def vtab_txt(arg: str | None, split: str, options: SourceOptions = DEFAULT_OPTIONS) -> TxtListSource:
    if not arg:
        raise ValueError("Data source 'vtab_txt' needs a task folder: 'vtab_txt:<root>/<task>'")
    return TxtListSource(arg, split)
