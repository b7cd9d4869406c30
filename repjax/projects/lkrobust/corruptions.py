"""ImageNet-C corruptions (Hendrycks & Dietterich, ICLR'19): the 15 benchmark corruptions and the 4 extra
("validation") ones, 5 severities each, batched over images.

The definitions and severity constants are those of the maintained reference, the `imagecorruptions` package
(Michaelis et al. 2019, the size-generic version of Hendrycks' `imagenet_c` code); they are re-implemented here
on whole batches with numpy / scipy.ndimage and checked image by image against that package in
`tests/test_lkrobust_corruptions.py` (deterministic corruptions to +-1 grey level from float rounding at the
uint8 truncation; random ones exactly given the same draws, by passing a legacy `np.random.RandomState` seeded
like the reference's global generator; impulse noise, whose reference draws from an unseeded generator, in
distribution).

Conventions shared with the reference, kept on purpose because the released ImageNet-C was made with them:
- every function returns values on the reference's scale ([0, 255] floats) and `corrupt` truncates them to
  uint8 (`np.uint8`, not rounding);
- glass blur's "swap" `x[h, w], x[h', w'] = x[h', w'], x[h, w]` on numpy views is a copy, x[h, w] <- x[h', w'];
  the sequential pass is solved here without a Python loop by pointer jumping over the copy chains (`_glass`);
- motion blur is the reference's shift-and-add line kernel (the original used ImageMagick's motion blur);
- frost textures are the six reference images (of which the reference draws only the first five), read from
  the installed `imagecorruptions` package or `$REPJAX_FROST_DIR`;
- the water branch of spatter (severities 1-3) needs OpenCV's Canny / distance transform / histogram
  equalisation; they run per image through `cv2` (installed with `imagecorruptions`).

Randomness: `rngs` holds one generator per image (`np.random.Generator`, or `np.random.RandomState` to
reproduce the reference's draws); each image's draws are made in the reference's order.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

Rng = np.random.Generator | np.random.RandomState

COMMON = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
          "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression")
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL = COMMON + EXTRA
GROUPS = {"noise": COMMON[0:3], "blur": COMMON[3:7], "weather": COMMON[7:11], "digital": COMMON[11:15]}

# Severity constants (index = severity - 1), as in the reference definitions.
PARAMS: dict[str, list] = {
    "gaussian_noise": [0.08, 0.12, 0.18, 0.26, 0.38],
    "shot_noise": [60, 25, 12, 5, 3],
    "impulse_noise": [0.03, 0.06, 0.09, 0.17, 0.27],
    "speckle_noise": [0.15, 0.2, 0.35, 0.45, 0.6],
    "gaussian_blur": [1, 2, 3, 4, 6],
    "glass_blur": [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],  # sigma, max delta, iterations
    "defocus_blur": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],  # disk radius, alias blur
    "motion_blur": [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],  # radius, sigma
    "zoom_blur": [np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01), np.arange(1, 1.21, 0.02),
                  np.arange(1, 1.26, 0.02), np.arange(1, 1.31, 0.03)],
    "fog": [(1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)],  # amount, wibble decay
    "frost": [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)],  # image weight, frost weight
    "snow": [(0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
             (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)],
    "spatter": [(0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0), (0.65, 0.3, 2, 0.68, 0.5, 0),
                (0.65, 0.3, 1, 0.65, 1.5, 1), (0.67, 0.4, 1, 0.65, 1.5, 1)],
    "contrast": [0.4, 0.3, 0.2, 0.1, 0.05],
    "brightness": [0.1, 0.2, 0.3, 0.4, 0.5],
    "saturate": [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)],
    "jpeg_compression": [25, 18, 15, 10, 7],
    "pixelate": [0.6, 0.5, 0.4, 0.3, 0.25],
    "elastic_transform": [250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12],  # alpha
}


# ----------------------------------------------------------------------------------------------- helpers

def _randint(rng: Rng, low: int, high: int | None = None, size=None):
    return rng.integers(low, high, size) if isinstance(rng, np.random.Generator) else rng.randint(low, high, size)


def _gaussian(x: np.ndarray, sigma: float | Sequence[float], *, mode: str = "nearest", truncate: float = 4.0,
              batch: bool = True, channels: bool = True) -> np.ndarray:
    """scikit-image's `filters.gaussian` (mode 'nearest', truncate 4) over the spatial axes of [B,]H,W[,C]."""
    s = list(np.broadcast_to(np.asarray(sigma, np.float64), (2,)))
    sig = ([0.0] if batch else []) + s + ([0.0] if channels else [])
    return ndimage.gaussian_filter(x, sig, mode=mode, truncate=truncate)


