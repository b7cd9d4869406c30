"""Depthwise large-kernel spatial mixers (training and deploy forms) and their re-parameterization.

    depthwise       plain depthwise conv (+ bias): ConvNeXt's 7x7 mixer; the deploy form of dense / stripe.
    DenseMixer      k x k (+ parallel s x s) depthwise conv, each branch -> BN (RepLKNet, PeLK Tab. 1 "dense").
    StripeMixer     SLaK: k x s + s x k + s x s depthwise branches, each -> BN, summed.
    PeripheralMixer PeLK: partial split, peripheral k x k kernel (theta form) -> BN, + s x s -> BN, stage PE.

Every depthwise conv goes through `repjax.nn.dwconv`. Re-parameterization (eval-mode BN, RepVGG Eq. 3-4):
`fuse_dense` / `fuse_stripe` give one dense {kernel, bias}; `fuse_peripheral` keeps the theta form (the
s x s branch is added into the 1-wide central cells, exact because s <= 2 r_c + 1 is enforced).

PE convention (PeLK Eq. 3 adds h to the *input* at each tap): every branch of the peripheral mixer sees it,
so branch outputs are conv(X, w_b) + pe_term(w_b, h), and the merged kernel W = sum_b t_b w_b gives exactly
conv(X, W) + pe_term(W, h) in deploy form (h stays a stage parameter).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from repjax.nn import dwconv
from repjax.nn.conv import Conv
from repjax.nn.layers import batch_norm
from repjax.nn.reparam import fuse_conv_bn, merge_branches, pad_kernel
from repjax.projects.pelk import peripheral as pk

Dtype = Any
trunc02 = nn.initializers.truncated_normal(0.02)


def depthwise(channels: int, kernel_size: tuple[int, int], use_bias: bool, method: str, dtype: Dtype,
              name: str) -> Conv:
    """Depthwise 'same' conv `name` (variables `kernel` [kh, kw, 1, C], optional `bias` [C]): a
    `repjax.nn.conv.Conv`, which routes depthwise convs to `repjax.nn.dwconv` with `method`."""
    kh, kw = kernel_size
    return Conv(channels, (kh, kw), padding=((kh // 2, kh // 2), (kw // 2, kw // 2)), feature_group_count=channels,
                use_bias=use_bias, dtype=dtype, kernel_init=trunc02, depthwise_method=method, name=name)


def _conv_bn(x: jax.Array, ks: tuple[int, int], name: str, train: bool, mod: nn.Module) -> jax.Array:
    """Depthwise conv (no bias) `name` -> BN `name_bn`, created inside `mod`'s compact method."""
    y = depthwise(x.shape[-1], ks, False, mod.method, mod.dtype, name)(x)
    return batch_norm(train, mod.dtype, name=f"{name}_bn")(y)


class DenseMixer(nn.Module):
    """Dense k x k depthwise conv. `use_bn=False`: one conv `lk` with bias (ConvNeXt; training = deploy form).
    Otherwise lk -> BN (+ small -> BN if `small_kernel`), deploy form `reparam` {kernel, bias}."""

    kernel_size: int
    small_kernel: int | None = None
    use_bn: bool = True
    deploy: bool = False
    method: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, pe: jax.Array | None = None) -> jax.Array:
        k = (self.kernel_size, self.kernel_size)
        if self.deploy or not self.use_bn:
            return depthwise(x.shape[-1], k, True, self.method, self.dtype, "reparam" if self.use_bn else "lk")(x)
        y = _conv_bn(x, k, "lk", train, self)
        if self.small_kernel:  # clipped to the large kernel (k=3 stages of small variants)
            y = y + _conv_bn(x, (min(self.small_kernel, self.kernel_size),) * 2, "small", train, self)
        return y


class StripeMixer(nn.Module):
    """SLaK decomposed kernel: (k x s) -> BN + (s x k) -> BN + (s x s) -> BN; deploy `reparam` k x k."""

    kernel_size: int
    small_kernel: int = 5
    deploy: bool = False
    method: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, pe: jax.Array | None = None) -> jax.Array:
        k, s = self.kernel_size, self.small_kernel
        if self.deploy:
            return depthwise(x.shape[-1], (k, k), True, self.method, self.dtype, "reparam")(x)
        y = _conv_bn(x, (k, s), "lk_h", train, self) + _conv_bn(x, (s, k), "lk_w", train, self)
        return y + _conv_bn(x, (s, s), "small", train, self)


