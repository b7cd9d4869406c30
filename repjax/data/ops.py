"""The preprocessing ops of the pp DSL (see `repjax.data.augment`): colour, geometry, crops, flips, scaling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from repjax.data.augment import OPS, STATS, Op, from_pil, need_uint8, to_pil


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _resize(image: np.ndarray, hw: tuple[int, int], box: tuple[float, float, float, float] | None = None,
            name: str = "resize") -> np.ndarray:
    need_uint8(name, image)
    if box is None and image.shape[:2] == hw:
        return image
    return from_pil(to_pil(image).resize((hw[1], hw[0]), Image.BILINEAR, box=box))


@OPS.register("to_rgb")
def to_rgb() -> Op:
    """Greyscale -> 3 channels; drops an alpha channel."""

    def fn(x: np.ndarray, rng: Any = None) -> np.ndarray:
        c = x.shape[-1]
        return np.repeat(x, 3, axis=-1) if c == 1 else x[..., :3] if c == 4 else x

    return Op("to_rgb", fn, fn)


@OPS.register("resize")
def resize(size: int | Sequence[int]) -> Op:
    """Resizes to `size` (int: square, or (h, w)), bilinear."""
    hw = _hw(size)
    return Op("resize", lambda x, rng: _resize(x, hw))


@OPS.register("resize_small")
def resize_small(size: int) -> Op:
    """Resizes so that the shorter side is `size`, keeping the aspect ratio."""

    def fn(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = x.shape[:2]
        scale = size / min(h, w)
        return _resize(x, (max(size, round(h * scale)), max(size, round(w * scale))), name="resize_small")

    return Op("resize_small", fn)


@OPS.register("center_crop")
def center_crop(size: int | Sequence[int]) -> Op:
    """Crops the central `size` (int: square, or (h, w))."""
    ch, cw = _hw(size)

    def crop(x: np.ndarray, axis: int) -> np.ndarray:
        h, w = x.shape[axis:axis + 2]
        if h < ch or w < cw:
            raise ValueError(f"center_crop({ch}, {cw}) on a smaller image {h}x{w}; resize first")
        top, left = (h - ch) // 2, (w - cw) // 2
        index = (slice(None),) * axis + (slice(top, top + ch), slice(left, left + cw))
        return x[index]

    return Op("center_crop", lambda x, rng: crop(x, 0), lambda x, rngs: crop(x, 1))


@OPS.register("random_resized_crop")
def random_resized_crop(size: int | Sequence[int], scale_lo: float = 0.08, scale_hi: float = 1.0,
                        ratio_lo: float = 3 / 4, ratio_hi: float = 4 / 3) -> Op:
    """Inception crop: a random box of area fraction [scale_lo, scale_hi] and aspect ratio [ratio_lo, ratio_hi]
    (log-uniform), resized to `size`; after 10 misses, the largest central box within the ratio range."""
    hw = _hw(size)
    log_ratio = (np.log(ratio_lo), np.log(ratio_hi))

    def fn(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = x.shape[:2]
        for _ in range(10):
            area = h * w * rng.uniform(scale_lo, scale_hi)
            ratio = np.exp(rng.uniform(*log_ratio))
            bw, bh = round(np.sqrt(area * ratio)), round(np.sqrt(area / ratio))
            if 0 < bw <= w and 0 < bh <= h:
                top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
                break
        else:
            ratio = w / h
            if ratio > ratio_hi:
                bw, bh = round(h * ratio_hi), h
            elif ratio < ratio_lo:
                bw, bh = w, round(w / ratio_lo)
            else:
                bw, bh = w, h
            top, left = (h - bh) // 2, (w - bw) // 2
        return _resize(x, hw, box=(left, top, left + bw, top + bh), name="random_resized_crop")

    return Op("random_resized_crop", fn)


@OPS.register("pad_crop")
def pad_crop(pad: int) -> Op:
    """Zero-pads `pad` pixels on each side, then crops a random window of the original size."""

    def offsets(rng: np.random.Generator) -> tuple[int, int]:
        dy, dx = divmod(int(rng.integers((2 * pad + 1) ** 2)), 2 * pad + 1)  # one draw: cheaper than two
        return dy, dx

    def fn(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = x.shape[:2]
        dy, dx = offsets(rng)
        padded = np.pad(x, ((pad, pad), (pad, pad)) + ((0, 0),) * (x.ndim - 2))
        return padded[dy:dy + h, dx:dx + w]

    def batch(x: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
        n, h, w = x.shape[:3]
        padded = np.zeros((n, h + 2 * pad, w + 2 * pad, *x.shape[3:]), x.dtype)
        padded[:, pad:pad + h, pad:pad + w] = x
        out = np.empty_like(x)
        for i, rng in enumerate(rngs):
            dy, dx = offsets(rng)
            out[i] = padded[i, dy:dy + h, dx:dx + w]
        return out

    return Op("pad_crop", fn, batch)


@OPS.register("flip_lr")
def flip_lr(prob: float = 0.5) -> Op:
    """Mirrors left-right with probability `prob`."""

    def fn(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return x[:, ::-1] if rng.random() < prob else x

    def batch(x: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
        out = x.copy()
        for i, rng in enumerate(rngs):
            if rng.random() < prob:
                out[i] = x[i, :, ::-1]
        return out

    return Op("flip_lr", fn, batch)


@OPS.register("normalize")
def normalize(mean: str | float | Sequence[float] = "imagenet", std: float | Sequence[float] | None = None) -> Op:
    """Scales to [0, 1] (uint8 input; float input is taken as already in [0, 1]) and standardises per channel:
    `normalize(imagenet)`, `normalize(cifar10)`, `normalize(digits)` or `normalize((m, ...), (s, ...))`."""
    if isinstance(mean, str):
        if mean not in STATS:
            raise ValueError(f"unknown statistics {mean!r}; known: {', '.join(STATS)} or (mean, std)")
        mean, std = STATS[mean]
    if std is None:
        raise ValueError("normalize needs std with a numeric mean")
    m, s = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def fn(x: np.ndarray, rng: Any = None) -> np.ndarray:
        w, c = x.shape[-2:]
        if m.size > 1 and c != m.size:
            raise ValueError(f"normalize with {m.size} channel statistics on images with {c} channels")
        scale = np.broadcast_to(1 / (255 * s) if x.dtype == np.uint8 else 1 / s, (c,))
        # Whole rows (W*C values) per inner loop: broadcasting over C alone is several times slower.
        out = np.multiply(x.reshape(-1, w * c), np.tile(scale, w), dtype=np.float32)
        out -= np.tile(np.broadcast_to(m / s, (c,)), w)
        return out.reshape(x.shape)

    return Op("normalize", fn, fn)


@OPS.register("value_range")
def value_range(lo: float = -1.0, hi: float = 1.0) -> Op:
    """Maps uint8 [0, 255] (or float [0, 1]) linearly onto float32 [lo, hi]."""

    def fn(x: np.ndarray, rng: Any = None) -> np.ndarray:
        top = 255.0 if x.dtype == np.uint8 else 1.0
        return (x.astype(np.float32) * np.float32((hi - lo) / top) + np.float32(lo)).astype(np.float32)

    return Op("value_range", fn, fn)