def _rgb2hsv(x: np.ndarray) -> np.ndarray:
    """scikit-image's RGB -> HSV on [..., 3] floats in [0, 1] (blue wins ties over green over red)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(-1)
    delta = np.ptp(x, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(delta == 0.0, 0.0, delta / v)
        h = np.where(b == v, 4.0 + (r - g) / delta, np.where(g == v, 2.0 + (b - r) / delta, (g - b) / delta))
    h = np.where(delta == 0.0, 0.0, (h / 6.0) % 1.0)
    out = np.stack([h, s, v], -1)
    out[np.isnan(out)] = 0
    return out


def _hsv2rgb(x: np.ndarray) -> np.ndarray:
    """scikit-image's HSV -> RGB."""
    h, s, v = x[..., 0], x[..., 1], x[..., 2]
    hi = np.floor(h * 6)
    f = h * 6 - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    hi = (hi.astype(np.uint8) % 6)[None, ..., None]
    return np.take_along_axis(table, np.broadcast_to(hi, (1, *table.shape[1:])), 0)[0]


def _clipped_zoom(x: np.ndarray, factor: float, *, batch: bool) -> np.ndarray:
    """Centre crop of side ceil(n / factor) zoomed back by `factor` (linear; may exceed n, not cropped here)."""
    ax = 1 if batch else 0
    h, w = x.shape[ax], x.shape[ax + 1]
    ch, cw = int(np.ceil(h / float(factor))), int(np.ceil(w / float(factor)))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[:, top:top + ch, left:left + cw] if batch else x[top:top + ch, left:left + cw]
    zoom = ([1.0] if batch else []) + [factor, factor] + [1.0] * (x.ndim - ax - 2)
    return ndimage.zoom(crop, zoom, order=1)


def _motion_offsets(radius: int, sigma: float, angle: float, shape: tuple[int, int]) -> list[tuple[float, int, int]]:
    """(weight, dy, dx) of the reference's line kernel: `width = 2 radius + 1` taps of a half-Gaussian along
    `angle`, tap i at distance ~i pixels; stops at the first tap shifted beyond the image."""
    width = 2 * radius + 1
    k = np.exp(-(np.arange(width) ** 2) / (2 * sigma**2)) / (np.sqrt(2 * np.pi) * sigma)
    k = k / np.sum(k)
    py, px = width * np.sin(np.deg2rad(angle)), width * np.cos(np.deg2rad(angle))
    hyp = np.hypot(py, px)
    taps = []
    for i in range(width):
        dy, dx = -int(np.ceil(i * py / hyp - 0.5)), -int(np.ceil(i * px / hyp - 0.5))
        if abs(dy) >= shape[0] or abs(dx) >= shape[1]:
            break
        taps.append((float(k[i]), dy, dx))
    return taps


