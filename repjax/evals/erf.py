"""Effective receptive field, following the RepLKNet / SLaK protocol (PeLK spec §2 "Analyses: ERF").

For each image: s = sum_c ReLU(F[h // 2, w // 2, c]) with F the last-stage feature map; the image's
contribution map is ReLU(ds/dx) summed over RGB. Maps are averaged over images, skipping non-finite ones.
F comes from the model's `features=True` output (its last entry) when `__call__` takes `features`, otherwise
from the last 4-D module output captured with Flax `capture_intermediates` (the result names which).

Quantification runs on the display map log10(x + 1) / max (as the reference analysis script does): for each
threshold t, the side of the smallest centred square (sides 1, 3, 5, ...) holding at least t of the total,
and the area ratio r = (side / H) (side / W). The reference search starts at side 3 and needs strictly more
than t; that differs only when the centre pixel alone holds t, or on exact ties.

Evaluator `erf` (config.evals.erf = dict(type="erf", image_size=1024, num_images=50, save="<prefix>")):
images spread evenly over the eval split, bicubic-resized to `image_size`, then the normalisation ops of
`config.data.eval_pp`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from PIL import Image

from repjax import data, sharding
from repjax.data import augment
from repjax.evals import EVALUATORS
from repjax.plot import new_figure, save_figure

THRESHOLDS = (0.2, 0.3, 0.5, 0.99)
NORM_OPS = ("to_rgb", "normalize", "value_range")


class ErfResult(NamedTuple):
    map: np.ndarray  # [H, W] mean contribution map (raw, not log-scaled)
    images: int  # images averaged
    skipped: int  # images dropped for a non-finite map
    feature: str  # "features[-1]" or "intermediates:<module path>"


def _takes_features(model: nn.Module) -> bool:
    return "features" in inspect.signature(type(model).__call__).parameters


def _ordered_4d(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, jax.Array]]:
    """4-D module outputs in the order the modules returned (children before the parent's `__call__`)."""
    out = []
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping):
            out += _ordered_4d(value, name)
        else:
            out += [(name.removesuffix("/__call__"), x) for x in value if getattr(x, "ndim", 0) == 4]
    return out


def last_feature(model: nn.Module, variables: Any, x: jax.Array) -> tuple[jax.Array, str]:
    """The last-stage feature map [B, h, w, C] of `model` on `x` (eval mode) and where it came from."""
    if _takes_features(model):
        feats = model.apply(variables, x, train=False, features=True)
        return (feats[-1] if isinstance(feats, list | tuple) else feats), "features[-1]"
    _, state = model.apply(variables, x, train=False, capture_intermediates=True, mutable=["intermediates"])
    found = _ordered_4d(state["intermediates"])
    if not found:
        raise ValueError(f"{type(model).__name__} has no `features` argument and no 4-D module output")
    name, feat = found[-1]
    return feat, f"intermediates:{name}"


def contribution_maps(model: nn.Module, variables: Any, images: jax.Array) -> tuple[jax.Array, str]:
    """Per-image maps [B, H, W]: ReLU of d(sum_c ReLU(centre feature))/d(input), summed over channels."""
    source: list[str] = []

    def scalar(x: jax.Array) -> jax.Array:
        feat, name = last_feature(model, variables, x)
        source.append(name)
        h, w = feat.shape[1] // 2, feat.shape[2] // 2
        return jnp.sum(jax.nn.relu(feat[:, h, w, :].astype(jnp.float32)))

    grad = jax.grad(scalar)(images.astype(jnp.float32))
    return jnp.sum(jax.nn.relu(grad), axis=-1), source[0]


