"""Occlusion invariance (Naseer et al. 2021, "Intriguing properties of vision transformers"; spec §3.4).

The image is cut into a grid of `patch_size` squares (default H // 14: the 14x14 grid of 16-pixel patches at
224; border rows/columns beyond the last whole patch are never dropped). Dropping a patch zeroes it in [0, 1]
pixel space (black), before the normalisation.
- random: for i = 0..9, zero i * P // 10 of the P patches, the same random patches for every image of a draw;
  `repeats` draws are averaged;
- salient / non-salient: a saliency map per image, summed per patch and normalised to mass 1; the foreground
  of level lambda is the set of patches holding the top-lambda mass (ascending cumulative mass > 1 - lambda;
  lambda >= 1: every patch). Salient (foreground) drop zeroes the foreground, non-salient (background) drop
  zeroes the rest, for lambda = 0.1..1.0.

Saliency sources are pluggable (`SALIENCY`, `register_saliency`): `gradient` (default) is the input-gradient
saliency |d logit_c / dx| summed over channels, c the predicted class, of the evaluated model itself (or of
another registered model passed as `saliency_model`). The paper used DINO ViT-S/16's last-layer CLS attention
(head 1); `attention` is the hook for it: a model that exposes `attention(variables, x) -> [B, heads, N]`
(CLS-to-patch weights of its last layer) gets it registered once a ViT provides that method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from repjax import data
from repjax.evals import EVALUATORS
from repjax.projects.lkrobust import inputs
from repjax.projects.lkrobust.attacks import plot_curves

MODES = ("random", "salient", "non_salient")
RANDOM_LEVELS = tuple(i / 10 for i in range(10))
SALIENT_LEVELS = tuple(i / 10 for i in range(1, 11))

SaliencyFn = Callable[[inputs.Evaluated, np.ndarray, dict[str, Any]], np.ndarray]
SALIENCY: dict[str, SaliencyFn] = {}


def register_saliency(name: str) -> Callable[[SaliencyFn], SaliencyFn]:
    """Registers `fn(ev, x01 [B,H,W,C], options) -> saliency [B,H,W]` (pixel map) or [B,gh,gw] (patch map)."""
    def wrap(fn: SaliencyFn) -> SaliencyFn:
        SALIENCY[name] = fn
        return fn
    return wrap


@register_saliency("gradient")
def gradient_saliency(ev: inputs.Evaluated, x01: np.ndarray, options: dict[str, Any]) -> np.ndarray:
    """|d logit_c / dx| summed over channels, c = the predicted class."""
    def sal(x):
        def top(z):
            logits = ev.fn(z)
            return jnp.sum(jnp.take_along_axis(logits, jnp.argmax(logits, -1)[:, None], 1))
        return jnp.sum(jnp.abs(jax.grad(top)(x)), -1)

    return inputs.run_batched(jax.jit(sal), [x01], ev.batch_size, ev.mesh)


@register_saliency("attention")
def attention_saliency(ev: inputs.Evaluated, x01: np.ndarray, options: dict[str, Any]) -> np.ndarray:
    """CLS-to-patch attention of the last layer (`head`, default 1 as the study) of `options['model']`,
    which must expose `attention(variables, x) -> [B, heads, N]` (a ViT); returns the [B, gh, gw] map."""
    model, variables = options.get("model"), options.get("variables")
    if model is None or not hasattr(model, "attention"):
        raise NotImplementedError("attention saliency needs a model with an `attention(variables, x)` method "
                                  "(a ViT); pass saliency_model=... or use saliency='gradient'")
    head = int(options.get("head", 1))
    x = x01 * ev.scale + ev.shift
    att = np.asarray(model.attention(variables, jnp.asarray(x)))[:, head]
    g = round(float(np.sqrt(att.shape[-1])))
    return att.reshape(len(x), g, g)


def grid(h: int, w: int, patch: int) -> tuple[int, int]:
    gh, gw = h // patch, w // patch
    if gh == 0 or gw == 0:
        raise ValueError(f"patch_size {patch} larger than the {h}x{w} image")
    return gh, gw


def patch_mask(keep: np.ndarray, h: int, w: int, patch: int) -> np.ndarray:
    """Pixel mask [B,H,W] (1 keep, 0 drop) of patch-level `keep` [B,gh,gw]; pixels beyond the grid are kept."""
    b, gh, gw = keep.shape
    m = np.ones((b, h, w), np.float32)
    m[:, :gh * patch, :gw * patch] = np.repeat(np.repeat(keep.astype(np.float32), patch, 1), patch, 2)
    return m


def random_keep(gh: int, gw: int, level: float, rng: np.random.Generator) -> np.ndarray:
    """[gh,gw] keep mask with round-down(level * P) random patches dropped (P = gh gw; level = i/10 gives the
    study's i * P // 10)."""
    p = gh * gw
    n = int(np.floor(level * p + 1e-9))
    keep = np.ones(p, bool)
    keep[rng.permutation(p)[:n]] = False
    return keep.reshape(gh, gw)


def patch_saliency(sal: np.ndarray, gh: int, gw: int, patch: int) -> np.ndarray:
    """Patch-level saliency [B,gh,gw] from a pixel map [B,H,W] (sum per patch) or a patch map."""
    if sal.shape[1:] == (gh, gw):
        return sal
    s = sal[:, :gh * patch, :gw * patch]
    return s.reshape(len(s), gh, patch, gw, patch).sum((2, 4))


def foreground(sal: np.ndarray, level: float) -> np.ndarray:
    """[B,gh,gw] bool: patches holding the top-`level` saliency mass (ascending cumulative mass > 1 - level);
    every patch for level >= 1."""
    b = len(sal)
    flat = np.maximum(sal.reshape(b, -1).astype(np.float64), 0)
    if level >= 1:
        return np.ones(sal.shape, bool)
    order = np.argsort(flat, 1, kind="stable")
    vals = np.take_along_axis(flat, order, 1)
    cum = np.cumsum(vals, 1) / np.maximum(vals.sum(1, keepdims=True), 1e-30)
    fg = np.zeros_like(flat, bool)
    np.put_along_axis(fg, order, cum > 1 - level, 1)
    return fg.reshape(sal.shape)


@EVALUATORS.register("occlusion")
def occlusion(model, variables, config, mesh, *, modes: Sequence[str] = MODES, patch_size: int | None = None,
              repeats: int = 1, saliency: str = "gradient", saliency_model: Any = None,
              saliency_variables: Any = None, head: int = 1, num_images: int | None = 1000, seed: int = 0,
              source: str | None = None, split: str | None = None, batch_size: int | None = None,
              save: str | None = None) -> dict[str, Any]:
    """`top1/random/<i/10>` for i = 0..9 and `top1/{salient,non_salient}/<lambda>` for lambda = 0.1..1;
    `save` writes `<save>.png` (top-1 against the dropped fraction / lambda)."""
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown occlusion modes {bad}; known: {', '.join(MODES)}")
    if saliency not in SALIENCY:
        raise ValueError(f"unknown saliency {saliency!r}; known: {', '.join(SALIENCY)}")
    src = data.get_source(source or config.data.source, split or config.data.eval_split)
    ev = inputs.Evaluated(model, variables, config, mesh, batch_size=batch_size)
    images, labels = inputs.load(src, inputs.subset(len(src), num_images), ev.geometry)
    x01 = inputs.to_unit(images)
    b, h, w = x01.shape[:3]
    patch = patch_size or max(1, h // 14)
    gh, gw = grid(h, w, patch)
    out: dict[str, Any] = {"images": b, "patch_size": patch, "patches": gh * gw}
    curves: dict[str, tuple[list[float], list[float]]] = {}
    if "random" in modes:
        rng = np.random.default_rng(seed)
        for level in RANDOM_LEVELS:
            accs = []
            for _ in range(repeats):
                keep = np.broadcast_to(random_keep(gh, gw, level, rng), (b, gh, gw))
                accs.append(ev.accuracy(x01 * patch_mask(keep, h, w, patch)[..., None], labels))
            out[f"top1/random/{level:g}"] = float(np.mean(accs))
        curves["random"] = (list(RANDOM_LEVELS), [100 * out[f"top1/random/{v:g}"] for v in RANDOM_LEVELS])
    salient_modes = [m for m in modes if m != "random"]
    if salient_modes:
        options = {"model": saliency_model, "variables": saliency_variables, "head": head}
        sal = patch_saliency(np.asarray(SALIENCY[saliency](ev, x01, options)), gh, gw, patch)
        for level in SALIENT_LEVELS:
            fg = foreground(sal, level)
            for m in salient_modes:
                keep = ~fg if m == "salient" else fg
                out[f"top1/{m}/{level:g}"] = ev.accuracy(x01 * patch_mask(keep, h, w, patch)[..., None], labels)
        for m in salient_modes:
            curves[m] = (list(SALIENT_LEVELS), [100 * out[f"top1/{m}/{v:g}"] for v in SALIENT_LEVELS])
    if save:
        plot_curves(curves, f"{save}.png", xlabel="dropped fraction (random) / lambda (salient)",
                    title=f"{config.model.name}: occlusion ({saliency} saliency)")
    return out
