"""ConvNeXt-style backbone with a pluggable depthwise spatial mixer: ConvNeXt, SLaK and PeLK.

    ConvNeXt (Liu et al., CVPR 2022)  mixer 'dense'      7x7 depthwise conv with bias
    SLaK (Liu et al., ICLR 2023)      mixer 'stripe'     Kx5 + 5xK + 5x5, each -> BN; widths int(1.3 d)
    PeLK (Chen et al., CVPR 2024)     mixer 'peripheral' partial (3/8 C) peripheral KxK -> BN + 5x5 -> BN,
                                                         kernel-wise PE h [k, k, g] per stage (Eq. 1-3)

Block (ConvNeXt / SLaK): x + DropPath(gamma * Linear(GELU(Linear_4C(LN(mixer(x)))))), LN eps 1e-6, layer
scale init 1e-6. Stem: 4x4/4 conv -> LN; downsampling: LN -> 2x2/2 conv; head: GAP -> LN -> Linear.
`features=True` returns the 4 stage outputs (strides p, 2p, 4p, 8p for stem patch p).

Family contract (`repjax.models.family`): three families over this one module, `convnext` (convnext_*),
`slak` (slak_*) and `pelk` (pelk_*). `reparameterize(variables, model)` folds each mixer's BNs and branches
into one kernel (dense k x k; theta form for PeLK); `macs` / `param_count` are analytic (and
eval_shape-based) with SLaK's sparse accounting as an option. `from_torch` / `to_torch` / `infer` read and
write the released PyTorch layouts (ConvNeXt: facebookresearch and timm; SLaK: training and deploy form);
PeLK has no released code, so no PyTorch layout.
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
import numpy as np

from repjax.io import torch as tio
from repjax.models import Family, abstract_variables, register
from repjax.nn.activations import gelu
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
        y = nn.Dense(c, dtype=self.dtype, kernel_init=trunc02, name="pwconv2")(gelu(y))
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


def deploy(model: LKConvNeXt) -> LKConvNeXt:
    """The deploy-form module of `model`; plain ConvNeXt (dense mixer, no BN, no small kernel) has one form and
    is returned unchanged, so its weight files, which cannot tell the forms apart, infer back to it."""
    if model.mixer == "dense" and not model.use_bn and model.small_kernel is None:
        return model
    return model.clone(deploy=True)


def reparameterize(variables: Mapping[str, Any], model: LKConvNeXt, eps: float = 1e-5) -> dict[str, Any]:
    """Training-form {'params', 'batch_stats'} -> the variables of `deploy(model)` (exact in eval mode only;
    pure, jit-able; `model` is unused: the fusion reads each mixer's kind from its keys).

    Each block's mixer is fused by kind: stripe (`lk_h`) and dense-with-BN (`lk_bn` beside `lk`) become
    {'reparam': {kernel, bias}}, peripheral (`theta`) {theta, bias}; ConvNeXt's plain conv is already in
    deploy form (a no-op). No BN is left, so 'batch_stats' is returned only if the deploy model has one.
    """
    del model
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


def mixer_macs(model: LKConvNeXt, st: int, hw: int, branches: bool = False) -> tuple[int, int]:
    """(MACs of one block's mixer per image on a map of hw pixels, channels it touches): one k x k kernel
    (the deploy form), or with `branches` each training-form branch of a training-form model (SLaK's
    stripes 2 k s + s^2 taps, RepLKNet/PeLK k^2 + s^2). The PE (one conv of a ones map per batch) is not
    counted."""
    kw, c = model.mixer_kw(st), model.dims[st]
    k, s = kw["kernel_size"], kw.get("small_kernel") or 0
    if model.mixer == "peripheral":
        c = pk.partial_channels(c, model.partial_ratio, model.rounding)
    if not branches or model.deploy or (model.mixer == "dense" and not model.use_bn):
        return k * k * c * hw, c
    taps = {"dense": k * k + s * s, "stripe": 2 * k * s + s * s, "peripheral": k * k + s * s}[model.mixer]
    return taps * c * hw, c


def macs(model: LKConvNeXt, height: int, width: int | None = None, sparsity: float = 0.0,
         branches: bool = False) -> int:
    """Multiply-accumulates of one image's forward pass: convs and linears (norms, elementwise ops and the
    PE are not counted), in the deploy form (the contract's convention: what `deploy(model)` computes).

    `branches=True` counts a training-form model's mixer branches instead: the papers' FLOPs for SLaK, whose
    published numbers (and official inference) keep the k x s + s x k stripes unmerged; our deploy form
    merges them into one k x k kernel, which has more MACs. With `sparsity`, every conv/linear counts
    (1 - sparsity) of its MACs (SLaK's sparse-FLOPs accounting), rounded to an integer."""
    h, w = height // model.patch_size, (width or height) // model.patch_size
    dims = model.dims
    total = 3 * dims[0] * model.patch_size**2 * h * w
    for st, depth in enumerate(model.depths):
        if st:
            h, w = h // 2, w // 2
            total += dims[st - 1] * dims[st] * 4 * h * w
        mix, _ = mixer_macs(model, st, h * w, branches)
        total += depth * (mix + 8 * dims[st] ** 2 * h * w)
    total += dims[-1] * model.num_classes
    return total if sparsity == 0.0 else round((1.0 - sparsity) * total)


# ---------------------------------------------------------------------------------------------- PyTorch
# Three released layouts (module paths of their `nn.Module`s; PyTorch -> this module's names):
#   'facebook'  facebookresearch/ConvNeXt: downsample_layers.{0: [conv, LN], s: [LN, conv]},
#               stages.s.i.{dwconv, norm, pwconv1, pwconv2, gamma}, norm, head.
#   'timm'      timm's ConvNeXt: stem.{0: conv, 1: LN}, stages.s.downsample.{0: LN, 1: conv} (s >= 1),
#               stages.s.blocks.i.{conv_dw, norm, mlp.fc1, mlp.fc2, gamma}, head.norm, head.fc.
#   'slak'      VITA-Group/SLaK (the facebook layout, the mixer replaced by `large_kernel`):
#               stripes LoRA1 (k x s) / LoRA2 (s x k) / small_conv (s x s), each {conv, bn}; dense-with-BN
#               lkb_origin / small_conv; deploy lkb_reparam {weight, bias}. SLaK builds small_conv only when
#               s < k, and its stripes are (k x 5) with the 5 unclipped, so the layout needs s < k per stage.
#               SLaK's own `merge_kernel` merges only lkb_origin; our deploy form of the stripes (one k x k
#               kernel) is written under the same `lkb_reparam` name.
# PeLK has no released code or checkpoints (spec: pelk_lkrobust.md section 1), so it has no PyTorch layout.

LAYOUTS = ("facebook", "timm", "slak")


def _ln(prefix: str, path: tio.Path) -> list[tio.Rule]:
    """LayerNorm {weight, bias} -> Flax LayerNorm {scale, bias} (channels-first or -last: same vectors)."""
    return [tio.Rule(f"{prefix}.weight", ("params", *path, "scale")),
            tio.Rule(f"{prefix}.bias", ("params", *path, "bias"))]


def _conv_bn(prefix: str, path: tio.Path, name: str) -> list[tio.Rule]:
    """SLaK's `conv_bn` Sequential {conv (no bias), bn} -> our `name` conv and `name_bn` BN under `path`."""
    return tio.conv(f"{prefix}.conv", (*path, name)) + tio.bn(f"{prefix}.bn", (*path, f"{name}_bn"))


def default_layout(model: LKConvNeXt) -> str:
    """'facebook' for ConvNeXt's plain conv mixer, 'slak' for the BN mixers (stripe, dense with BN)."""
    if model.mixer == "peripheral":
        raise ValueError("PeLK (mixer='peripheral') has no PyTorch layout: no official code or checkpoint exists")
    return "facebook" if model.mixer == "dense" and not model.use_bn else "slak"


def _mixer_rules(model: LKConvNeXt, st: int, prefix: str, path: tio.Path, layout: str) -> list[tio.Rule]:
    path = (*path, "mixer")
    if layout != "slak":
        return tio.conv(f"{prefix}.{'conv_dw' if layout == 'timm' else 'dwconv'}", (*path, "lk"), bias=True)
    lk, kw = f"{prefix}.large_kernel", model.mixer_kw(st)
    if model.deploy:
        return tio.conv(f"{lk}.lkb_reparam", (*path, "reparam"), bias=True)
    if not (kw.get("small_kernel") or 0) < kw["kernel_size"]:
        raise ValueError(f"SLaK's layout needs small_kernel < kernel_size, stage {st} has {kw.get('small_kernel')} "
                         f"and {kw['kernel_size']} (SLaK drops or reshapes that branch; this model does not)")
    if model.mixer == "stripe":
        rules = _conv_bn(f"{lk}.LoRA1", path, "lk_h") + _conv_bn(f"{lk}.LoRA2", path, "lk_w")
    else:
        rules = _conv_bn(f"{lk}.lkb_origin", path, "lk")
    return rules + (_conv_bn(f"{lk}.small_conv", path, "small") if kw.get("small_kernel") else [])


def torch_rules(model: LKConvNeXt, layout: str | None = None) -> list[tio.Rule]:
    """PyTorch key <-> leaf rules of `model` in `layout` (default: `default_layout(model)`)."""
    layout = layout or default_layout(model)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    want = default_layout(model)
    if (layout == "slak") != (want == "slak"):
        raise ValueError(f"layout {layout!r} does not hold mixer={model.mixer!r} use_bn={model.use_bn}: use {want!r}")
    timm = layout == "timm"
    stem = ("stem.0", "stem.1") if timm else ("downsample_layers.0.0", "downsample_layers.0.1")
    rules = tio.conv(stem[0], ("stem_conv",), bias=True) + _ln(stem[1], ("stem_norm",))
    for st, depth in enumerate(model.depths):
        if st:
            ds = f"stages.{st}.downsample" if timm else f"downsample_layers.{st}"
            rules += _ln(f"{ds}.0", (f"downsample_{st}_norm",)) + tio.conv(f"{ds}.1", (f"downsample_{st}_conv",), True)
        for i in range(depth):
            t, f = (f"stages.{st}.blocks.{i}" if timm else f"stages.{st}.{i}"), f"stages_{st}_{i}"
            rules += _mixer_rules(model, st, t, (f,), layout) + _ln(f"{t}.norm", (f, "norm"))
            rules += tio.linear(f"{t}.mlp.fc1" if timm else f"{t}.pwconv1", (f, "pwconv1"))
            rules += tio.linear(f"{t}.mlp.fc2" if timm else f"{t}.pwconv2", (f, "pwconv2"))
            if model.layer_scale_init > 0:
                rules.append(tio.Rule(f"{t}.gamma", ("params", f, "gamma")))
    head = ("head.norm", "head.fc") if timm else ("norm", "head")
    return rules + _ln(head[0], ("norm",)) + tio.linear(head[1], ("head",))


def detect_layout(state_dict: Mapping[str, Any]) -> tuple[str, str]:
    """(layout, form) of a ConvNeXt / SLaK state_dict from its keys; form is 'convnext' (plain dwconv),
    'stripe' / 'dense' (SLaK training form) or 'deploy' (SLaK `lkb_reparam`)."""
    keys = set(state_dict)
    if "downsample_layers.0.0.weight" in keys:
        if "stages.0.0.dwconv.weight" in keys:
            return "facebook", "convnext"
        for branch, form in (("LoRA1", "stripe"), ("lkb_origin", "dense"), ("lkb_reparam", "deploy")):
            if any(k.startswith("stages.0.0.large_kernel.") and f".{branch}." in k for k in keys):
                return "slak", form
    if "stem.0.weight" in keys and "stages.0.blocks.0.conv_dw.weight" in keys:
        return "timm", "convnext"
    raise ValueError("not a ConvNeXt (facebook: downsample_layers.0.0, stages.0.0.dwconv; timm: stem.0, "
                     "stages.0.blocks.0.conv_dw) or SLaK (stages.0.0.large_kernel.{LoRA1,lkb_origin,lkb_reparam}) "
                     f"state_dict; first keys: {sorted(keys)[:6]}")


def infer(state_dict: Mapping[str, Any], model: LKConvNeXt) -> LKConvNeXt:
    """`model` in the form `state_dict` holds (deploy for SLaK's `lkb_reparam`) with its head's number of
    classes; a clear error when the state_dict's mixer is not `model`'s (e.g. SLaK stripes into a ConvNeXt).
    The architecture stays `model`'s: another depth or width fails the strict import, listed."""
    layout, form = detect_layout(state_dict)
    kind = "convnext" if model.mixer == "dense" and not model.use_bn else (
        "dense" if model.mixer == "dense" else model.mixer)
    fits = {"convnext": ("convnext",), "stripe": ("stripe", "deploy"), "dense": ("dense", "deploy")}.get(kind, ())
    if form not in fits:
        raise ValueError(f"the state_dict holds a {layout} {form!r} model, which does not fit mixer={model.mixer!r} "
                         f"use_bn={model.use_bn} (ConvNeXt: convnext_*, SLaK stripes: slak_*, SLaK dense: use_bn=True)")
    head = state_dict.get("head.fc.weight" if layout == "timm" else "head.weight")
    classes = {} if head is None else {"num_classes": int(np.shape(head)[0])}
    return model.clone(**classes, **({"deploy": form == "deploy"} if kind != "convnext" else {}))


def from_torch(state_dict: Mapping[str, Any], model: LKConvNeXt) -> dict[str, Any]:
    """A facebook / timm ConvNeXt or SLaK state_dict (layout from its keys) -> `model`'s variables, strictly:
    a `WeightImportError` lists every missing, unexpected and mis-shaped key (`num_batches_tracked` dropped).
    `model` must be in the state_dict's form (`infer(state_dict, model)` gives it)."""
    sd = tio.numpy_state_dict(state_dict)
    layout, _ = detect_layout(sd)
    if infer(sd, model).deploy != model.deploy:
        raise ValueError(f"model.deploy={model.deploy} but the state_dict is in the other form: use "
                         "infer(state_dict, model)")
    target = abstract_variables(model, 8 * model.patch_size)
    return jax.tree.map(jnp.asarray, tio.from_torch_state_dict(sd, torch_rules(model, layout), target))


def to_torch(variables: Mapping[str, Any], model: LKConvNeXt, layout: str | None = None) -> dict[str, np.ndarray]:
    """`model`'s variables -> a state_dict in `layout` (default `default_layout(model)`: 'facebook' for
    ConvNeXt, 'slak' otherwise), numpy, with `num_batches_tracked` for PyTorch's strict loading."""
    return tio.to_torch_state_dict(variables, torch_rules(model, layout))  # with num_batches_tracked


# ---------------------------------------------------------------------------------------------- families
# Three families over one module: their PyTorch layouts differ (ConvNeXt facebook/timm, SLaK its own, PeLK
# none), and the shared contract test builds a tiny model of each mixer. The dense mixer with BN (PeLK's
# Tab. 1 "dense" baseline, `convnext_*(use_bn=True, small_kernel=5)`) is the convnext family's second form.

_common = dict(module=LKConvNeXt, macs=macs, reparameterize=reparameterize, deploy=deploy)
CONVNEXT = Family("convnext", tiny="convnext_test", from_torch=from_torch, to_torch=to_torch, infer=infer, **_common)
SLAK = Family("slak", tiny="slak_test", from_torch=from_torch, to_torch=to_torch, infer=infer, **_common)
PELK = Family("pelk", tiny="pelk_test", **_common)
FAMILIES = {"dense": CONVNEXT, "stripe": SLAK, "peripheral": PELK}

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
PREFIX = {"dense": "convnext", "stripe": "slak", "peripheral": "pelk"}


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
    for _m in ("dense", "stripe", "peripheral"):
        register(f"{PREFIX[_m]}_{_s}", FAMILIES[_m], input_size=224)(_make(_s, _m))
register("pelk_b101", PELK, input_size=384)(_make("b", "peripheral", kernel_sizes=PELK101_K, r_c=(3, 3, 3, 2)))


def _small(mixer: str, map_size: int, patch: int, depths: tuple[int, ...], base: tuple[int, ...],
           kw: dict[str, Any]) -> LKConvNeXt:
    fam = _family(mixer)
    if mixer != "dense":  # large kernels scale with the first map: 51 on 56 -> 15 on 16
        fam["kernel_sizes"] = tuple(odd(k * map_size / 56) for k in fam["kernel_sizes"])
    cfg = dict(depths=depths, dims=base if mixer == "dense" else slak_dims(base), patch_size=patch, num_classes=10,
               **fam)
    return LKConvNeXt(**{**cfg, **kw})


def _register_small(mixer: str) -> None:
    prefix, family = PREFIX[mixer], FAMILIES[mixer]

    @register(f"{prefix}_cifar", family, input_size=32)
    def cifar(**kw: Any) -> LKConvNeXt:
        """CIFAR-10 (32x32): stem patch 2 (maps 16, 8, 4, 2), widths 32-256 (x1.3 for SLaK/PeLK),
        depths 1-1-3-1, large kernels scaled to the map (15-15-13-3)."""
        return _small(mixer, 16, 2, (1, 1, 3, 1), (32, 64, 128, 256), kw)

    @register(f"{prefix}_imagenette", family, input_size=64)
    def imagenette(image_size: int = 64, **kw: Any) -> LKConvNeXt:
        """Imagenette at `image_size` (a multiple of 32; 64: maps 16-2, kernels 15-15-13-3; 96: 21-21-21-5),
        stem patch 4, widths 48-384 (x1.3 for SLaK/PeLK), depths 2-2-4-2."""
        if image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {image_size}")
        return _small(mixer, image_size // 4, 4, (2, 2, 4, 2), (48, 96, 192, 384), kw)

    @register(f"{prefix}_test", family, input_size=32)
    def test(**kw: Any) -> LKConvNeXt:
        """Test size (the family's `tiny`): 32x32, patch 2, depths 1-1-1-1, widths 8-16-16-24 (no x1.3),
        10 classes; kernels 7 (ConvNeXt) or 11-9-7-7 with small 5 < every kernel (SLaK's layout needs it)."""
        cfg = dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 24), patch_size=2, num_classes=10, **_family(mixer))
        if mixer != "dense":
            cfg["kernel_sizes"] = (11, 9, 7, 7)
        return LKConvNeXt(**{**cfg, **kw})


for _m in ("dense", "stripe", "peripheral"):
    _register_small(_m)
