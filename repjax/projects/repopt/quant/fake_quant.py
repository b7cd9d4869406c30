"""Simulated ("fake") int8 quantization: quantize to integers, then map back to float.

Weights: symmetric, per output channel (the last axis of a Flax conv HWIO or dense (in, out) kernel),
scale = max|w| / 127, integers round-to-nearest-even and clipped to [-127, 127]; so |w - w_q| <= scale / 2.

Activations: one (scale, zero point) per tensor from a calibrated range [lo, hi], always widened to include 0 so
that zero (ReLU outputs, conv zero padding) is exact.
- `"affine"` (default; PyTorch's fbgemm/x86 default): uint8 [0, 255], scale = (hi - lo) / 255,
  zero point = round(-lo / scale). Post-ReLU inputs (lo = 0) get zero point 0 and use all 256 levels.
- `"symmetric"`: int8 [-127, 127], scale = max(|lo|, |hi|) / 127, zero point 0.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ACT_MODES = ("affine", "symmetric")


def weight_scales(kernel: jax.Array) -> jax.Array:
    """Per-output-channel scales max|w| / 127 (1 for an all-zero channel), shape (out,)."""
    amax = jnp.max(jnp.abs(kernel.astype(jnp.float32)).reshape(-1, kernel.shape[-1]), axis=0)
    return jnp.where(amax > 0, amax / 127.0, 1.0)


def quantize_weight(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(int8 kernel, per-output-channel float32 scales)."""
    scale = weight_scales(kernel)
    q = jnp.clip(jnp.round(kernel.astype(jnp.float32) / scale), -127, 127)
    return q.astype(jnp.int8), scale


def fake_quant_weight(kernel: jax.Array) -> jax.Array:
    """The kernel rounded to its per-channel int8 grid, in the kernel's dtype."""
    q, scale = quantize_weight(kernel)
    return (q.astype(jnp.float32) * scale).astype(kernel.dtype)


class ActQParams(NamedTuple):
    """Per-tensor activation quantizer: x_q = (clip(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int


def act_qparams(lo: float, hi: float, mode: str = "affine") -> ActQParams:
    """Quantizer for the calibrated range [lo, hi] (widened to contain 0); scales computed in float32."""
    lo, hi = np.float32(min(lo, 0.0)), np.float32(max(hi, 0.0))
    if mode == "affine":
        scale = (hi - lo) / np.float32(255)
        scale = scale if scale > 0 else np.float32(1)
        return ActQParams(float(scale), int(np.clip(np.round(-lo / scale), 0, 255)), 0, 255)
    if mode == "symmetric":
        scale = max(-lo, hi) / np.float32(127)
        return ActQParams(float(scale if scale > 0 else 1), 0, -127, 127)
    raise ValueError(f"unknown activation quantization mode {mode!r}; use one of {ACT_MODES}")


def fake_quant_act(x: jax.Array, qp: ActQParams) -> jax.Array:
    """x rounded to the grid of `qp` (values outside the range are clipped), in x's dtype."""
    xf = x.astype(jnp.float32)
    q = jnp.clip(jnp.round(xf / qp.scale) + qp.zero_point, qp.qmin, qp.qmax)
    return ((q - qp.zero_point) * qp.scale).astype(x.dtype)
