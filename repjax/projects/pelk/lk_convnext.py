"""ConvNeXt-style backbone with a pluggable depthwise spatial mixer: ConvNeXt, SLaK and PeLK.

    ConvNeXt (Liu et al., CVPR 2022)  mixer 'dense'      7x7 depthwise conv with bias
    SLaK (Liu et al., ICLR 2023)      mixer 'stripe'     Kx5 + 5xK + 5x5, each -> BN; widths int(1.3 d)
    PeLK (Chen et al., CVPR 2024)     mixer 'peripheral' partial (3/8 C) peripheral KxK -> BN + 5x5 -> BN,
                                                         kernel-wise PE h [k, k, g] per stage (Eq. 1-3)

Block (ConvNeXt / SLaK): x + DropPath(gamma * Linear(GELU(Linear_4C(LN(mixer(x)))))), LN eps 1e-6, layer
scale init 1e-6. Stem: 4x4/4 conv -> LN; downsampling: LN -> 2x2/2 conv; head: GAP -> LN -> Linear.
`features=True` returns the 4 stage outputs (strides p, 2p, 4p, 8p for stem patch p).

`reparameterize` folds each mixer's BNs and branches into one kernel (dense k x k; theta form for PeLK);
`macs` / `param_count` are analytic (and eval_shape-based) with SLaK's sparse accounting as an option.
PeLK details the paper leaves open are switches (defaults): `pe_mode` ('valid_taps'; None = no PE),
`rounding` of g ('floor'), `merge_degenerate` (False), small kernel 5 with BN (as SLaK), all 4 stages
peripheral (stage 4: k=13, r_c=2, grid 2,2,1,1,1,...).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from repjax.models import MODELS
from repjax.projects.pelk import lk_mixers as lkm, peripheral as pk

Dtype = Any
MIXERS = {"dense": lkm.DenseMixer, "stripe": lkm.StripeMixer, "peripheral": lkm.PeripheralMixer}
trunc02 = nn.initializers.truncated_normal(0.02)


def drop_path(module: nn.Module, x: jax.Array, rate: float, train: bool) -> jax.Array:
    """Stochastic depth: zero whole samples with probability `rate` (rng 'dropout'), rescale the rest."""
    if not train or rate == 0.0:
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, (x.shape[0], 1, 1, 1))
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Block(nn.Module):
    """mixer -> LN -> Linear(4C) -> GELU -> Linear(C) -> layer scale -> DropPath -> + x."""

    mixer: str
    mixer_kw: tuple[tuple[str, Any], ...]
    layer_scale_init: float = 1e-6
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, pe: jax.Array | None = None) -> jax.Array:
        c = x.shape[-1]
        y = MIXERS[self.mixer](**dict(self.mixer_kw), dtype=self.dtype, name="mixer")(x, train, pe)
        y = nn.LayerNorm(1e-6, dtype=self.dtype, name="norm")(y)
        y = nn.Dense(4 * c, dtype=self.dtype, kernel_init=trunc02, name="pwconv1")(y)
        y = nn.Dense(c, dtype=self.dtype, kernel_init=trunc02, name="pwconv2")(nn.gelu(y, approximate=False))
        if self.layer_scale_init > 0:
            y = y * self.param("gamma", nn.initializers.constant(self.layer_scale_init), (c,)).astype(self.dtype)
        return x + drop_path(self, y, self.drop_path, train)


class LKConvNeXt(nn.Module):
    """The backbone; `mixer` and the fields after it select ConvNeXt / SLaK / PeLK (see module docstring)."""

    depths: Sequence[int] = (3, 3, 9, 3)
    dims: Sequence[int] = (96, 192, 384, 768)
    mixer: str = "dense"
    kernel_sizes: Sequence[int] = (7, 7, 7, 7)
    small_kernel: int | None = None
    use_bn: bool = False  # dense mixer only: False = ConvNeXt's conv with bias
    r_c: Sequence[int] = (2, 2, 2, 2)
    m: int = 2
    merge_degenerate: bool = False
    partial_ratio: float = 3 / 8
    rounding: str = "floor"
    pe_mode: str | None = "valid_taps"
    patch_size: int = 4
    layer_scale_init: float = 1e-6
    drop_path_rate: float = 0.0
    num_classes: int = 1000
    deploy: bool = False
    dwconv_method: str = "auto"
    dtype: Dtype = jnp.float32

    def mixer_kw(self, st: int) -> dict[str, Any]:
        k, s = self.kernel_sizes[st], self.small_kernel
        s = None if s is None else min(s, k)
        kw: dict[str, Any] = dict(kernel_size=k, deploy=self.deploy, method=self.dwconv_method)
        if self.mixer == "dense":
            kw.update(small_kernel=s, use_bn=self.use_bn)
        elif self.mixer == "stripe":
            kw.update(small_kernel=s or 5)
        else:
            kw.update(r_c=self.r_c[st], m=self.m, merge_degenerate=self.merge_degenerate, small_kernel=s,
                      partial_ratio=self.partial_ratio, rounding=self.rounding, pe_mode=self.pe_mode or "valid_taps")
        return kw

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, features: bool = False) -> jax.Array | list[jax.Array]:
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {sorted(MIXERS)}, got {self.mixer!r}")
        x, feats = x.astype(self.dtype), []
        n = sum(self.depths)
        rates = [self.drop_path_rate * i / max(1, n - 1) for i in range(n)]
        conv = dict(padding="VALID", dtype=self.dtype, kernel_init=trunc02)
        block = 0
        for st, depth in enumerate(self.depths):
            if st == 0:
                x = nn.Conv(self.dims[0], (self.patch_size,) * 2, self.patch_size, name="stem_conv", **conv)(x)
                x = nn.LayerNorm(1e-6, dtype=self.dtype, name="stem_norm")(x)
            else:
                x = nn.LayerNorm(1e-6, dtype=self.dtype, name=f"downsample_{st}_norm")(x)
                x = nn.Conv(self.dims[st], (2, 2), 2, name=f"downsample_{st}_conv", **conv)(x)
            kw = self.mixer_kw(st)
            pe = None
            if self.mixer == "peripheral" and self.pe_mode is not None:
                k, g = kw["kernel_size"], pk.partial_channels(self.dims[st], self.partial_ratio, self.rounding)
                pe = self.param(f"pe_{st}", trunc02, (k, k, g)).astype(self.dtype)
            for i in range(depth):
                x = Block(self.mixer, tuple(kw.items()), self.layer_scale_init, rates[block], self.dtype,
                          name=f"stages_{st}_{i}")(x, train, pe)
                block += 1
            feats.append(x)
        if features:
            return [f.astype(jnp.float32) for f in feats]
        x = nn.LayerNorm(1e-6, dtype=self.dtype, name="norm")(jnp.mean(x, axis=(1, 2)))
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=trunc02, name="head")(x).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------- re-param


def reparameterize(variables: Mapping[str, Any], eps: float = 1e-5) -> dict[str, Any]:
    """Training-form {'params', 'batch_stats'} -> deploy form (exact in eval mode only; pure, jit-able).

    Each block's mixer is fused by kind (read from its keys): stripe (`lk_h`) and dense-with-BN (`lk_bn`
    beside `lk`) become {'reparam': {kernel, bias}}, peripheral (`theta`) {theta, bias}; ConvNeXt's plain
    conv is already in deploy form. The deploy model is the same one built with `deploy=True`.
    """
    params, stats = dict(variables["params"]), dict(variables.get("batch_stats", {}))
    for name, blk in variables["params"].items():
        if not (isinstance(blk, Mapping) and "mixer" in blk):
            continue
        mix, st = blk["mixer"], stats.pop(name, {}).get("mixer", {})
        if "theta" in mix:
            fused = lkm.fuse_peripheral(mix, st, eps)
        elif "lk_h" in mix:
            fused = lkm.fuse_stripe(mix, st, eps)
        elif "lk_bn" in mix:
            fused = lkm.fuse_dense(mix, st, eps)
        else:
            fused = mix
        params[name] = {**blk, "mixer": fused}
    return {"params": params, **({"batch_stats": stats} if stats else {})}


# ---------------------------------------------------------------------------------------------- counting


def abstract_variables(model: nn.Module, size: int = 32) -> dict[str, Any]:
    """Shapes of `model`'s variables via jax.eval_shape (nothing allocated, nothing run)."""
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x))


