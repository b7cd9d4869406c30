"""'boxsum': exact convolution with a piecewise-constant (PeLK peripheral) kernel without expanding it.

With cells I_a (offsets [o_a, o_a + s_a) of the separable grid, PeLK Eq. 1),
    conv(X, expand(theta))[i, j] = sum_{a,b} theta_ab * sum_{d in I_a, e in I_b} X[i+d, j+e]
                                 = sum_b BoxW_b( sum_a theta_ab * BoxH_a(X) )[i, j].
Box sums come from a doubling pyramid (L_1 = X, L_2m[t] = L_m[t] + L_m[t+m]) rather than prefix sums, so there is
no cancellation between long cumulative sums: every box is a sum of <= log2(s)+1 exact partial sums.
Cost O(k'^2 HW + k' log(k) HW) instead of O(k^2 HW). Gradients by autodiff (slices, adds, one contraction).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from repjax.nn.dwconv._common import compute_dtype


def cells(sizes: Sequence[int], n: int) -> list[tuple[int, int, int]]:
    """(cell index, first offset, size) of every cell clipped to offsets |d| <= n-1 (the rest reads only padding)."""
    out, start = [], -(sum(sizes) // 2)
    for a, s in enumerate(sizes):
        lo, hi = max(start, 1 - n), min(start + s, n)
        if hi > lo:
            out.append((a, lo, hi - lo))
        start += s
    return out


def _box(a: jax.Array, axis: int, pad: int, spans: Sequence[tuple[int, int]], n: int) -> list[jax.Array]:
    """For each (first offset, size) in spans, the box sum over those offsets along `axis` (zero outside)."""
    widths = [(0, 0)] * a.ndim
    widths[axis] = (pad, pad)
    levels = {1: jnp.pad(a, widths)}

    def level(m: int) -> jax.Array:
        if m not in levels:
            half = level(m // 2)
            length = half.shape[axis] - m // 2
            levels[m] = (jax.lax.slice_in_dim(half, 0, length, axis=axis)
                         + jax.lax.slice_in_dim(half, m // 2, m // 2 + length, axis=axis))
        return levels[m]

    out = []
    for lo, s in spans:
        total, pos, m = None, lo + pad, 1 << (s.bit_length() - 1)
        while s:
            if s >= m:
                part = jax.lax.slice_in_dim(level(m), pos, pos + n, axis=axis)
                total = part if total is None else total + part
                pos, s = pos + m, s - m
            m //= 2
        out.append(total)
    return out


def boxsum(x: jax.Array, theta: jax.Array, sizes: Sequence[int]) -> jax.Array:
    """piecewise conv of x [N,H,W,C] with theta [k',k',1,C] on the cell grid `sizes`; accumulates in float32."""
    sizes = tuple(int(s) for s in sizes)
    _, h, w, _ = x.shape
    dt = compute_dtype(x)
    xs, th = x.astype(dt), theta[:, :, 0, :].astype(dt)
    rows, cols = cells(sizes, h), cells(sizes, w)
    ph = max(max(-lo, lo + s - 1) for _, lo, s in rows)
    pw = max(max(-lo, lo + s - 1) for _, lo, s in cols)
    r = _box(xs, 1, ph, [(lo, s) for _, lo, s in rows], h)
    y = None
    for b, lo, s in cols:
        z = sum(th[a, b] * ra for (a, _, _), ra in zip(rows, r))
        part = _box(z, 2, pw, [(lo, s)], w)[0]
        y = part if y is None else y + part
    return y.astype(x.dtype)
