"""Frequency analyses: band-limited noise (Park & Kim 2022's FreqAttack protocol, spec §3.4), low-/high-pass
accuracy, and the Fourier heat map of the error (Yin et al. 2019).

Frequencies. For an H x W image the centred DFT index k_y in [-H/2, H/2) has angular frequency
w_y = 2 pi |k_y| / H in [0, pi] (pi = Nyquist), likewise w_x; a component's frequency is the Chebyshev norm
w = max(w_y, w_x), so equal-frequency sets are square rings of the shifted spectrum (Park & Kim's square masks).

Band-limited noise at centre frequency f with `window` W (full width; Park & Kim's half-width s is W / 2; the
study states a 0.1 pi window, default here):
  1. delta = eps sign(N(0, 1)) per pixel and channel (eps = `amplitude`, [0, 1] pixel units);
  2. its 2-D DFT per channel is multiplied by the band mask 1[f - W/2 <= w < f + W/2] (amplitudes outside
     zeroed, phases of the kept components unchanged); the mask is symmetric under k -> -k, so the inverse
     DFT is real;
  3. the filtered noise is added to the image in [0, 1] space and clipped to [0, 1], then normalised.
  `scale="pre_filter"` (default, as FreqAttack) keeps eps as the amplitude before filtering, so narrow bands
  carry less energy; `scale="rms"` rescales the filtered noise to RMS eps in every band.
Low-pass (high-pass) images keep the components with w <= c (w >= c); high-pass keeps the mean (DC) too, so
images stay near their range (`keep_dc=False` drops it); both are clipped to [0, 1].
Fourier heat map: for each frequency (k_y, k_x) of a subsampled half-plane, images are perturbed by
x + eps_l2 r U_k (U_k the real Fourier basis image of unit L2 norm, the same on every channel, r = +-1 per
image) and the error rate is recorded on the (k_y, k_x) grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from repjax import data
from repjax.evals import EVALUATORS
from repjax.plot import new_figure, save_figure
from repjax.projects.lkrobust import inputs
from repjax.projects.lkrobust.attacks import plot_curves


def frequencies(h: int, w: int) -> np.ndarray:
    """[H,W] Chebyshev angular frequency of each (un-shifted) DFT index, in [0, pi]."""
    wy = 2 * np.pi * np.abs(np.fft.fftfreq(h) * h) / h
    wx = 2 * np.pi * np.abs(np.fft.fftfreq(w) * w) / w
    return np.maximum(wy[:, None], wx[None, :])


def band_mask(h: int, w: int, f: float, window: float) -> np.ndarray:
    """[H,W] bool (un-shifted DFT layout): f - window/2 <= frequency < f + window/2 (<= at pi)."""
    om = frequencies(h, w)
    lo, hi = f - window / 2, f + window / 2
    return (om >= lo - 1e-12) & ((om < hi - 1e-12) | ((hi >= np.pi) & (om <= np.pi + 1e-12)))


def filtered(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Real inverse DFT of DFT(x) * mask over the spatial axes of [B,H,W,C]."""
    spec = np.fft.fft2(x, axes=(1, 2)) * mask[None, :, :, None]
    return np.real(np.fft.ifft2(spec, axes=(1, 2)))


def band_noise(shape: tuple[int, ...], f: float, window: float, amplitude: float, rng: np.random.Generator,
               scale: str = "pre_filter") -> np.ndarray:
    """Band-limited sign noise [B,H,W,C] (see the module docstring)."""
    if scale not in ("pre_filter", "rms"):
        raise ValueError(f"scale must be 'pre_filter' or 'rms', got {scale!r}")
    delta = amplitude * np.sign(rng.standard_normal(shape))
    noise = filtered(delta, band_mask(shape[1], shape[2], f, window))
    if scale == "rms":
        rms = np.sqrt(np.mean(noise**2, axis=(1, 2, 3), keepdims=True))
        noise = noise * amplitude / np.maximum(rms, 1e-12)
    return noise.astype(np.float32)


def pass_filter(x01: np.ndarray, cutoff: float, kind: str, keep_dc: bool = True) -> np.ndarray:
    """Low-pass (w <= cutoff) or high-pass (w >= cutoff, plus DC when keep_dc) images, clipped to [0, 1]."""
    om = frequencies(*x01.shape[1:3])
    if kind == "low":
        mask = om <= cutoff + 1e-12
    elif kind == "high":
        mask = om >= cutoff - 1e-12
        if keep_dc:
            mask[0, 0] = True
    else:
        raise ValueError(f"kind must be 'low' or 'high', got {kind!r}")
    return np.clip(filtered(x01, mask), 0, 1).astype(np.float32)


def fourier_basis(h: int, w: int, ky: int, kx: int) -> np.ndarray:
    """Real unit-L2 image [H,W] of frequency (ky, kx): the inverse DFT of a delta there and at its mirror."""
    spec = np.zeros((h, w), np.complex128)
    spec[ky % h, kx % w] = 1
    spec[-ky % h, -kx % w] = 1
    u = np.real(np.fft.ifft2(spec))
    return (u / np.linalg.norm(u)).astype(np.float32)


def plot_heatmap(err: np.ndarray, ky: np.ndarray, kx: np.ndarray, path: str | Path, title: str) -> Path:
    fig = new_figure(5, 4.4)
    ax = fig.add_subplot()
    image = ax.imshow(100 * err, cmap="jet", vmin=0, vmax=100, origin="lower", interpolation="nearest",
                      extent=(kx[0] - 0.5, kx[-1] + 0.5, ky[0] - 0.5, ky[-1] + 0.5), aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="error (%)")
    ax.set_xlabel("k_x")
    ax.set_ylabel("k_y")
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def _data(model, variables, config, mesh, source, split, num_images, batch_size):
    src = data.get_source(source or config.data.source, split or config.data.eval_split)
    ev = inputs.Evaluated(model, variables, config, mesh, batch_size=batch_size)
    images, labels = inputs.load(src, inputs.subset(len(src), num_images), ev.geometry)
    return ev, inputs.to_unit(images), labels


