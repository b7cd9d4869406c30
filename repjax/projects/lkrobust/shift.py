"""Distribution-shift test sets: ImageNet-A, -R, -O, -9 (Backgrounds Challenge), -V2 and -Sketch.

Each evaluator reads a locally prepared copy, either a folder (`path=`) or a prepared TFDS dataset (`tfds=`),
never downloads. Folder layouts (as released):
  A, R, O, Sketch   <path>/<wnid>/*.jpg            (A/R/O: 200 wnids; Sketch: 1000)
  V2                <path>/<class index 0..999>/*.jpeg   (folder names are ImageNet label indices)
  IN-9              <path>/<variant>/val/<class>/*  variants original, only_fg, mixed_same, mixed_rand, ...
Labels are mapped to the model's classes by name (folder wnids against the class names of the model's training
source, `config.data.source`), by index (all-digit names, V2), or identity when the class counts agree.

Metrics (spec §3.1):
- A, R: top-1 with the logits masked to the classes present in the set (the 200-class subset), `mask=False`
  for the plain 1000-way top-1;
- O: AUPR of detecting the ImageNet-O images (positives) among in-distribution images (the model's eval
  split restricted to the same 200 classes) with anomaly score = - max softmax over the 200 masked logits
  (Hendrycks et al. 2021); the AUPR is the step-wise average precision (sklearn's `average_precision_score`);
- IN-9: top-1 over the 9 super-classes for each variant present and the background gap
  `bg_gap = mixed_same - mixed_rand` (Xiao et al. 2021). A 9-class model (trained on IN-9 `original`) is read
  directly; a 1000-class model needs the release's `in_to_in9.json` (`in9_map=`: a list or {index: class} with
  -1 for classes outside the 9): the prediction is the super-class of the 1000-way arg-max (-1 counts wrong);
- V2, Sketch: plain top-1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from repjax import data
from repjax.data.folder import EXTENSIONS, decode
from repjax.evals import EVALUATORS
from repjax.projects.lkrobust import inputs

IN9_VARIANTS = ("original", "only_fg", "mixed_same", "mixed_rand", "mixed_next", "no_fg", "only_bg_b",
                "only_bg_t", "fg_mask")


class FlatFolder:
    """`<root>/<class>/*.{jpg,jpeg,png}` (no split level), decoded lazily."""

    def __init__(self, root: str | os.PathLike):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder {str(root)!r} does not exist (expected <root>/<class>/*.jpg)")
        self.class_names = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.num_classes = len(self.class_names)
        self.files, labels = [], []
        for label, name in enumerate(self.class_names):
            found = sorted(e.path for e in os.scandir(root / name) if e.name.lower().endswith(EXTENSIONS))
            self.files += found
            labels += [label] * len(found)
        if not self.files:
            raise FileNotFoundError(f"no images under {str(root)!r} (expected <root>/<class>/*.jpg)")
        self.labels = np.asarray(labels, np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": decode(self.files[int(index)]), "label": int(self.labels[int(index)])}


def open_set(path: str | None, tfds: str | None, tfds_name: str, split: str = "test") -> Any:
    """The set at `path` (folder) or the prepared TFDS dataset (`tfds`: data_dir, '' for the default)."""
    if path is not None:
        return FlatFolder(path)
    if tfds is not None:
        return data.get_source(f"tfds:{tfds_name}@{tfds}" if tfds else f"tfds:{tfds_name}", split)
    raise ValueError(f"{tfds_name}: give path=<folder> or tfds=<data_dir> (nothing is downloaded)")


def model_classes(config: Any, names: Sequence[str] | None = None) -> list[str]:
    """The model's class names: given, else those of its training source."""
    if names is not None:
        return list(names)
    return list(data.get_source(config.data.source, config.data.train_split).class_names)


def label_map(set_names: Sequence[str], model_names: Sequence[str]) -> np.ndarray:
    """Model class index of each of the set's classes: by name, by index for all-digit names, or identity."""
    index = {n: i for i, n in enumerate(model_names)}
    if all(n in index for n in set_names):
        return np.array([index[n] for n in set_names])
    if all(n.isdigit() for n in set_names):
        out = np.array([int(n) for n in set_names])
        if out.max() >= len(model_names):
            raise ValueError(f"class folder {out.max()} beyond the model's {len(model_names)} classes")
        return out
    if len(set_names) == len(model_names):
        return np.arange(len(model_names))
    missing = [n for n in set_names if n not in index][:5]
    raise ValueError(f"cannot map the set's {len(set_names)} classes onto the model's {len(model_names)}: "
                     f"{missing} are not model class names")


