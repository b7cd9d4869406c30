"""ImageNet-C style evaluation of any dataset: "<name>-C" on the fly, the released ImageNet-C, mCE.

Metrics (Hendrycks & Dietterich, ICLR'19; spec §3.1), with E_{s,c} the top-1 error at severity s of
corruption c and E_clean the clean error:
  CE_c          = sum_s E_{s,c} / sum_s E^base_{s,c}              mCE = mean over corruptions of CE_c
  relative CE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^base_{s,c} - E^base_clean)   relative mCE likewise.
For ImageNet the baseline is AlexNet: its mean error over the 5 severities per corruption (the 15 constants of
the spec, `ALEXNET_ERRORS`) and its clean error `ALEXNET_CLEAN_ERROR` = 0.43478 (the top-1 error of the
torchvision AlexNet weights, 56.522% top-1; the paper's table rounds it to 43.5%). Those constants only
mean something for the 1000 ImageNet classes; on other datasets a baseline model is declared: a JSON file
written by this evaluator's `save` for that model (its `errors` and `clean_error`), or a dict.

Where the images come from (evaluator `imagenet_c`):
- on the fly (default): the eval split of any source, geometry ops of the eval preprocessing applied (resize,
  crop), then the corruption at the model's input resolution (as ImageNet-C corrupts 224x224 crops), then the
  normalisation. Each image's randomness is seeded by (seed, corruption, severity, index), so runs are
  reproducible; corrupted splits are cached as .npy under `cache_dir` (default `$REPJAX_CORRUPT_CACHE`, else
  no cache). Generated corruptions are not the released JPEGs: the release stored JPEG re-encodings (quality
  85), so numbers differ slightly from the released set;
- `released=<root>`: the released folder layout `<root>/<corruption>/<severity>/<wnid>/*.JPEG`;
- `tfds=<data_dir>`: TFDS `imagenet2012_corrupted/<corruption>_<severity>`, split `validation`, prepared as
  ArrayRecord. Released images are resized to the clean input size only when that differs.

A corrupted split is also a data source for training or `python -m repjax.eval`:
`corrupt:<corruption>/<severity>[/<seed>]:<base spec>` (corrupted at the source's own resolution).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from repjax import data
from repjax.data.base import SOURCES
from repjax.evals import EVALUATORS
from repjax.plot import new_figure, save_figure
from repjax.projects.lkrobust import corruptions as C, inputs

ALEXNET_ERRORS = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640, "defocus_blur": 0.819880,
    "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572,
    "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500}
ALEXNET_CLEAN_ERROR = 0.43478
CACHE_VERSION = 1


def image_rngs(seed: int, corruption: str, severity: int, indices: Sequence[int]) -> list[np.random.Generator]:
    """One generator per image, seeded by (seed, corruption, severity, image index)."""
    k = C.ALL.index(corruption)
    return [np.random.default_rng([seed, k, severity, int(i)]) for i in indices]


def corrupt_split(images: np.ndarray, indices: Sequence[int], corruption: str, severity: int, *, seed: int = 0,
                  chunk: int = 64) -> np.ndarray:
    """Corrupts uint8 images [N,H,W,3] (`indices`: their dataset indices, for the seeds) in chunks."""
    out = np.empty_like(images)
    for lo in range(0, len(images), chunk):
        hi = min(lo + chunk, len(images))
        out[lo:hi] = C.corrupt(images[lo:hi], corruption, severity,
                               image_rngs(seed, corruption, severity, indices[lo:hi]))
    return out


def _cache_path(cache_dir: str | os.PathLike | None, key: Mapping[str, Any], corruption: str,
                severity: int) -> Path | None:
    if not cache_dir:
        return None
    digest = hashlib.sha1(json.dumps({**key, "v": CACHE_VERSION}, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / digest / f"{corruption}_{severity}.npy"


def cached_corrupt(images: np.ndarray, indices: Sequence[int], corruption: str, severity: int, *, seed: int,
                   cache_dir: str | os.PathLike | None, key: Mapping[str, Any]) -> np.ndarray:
    """`corrupt_split`, read from / written to `<cache_dir>/<hash of key>/<corruption>_<severity>.npy`."""
    path = _cache_path(cache_dir, {**key, "seed": seed, "n": len(images), "shape": list(images.shape)},
                       corruption, severity)
    if path is not None and path.is_file():
        out = np.load(path)
        if out.shape == images.shape and out.dtype == np.uint8:
            return out
    out = corrupt_split(images, indices, corruption, severity, seed=seed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, out)
        tmp.replace(path)
    return out


class CorruptedSource:
    """`corrupt:<corruption>/<severity>[/<seed>]:<base spec>`: a split with every image corrupted (at the
    source's resolution), deterministic per index; `as_arrays()` corrupts the split once (cached on disk
    under `$REPJAX_CORRUPT_CACHE` when set)."""

    def __init__(self, base: Any, corruption: str, severity: int, seed: int = 0, *, key: str = "",
                 cache_dir: str | None = None):
        if corruption not in C.CORRUPTIONS:
            raise ValueError(f"unknown corruption {corruption!r}; known: {', '.join(C.ALL)}")
        if severity not in (1, 2, 3, 4, 5):
            raise ValueError(f"severity must be 1..5, got {severity}")
        self.base, self.corruption, self.severity, self.seed = base, corruption, severity, seed
        self.class_names, self.num_classes = base.class_names, base.num_classes
        self.key, self.cache_dir = key, cache_dir if cache_dir is not None else os.environ.get("REPJAX_CORRUPT_CACHE")
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._arrays is not None:
            return {"image": self._arrays[0][index], "label": int(self._arrays[1][index])}
        ex = self.base[int(index)]
        x = np.asarray(ex["image"])
        x = x[..., None] if x.ndim == 2 else x
        x = np.repeat(x, 3, -1) if x.shape[-1] == 1 else x[..., :3]
        rng = image_rngs(self.seed, self.corruption, self.severity, [index])
        return {"image": C.corrupt(x, self.corruption, self.severity, rng), "label": int(ex["label"])}

    def as_arrays(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self._arrays is None:
            arrays = self.base.as_arrays() if hasattr(self.base, "as_arrays") else None
            if arrays is None or arrays[0].ndim != 4 or arrays[0].shape[-1] != 3:
                return None
            images, labels = arrays
            out = cached_corrupt(np.asarray(images), np.arange(len(images)), self.corruption, self.severity,
                                 seed=self.seed, cache_dir=self.cache_dir, key={"source": self.key})
            self._arrays = (out, np.asarray(labels))
        return self._arrays


@SOURCES.register("corrupt")
def corrupt_source(arg: str | None, split: str, options: data.SourceOptions | None = None) -> CorruptedSource:
    form = "'corrupt:<corruption>/<severity>[/<seed>]:<base spec>', e.g. 'corrupt:fog/3:folder:../data/x'"
    if not arg or ":" not in arg:
        raise ValueError(f"Data source 'corrupt' needs {form}")
    what, base = arg.split(":", 1)
    parts = what.split("/")
    if len(parts) not in (2, 3) or not all(p.strip().isdigit() for p in parts[1:]):
        raise ValueError(f"Data source 'corrupt:{arg}': expected {form}")
    return CorruptedSource(data.get_source(base, split, options), parts[0].strip(), int(parts[1]),
                           int(parts[2]) if len(parts) == 3 else 0, key=f"{base}|{split}")


def released_source(root: str | None, tfds_dir: str | None, corruption: str, severity: int) -> Any:
    """The released ImageNet-C split (`<root>/<corruption>/<severity>/<wnid>/*`) or the TFDS one."""
    if root is not None:
        folder = Path(root) / corruption
        if not (folder / str(severity)).is_dir():
            raise FileNotFoundError(f"released ImageNet-C folder {str(folder / str(severity))!r} not found; "
                                    "expected <root>/<corruption>/<severity>/<wnid>/*.JPEG")
        return data.get_source(f"folder:{folder}", str(severity))
    name = f"imagenet2012_corrupted/{corruption}_{severity}"
    return data.get_source(f"tfds:{name}@{tfds_dir}" if tfds_dir else f"tfds:{name}", "validation")


def _resize_to(images: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if images.shape[1:3] == hw:
        return images
    return np.stack([np.asarray(Image.fromarray(x).resize(hw[::-1], Image.BILINEAR)) for x in images])


def baseline_errors(baseline: str | Mapping[str, Any] | None, num_classes: int,
                    clean_error: float | None) -> tuple[dict[str, float] | None, float | None]:
    """(mean error over severities per corruption, clean error) of the declared baseline."""
    if baseline is None:
        return None, clean_error
    if isinstance(baseline, str) and baseline == "alexnet":
        if num_classes != 1000:
            raise ValueError(f"baseline 'alexnet' (the ImageNet-C constants) needs the 1000 ImageNet classes, the "
                             f"data has {num_classes}: declare a baseline model's errors (baseline=<its JSON>)")
        return dict(ALEXNET_ERRORS), ALEXNET_CLEAN_ERROR if clean_error is None else clean_error
    if isinstance(baseline, str):
        path = Path(baseline)
        if not path.is_file():
            raise FileNotFoundError(f"baseline {baseline!r}: neither 'alexnet' nor a JSON file of this evaluator")
        baseline = json.loads(path.read_text())
    errors = baseline.get("errors", baseline)
    mean = {c: float(np.mean(list(v.values())) if isinstance(v, Mapping) else v) for c, v in errors.items()
            if c in C.CORRUPTIONS}
    return mean, baseline.get("clean_error", clean_error) if clean_error is None else clean_error


def ce_metrics(errors: Mapping[str, Mapping[int, float]], clean_error: float, base: Mapping[str, float],
               base_clean: float | None) -> dict[str, float]:
    """CE / mCE and relative CE / mCE of the corruptions present in both (mean over the severities run)."""
    missing = [c for c in errors if c not in base]
    if missing:
        raise ValueError(f"the baseline has no error for {missing}; it has {sorted(base)}")
    out: dict[str, float] = {}
    for c, per in errors.items():
        e = float(np.mean(list(per.values())))
        out[f"ce/{c}"] = e / base[c]
        if base_clean is not None:
            gap = base[c] - base_clean  # 0: the baseline is not hurt by c at all, relative CE undefined (nan)
            out[f"rel_ce/{c}"] = (e - clean_error) / gap if gap != 0 else float("nan")
    out["mce"] = float(np.mean([out[f"ce/{c}"] for c in errors]))
    if base_clean is not None:
        out["relative_mce"] = float(np.mean([out[f"rel_ce/{c}"] for c in errors]))
    return out


def plot_bars(values: Mapping[str, float], path: str | Path, *, ylabel: str, title: str,
              reference: float | None = None) -> Path:
    """One bar per corruption (PNG); `reference` draws a horizontal line (e.g. 100% = the baseline)."""
    fig = new_figure(max(6.0, 0.45 * len(values) + 2), 4)
    ax = fig.add_subplot()
    names = list(values)
    ax.bar(range(len(names)), [values[n] for n in names], color="tab:blue")
    ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=60, ha="right", fontsize=8)
    if reference is not None:
        ax.axhline(reference, color="k", lw=0.8, ls="--")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


@EVALUATORS.register("imagenet_c")
def imagenet_c(model, variables, config, mesh, *, corruptions: Sequence[str] = C.COMMON,
               severities: Sequence[int] = (1, 2, 3, 4, 5), source: str | None = None, split: str | None = None,
               num_images: int | None = None, seed: int = 0, cache_dir: str | None = None,
               released: str | None = None, tfds: str | None = None, baseline: Any = "alexnet",
               baseline_clean_error: float | None = None, batch_size: int | None = None,
               save: str | None = None) -> dict[str, Any]:
    """Top-1 per corruption and severity (`top1/<c>/<s>`, `top1/<c>`), clean top-1, mean corrupted top-1,
    and with a baseline CE per corruption, mCE, relative mCE. `save` writes `<save>.json` (all tables: a
    baseline for other models) and `<save>.png` (CE per corruption, or error without a baseline)."""
    unknown = [c for c in corruptions if c not in C.CORRUPTIONS]
    if unknown:
        raise ValueError(f"unknown corruptions {unknown}; known: {', '.join(C.ALL)}")
    spec, split = source or config.data.source, split or config.data.eval_split
    src = data.get_source(spec, split)
    ev = inputs.Evaluated(model, variables, config, mesh, batch_size=batch_size)
    idx = inputs.subset(len(src), num_images)
    clean, labels = inputs.load(src, idx, ev.geometry)
    clean_acc = ev.accuracy(inputs.to_unit(clean), labels)
    cache_dir = cache_dir if cache_dir is not None else os.environ.get("REPJAX_CORRUPT_CACHE")
    key = {"source": spec, "split": split, "pp": ev.geometry, "idx": hashlib.sha1(idx.tobytes()).hexdigest()}
    acc: dict[str, dict[int, float]] = {}
    for c in corruptions:
        acc[c] = {}
        for s in severities:
            if released is not None or tfds is not None:
                rs = released_source(released, tfds, c, s)
                images, y = inputs.load(rs, inputs.subset(len(rs), num_images), "to_rgb")
                images = _resize_to(images, clean.shape[1:3])
            else:
                images = cached_corrupt(clean, idx, c, s, seed=seed, cache_dir=cache_dir, key=key)
                y = labels
            acc[c][s] = ev.accuracy(inputs.to_unit(images), y)
    errors = {c: {s: 1.0 - a for s, a in per.items()} for c, per in acc.items()}
    out: dict[str, Any] = {"clean_top1": clean_acc, "images": len(idx),
                           "mean_corrupted_top1": float(np.mean([a for per in acc.values() for a in per.values()]))}
    for c, per in acc.items():
        out[f"top1/{c}"] = float(np.mean(list(per.values())))
        out.update({f"top1/{c}/{s}": a for s, a in per.items()})
    base, base_clean = baseline_errors(baseline, src.num_classes, baseline_clean_error)
    if base is not None:
        out.update(ce_metrics(errors, 1.0 - clean_acc, base, base_clean))
    if save:
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{save}.json").write_text(json.dumps(
            {"model": config.model.name, "clean_error": 1.0 - clean_acc, "errors": errors, "metrics": out}, indent=1))
        if base is not None:
            plot_bars({c: 100 * out[f"ce/{c}"] for c in corruptions}, f"{save}.png", ylabel="CE (%)", reference=100,
                      title=f"{config.model.name}: mCE {100 * out['mce']:.1f}")
        else:
            plot_bars({c: 100 * (1 - out[f"top1/{c}"]) for c in corruptions}, f"{save}.png", ylabel="error (%)",
                      title=f"{config.model.name}: corruption error")
    return out