@EVALUATORS.register("frequency_noise")
def frequency_noise(model, variables, config, mesh, *, centres: Sequence[float] | None = None,
                    window: float = 0.1 * np.pi, amplitude: float = 0.1, scale: str = "pre_filter",
                    num_images: int | None = 1000, seed: int = 0, source: str | None = None,
                    split: str | None = None, batch_size: int | None = None, save: str | None = None
                    ) -> dict[str, Any]:
    """`top1/<f/pi>` and `drop/<f/pi>` (clean minus noisy top-1) for centre frequencies f (default 0, 0.1 pi,
    ..., pi), clean top-1; `save` writes `<save>.png` (top-1 drop against f)."""
    ev, x01, labels = _data(model, variables, config, mesh, source, split, num_images, batch_size)
    centres = [i * np.pi / 10 for i in range(11)] if centres is None else list(centres)
    out: dict[str, Any] = {"clean_top1": ev.accuracy(x01, labels), "images": len(labels)}
    for f in centres:
        rng = np.random.default_rng([seed, round(1000 * f)])
        noisy = np.clip(x01 + band_noise(x01.shape, f, window, amplitude, rng, scale), 0, 1)
        key = f"{f / np.pi:.2f}"
        out[f"top1/{key}"] = ev.accuracy(noisy, labels)
        out[f"drop/{key}"] = out["clean_top1"] - out[f"top1/{key}"]
    if save:
        plot_curves({"drop": ([f / np.pi for f in centres], [100 * out[f"drop/{f / np.pi:.2f}"] for f in centres])},
                    f"{save}.png", xlabel="noise frequency (x pi)", ylabel="top-1 drop (points)",
                    title=f"{config.model.name}: band noise (window {window / np.pi:.2f} pi, eps {amplitude})")
    return out


@EVALUATORS.register("frequency_filter")
def frequency_filter(model, variables, config, mesh, *, cutoffs: Sequence[float] | None = None,
                     keep_dc: bool = True, num_images: int | None = 1000, source: str | None = None,
                     split: str | None = None, batch_size: int | None = None, save: str | None = None
                     ) -> dict[str, Any]:
    """`lowpass/<c/pi>` and `highpass/<c/pi>` top-1 for cutoffs c (default 0.1 pi .. pi)."""
    ev, x01, labels = _data(model, variables, config, mesh, source, split, num_images, batch_size)
    cutoffs = [i * np.pi / 10 for i in range(1, 11)] if cutoffs is None else list(cutoffs)
    out: dict[str, Any] = {"clean_top1": ev.accuracy(x01, labels)}
    for c in cutoffs:
        key = f"{c / np.pi:.2f}"
        out[f"lowpass/{key}"] = ev.accuracy(pass_filter(x01, c, "low"), labels)
        out[f"highpass/{key}"] = ev.accuracy(pass_filter(x01, c, "high", keep_dc), labels)
    if save:
        xs = [c / np.pi for c in cutoffs]
        plot_curves({k: (xs, [100 * out[f"{k}/{x:.2f}"] for x in xs]) for k in ("lowpass", "highpass")},
                    f"{save}.png", xlabel="cutoff (x pi)", title=f"{config.model.name}: filtered images")
    return out


@EVALUATORS.register("fourier_heatmap")
def fourier_heatmap(model, variables, config, mesh, *, eps_l2: float = 4.0, points: int = 9,
                    num_images: int | None = 200, seed: int = 0, source: str | None = None,
                    split: str | None = None, batch_size: int | None = None, save: str | None = None
                    ) -> dict[str, Any]:
    """Error under Fourier-basis noise of L2 norm `eps_l2` on a `points` x `points` grid of (k_y >= 0, k_x)
    frequencies; metrics `mean_error`, `low_error` / `high_error` (w below / above pi/2); `save` writes
    `<save>.npy` (grid) and `<save>.png` (heat map)."""
    ev, x01, labels = _data(model, variables, config, mesh, source, split, num_images, batch_size)
    h, w = x01.shape[1:3]
    ky = np.unique(np.linspace(0, h // 2, points).round().astype(int))
    kx = np.unique(np.linspace(-(w // 2), w // 2, 2 * points - 1).round().astype(int))
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], len(x01)).astype(np.float32)
    err = np.zeros((len(ky), len(kx)))
    for i, a in enumerate(ky):
        for j, b in enumerate(kx):
            u = fourier_basis(h, w, int(a), int(b))
            noisy = np.clip(x01 + eps_l2 * signs[:, None, None, None] * u[None, :, :, None], 0, 1)
            err[i, j] = 1.0 - ev.accuracy(noisy, labels)
    om = np.maximum(2 * np.pi * ky[:, None] / h, 2 * np.pi * np.abs(kx)[None, :] / w)
    out = {"mean_error": float(err.mean()), "low_error": float(err[om <= np.pi / 2].mean()),
           "high_error": float(err[om > np.pi / 2].mean()) if np.any(om > np.pi / 2) else float("nan")}
    if save:
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        np.save(f"{save}.npy", err)
        plot_heatmap(err, ky, kx, f"{save}.png", f"{config.model.name}: Fourier heat map (eps {eps_l2})")
    return out
