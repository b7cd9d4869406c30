"""Shared plumbing of the robustness evaluators: images in [0, 1] pixel space, normalisation inside the model.

Every perturbation of this package (corruption, attack, occlusion, noise) acts on the image the model sees,
in [0, 1] pixel units, before mean/std normalisation (spec §3.4: occlusion zeroes black pixels; attacks take
eps in pixel units with the normalisation declared to the attack). So the eval preprocessing string is split:
- geometry: every op except `normalize` / `value_range` (to_rgb, resize, center_crop), applied on the host to
  uint8 images (`load`);
- normalisation: the per-channel affine map those ops apply to [0, 1] floats, read off the ops themselves
  (`affine`) and applied inside the jitted function (`logits_fn`), so gradients reach pixel space.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from repjax import sharding
from repjax.data import augment

NORM_OPS = ("normalize", "value_range")


def split_pp(pp: str) -> tuple[str, str]:
    """(geometry ops, normalisation ops) of a pp string, each in its original order."""
    ops = [op.strip() for op in pp.split("|") if op.strip()]
    norm = [op for op in ops if op.split("(")[0] in NORM_OPS]
    return "|".join(op for op in ops if op not in norm), "|".join(norm)


def affine(norm_pp: str, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) per channel with `norm_pp(x) = x * scale + shift` for x in [0, 1] (float input)."""
    if not norm_pp:
        return np.ones(channels, np.float32), np.zeros(channels, np.float32)
    pp = augment.build(norm_pp)
    rng = np.random.default_rng(0)
    zero = pp(np.zeros((1, 1, channels), np.float32), rng).reshape(-1)
    one = pp(np.ones((1, 1, channels), np.float32), rng).reshape(-1)
    half = pp(np.full((1, 1, channels), 0.5, np.float32), rng).reshape(-1)
    if not np.allclose(half, (zero + one) / 2, atol=1e-5):
        raise ValueError(f"normalisation {norm_pp!r} is not affine per channel")
    return (one - zero).astype(np.float32), zero.astype(np.float32)


def subset(n: int, num: int | None) -> np.ndarray:
    """`num` indices spread evenly over [0, n) (all when `num` is None or >= n)."""
    if num is None or num >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, num).round().astype(int))


def load(source: Any, indices: Sequence[int], geometry_pp: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N,H,W,C] after the geometry ops, int labels [N]) of `source[indices]`."""
    pp = augment.build(geometry_pp) if geometry_pp else None
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in indices:
        ex = source[int(i)]
        x = np.asarray(ex["image"])
        x = x[..., None] if x.ndim == 2 else x
        images.append(np.asarray(pp(x, rng) if pp else x))
        labels.append(int(ex["label"]))
    shapes = {x.shape for x in images}
    if len(shapes) > 1:
        raise ValueError(f"images differ in shape after {geometry_pp!r} ({sorted(shapes)[:3]}); add resize/crop ops")
    out = np.stack(images)
    if out.dtype != np.uint8:
        raise ValueError(f"geometry preprocessing {geometry_pp!r} must keep uint8 images, got {out.dtype}")
    return out, np.asarray(labels, np.int64)


def logits_fn(model: nn.Module, variables: Any, scale: np.ndarray, shift: np.ndarray) -> Callable:
    """`x01 [B,H,W,C] -> logits`: the model on pixel-space images, the normalisation inside (differentiable)."""
    s, b = jnp.asarray(scale), jnp.asarray(shift)

    def f(x01: jax.Array) -> jax.Array:
        return model.apply(variables, x01 * s + b, train=False).astype(jnp.float32)

    return f


def run_batched(fn: Callable, arrays: Sequence[np.ndarray], batch_size: int, mesh: Mesh) -> np.ndarray:
    """Applies the jitted `fn(*batch_arrays)` over rows in batches sharded over `mesh` (single process; the
    last batch is padded by repeating its last row and the padding dropped); returns the stacked outputs."""
    if jax.process_count() > 1:
        raise NotImplementedError("the robustness evaluators run in a single process")
    n = len(arrays[0])
    bs = -(-max(1, min(batch_size, n)) // mesh.size) * mesh.size
    outs = []
    for start in range(0, n, bs):
        rows = np.minimum(np.arange(start, start + bs), n - 1)
        local = {str(i): np.asarray(a)[rows] for i, a in enumerate(arrays)}
        batch = sharding.global_batch(local, mesh)
        out = jax.device_get(fn(*[batch[str(i)] for i in range(len(arrays))]))
        outs.append(np.asarray(out)[: min(bs, n - start)])
    return np.concatenate(outs)


def to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1]."""
    return np.asarray(images, np.float32) / np.float32(255)


class Evaluated:
    """A model bound to its pixel-space input: `.logits(x01)`, `.predict(x01)`, `.accuracy(x01, labels)`."""

    def __init__(self, model: nn.Module, variables: Any, config: Any, mesh: Mesh, *, pp: str | None = None,
                 batch_size: int | None = None):
        self.geometry, norm = split_pp(pp if pp is not None else config.data.eval_pp)
        self.scale, self.shift = affine(norm)
        self.fn = logits_fn(model, variables, self.scale, self.shift)
        self.mesh = mesh
        self.batch_size = batch_size or config.eval_batch_size
        self._jit = jax.jit(self.fn)

    def logits(self, x01: np.ndarray) -> np.ndarray:
        return run_batched(self._jit, [np.asarray(x01, np.float32)], self.batch_size, self.mesh)

    def predict(self, x01: np.ndarray) -> np.ndarray:
        return np.argmax(self.logits(x01), -1)

    def accuracy(self, x01: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(self.predict(x01) == np.asarray(labels)))