class PeripheralMixer(nn.Module):
    """Partial peripheral conv: first g channels -> [theta-form k x k conv -> BN] + [s x s -> BN] (+ PE);
    other channels identity; output concat([mixed, identity]). Deploy: {theta, bias} (still theta form).

    Variables: training `theta` [k', k', 1, g], `lk_bn`, `small/kernel`, `small_bn`; deploy `theta`, `bias`.
    `pe` is the stage's h [k, k, g] (or None for no PE), `pe_mode` its border semantics (`pe_term`).
    """

    kernel_size: int
    r_c: int = 2
    m: int = 2
    merge_degenerate: bool = False
    small_kernel: int | None = 5
    partial_ratio: float = 3 / 8
    rounding: str = "floor"
    pe_mode: str = "valid_taps"
    deploy: bool = False
    method: str = "auto"
    dtype: Dtype = jnp.float32

    @property
    def grid(self) -> tuple[int, ...]:
        return pk.sharing_grid(self.kernel_size, self.r_c, self.m, self.merge_degenerate)

    def _pe(self, kernel: jax.Array, pe: jax.Array | None, hw: tuple[int, int]) -> jax.Array | float:
        return 0.0 if pe is None else pe_for(kernel, pe, hw, self.pe_mode, self.method)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, pe: jax.Array | None = None) -> jax.Array:
        grid, s = self.grid, self.small_kernel
        if s and not (s <= min(2 * self.r_c + 1, self.kernel_size) and s % 2):
            raise ValueError(f"small kernel {s} must be odd and fit the fine centre (2 r_c + 1 = {2 * self.r_c + 1})")
        g = pk.partial_channels(x.shape[-1], self.partial_ratio, self.rounding)
        xg, rest = pk.split_partial(x, g)
        hw = x.shape[1:3]
        theta = self.param("theta", trunc02, (len(grid), len(grid), 1, g), jnp.float32).astype(self.dtype)
        y = dwconv.piecewise_conv(xg, theta, grid, self.method)
        y = y + self._pe(dwconv.expand_piecewise(theta, grid), pe, hw)
        if self.deploy:
            y = y + self.param("bias", nn.initializers.zeros, (g,), jnp.float32).astype(self.dtype)
        else:
            y = batch_norm(train, self.dtype, name="lk_bn")(y)
            if s:
                small = depthwise(xg.shape[-1], (s, s), False, self.method, self.dtype, "small")
                z = small(xg)
                z = z + self._pe(small.variables["params"]["kernel"].astype(self.dtype), _centre(pe, s), hw)
                y = y + batch_norm(train, self.dtype, name="small_bn")(z)
        return jnp.concatenate([y, rest], axis=-1)


def _centre(pe: jax.Array | None, s: int) -> jax.Array | None:
    if pe is None:
        return None
    lo = pe.shape[0] // 2 - s // 2
    return pe[lo:lo + s, lo:lo + s]


def pe_for(kernel: jax.Array, pe: jax.Array, hw: tuple[int, int], mode: str, method: str) -> jax.Array:
    """`peripheral.pe_term` reshaped to broadcast against [N, H, W, C]."""
    return pk.pe_term(kernel, pe.astype(kernel.dtype), tuple(hw), mode, method)


# ---------------------------------------------------------------------------------------------- re-param


def _fuse(params: Mapping[str, Any], stats: Mapping[str, Any], name: str, eps: float) -> tuple[jax.Array, jax.Array]:
    bn, st = params[f"{name}_bn"], stats[f"{name}_bn"]
    return fuse_conv_bn(params[name]["kernel"], None, bn["scale"], bn["bias"], st["mean"], st["var"], eps)


def fuse_dense(params: Mapping[str, Any], stats: Mapping[str, Any], eps: float = 1e-5) -> dict[str, Any]:
    """Training DenseMixer (with BN) -> {'reparam': {kernel, bias}}."""
    branches = [_fuse(params, stats, n, eps) for n in ("lk", "small") if n in params]
    kernel, bias = merge_branches(branches)
    return {"reparam": {"kernel": kernel, "bias": bias}}


def fuse_stripe(params: Mapping[str, Any], stats: Mapping[str, Any], eps: float = 1e-5) -> dict[str, Any]:
    """Training StripeMixer -> {'reparam': {kernel, bias}} (k x k: stripes and the s x s zero-padded)."""
    kernel, bias = merge_branches([_fuse(params, stats, n, eps) for n in ("lk_h", "lk_w", "small")])
    return {"reparam": {"kernel": kernel, "bias": bias}}


def fuse_peripheral(params: Mapping[str, Any], stats: Mapping[str, Any], eps: float = 1e-5) -> dict[str, Any]:
    """Training PeripheralMixer -> deploy {theta, bias}: BN folded into theta (per channel, so the sharing is
    kept) and the s x s branch added into the central 1-wide cells (`peripheral.add_to_centre`)."""
    bn, st = params["lk_bn"], stats["lk_bn"]
    theta, bias = fuse_conv_bn(params["theta"], None, bn["scale"], bn["bias"], st["mean"], st["var"], eps)
    if "small" in params:
        small, b2 = _fuse(params, stats, "small", eps)
        theta = pk.add_to_centre(theta, small)
        bias = bias + b2
    return {"theta": theta, "bias": bias}


def dense_kernel(theta: jax.Array, grid: tuple[int, ...], small: jax.Array | None = None) -> jax.Array:
    """expand(theta) (+ zero-padded small kernel): the dense kernel a peripheral mixer applies."""
    w = dwconv.expand_piecewise(theta, grid)
    return w if small is None else w + pad_kernel(small, w.shape[0])