def _motion(x: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
    """Shift-and-add motion blur of one image [H,W(,C)]; shifted-in borders repeat the edge pixel."""
    h, w = x.shape[:2]
    ys, xs = np.arange(h), np.arange(w)
    out = np.zeros(x.shape, np.float64)
    for weight, dy, dx in _motion_offsets(radius, sigma, angle, (h, w)):
        out = out + weight * x[np.clip(ys - dy, 0, h - 1)][:, np.clip(xs - dx, 0, w - 1)]
    return out


# ------------------------------------------------------------------------------------------- corruptions

def gaussian_noise(u: np.ndarray, s: int, rngs: Sequence[Rng]) -> np.ndarray:
    noise = np.stack([r.normal(size=u.shape[1:], scale=PARAMS["gaussian_noise"][s - 1]) for r in rngs])
    return np.clip(u / 255.0 + noise, 0, 1) * 255


def shot_noise(u: np.ndarray, s: int, rngs: Sequence[Rng]) -> np.ndarray:
    c = PARAMS["shot_noise"][s - 1]
    x = u / 255.0
    return np.clip(np.stack([r.poisson(xi * c) for r, xi in zip(rngs, x)]) / float(c), 0, 1) * 255


def impulse_noise(u: np.ndarray, s: int, rngs: Sequence[Rng]) -> np.ndarray:
    """Salt and pepper per value (channels independent): prob c replaced, half by 1, half by 0."""
    c = PARAMS["impulse_noise"][s - 1]
    x = u / 255.0
    flipped = np.stack([r.random(u.shape[1:]) <= c for r in rngs])
    salted = np.stack([r.random(u.shape[1:]) <= 0.5 for r in rngs])
    x = np.where(flipped & salted, 1.0, np.where(flipped, 0.0, x))
    return np.clip(x, 0, 1) * 255


def speckle_noise(u: np.ndarray, s: int, rngs: Sequence[Rng]) -> np.ndarray:
    noise = np.stack([r.normal(size=u.shape[1:], scale=PARAMS["speckle_noise"][s - 1]) for r in rngs])
    x = u / 255.0
    return np.clip(x + x * noise, 0, 1) * 255


def gaussian_blur(u: np.ndarray, s: int, rngs: Sequence[Rng]) -> np.ndarray:
    return np.clip(_gaussian(u / 255.0, PARAMS["gaussian_blur"][s - 1]), 0, 1) * 255


def _glass(x: np.ndarray, delta: int, rngs: Sequence[Rng]) -> np.ndarray:
    """One pass of the reference's local shuffle on uint8 [B,H,W,C]: for h = H-d..d+1, w = W-d..d+1 (both
    descending) x[h, w] <- x[h + dy, w + dx], (dx, dy) uniform in [-d, d). Because the pass is sequential, a
    pixel copies the value its source holds at that time: the source's final value if it was visited before,
    else its original value. Pointer jumping along these copy chains gives every final value in O(log) sweeps."""
    b, h, w, c = x.shape
    hs, ws = np.arange(h - delta, delta, -1), np.arange(w - delta, delta, -1)
    if len(hs) == 0 or len(ws) == 0:
        return x
    draws = np.stack([_randint(r, -delta, delta, size=(len(hs) * len(ws), 2)) for r in rngs])  # (dx, dy)
    hh, ww = np.repeat(hs, len(ws)), np.tile(ws, len(hs))
    dst = hh * w + ww  # flat positions in visiting order
    src = (hh + draws[..., 1]) * w + (ww + draws[..., 0])  # [B, n]
    order = np.full(h * w, np.iinfo(np.int64).max)
    order[dst] = np.arange(len(dst))
    earlier = order[src] < np.arange(len(dst))  # the source was already visited
    nxt = np.tile(np.arange(h * w), (b, 1))  # chain pointer (self = end of chain)
    val = nxt.copy()  # where the end of a chain reads its original value
    rows = np.arange(b)[:, None]
    nxt[rows, dst] = np.where(earlier, src, dst)
    val[rows, dst] = np.where(earlier, dst, src)
    while True:
        jumped = np.take_along_axis(nxt, nxt, 1)
        if np.array_equal(jumped, nxt):
            break
        nxt = jumped
    index = np.take_along_axis(val, nxt, 1)
    return np.take_along_axis(x.reshape(b, h * w, c), index[..., None], 1).reshape(x.shape)


def glass_blur(u: np.ndarray, s: int, rngs: Sequence[Rng]) -> np.ndarray:
    sigma, delta, iterations = PARAMS["glass_blur"][s - 1]
    x = np.uint8(_gaussian(u / 255.0, sigma) * 255)
    for _ in range(iterations):
        x = _glass(x, delta, rngs)
    return np.clip(_gaussian(x / 255.0, sigma), 0, 1) * 255


def _gauss_kernel_1d(size: int, sigma: float) -> np.ndarray:
    k = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    return (k / k.sum()).astype(np.float32)


@functools.lru_cache(maxsize=8)
def disk_kernel(radius: int, alias_blur: float) -> np.ndarray:
    """Normalised disk (side 17 up to radius 8, else 2 radius + 1) smoothed by a 3x3 (5x5 beyond radius 8)
    Gaussian of std `alias_blur` with mirrored borders, in float32 (OpenCV's GaussianBlur on the disk)."""
    side = np.arange(-8, 9) if radius <= 8 else np.arange(-radius, radius + 1)
    ksize = 3 if radius <= 8 else 5
    yy, xx = np.meshgrid(side, side)
    d = np.asarray(yy**2 + xx**2 <= radius**2, np.float32)
    d /= np.sum(d)
    g = _gauss_kernel_1d(ksize, alias_blur)
    d = ndimage.correlate1d(ndimage.correlate1d(d, g, axis=1, mode="mirror"), g, axis=0, mode="mirror")
    return d


def defocus_blur(u: np.ndarray, s: int, rngs: Sequence[Rng]) -> np.ndarray:
    k = disk_kernel(*PARAMS["defocus_blur"][s - 1]).astype(np.float64)
    out = ndimage.correlate(u / 255.0, k[None, :, :, None], mode="mirror")
    return np.clip(out, 0, 1) * 255


def motion_blur(u: np.ndarray, s: int, rngs: Sequence[Rng]) -> np.ndarray:
    radius, sigma = PARAMS["motion_blur"][s - 1]
    return np.clip(np.stack([_motion(x, radius, sigma, r.uniform(-45, 45)) for x, r in zip(u, rngs)]), 0, 255)


def zoom_blur(u: np.ndarray, s: int, rngs: Sequence[Rng]) -> np.ndarray:
    x = (u / 255.0).astype(np.float32)
    b, h, w, c = x.shape
    stacked = x.transpose(1, 2, 0, 3).reshape(h, w, b * c)  # images side by side on the (unzoomed) last axis
    out = np.zeros_like(stacked)
    factors = PARAMS["zoom_blur"][s - 1]
    for f in factors:
        out += _clipped_zoom(stacked, f, batch=False)[:h, :w]
    out = out.reshape(h, w, b, c).transpose(2, 0, 1, 3)
    return np.clip((x + out) / (len(factors) + 1), 0, 1) * 255


def plasma_fractal(size: int, decay: float, rng: Rng) -> np.ndarray:
    """Diamond-square height map in [0, 1] on a `size` x `size` torus (`size` a power of two); the random
    displacement starts at +-100 and shrinks by `decay` per level."""
    if size & (size - 1):
        raise ValueError(f"plasma_fractal size must be a power of two, got {size}")
    m = np.zeros((size, size), np.float64)
    step, wibble = size, 100.0

    def displaced(a: np.ndarray) -> np.ndarray:
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

    while step >= 2:
        half = step // 2
        corners = m[0:size:step, 0:size:step]
        square = corners + np.roll(corners, -1, axis=0)
        square = square + np.roll(square, -1, axis=1)
        m[half:size:step, half:size:step] = displaced(square)
        centres = m[half:size:step, half:size:step]
        corners = m[0:size:step, 0:size:step]
        m[0:size:step, half:size:step] = displaced(centres + np.roll(centres, 1, axis=0)
                                                   + corners + np.roll(corners, -1, axis=1))
        m[half:size:step, 0:size:step] = displaced(centres + np.roll(centres, 1, axis=1)
                                                   + corners + np.roll(corners, -1, axis=0))
        step //= 2
        wibble /= decay
    m -= m.min()
    return m / m.max()


def fog(u: np.ndarray, s: int, rngs: Sequence[Rng]) -> np.ndarray:
    amount, decay = PARAMS["fog"][s - 1]
    b, h, w = u.shape[:3]
    size = 1 << (max(h, w, u.shape[3]) - 1).bit_length()
    x = u / 255.0
    peak = x.reshape(b, -1).max(1)[:, None, None, None]
    x = x + amount * np.stack([plasma_fractal(size, decay, r)[:h, :w] for r in rngs])[..., None]
    return np.clip(x * peak / (peak + amount), 0, 1) * 255


def frost_dir() -> Path:
    """Folder of the frost textures: `$REPJAX_FROST_DIR`, else the installed `imagecorruptions` package's."""
    if os.environ.get("REPJAX_FROST_DIR"):
        return Path(os.environ["REPJAX_FROST_DIR"])
    import importlib.util

    spec = importlib.util.find_spec("imagecorruptions")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("frost needs the frost textures: pip install imagecorruptions (or set "
                                "REPJAX_FROST_DIR to a folder with frost1.png..frost5.jpg)")
    return Path(next(iter(spec.submodule_search_locations))) / "frost"


FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")


def _cubic_resize(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """OpenCV's INTER_CUBIC (Keys a = -0.75, half-pixel centres, replicated borders) on uint8 [H,W,C],
    computed in float and rounded (OpenCV uses 11-bit fixed point: +-1 grey level)."""
    def weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
        pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        i0 = np.floor(pos).astype(int)
        t = pos - i0
        a = -0.75
        d = np.stack([1 + t, t, 1 - t, 2 - t], 1)
        wts = np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a)
        idx = np.clip(i0[:, None] + np.arange(-1, 3)[None], 0, n_in - 1)
        return idx, wts

    iy, wy = weights(x.shape[0], out_h)
    ix, wx = weights(x.shape[1], out_w)
    f = x.astype(np.float64)
    f = np.einsum("ok,okwc->owc", wy, f[iy])
    f = np.einsum("pk,opkc->opc", wx, f[:, ix])
    return np.clip(np.rint(f), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=32)
def frost_texture(index: int, h: int, w: int) -> np.ndarray:
    """Frost image `index` as RGB uint8, scaled (x1.1 beyond what covers an h x w image) like the reference."""
    path = frost_dir() / FROST_FILES[index]
    if not path.is_file():
        raise FileNotFoundError(f"frost texture {str(path)!r} not found")
    with Image.open(path) as im:
        tex = np.asarray(im.convert("RGB"), np.uint8)
    th, tw = tex.shape[:2]
    scale = max(1.0, h / th, w / tw) * 1.1
    return _cubic_resize(tex, int(np.ceil(th * scale)), int(np.ceil(tw * scale)))


def frost(u: np.ndarray, s: int, rngs: Sequence[Rng]) -> np.ndarray:
    a, f = PARAMS["frost"][s - 1]
    h, w = u.shape[1:3]
    crops = []
    for r in rngs:
        tex = frost_texture(int(_randint(r, 5)), h, w)
        y0, x0 = int(_randint(r, 0, tex.shape[0] - h)), int(_randint(r, 0, tex.shape[1] - w))
        crops.append(tex[y0:y0 + h, x0:x0 + w])
    return np.clip(a * u.astype(np.float64) + f * np.stack(crops), 0, 255)


def snow(u: np.ndarray, s: int, rngs: Sequence[Rng]) -> np.ndarray:
    loc, scale, zoom, thresh, radius, sigma, mix = PARAMS["snow"][s - 1]
    x = (u / 255.0).astype(np.float32)
    h, w = x.shape[1:3]
    layers = []
    for r in rngs:
        layer = _clipped_zoom(r.normal(size=(h, w), loc=loc, scale=scale)[..., None], zoom, batch=False)
        layer[layer < thresh] = 0
        layer = _motion(np.clip(layer[..., 0], 0, 1), radius, sigma, r.uniform(-135, -45))
        layers.append((np.round(layer * 255).astype(np.uint8) / 255.0)[:h, :w])
    layer = np.stack(layers)[..., None]
    gray = (np.float32(0.299) * x[..., 0:1] + np.float32(0.587) * x[..., 1:2] + np.float32(0.114) * x[..., 2:3])
    x = mix * x + (1 - mix) * np.maximum(x, gray * 1.5 + 0.5)
    return np.clip(x + layer + layer[:, ::-1, ::-1], 0, 1) * 255


def _spatter_water(liquid: np.ndarray) -> np.ndarray:
    """The reference's water-drop map of one thresholded liquid layer [H,W] (OpenCV edge / distance ops)."""
    try:
        import cv2
    except ImportError as e:
        raise ImportError("spatter at severities 1-3 needs OpenCV (pip install imagecorruptions)") from e
    liquid = (liquid * 255).astype(np.uint8)
    dist = 255 - cv2.Canny(liquid, 50, 150)
    dist = cv2.distanceTransform(dist, cv2.DIST_L2, 5)
    _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
    dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
    dist = cv2.filter2D(dist, cv2.CV_8U, np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]]))
    dist = cv2.blur(dist, (3, 3)).astype(np.float32)
    m = liquid * dist
    return m / np.max(m)


