"""Batch-level mixup (Zhang et al. 2018) and cutmix (Yun et al. 2019) in numpy, with soft one-hot labels.

One mixing draw per global batch: with both alphas > 0, mixup or cutmix is picked with probability 1/2.
Row i of a batch of n is mixed with its partner row n - 1 - i (the batch reversed); `apply` takes the partner
rows explicitly so a process holding only part of the global batch can mix with rows held elsewhere.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Mix:
    """One draw: `lam` is the weight of each row itself; `box` (top, left, bottom, right) for cutmix."""

    kind: str  # "mixup" | "cutmix"
    lam: float
    box: tuple[int, int, int, int] | None = None


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[np.asarray(labels)]


def sample(rng: np.random.Generator, height: int, width: int, mixup_alpha: float, cutmix_alpha: float) -> Mix:
    """Draws the mixing of one batch of `height` x `width` images."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        raise ValueError("sample needs mixup_alpha > 0 or cutmix_alpha > 0")
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    if not use_cutmix:
        return Mix("mixup", float(rng.beta(mixup_alpha, mixup_alpha)))
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha))
    cut = np.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, height)
    left, right = max(cx - cw // 2, 0), min(cx + cw // 2, width)
    area = (bottom - top) * (right - left)
    return Mix("cutmix", 1.0 - area / (height * width), (top, left, bottom, right))


def apply(mix: Mix, images: np.ndarray, labels: np.ndarray, partner_images: np.ndarray,
          partner_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mixes float images [n,H,W,C] and soft labels [n,K] with their partners' rows."""
    if mix.kind == "mixup":
        out = images * np.float32(mix.lam) + partner_images * np.float32(1.0 - mix.lam)
    else:
        top, left, bottom, right = mix.box  # type: ignore[misc]
        out = images.copy()
        out[:, top:bottom, left:right] = partner_images[:, top:bottom, left:right]
    soft = labels * np.float32(mix.lam) + partner_labels * np.float32(1.0 - mix.lam)
    return out.astype(np.float32), soft.astype(np.float32)


def mixup_cutmix(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator, *, num_classes: int,
                 mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Mixes a whole batch with itself reversed; integer `labels` become soft one-hot float32 [n, K]."""
    images = images.astype(np.float32)
    soft = one_hot(labels, num_classes) if labels.ndim == 1 else labels.astype(np.float32)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, soft
    mix = sample(rng, images.shape[1], images.shape[2], mixup_alpha, cutmix_alpha)
    return apply(mix, images, soft, images[::-1], soft[::-1])
