"""'shift': shift-and-add depthwise convolution for small kernels, y = sum_{u,v} k[u,v] * x shifted by (u-p, v-q).

Cost k^2 * N*H*W*C multiply-adds in one fused elementwise loop (no im2col buffer). Hand-written VJP:
    dx = the same op on dy with the flipped kernel,
    dk[u,v] = sum_{n,i,j} x_pad[n, i+u, j+v] * dy[n, i, j]     (one reduction per tap).
The k^2 tap reductions each read x and dy once, so on large maps the kernel gradient is memory-bound: it is
accumulated over chunks of images small enough (KGRAD_CHUNK_BYTES) that a chunk stays in cache across the taps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from repjax.nn.dwconv._common import compute_dtype, crop_kernel

UNROLL_TAPS = 81  # above this many taps, loop over kernel rows (compile time grows with unrolled taps)
# Bytes of x per kernel-gradient chunk: the per-core L2 (1 MiB) of the CPU measured, where chunks of one image
# (8x56x56x96, 1.15 MiB each) made the K=3 kernel gradient 2.3x faster than one pass over the batch
# (`python experiments/xla_cpu_probes.py`, 'dw_kernel_grad'); batches that fit whole run in one pass.
KGRAD_CHUNK_BYTES = 1 << 20


def _over_rows(fn, kh: int, kw: int):
    """[fn(u) for u in range(kh)] stacked: unrolled for small kernels, lax.map over rows otherwise."""
    if kh * kw <= UNROLL_TAPS:
        return jnp.stack([fn(u) for u in range(kh)])
    return jax.lax.map(fn, jnp.arange(kh))


def _taps(x: jax.Array, k: jax.Array) -> jax.Array:
    """Correlation of x [N,H,W,C] with k [kh,kw,C] over a zero border of kh//2, kw//2."""
    kh, kw, _ = k.shape
    _, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))

    def row(u, acc):
        xr = jax.lax.dynamic_slice_in_dim(xp, u, h, axis=1)
        for v in range(kw):
            acc = acc + xr[:, :, v:v + w, :] * k[u, v]
        return acc

    zero = jnp.zeros_like(x)
    if kh * kw <= UNROLL_TAPS:
        acc = zero
        for u in range(kh):
            acc = row(u, acc)
        return acc
    return jax.lax.fori_loop(0, kh, row, zero)


@jax.custom_vjp
def _shift(x: jax.Array, k: jax.Array) -> jax.Array:
    return _taps(x, k)


def _shift_fwd(x: jax.Array, k: jax.Array):
    return _taps(x, k), (x, k)


def kernel_grad(x: jax.Array, dy: jax.Array, kh: int, kw: int, chunk_bytes: int | None = None) -> jax.Array:
    """dk [kh,kw,C] of the module docstring, summed over batch chunks of at most `chunk_bytes` of x (the largest
    divisor of N that fits, one image when a single image is larger). Default: KGRAD_CHUNK_BYTES on CPU; on other
    backends the whole batch in one pass (a loop of chunks would serialise an accelerator; not measured there)."""
    n, h, w, c = x.shape
    if chunk_bytes is None:
        chunk_bytes = KGRAD_CHUNK_BYTES if jax.default_backend() == "cpu" else x.nbytes
    per_image = h * w * c * x.dtype.itemsize
    chunk = max([d for d in range(1, n + 1) if n % d == 0 and d * per_image <= chunk_bytes] or [1])

    def taps(xc: jax.Array, dc: jax.Array) -> jax.Array:
        xp = jnp.pad(xc, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))

        def row(u):
            xr = jax.lax.dynamic_slice_in_dim(xp, u, h, axis=1)
            return jnp.stack([jnp.sum(xr[:, :, v:v + w, :] * dc, axis=(0, 1, 2)) for v in range(kw)])

        return _over_rows(row, kh, kw)

    if chunk == n:
        return taps(x, dy)
    xs, dys = (a.reshape(n // chunk, chunk, h, w, c) for a in (x, dy))
    return jax.lax.fori_loop(0, n // chunk, lambda i, acc: acc + taps(xs[i], dys[i]), jnp.zeros((kh, kw, c), x.dtype))


def _shift_bwd(res, dy: jax.Array):
    x, k = res
    kh, kw, _ = k.shape
    return _taps(dy, k[::-1, ::-1]), kernel_grad(x, dy, kh, kw)


_shift.defvjp(_shift_fwd, _shift_bwd)


def shift(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Shift-and-add depthwise convolution; computes in float32 for low-precision inputs."""
    _, h, w, _ = x.shape
    kernel = crop_kernel(kernel, h, w)
    dt = compute_dtype(x)
    return _shift(x.astype(dt), kernel[:, :, 0, :].astype(dt)).astype(x.dtype)