def spatter(u: np.ndarray, s: int, rngs: Sequence[Rng]) -> np.ndarray:
    loc, scale, sigma, thresh, strength, mud = PARAMS["spatter"][s - 1]
    x = (u / 255.0).astype(np.float32)
    h, w = x.shape[1:3]
    liquid = _gaussian(np.stack([r.normal(size=(h, w), loc=loc, scale=scale) for r in rngs]), sigma,
                       channels=False)
    liquid[liquid < thresh] = 0
    if not mud:  # water: pale turquoise
        m = np.stack([_spatter_water(layer) for layer in liquid])[..., None] * np.float32(strength)
        color = np.array([175, 238, 238], np.float32) / np.float32(255)
        return np.clip(x + m * color, 0, 1) * 255
    m = _gaussian(np.where(liquid > thresh, 1, 0).astype(np.float32), strength, channels=False)
    m[m < 0.8] = 0
    color = np.array([63, 42, 20], np.float64) / 255.0 * m[..., None]  # mud brown
    return np.clip(x * (1 - m[..., None]) + color, 0, 1) * 255


def contrast(u: np.ndarray, s: int, rngs: Sequence[Rng]) -> np.ndarray:
    x = u / 255.0
    means = np.mean(x, axis=(1, 2), keepdims=True)
    return np.clip((x - means) * PARAMS["contrast"][s - 1] + means, 0, 1) * 255