def masked_sum(maps: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum over the valid images with an all-finite map, their count)."""
    ok = valid & jnp.all(jnp.isfinite(maps), axis=(1, 2))
    return jnp.sum(jnp.where(ok[:, None, None], maps, 0.0), axis=0), jnp.sum(ok).astype(jnp.int32)


def erf_map(model: nn.Module, variables: Any, batches: Iterable[jax.Array | tuple[jax.Array, jax.Array]],
            out_sharding: Any = None) -> ErfResult:
    """Mean contribution map over `batches` of NHWC images (or `(images, valid)` pairs; padding rows invalid)."""
    names: list[str] = []

    def step(v, x, valid):
        maps, name = contribution_maps(model, v, x)
        names.append(name)
        return masked_sum(maps, valid)

    step = jax.jit(step, out_shardings=out_sharding)
    total, used, seen = None, 0, 0
    for batch in batches:
        x, valid = batch if isinstance(batch, tuple) else (batch, jnp.ones(batch.shape[:1], bool))
        s, n = jax.device_get(step(variables, x, valid))
        total = s.astype(np.float64) if total is None else total + s
        used, seen = used + int(n), seen + int(np.sum(jax.device_get(valid)))
    if total is None:
        raise ValueError("erf_map got no images")
    return ErfResult((total / max(used, 1)).astype(np.float32), used, seen - used, names[0])


def display_map(erf: np.ndarray) -> np.ndarray:
    """log10(x + 1) / max: the scale the heat maps and area ratios use."""
    x = np.log10(np.asarray(erf, np.float64) + 1.0)
    peak = np.max(x)
    return x / peak if peak > 0 else x


def area_ratios(m: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> dict[float, tuple[int, float]]:
    """`{t: (side, ratio)}`: smallest centred odd square (clipped at borders) holding >= t of the map's mass."""
    m = np.asarray(m, np.float64)
    h, w = m.shape
    total = m.sum()
    if not total > 0:
        return {t: (0, float("nan")) for t in thresholds}
    integral = np.pad(m.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    r = np.arange(max(h, w) // 2 + 1)
    y0, y1 = np.clip(h // 2 - r, 0, h), np.clip(h // 2 + r + 1, 0, h)
    x0, x1 = np.clip(w // 2 - r, 0, w), np.clip(w // 2 + r + 1, 0, w)
    mass = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    out = {}
    for t in thresholds:
        side = 2 * int(np.argmax(mass >= t * total)) + 1 if np.any(mass >= t * total) else 2 * int(r[-1]) + 1
        out[t] = (side, min(side, h) * min(side, w) / (h * w))
    return out


def plot_erf(erf: np.ndarray, path: str | Path, title: str | None = None) -> Path:
    """Heat map (PNG) of the display map of a raw ERF map."""
    fig = new_figure(5, 4.4)
    ax = fig.add_subplot()
    image = ax.imshow(display_map(erf), cmap="RdYlGn", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def _norm_pp(eval_pp: str) -> str:
    return "|".join(op for op in eval_pp.split("|") if op.strip().split("(")[0] in NORM_OPS)


def _load(source: Any, index: int, size: int, resample: int, pp: str) -> np.ndarray:
    img = augment.from_pil(augment.to_pil(source[index]["image"]).resize((size, size), resample))
    out = augment.build(pp)(img, np.random.default_rng(0)) if pp else img.astype(np.float32)
    return np.asarray(out, np.float32)


def _batches(source: Any, indices: Sequence[int], batch_size: int, size: int, resample: int, pp: str, mesh: Mesh):
    per = batch_size // jax.process_count()
    lo = jax.process_index() * per
    for start in range(0, len(indices), batch_size):
        rows = [indices[i] if i < len(indices) else None for i in range(start + lo, start + lo + per)]
        images = [_load(source, i, size, resample, pp) for i in rows if i is not None]
        pad = np.zeros_like(images[0]) if images else np.zeros((size, size, 3), np.float32)
        local = {"image": np.stack(images + [pad] * (per - len(images))),
                 "valid": np.array([i is not None for i in rows])}
        batch = sharding.global_batch(local, mesh)
        yield batch["image"], batch["valid"]


@EVALUATORS.register("erf")
def erf(model: nn.Module, variables: dict[str, Any], config, mesh: Mesh, *, image_size: int = 1024,
        num_images: int = 50, batch_size: int | None = None, split: str | None = None, source: str | None = None,
        pp: str | None = None, resample: str = "bicubic", thresholds: Sequence[float] = THRESHOLDS,
        save: str | None = None) -> dict[str, Any]:
    """Evaluator entry: ERF area ratios (`ratio_<t>`, `side_<t>`), image counts, and the feature used.
    `pp` (default: the normalisation ops of the eval preprocessing) runs after the resize; `save` writes
    `<save>.npy` (raw mean map) and `<save>.png` (heat map) from process 0."""
    src = data.from_config(config, split or config.data.eval_split, source)
    indices = sorted(set(np.linspace(0, len(src) - 1, min(num_images, len(src))).round().astype(int).tolist()))
    step = mesh.size * jax.process_count() // np.gcd(mesh.size, jax.process_count())
    bs = -(-(batch_size or min(8, len(indices))) // step) * step
    method = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[resample]
    norm = _norm_pp(config.data.eval_pp) if pp is None else pp
    result = erf_map(model, variables, _batches(src, indices, bs, image_size, method, norm, mesh),
                     out_sharding=sharding.replicated(mesh))
    if save and jax.process_index() == 0:
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        np.save(f"{save}.npy", result.map)
        plot_erf(result.map, f"{save}.png", title=f"ERF {config.model.name} @ {image_size}")
    out: dict[str, Any] = {"images": result.images, "skipped": result.skipped, "feature": result.feature}
    for t, (side, ratio) in area_ratios(display_map(result.map), thresholds).items():
        out[f"side_{t}"], out[f"ratio_{t}"] = side, ratio
    return out