def param_count(params: Any, sparsity: float = 0.0, exclude: tuple[str, ...] = ("pe_",)) -> float:
    """Parameters; with `sparsity`, SLaK's accounting: every weight with ndim >= 2 (convs, linears, theta)
    counts only its (1 - sparsity) non-zero fraction; vectors and leaves whose name starts with `exclude`
    (the stage PE) count fully."""
    total = 0.0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        n = float(math.prod(leaf.shape))
        names = [str(getattr(p, "key", "")) for p in path]
        dense = leaf.ndim < 2 or any(s.startswith(exclude) for s in names)
        total += n if dense else n * (1.0 - sparsity)
    return total


def mixer_macs(model: LKConvNeXt, st: int, hw: int) -> tuple[int, int]:
    """(MACs of one block's mixer per image on a map of hw pixels, channels it touches). Training form
    counts every branch; deploy form one k x k kernel. The PE (one conv of a ones map per batch) is not
    counted."""
    kw, c = model.mixer_kw(st), model.dims[st]
    k, s = kw["kernel_size"], kw.get("small_kernel") or 0
    if model.mixer == "peripheral":
        c = pk.partial_channels(c, model.partial_ratio, model.rounding)
    if model.deploy:
        return k * k * c * hw, c
    taps = {"dense": k * k + s * s, "stripe": 2 * k * s + s * s, "peripheral": k * k + s * s}[model.mixer]
    return taps * c * hw, c


