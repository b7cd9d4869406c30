"""Peripheral convolution (PeLK, Chen et al., CVPR 2024): sharing grids, kernel-wise PE, partial channels.

A peripheral kernel is a dense k x k depthwise kernel w = expand(theta, S) (Eq. 1) built from a small
theta [k', k'] by a separable *sharing grid* S (k' cell sizes summing to k, mirror-symmetric): cell (a, b)
of the grid takes the value theta[a, b]. Eq. 2 makes the 2 r_c + 1 central cells 1 wide (the fine "focus"
region) and the peripheral cells m, m^2, m^3, ... wide moving outward; the outermost cell takes what is
left of the half-width (so it may be narrower than m^j). This clipping rule is inferred: it reproduces
every grid printed in the paper (Fig. 1b, Tab. 5, Tab. 6). When the remainder is a single pixel (k=69,
r_c=3) the paper is silent: by default the 1-wide cell is kept; `merge_degenerate=True` merges it into its
neighbour.

Kernel-wise positional embedding (Eq. 3): Y(x) = sum_t w(t) (X(x+t) + h(t)), h [k, k, g] shared by all
blocks of a stage. Two border semantics (the paper does not say which), see `pe_term`.

Partial peripheral conv (Sec. 3.4): the first g = f(3/8 C) channels are convolved, the rest pass unchanged;
output = concat([conv part, identity part]). f is the rounding rule (`partial_channels`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from repjax.nn import dwconv

PE_MODES = ("all_taps", "valid_taps")
ROUNDINGS = ("floor", "round", "ceil", "mult8")


def half_grid(k: int, r_c: int = 2, m: int = 2, merge_degenerate: bool = False) -> tuple[int, ...]:
    """Cell sizes of one half of the sharing grid, outermost cell first, ending with the centre cell (Eq. 2).

    E.g. k=31, r_c=2 -> (7, 4, 2, 1, 1, 1). `merge_degenerate` merges an outermost clipped cell narrower
    than m (a 1-wide cell for m=2) into its peripheral neighbour; the default keeps it.
    """
    if k < 1 or k % 2 == 0:
        raise ValueError(f"kernel size must be odd and positive, got {k}")
    if m < 2:
        raise ValueError(f"growth factor m must be >= 2, got {m}")
    r = (k - 1) // 2
    r_c = min(r_c, r)
    rest, cells, size = r - r_c, [], m
    while rest > 0:
        cells.append(min(size, rest))
        rest -= cells[-1]
        size *= m
    if merge_degenerate and len(cells) >= 2 and cells[-1] < m:
        last = cells.pop()
        cells[-1] += last
    return (*reversed(cells), *([1] * r_c), 1)


def symmetric_grid(half: Sequence[int]) -> tuple[int, ...]:
    """Full grid from a half grid written outer -> centre (last entry = the centre cell)."""
    half = tuple(int(s) for s in half)
    return half + half[-2::-1]


def sharing_grid(k: int, r_c: int = 2, m: int = 2, merge_degenerate: bool = False) -> tuple[int, ...]:
    """The full symmetric sharing grid S of a k x k peripheral kernel (k' cells, sum k)."""
    return symmetric_grid(half_grid(k, r_c, m, merge_degenerate))


def reduced_size(k: int, r_c: int = 2, m: int = 2) -> int:
    """Closed form of k' for the default grid (degenerate cell kept): k' = 2 (r_c + n_p) + 1 with
    n_p = ceil(log_m((r - r_c)(m - 1)/m + 1)), r = (k - 1)/2 (for m=2: ceil(log2((r - r_c)/2 + 1)))."""
    r = (k - 1) // 2
    r_c = min(r_c, r)
    x = (r - r_c) * (m - 1) / m + 1
    n_p = math.ceil(math.log(x, m) - 1e-12) if r > r_c else 0
    return 2 * (r_c + n_p) + 1


def param_ratio(grid: Sequence[int]) -> float:
    """Parameters of the shared kernel relative to the dense one: (k'/k)^2."""
    return (len(grid) / sum(grid)) ** 2


def central_ratio(k: int, r_c: int) -> float:
    """Area fraction of the fine central region: (2 r_c + 1)^2 / k^2 (Tab. 6: 0.04%..1.88% for k=51)."""
    return (2 * r_c + 1) ** 2 / k**2


def partial_channels(c: int, ratio: float = 3 / 8, rounding: str = "floor") -> int:
    """Channels g convolved by the partial peripheral conv (paper: 3/8 C; rounding unstated).

    'floor' = int(ratio C) (default, the usual Python idiom), 'round' = half-up, 'ceil', 'mult8' = nearest
    multiple of 8 (at least 8). Result clipped to [1, c].
    """
    x = ratio * c
    if rounding == "floor":
        g = math.floor(x + 1e-9)
    elif rounding == "round":
        g = math.floor(x + 0.5)
    elif rounding == "ceil":
        g = math.ceil(x - 1e-9)
    elif rounding == "mult8":
        g = max(8, 8 * math.floor(x / 8 + 0.5))
    else:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return max(1, min(c, g))


def split_partial(x: jax.Array, g: int) -> tuple[jax.Array, jax.Array]:
    """(first g channels, the rest) of an NHWC map."""
    return x[..., :g], x[..., g:]


def pe_term(kernel: jax.Array, pe: jax.Array, shape: tuple[int, int], mode: str = "valid_taps",
            method: str = "auto") -> jax.Array:
    """What Eq. 3's positional embedding adds to conv(X, w), broadcastable to [N, H, W, C].

    kernel: dense depthwise kernel w [k, k, 1, C]; pe: h [k, k, C]; shape: (H, W) of the map.
      'all_taps':   h is added at every tap, zero-padded border taps included -> a per-channel constant
                    sum_t w(t) h(t), shape [C] (exactly removed by a following train-mode BatchNorm).
      'valid_taps': h is added only at taps inside the map -> corr(1_valid, w * h), shape [1, H, W, C]
                    (position dependent near the borders; with k ~ H that is nearly every position).
    """
    if pe.shape != kernel.shape[:2] + kernel.shape[3:]:
        raise ValueError(f"pe {pe.shape} does not match kernel {kernel.shape}")
    wh = kernel * pe[:, :, None, :].astype(kernel.dtype)
    if mode == "all_taps":
        return jnp.sum(wh, axis=(0, 1, 2))
    if mode == "valid_taps":
        ones = jnp.ones((1, *shape, kernel.shape[-1]), kernel.dtype)
        return dwconv.depthwise_conv(ones, wh, method)
    raise ValueError(f"pe_mode must be one of {PE_MODES}, got {mode!r}")


def add_to_centre(theta: jax.Array, small: jax.Array, sizes: Sequence[int] | None = None) -> jax.Array:
    """theta' with expand(theta', S) == expand(theta, S) + pad(small): a centred s x s kernel [s, s, ...]
    added into the 1-wide central cells. Exact only if s <= 2 r_c + 1; with `sizes` given this is checked
    (raises otherwise), so a merged re-param branch keeps the peripheral (theta) form."""
    s, kp = small.shape[0], theta.shape[0]
    sizes = (1,) * kp if sizes is None else tuple(sizes)
    lo = kp // 2 - s // 2
    if small.shape[1] != s or s % 2 == 0 or lo < 0 or any(sizes[i] != 1 for i in range(lo, lo + s)):
        raise ValueError(f"a {small.shape[:2]} kernel does not fit the fine centre of grid {tuple(sizes)}")
    return theta.at[lo:lo + s, lo:lo + s].add(small.astype(theta.dtype))
