"""RandAugment (Cubuk et al., 2020) with Pillow: the paper's 14 transformations at one global magnitude.

Magnitude m is on the AutoAugment scale 0..10; level = m / 10. Geometric ops and enhancement factors take a
random sign. Ranges: rotate 30 degrees, shear 0.3, translate 0.45 of the image side, enhance factor
1 +- 0.9 level, solarize threshold 256 (1 - level), posterize 8 - 4 level bits. Empty pixels are grey (128).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from repjax.data.augment import OPS, Op, from_pil, need_uint8, to_pil

FILL = 128


def _fill(img: Image.Image) -> int | tuple[int, ...]:
    return FILL if img.mode == "L" else (FILL,) * len(img.getbands())


def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, coeffs, Image.BILINEAR, fillcolor=_fill(img))


def identity(img: Image.Image, level: float) -> Image.Image:
    return img


def auto_contrast(img: Image.Image, level: float) -> Image.Image:
    return ImageOps.autocontrast(img)


def equalize(img: Image.Image, level: float) -> Image.Image:
    return ImageOps.equalize(img)


def rotate(img: Image.Image, level: float) -> Image.Image:
    return img.rotate(30.0 * level, resample=Image.BILINEAR, fillcolor=_fill(img))


def solarize(img: Image.Image, level: float) -> Image.Image:
    return ImageOps.solarize(img, round(256 * (1 - abs(level))))


def posterize(img: Image.Image, level: float) -> Image.Image:
    return ImageOps.posterize(img, 8 - int(4 * abs(level)))


def color(img: Image.Image, level: float) -> Image.Image:
    return ImageEnhance.Color(img).enhance(1 + 0.9 * level)


def contrast(img: Image.Image, level: float) -> Image.Image:
    return ImageEnhance.Contrast(img).enhance(1 + 0.9 * level)


def brightness(img: Image.Image, level: float) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(1 + 0.9 * level)


def sharpness(img: Image.Image, level: float) -> Image.Image:
    return ImageEnhance.Sharpness(img).enhance(1 + 0.9 * level)


def shear_x(img: Image.Image, level: float) -> Image.Image:
    return _affine(img, (1, 0.3 * level, 0, 0, 1, 0))


def shear_y(img: Image.Image, level: float) -> Image.Image:
    return _affine(img, (1, 0, 0, 0.3 * level, 1, 0))


def translate_x(img: Image.Image, level: float) -> Image.Image:
    return _affine(img, (1, 0, 0.45 * level * img.width, 0, 1, 0))


def translate_y(img: Image.Image, level: float) -> Image.Image:
    return _affine(img, (1, 0, 0, 0, 1, 0.45 * level * img.height))


# (op, takes a random sign)
TRANSFORMS: list[tuple[Callable[[Image.Image, float], Image.Image], bool]] = [
    (identity, False), (auto_contrast, False), (equalize, False), (rotate, True), (solarize, False),
    (color, True), (posterize, False), (contrast, True), (brightness, True), (sharpness, True),
    (shear_x, True), (shear_y, True), (translate_x, True), (translate_y, True),
]


def rand_augment(image: np.ndarray, rng: np.random.Generator, num_ops: int = 2, magnitude: float = 9) -> np.ndarray:
    """Applies `num_ops` random transformations to a uint8 HWC image (1 or 3 channels)."""
    img = to_pil(image)
    level = min(max(magnitude, 0.0), 10.0) / 10.0
    for choice in rng.integers(0, len(TRANSFORMS), size=num_ops):
        op, signed = TRANSFORMS[int(choice)]
        sign = -1.0 if signed and rng.random() < 0.5 else 1.0
        img = op(img, sign * level)
    return from_pil(img)


@OPS.register("randaugment")
def randaugment(num_ops: int = 2, magnitude: float = 9) -> Op:
    """RandAugment (Cubuk et al. 2020): `num_ops` ops drawn uniformly with replacement at `magnitude` (0-10)."""

    def fn(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        need_uint8("randaugment", x)
        return rand_augment(x, rng, num_ops, magnitude)

    return Op("randaugment", fn)