def set_logits(ev: inputs.Evaluated, source: Any, num_images: int | None, chunk: int = 1024
               ) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, K], set labels [N]) over `num_images` evenly spread images, loaded in chunks."""
    idx = inputs.subset(len(source), num_images)
    logits, labels = [], []
    for lo in range(0, len(idx), chunk):
        images, y = inputs.load(source, idx[lo:lo + chunk], ev.geometry)
        logits.append(ev.logits(inputs.to_unit(images)))
        labels.append(y)
    return np.concatenate(logits), np.concatenate(labels)


def masked_top1(logits: np.ndarray, targets: np.ndarray, classes: np.ndarray | None) -> float:
    """Top-1 with the arg-max over `classes` only (None: all)."""
    if classes is None:
        return float(np.mean(np.argmax(logits, -1) == targets))
    return float(np.mean(classes[np.argmax(logits[:, classes], -1)] == targets))


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Step-wise area under the precision-recall curve: sum over thresholds of (R_k - R_{k-1}) P_k, with
    tied scores forming one threshold (equals sklearn's `average_precision_score`)."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    if not positive.any():
        raise ValueError("average_precision needs at least one positive")
    order = np.argsort(-scores, kind="mergesort")
    s, p = scores[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(p)[last]
    precision, recall = tp / (last + 1), tp / p.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _softmax_max(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(-1, keepdims=True)).max(-1)


def _classification(dataset: str, tfds_name: str, model, variables, config, mesh, *, path, tfds, split,
                    num_images, mask, class_names, batch_size, pp) -> dict[str, Any]:
    src = open_set(path, tfds, tfds_name, split)
    ev = inputs.Evaluated(model, variables, config, mesh, pp=pp, batch_size=batch_size)
    to_model = label_map(src.class_names, model_classes(config, class_names))
    logits, y = set_logits(ev, src, num_images)
    targets = to_model[y]
    out: dict[str, Any] = {"images": len(y), "top1_unmasked": masked_top1(logits, targets, None)}
    if mask:
        classes = np.unique(to_model[np.unique(y)]) if mask == "present" else np.unique(to_model)
        out["classes"] = len(classes)
        out["top1"] = masked_top1(logits, targets, classes)
    else:
        out["top1"] = out["top1_unmasked"]
    return out


def _register(dataset: str, tfds_name: str, default_mask: bool | str) -> None:
    def evaluator(model, variables, config, mesh, *, path: str | None = None, tfds: str | None = None,
                  split: str = "test", num_images: int | None = None, mask: bool | str = default_mask,
                  class_names: Sequence[str] | None = None, batch_size: int | None = None,
                  pp: str | None = None) -> dict[str, Any]:
        return _classification(dataset, tfds_name, model, variables, config, mesh, path=path, tfds=tfds,
                               split=split, num_images=num_images, mask=mask, class_names=class_names,
                               batch_size=batch_size, pp=pp)

    evaluator.__doc__ = (f"{dataset}: top-1 (`mask`: 'set' = the set's classes, 'present' = classes with "
                         "images, False = all logits), plus `top1_unmasked`.")
    EVALUATORS.register(dataset)(evaluator)


_register("imagenet_a", "imagenet_a", "set")
_register("imagenet_r", "imagenet_r", "set")
_register("imagenet_v2", "imagenet_v2", False)
_register("imagenet_sketch", "imagenet_sketch", False)


@EVALUATORS.register("imagenet_o")
def imagenet_o(model, variables, config, mesh, *, path: str | None = None, tfds: str | None = None,
               split: str = "test", in_source: str | None = None, in_split: str | None = None,
               num_images: int | None = None, class_names: Sequence[str] | None = None,
               batch_size: int | None = None, pp: str | None = None) -> dict[str, Any]:
    """AUPR (ImageNet-O positive, anomaly score - max softmax over the set's classes), the same with all
    logits, and the in-distribution count (the model's eval split, `in_source`/`in_split`, on those classes)."""
    out_src = open_set(path, tfds, "imagenet_o", split)
    names = model_classes(config, class_names)
    classes = np.unique(label_map(out_src.class_names, names))
    ev = inputs.Evaluated(model, variables, config, mesh, pp=pp, batch_size=batch_size)
    out_logits, _ = set_logits(ev, out_src, num_images)
    in_src = data.get_source(in_source or config.data.source, in_split or config.data.eval_split)
    in_to_model = label_map(in_src.class_names, names)
    keep = np.flatnonzero(np.isin(in_to_model[_labels(in_src)], classes))
    if len(keep) == 0:
        raise ValueError("imagenet_o: no in-distribution images of the ImageNet-O classes in the eval split")
    in_logits = np.concatenate([ev.logits(inputs.to_unit(inputs.load(in_src, keep[lo:lo + 1024], ev.geometry)[0]))
                                for lo in range(0, len(keep), 1024)])
    positive = np.r_[np.ones(len(out_logits), bool), np.zeros(len(in_logits), bool)]
    both = np.concatenate([out_logits, in_logits])
    return {"aupr": average_precision(-_softmax_max(both[:, classes]), positive),
            "aupr_unmasked": average_precision(-_softmax_max(both), positive),
            "ood_images": len(out_logits), "in_images": len(in_logits), "classes": len(classes)}


def _labels(source: Any) -> np.ndarray:
    if hasattr(source, "labels"):
        return np.asarray(source.labels)
    arrays = source.as_arrays() if hasattr(source, "as_arrays") else None
    return np.asarray(arrays[1]) if arrays is not None else np.array([source[i]["label"] for i in range(len(source))])


def in9_superclass(in9_map: str | Sequence[int] | Mapping[Any, int] | None, num_model_classes: int) -> np.ndarray:
    """Super-class (0..8, -1 = none) of each model class: identity for a 9-class model, else the map."""
    if in9_map is None:
        if num_model_classes == 9:
            return np.arange(9)
        raise ValueError(f"imagenet_9: a {num_model_classes}-class model needs in9_map= (the release's "
                         "in_to_in9.json, mapping each ImageNet class to 0..8 or -1)")
    if isinstance(in9_map, str):
        in9_map = json.loads(Path(in9_map).read_text())
    if isinstance(in9_map, Mapping):
        out = np.full(num_model_classes, -1)
        for k, v in in9_map.items():
            out[int(k)] = int(v)
        return out
    out = np.asarray(in9_map, int)
    if out.shape != (num_model_classes,):
        raise ValueError(f"in9_map has {out.size} entries for {num_model_classes} model classes")
    return out


@EVALUATORS.register("imagenet_9")
def imagenet_9(model, variables, config, mesh, *, path: str, variants: Sequence[str] | None = None,
               split: str = "val", in9_map: Any = None, num_images: int | None = None,
               batch_size: int | None = None, pp: str | None = None) -> dict[str, Any]:
    """`top1/<variant>` over the 9 super-classes for each variant folder present, and
    `bg_gap = top1/mixed_same - top1/mixed_rand`."""
    root = Path(path)
    present = [v for v in (variants or IN9_VARIANTS) if (root / v / split).is_dir()]
    if not present:
        raise FileNotFoundError(f"imagenet_9: no <variant>/{split}/<class>/ folders under {str(root)!r} "
                                f"(variants {', '.join(variants or IN9_VARIANTS)})")
    ev = inputs.Evaluated(model, variables, config, mesh, pp=pp, batch_size=batch_size)
    out: dict[str, Any] = {}
    superclass = None
    for v in present:
        src = FlatFolder(root / v / split)
        if src.num_classes != 9:
            raise ValueError(f"imagenet_9: {str(root / v / split)!r} has {src.num_classes} class folders, not 9")
        logits, y = set_logits(ev, src, num_images)
        if superclass is None:
            superclass = in9_superclass(in9_map, logits.shape[-1])
        out[f"top1/{v}"] = float(np.mean(superclass[np.argmax(logits, -1)] == y))
    if "mixed_same" in present and "mixed_rand" in present:
        out["bg_gap"] = out["top1/mixed_same"] - out["top1/mixed_rand"]
    return out