def brightness(u: np.ndarray, s: int, rngs: Sequence[Rng]) -> np.ndarray:
    x = _rgb2hsv(u / 255.0)
    x[..., 2] = np.clip(x[..., 2] + PARAMS["brightness"][s - 1], 0, 1)
    return np.clip(_hsv2rgb(x), 0, 1) * 255


def saturate(u: np.ndarray, s: int, rngs: Sequence[Rng]) -> np.ndarray:
    mul, add = PARAMS["saturate"][s - 1]
    x = _rgb2hsv(u / 255.0)
    x[..., 1] = np.clip(x[..., 1] * mul + add, 0, 1)
    return np.clip(_hsv2rgb(x), 0, 1) * 255


def jpeg_compression(u: np.ndarray, s: int, rngs: Sequence[Rng]) -> np.ndarray:
    out = []
    for x in u:
        buf = io.BytesIO()
        Image.fromarray(x).save(buf, "JPEG", quality=PARAMS["jpeg_compression"][s - 1])
        with Image.open(buf) as im:
            out.append(np.asarray(im, np.uint8))
    return np.stack(out)


def pixelate(u: np.ndarray, s: int, rngs: Sequence[Rng]) -> np.ndarray:
    c = PARAMS["pixelate"][s - 1]
    h, w = u.shape[1:3]
    small = (int(w * c), int(h * c))
    return np.stack([np.asarray(Image.fromarray(x).resize(small, Image.BOX).resize((w, h), Image.NEAREST))
                     for x in u])