def macs(model: LKConvNeXt, height: int, width: int | None = None, sparsity: float = 0.0) -> float:
    """Multiply-accumulates of one forward pass (convs and linears; norms and elementwise ops not counted).
    With `sparsity`, every conv/linear counts (1 - sparsity) of its MACs (SLaK's sparse-FLOPs accounting)."""
    d = 1.0 - sparsity
    h, w = height // model.patch_size, (width or height) // model.patch_size
    dims = model.dims
    total = 3 * dims[0] * model.patch_size**2 * h * w
    for st, depth in enumerate(model.depths):
        if st:
            h, w = h // 2, w // 2
            total += dims[st - 1] * dims[st] * 4 * h * w
        mix, _ = mixer_macs(model, st, h * w)
        total += depth * (mix + 8 * dims[st] ** 2 * h * w)
    return d * (total + dims[-1] * model.num_classes)


# ---------------------------------------------------------------------------------------------- variants


def slak_dims(dims: Sequence[int], factor: float = 1.3) -> tuple[int, ...]:
    """SLaK's widened channels int(d * 1.3): (96, ...) -> (124, 249, 499, 998)."""
    return tuple(int(d * factor) for d in dims)


def odd(x: float, lo: int = 3) -> int:
    """Nearest odd integer to x (an even x goes up), at least lo."""
    return max(lo, 2 * math.floor(x / 2) + 1)


_SIZES = {"t": ((3, 3, 9, 3), (96, 192, 384, 768)), "s": ((3, 3, 27, 3), (96, 192, 384, 768)),
          "b": ((3, 3, 27, 3), (128, 256, 512, 1024))}
SLAK_K, PELK_K, PELK101_K = (51, 49, 47, 13), (51, 49, 47, 13), (101, 69, 67, 13)


def _family(mixer: str) -> dict[str, Any]:
    if mixer == "stripe":
        return dict(mixer="stripe", kernel_sizes=SLAK_K, small_kernel=5)
    if mixer == "peripheral":
        return dict(mixer="peripheral", kernel_sizes=PELK_K, small_kernel=5)
    return dict(mixer="dense", kernel_sizes=(7, 7, 7, 7))


def _make(size: str, mixer: str, **extra: Any):
    depths, dims = _SIZES[size]

    def factory(**kw: Any) -> LKConvNeXt:
        cfg = {"depths": depths, "dims": dims if mixer == "dense" else slak_dims(dims), **_family(mixer), **extra}
        return LKConvNeXt(**{**cfg, **kw})

    return factory


for _s in "tsb":
    MODELS.register(f"convnext_{_s}", _make(_s, "dense"))
    MODELS.register(f"slak_{_s}", _make(_s, "stripe"))
    MODELS.register(f"pelk_{_s}", _make(_s, "peripheral"))
MODELS.register("pelk_b101", _make("b", "peripheral", kernel_sizes=PELK101_K, r_c=(3, 3, 3, 2)))


def _small(mixer: str, map_size: int, patch: int, depths: tuple[int, ...], base: tuple[int, ...],
           kw: dict[str, Any]) -> LKConvNeXt:
    fam = _family(mixer)
    if mixer != "dense":  # large kernels scale with the first map: 51 on 56 -> 15 on 16
        fam["kernel_sizes"] = tuple(odd(k * map_size / 56) for k in fam["kernel_sizes"])
    cfg = dict(depths=depths, dims=base if mixer == "dense" else slak_dims(base), patch_size=patch, num_classes=10,
               **fam)
    return LKConvNeXt(**{**cfg, **kw})


def _register_small(prefix: str, mixer: str) -> None:
    @MODELS.register(f"{prefix}_cifar")
    def cifar(**kw: Any) -> LKConvNeXt:
        """CIFAR-10 (32x32): stem patch 2 (maps 16, 8, 4, 2), widths 32-256 (x1.3 for SLaK/PeLK),
        depths 1-1-3-1, large kernels scaled to the map (15-15-13-3)."""
        return _small(mixer, 16, 2, (1, 1, 3, 1), (32, 64, 128, 256), kw)

    @MODELS.register(f"{prefix}_imagenette")
    def imagenette(image_size: int = 64, **kw: Any) -> LKConvNeXt:
        """Imagenette at `image_size` (a multiple of 32; 64: maps 16-2, kernels 15-15-13-3; 96: 21-21-21-5),
        stem patch 4, widths 48-384 (x1.3 for SLaK/PeLK), depths 2-2-4-2."""
        if image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {image_size}")
        return _small(mixer, image_size // 4, 4, (2, 2, 4, 2), (48, 96, 192, 384), kw)


for _p, _m in (("convnext", "dense"), ("slak", "stripe"), ("pelk", "peripheral")):
    _register_small(_p, _m)
