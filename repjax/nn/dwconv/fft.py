"""'fft': depthwise convolution through real 2-D FFTs, with a hand-written VJP that reuses the forward spectra.

With p = k//2 and the input placed at offset p inside a zero buffer of size P >= H + p, the circular
cross-correlation with the kernel (placed at 0..k-1) equals the linear 'same' one on the first H rows: no wrapped
term ever reads a non-zero value. The same P serves the two backward products:
    dx = irfft(DY * K)[p:p+H]      (convolution with the kernel = correlation with the flipped kernel)
    dk = irfft(sum_n conj(DY_n) * X_n)[:k]   (summed over the batch in the frequency domain: one inverse FFT)
Spectra are complex64 for float32 inputs; channels are moved next to the batch so each FFT is over contiguous rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from repjax.nn.dwconv._common import compute_dtype, crop_kernel


def fast_size(n: int) -> int:
    """Smallest m >= n whose prime factors are all in {2, 3, 5, 7} (cheap sizes for pocketfft/ducc and cuFFT)."""
    m = max(int(n), 1)
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def _spectrum(a: jax.Array, size: tuple[int, int], offset: tuple[int, int]) -> jax.Array:
    """rfft2 over the last two axes of a [..., h, w] array placed at `offset` in a zero buffer of `size`."""
    h, w = a.shape[-2:]
    pad = [(0, 0)] * (a.ndim - 2) + [(offset[0], size[0] - h - offset[0]), (offset[1], size[1] - w - offset[1])]
    return jnp.fft.rfft2(jnp.pad(a, pad), axes=(-2, -1))


def _real(spec: jax.Array, size: tuple[int, int]) -> jax.Array:
    return jnp.fft.irfft2(spec, s=size, axes=(-2, -1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fft_nchw(x: jax.Array, k: jax.Array, size: tuple[int, int]) -> jax.Array:
    return _fwd(x, k, size)[0]


def _fwd(x: jax.Array, k: jax.Array, size: tuple[int, int]):
    (h, w), (kh, kw) = x.shape[-2:], k.shape[-2:]
    xf = _spectrum(x, size, (kh // 2, kw // 2))
    kf = _spectrum(k, size, (0, 0))
    y = _real(xf * jnp.conj(kf), size)[..., :h, :w]
    return y, (xf, kf)


def _fft_fwd(x, k, size):
    y, (xf, kf) = _fwd(x, k, size)
    return y, (xf, kf, k.shape[-2:], x.shape[-2:])


def _fft_bwd(size, res, dy):
    xf, kf, (kh, kw), (h, w) = res
    dyf = _spectrum(dy, size, (0, 0))
    dx = _real(dyf * kf, size)[..., kh // 2:kh // 2 + h, kw // 2:kw // 2 + w]
    dk = _real(jnp.sum(jnp.conj(dyf) * xf, axis=0), size)[..., :kh, :kw]
    return dx, dk


_fft_nchw.defvjp(_fft_fwd, _fft_bwd)


def fft(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """FFT depthwise convolution of x [N,H,W,C] with kernel [kh,kw,1,C]; computes in float32 (complex64)."""
    _, h, w, _ = x.shape
    kernel = crop_kernel(kernel, h, w)
    kh, kw = kernel.shape[:2]
    size = (fast_size(h + kh // 2), fast_size(w + kw // 2))
    dt = compute_dtype(x)
    xt = jnp.transpose(x.astype(dt), (0, 3, 1, 2))
    kt = jnp.transpose(kernel[:, :, 0, :].astype(dt), (2, 0, 1))
    return jnp.transpose(_fft_nchw(xt, kt, size), (0, 2, 3, 1)).astype(x.dtype)