def elastic_transform(u: np.ndarray, s: int, rngs: Sequence[Rng]) -> np.ndarray:
    """Bilinear resampling along a smooth random field: uniform +-0.005 H displacements (the reference uses H
    for both axes), Gaussian-smoothed with std 0.01 (H, W) (reflect, truncate 3), scaled by alpha."""
    x = (u / 255.0).astype(np.float32)
    b, h, w, c = x.shape
    alpha, sigma, m = PARAMS["elastic_transform"][s - 1], (h * 0.01, w * 0.01), h * 0.005
    fields = [(r.uniform(-m, m, size=(h, w)), r.uniform(-m, m, size=(h, w))) for r in rngs]
    dx = (_gaussian(np.stack([f[0] for f in fields]), sigma, mode="reflect", truncate=3, channels=False)
          * alpha).astype(np.float32)
    dy = (_gaussian(np.stack([f[1] for f in fields]), sigma, mode="reflect", truncate=3, channels=False)
          * alpha).astype(np.float32)
    bb, yy, xx, cc = np.meshgrid(np.arange(b), np.arange(h), np.arange(w), np.arange(c), indexing="ij")
    coords = np.stack([bb, yy + dy[..., None], xx + dx[..., None], cc]).reshape(4, -1)
    out = ndimage.map_coordinates(x, coords, order=1, mode="reflect").reshape(x.shape)
    return np.clip(out, 0, 1) * 255


