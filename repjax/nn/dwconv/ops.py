"""Public depthwise-convolution entry points, the algorithm registry and the automatic choice.

Each algorithm is `fn(x [N,H,W,C], kernel [kh,kw,1,C]) -> y [N,H,W,C]`; see native.py, shift.py, fft.py, matmul.py,
boxsum.py. Dtypes: 'native' computes in x.dtype; the others accumulate in float32 and return x.dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp

from repjax.nn.dwconv._common import check, cropped_size
from repjax.nn.dwconv.boxsum import boxsum
from repjax.nn.dwconv.fft import fft
from repjax.nn.dwconv.matmul import matmul, piecewise_matmul
from repjax.nn.dwconv.native import native
from repjax.nn.dwconv.shift import shift
from repjax.registry import Registry

METHODS: Registry = Registry("depthwise conv method")
METHODS.register("native", native)
METHODS.register("shift", shift)
METHODS.register("fft", fft)
METHODS.register("matmul", matmul)


@METHODS.register("boxsum")
def boxsum_dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A dense kernel is the piecewise kernel on the all-ones grid (correct, but only fast for coarse grids)."""
    if kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"boxsum needs a square kernel, got {kernel.shape}")
    return boxsum(x, kernel, (1,) * kernel.shape[0])


# CPU thresholds, from experiments/bench_dwconv.py (results in experiments/results/bench_dwconv/results.json):
# on 2 cores, fwd+bwd, 'shift' (kernel gradient in cache-sized batch chunks) beat 'fft' at K=3 on every map from
# 2x2 to 56x56, and 'fft' beat it from K=5 (its k^2 tap reductions grow faster than FFT's fixed cost) and XLA's
# grouped conv by >10x from K=7; 'fft' also beat 'boxsum' at every PeLK grid (boxsum's per-cell theta-gradient
# reductions dominate). 1x1 kernels are a plain multiply ('shift').
CPU_SHIFT_MAX_K = 3
# Maps of at most this many pixels use 'matmul' (one hw x hw matrix per channel) for K > 1: on PeLK-T's last stage
# (7x7 maps, K=13) it beat fft; at 14x14 (196 px) fft was faster again. At K=3 on such maps 'shift' wins only with
# enough channels to fill its vectors (SLaK's 2x2x499), not on RepMLPNet's 8x8x4 local branches.
CPU_MATMUL_MAX_PIXELS = 64
CPU_SHIFT_MIN_CHANNELS_SMALL_MAP = 64
# GPU/TPU: NOT measured here (no accelerator available). Assumed: the vendor grouped conv is good for small
# kernels and FFT wins for large ones; re-measure with the benchmark and adjust.
ACCEL_NATIVE_MAX_K = 13


_FORCED: list[str] = []  # innermost `forced_method` last


@contextlib.contextmanager
def forced_method(name: str) -> Iterator[None]:
    """Within the block, every `depthwise_conv` / `piecewise_conv` traced uses algorithm `name`, whatever method
    its caller asked for (the choice is made while tracing, so wrap the tracing: `jit(...).lower(...)`).

    Cost analysis uses it with 'native': XLA then counts the convolution itself (2 * k_h * k_w FLOPs per output),
    not the FFT, matmul or shift arithmetic an automatic choice would run."""
    METHODS.get(name)  # unknown names raise here, with the known ones
    _FORCED.append(name)
    try:
        yield
    finally:
        _FORCED.pop()


def choose(x_shape: Sequence[int], kernel_shape: Sequence[int], backend: str | None = None) -> str:
    """The algorithm 'auto' uses for a depthwise conv of these shapes on `backend` (default: jax's)."""
    backend = backend or jax.default_backend()
    k = max(cropped_size(kernel_shape[0], x_shape[1]), cropped_size(kernel_shape[1], x_shape[2]))
    if backend == "cpu":
        small_map = x_shape[1] * x_shape[2] <= CPU_MATMUL_MAX_PIXELS
        if k == 1 or (k <= CPU_SHIFT_MAX_K and not (small_map and x_shape[3] < CPU_SHIFT_MIN_CHANNELS_SMALL_MAP)):
            return "shift"
        return "matmul" if small_map else "fft"
    return "native" if k <= ACCEL_NATIVE_MAX_K else "fft"


def choose_piecewise(x_shape: Sequence[int], sizes: Sequence[int], backend: str | None = None) -> str:
    """The algorithm 'auto' uses in piecewise_conv. 'boxsum' costs O(k'^2 HW) multiply-adds against FFT's
    O(HW log HW) per transform, but with autodiff its theta gradient is k'^2 reductions, which measured slower
    than 'fft' on CPU at every PeLK grid; on accelerators it is unmeasured, so the dense choice is kept."""
    k = sum(sizes)
    return choose(x_shape, (k, k, 1, x_shape[-1]), backend)


def depthwise_conv(x: jax.Array, kernel: jax.Array, method: str = "auto") -> jax.Array:
    """Depthwise 'same' convolution (cross-correlation, like lax.conv) of x [N, H, W, C] with kernel [kh, kw, 1, C]."""
    check(x, kernel)
    name = _FORCED[-1] if _FORCED else choose(x.shape, kernel.shape) if method == "auto" else method
    fn: Callable = METHODS.get(name)
    return fn(x, kernel)


def expand_piecewise(theta: jax.Array, sizes: Sequence[int]) -> jax.Array:
    """Dense kernel [k, k, ...] from shared parameters theta [k', k', ...]: cell (a, b) of the separable grid
    `sizes` (k' cell sizes summing to k, the same on both axes) takes the value theta[a, b] (PeLK Eq. 1)."""
    sizes = tuple(int(s) for s in sizes)
    if theta.shape[0] != len(sizes) or theta.shape[1] != len(sizes):
        raise ValueError(f"theta {theta.shape} does not match a grid of {len(sizes)} cells")
    k = sum(sizes)
    reps = jnp.asarray(sizes)
    return jnp.repeat(jnp.repeat(theta, reps, axis=0, total_repeat_length=k), reps, axis=1, total_repeat_length=k)


def piecewise_conv(x: jax.Array, theta: jax.Array, sizes: Sequence[int], method: str = "auto") -> jax.Array:
    """`depthwise_conv(x, expand_piecewise(theta, sizes))`; 'boxsum' and 'matmul' never materialise the dense
    kernel."""
    name = _FORCED[-1] if _FORCED else choose_piecewise(x.shape, sizes) if method == "auto" else method
    if name == "boxsum":
        check(x, jax.ShapeDtypeStruct((sum(sizes), sum(sizes), 1, theta.shape[-1]), theta.dtype))
        return boxsum(x, theta, sizes)
    if name == "matmul":
        check(x, jax.ShapeDtypeStruct((sum(sizes), sum(sizes), 1, theta.shape[-1]), theta.dtype))
        return piecewise_matmul(x, theta, tuple(int(s) for s in sizes))
    return depthwise_conv(x, expand_piecewise(theta, sizes), name)