CORRUPTIONS: dict[str, Callable[[np.ndarray, int, Sequence[Rng]], np.ndarray]] = {
    name: globals()[name] for name in ALL}


def corrupt(images: np.ndarray, name: str, severity: int, rngs: Rng | Sequence[Rng] | None = None,
            seed: int = 0) -> np.ndarray:
    """Corruption `name` at `severity` (1-5) of uint8 RGB images [B,H,W,3] (or one [H,W,3]), as uint8.
    `rngs`: one generator per image (or one shared for a single image); default: seeded by (seed, index)."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(ALL)}")
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    u = np.asarray(images)
    single = u.ndim == 3
    u = u[None] if single else u
    if u.dtype != np.uint8 or u.ndim != 4 or u.shape[-1] != 3:
        raise ValueError(f"corrupt needs uint8 RGB images [B,H,W,3] or [H,W,3], got {images.dtype} {images.shape}")
    if min(u.shape[1:3]) < 32:
        raise ValueError(f"corrupt needs images of at least 32x32 pixels (the reference's minimum), got "
                         f"{u.shape[1]}x{u.shape[2]}")
    if rngs is None:
        rngs = [np.random.default_rng([seed, i]) for i in range(len(u))]
    elif isinstance(rngs, np.random.Generator | np.random.RandomState):
        rngs = [rngs]
    if len(rngs) != len(u):
        raise ValueError(f"corrupt got {len(rngs)} generators for {len(u)} images")
    out = np.uint8(CORRUPTIONS[name](u, severity, list(rngs)))
    return out[0] if single else out
