"""RepMLPNet (Ding et al., CVPR'22): RepMLP blocks with Locality Injection, hierarchical backbone.

RepMLP block on x [N, H, W, C] (H % h == W % w == 0, C % S == 0; channel c uses share-set c mod S):
  out = GP(x) * (BN_S(FC3(partitions(x))) + sum_k BN_S(dwconv_k(partitions(x))))
with GP the Global Perceptron gate (GAP -> 1x1 C/r -> ReLU -> 1x1 C -> sigmoid), FC3 S spatial (hw x hw)
matrices applied to every h x w partition, and the Local Perceptron convs zero-padded at each partition
boundary. Locality Injection (paper Sec. "Locality Injection"; `repjax.nn.locality`) folds the BNs and convs into FC3:
`reparameterize` maps training variables to the deploy form (FC3 with bias, no fc3_bn / repconv*); with
`deploy`, `macs`, `from_torch` / `to_torch` (official layout) and `infer` it is the family contract
(`repjax.models.family`), registered as `FAMILY`.
Partitions are taken literally (out[partition i, j] depends only on in[partition i, j]). With one partition
per map (the released configs at native resolution) this equals the official code; with hp * wp > 1 the
official forward's reshapes mix partitions and channels (an identity FC3 does not give back its input there),
so imported weights agree with it only at the native resolution.

Parameter tree mirrors the official names: `conv_embedding`, `stages_{s}_{i}` ({prebn1, repmlp_block{gp,
fc3, fc3_bn, repconv{k}}, prebn2, ffn_block{ffn_fc1, ffn_fc2}}), `embeds_{s}`, `head_norm`, `head`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from repjax.io import torch as tio
from repjax.models import Family, abstract_variables, register
from repjax.nn.activations import gelu
from repjax.nn.conv import Conv
from repjax.nn.layers import ConvBN, batch_norm, he_normal
from repjax.nn.locality import fuse_fc_bn, inject
from repjax.nn.reparam import fuse_conv_bn, merge_branches

BN_EPS = 1e-5


class GlobalPerceptron(nn.Module):
    """Per-channel gate: GAP -> 1x1 conv C/r (bias) -> ReLU -> 1x1 conv C (bias) -> sigmoid."""

    internal: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        g = jnp.mean(x, axis=(1, 2), keepdims=True)
        g = nn.relu(nn.Conv(self.internal, (1, 1), dtype=self.dtype, name="fc1")(g))
        return nn.sigmoid(nn.Conv(x.shape[-1], (1, 1), dtype=self.dtype, name="fc2")(g))


def fc3_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """PyTorch default for the grouped 1x1 conv: U(-1/sqrt(hw), 1/sqrt(hw))."""
    bound = 1.0 / np.sqrt(shape[1])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class RepMLPBlock(nn.Module):
    """RepMLP block (in == out channels); `fc3/kernel` is [S, hw_in, hw_out], `fc3/bias` [S, hw] if deploy."""

    h: int
    w: int
    sharesets: int = 1
    reparam_conv_k: tuple[int, ...] = (1, 3)
    gp_reduce: int = 4
    deploy: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        n, hh, ww, c = x.shape
        h, w, s = self.h, self.w, self.sharesets
        if hh % h or ww % w or c % s:
            raise ValueError(f"input {hh}x{ww}x{c} needs H % {h} == W % {w} == 0 and C % {s} == 0")
        hp, wp, g = hh // h, ww // w, c // s
        gate = GlobalPerceptron(c // self.gp_reduce, self.dtype, name="gp")(x)
        # [N, hp, h, wp, w, G, S] -> [N, hp, wp, G, h, w, S]: one h x w image with S channels per row.
        parts = x.reshape(n, hp, h, wp, w, g, s).transpose(0, 1, 3, 5, 2, 4, 6).reshape(-1, h, w, s)
        fc3 = _FC3(h * w, s, self.deploy, self.dtype, name="fc3")
        y = fc3(parts.reshape(-1, h * w, s)).reshape(-1, h, w, s)
        if not self.deploy:
            y = batch_norm(train, self.dtype, name="fc3_bn")(y)
            for k in self.reparam_conv_k:
                y = y + ConvBN(s, k, groups=s, act=None, dtype=self.dtype, name=f"repconv{k}")(parts, train)
        y = y.reshape(n, hp, wp, g, h, w, s).transpose(0, 1, 4, 2, 5, 3, 6).reshape(n, hh, ww, c)
        return y * gate


class _FC3(nn.Module):
    """S spatial FC matrices: y[b, q, s] = sum_p x[b, p, s] kernel[s, p, q] (+ bias[s, q])."""

    hw: int
    sharesets: int
    use_bias: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", fc3_init, (self.sharesets, self.hw, self.hw), jnp.float32)
        y = jnp.einsum("bps,spq->bqs", x, kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.sharesets, self.hw), jnp.float32)
            y = y + bias.T.astype(self.dtype)
        return y


class ConvBNNoPad(nn.Module):
    """Conv (no bias, no padding, stride == kernel) -> BN -> ReLU: the patch embeddings."""

    features: int
    patch: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Conv(self.features, (self.patch, self.patch), strides=self.patch, padding=((0, 0), (0, 0)),
                 use_bias=False, dtype=self.dtype, kernel_init=he_normal, name="conv")(x)
        return nn.relu(batch_norm(train, self.dtype, name="bn")(x))


class RepMLPNetUnit(nn.Module):
    """y = x + RepMLP(BN(x)); z = y + FFN(BN(y)), FFN = 1x1 conv-BN (4C) -> GELU (erf) -> 1x1 conv-BN (C)."""

    h: int
    w: int
    sharesets: int
    reparam_conv_k: tuple[int, ...]
    gp_reduce: int = 4
    ffn_expand: int = 4
    deploy: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        y = x + RepMLPBlock(self.h, self.w, self.sharesets, self.reparam_conv_k, self.gp_reduce, self.deploy,
                            self.dtype, name="repmlp_block")(batch_norm(train, self.dtype, name="prebn1")(x), train)
        z = batch_norm(train, self.dtype, name="prebn2")(y)
        ffn = FFNBlock(c * self.ffn_expand, c, self.dtype, name="ffn_block")
        return y + ffn(z, train)


class FFNBlock(nn.Module):
    """1x1 conv-BN (hidden) -> GELU (erf, as torch nn.GELU) -> 1x1 conv-BN (out)."""

    hidden: int
    out: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = ConvBN(self.hidden, 1, act=None, dtype=self.dtype, name="ffn_fc1")(x, train)
        x = gelu(x)
        return ConvBN(self.out, 1, act=None, dtype=self.dtype, name="ffn_fc2")(x, train)


class RepMLPNet(nn.Module):
    """Stem (patch conv-BN-ReLU) -> stages of RepMLPNetUnits joined by 2x2/2 conv-BN-ReLU -> BN, GAP, `head`.

    `features=True` returns the list of stage outputs (strides patch, 2 patch, 4 patch, ...) instead of logits;
    the input must then make each stage's map a multiple of its (h, w) (several partitions share FC3).
    """

    num_blocks: Sequence[int] = (2, 2, 6, 2)
    channels: Sequence[int] = (64, 128, 256, 512)
    hs: Sequence[int] = (56, 28, 14, 7)
    ws: Sequence[int] = (56, 28, 14, 7)
    sharesets: Sequence[int] = (1, 4, 16, 128)
    reparam_conv_k: tuple[int, ...] = (1, 3)
    gp_reduce: int = 4
    patch_size: int = 4
    num_classes: int = 1000
    deploy: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, features: bool = False) -> jax.Array | list[jax.Array]:
        stem = ConvBNNoPad(self.channels[0], self.patch_size, self.dtype, name="conv_embedding")
        x = stem(x.astype(self.dtype), train)
        feats = []
        for st, depth in enumerate(self.num_blocks):
            for i in range(depth):
                x = RepMLPNetUnit(self.hs[st], self.ws[st], self.sharesets[st], tuple(self.reparam_conv_k),
                                  self.gp_reduce, 4, self.deploy, self.dtype, name=f"stages_{st}_{i}")(x, train)
            feats.append(x)
            if st < len(self.num_blocks) - 1:
                x = ConvBNNoPad(self.channels[st + 1], 2, self.dtype, name=f"embeds_{st}")(x, train)
        if features:
            return [f.astype(jnp.float32) for f in feats]
        x = jnp.mean(batch_norm(train, self.dtype, name="head_norm")(x), axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------
# Locality Injection (training variables -> deploy variables)


def inject_block(params: Mapping[str, Any], stats: Mapping[str, Any], h: int, w: int,
                 eps: float = BN_EPS) -> dict[str, Any]:
    """One training-form RepMLPBlock's params -> deploy params (fc3 {kernel, bias}, gp unchanged)."""
    bn, st = params["fc3_bn"], stats["fc3_bn"]
    kernel, bias = fuse_fc_bn(params["fc3"]["kernel"], bn["scale"], bn["bias"], st["mean"], st["var"], eps)
    convs = [fuse_conv_bn(p["conv"]["kernel"], None, p["bn"]["scale"], p["bn"]["bias"],
                          stats[k]["bn"]["mean"], stats[k]["bn"]["var"], eps)
             for k, p in params.items() if k.startswith("repconv")]
    if convs:
        kernel, bias = inject(kernel, bias, [merge_branches(convs)], h, w)
    return {"gp": params["gp"], "fc3": {"kernel": kernel, "bias": bias}}


def reparameterize(variables: Mapping[str, Any], model: RepMLPNet) -> dict[str, Any]:
    """Training-form {'params', 'batch_stats'} -> deploy-form ones (pure; jit-able; exact in eval mode only).

    Every `repmlp_block` gets its BNs and conv branches folded into FC3; the other BNs stay (as officially).
    Partition sizes come from `model.hs` / `model.ws`; an FC3 of another size raises.
    """
    params, stats = dict(variables["params"]), dict(variables.get("batch_stats", {}))
    for name, unit in variables["params"].items():
        if isinstance(unit, Mapping) and "repmlp_block" in unit:
            blk = unit["repmlp_block"]
            hw = blk["fc3"]["kernel"].shape[1]
            st = int(name.split("_")[1])
            h, w = model.hs[st], model.ws[st]
            if h * w != hw:
                raise ValueError(f"{name}: FC3 has {hw} positions, the model's partition is {h}x{w}")
            params[name] = {**unit, "repmlp_block": inject_block(blk, stats[name]["repmlp_block"], h, w)}
            stats[name] = {k: v for k, v in stats[name].items() if k != "repmlp_block"}
    return {"params": params, "batch_stats": stats}


def deploy(model: RepMLPNet) -> RepMLPNet:
    """The deploy form (FC3 with bias, no fc3_bn / repconv*) of `model`."""
    return model.clone(deploy=True)


# ----------------------------------------------------------------------------------------------------------
# Variants (official table, spec 4.3) and small ones

_CONFIGS: dict[str, tuple[tuple[int, ...], tuple[int, ...], int, tuple[int, ...]]] = {
    # name: (channels, blocks, input size, sharesets)
    "t224": ((64, 128, 256, 512), (2, 2, 6, 2), 224, (1, 4, 16, 128)),
    "b224": ((96, 192, 384, 768), (2, 2, 12, 2), 224, (1, 4, 32, 128)),
    "t256": ((64, 128, 256, 512), (2, 2, 6, 2), 256, (1, 4, 16, 128)),
    "b256": ((96, 192, 384, 768), (2, 2, 12, 2), 256, (1, 4, 32, 128)),
    "d256": ((80, 160, 320, 640), (2, 2, 18, 2), 256, (1, 4, 16, 128)),
    "l256": ((96, 192, 384, 768), (2, 2, 18, 2), 256, (1, 4, 32, 256)),
}


def _make(channels, blocks, size, sharesets):
    def factory(**kw: Any) -> RepMLPNet:
        hs = tuple(size // 4 // 2**i for i in range(4))
        cfg = dict(channels=channels, num_blocks=blocks, hs=hs, ws=hs, sharesets=sharesets)
        return RepMLPNet(**{**cfg, **kw})

    return factory


def repmlpnet_cifar(**kw: Any) -> RepMLPNet:
    """CIFAR-10 (32x32): patch 2 -> maps 16, 8, 4, 2 (one partition each), widths 32-256, 1.15M params."""
    cfg = dict(channels=(32, 64, 128, 256), num_blocks=(1, 1, 2, 1), hs=(16, 8, 4, 2), ws=(16, 8, 4, 2),
               sharesets=(1, 4, 8, 32), patch_size=2, num_classes=10)
    return RepMLPNet(**{**cfg, **kw})


def repmlpnet_imagenette(image_size: int = 128, **kw: Any) -> RepMLPNet:
    """Imagenette (crops of `image_size`, a multiple of 32): patch 4, one partition per map (32, 16, 8, 4 at
    128: 7.3M params; 56, 28, 14, 7 at 224: 31.6M), widths 48-384, S = (1, 4, 16, 32)."""
    if image_size % 32:
        raise ValueError(f"image_size must be a multiple of 32, got {image_size}")
    hs = tuple(image_size // 4 // 2**i for i in range(4))
    cfg = dict(channels=(48, 96, 192, 384), num_blocks=(2, 2, 4, 2), hs=hs, ws=hs, sharesets=(1, 4, 16, 32),
               num_classes=10)
    return RepMLPNet(**{**cfg, **kw})


def repmlpnet_tiny(**kw: Any) -> RepMLPNet:
    """Test-size model: 2 stages, partitions 4 and 2 (a 16x16 input gives 2x2 partitions per stage), k=(1,3,5)."""
    cfg = dict(channels=(8, 16), num_blocks=(1, 1), hs=(4, 2), ws=(4, 2), sharesets=(2, 4), patch_size=2,
               reparam_conv_k=(1, 3, 5), num_classes=10)
    return RepMLPNet(**{**cfg, **kw})


def macs(model: RepMLPNet, height: int, width: int | None = None) -> int:
    """Multiply-accumulates of one deploy-form forward pass (convs, FC3, FFN, GP, head; BN and elementwise
    ops not counted), the quantity behind the official "FLOPs" column (T224: 2.80e9)."""
    r, q = height // model.patch_size, (width or height) // model.patch_size
    ch = model.channels
    total = 3 * ch[0] * model.patch_size**2 * r * q
    for st, depth in enumerate(model.num_blocks):
        c, hw = ch[st], model.hs[st] * model.ws[st]
        fc3 = c * hw * (r * q)  # every pixel of every channel: one row of an hw x hw matrix
        unit = fc3 + 2 * c * 4 * c * r * q + 2 * c * (c // model.gp_reduce)
        total += depth * unit
        if st < len(model.num_blocks) - 1:
            r, q = r // 2, q // 2
            total += c * ch[st + 1] * 4 * r * q
    return total + ch[-1] * model.num_classes


# ----------------------------------------------------------------------------------------------------------
# Official PyTorch state_dict layout (`repmlpnet.py`: conv_embedding, stages.{s}.{i}..., embeds.{s}, head)


def fc3_from_torch(w: np.ndarray, sharesets: int) -> np.ndarray:
    """Grouped 1x1 conv weight [S*hw_out, hw_in, 1, 1] -> kernel [S, hw_in, hw_out]."""
    hw = w.shape[1]
    if w.ndim != 4 or w.shape[0] != sharesets * hw:
        raise ValueError(f"fc3 weight {w.shape} is not [S*hw, hw, 1, 1] with S={sharesets}")
    return np.transpose(w.reshape(sharesets, hw, hw), (0, 2, 1))


def fc3_to_torch(k: np.ndarray) -> np.ndarray:
    s, hw, _ = k.shape
    return np.transpose(k, (0, 2, 1)).reshape(s * hw, hw, 1, 1)


def torch_rules(model: RepMLPNet) -> list[tio.Rule]:
    """Official RepMLPNet key <-> repjax leaf rules (training or deploy form, per `model.deploy`)."""
    rules = tio.conv("conv_embedding.conv", ("conv_embedding", "conv")) + tio.bn("conv_embedding.bn",
                                                                                 ("conv_embedding", "bn"))
    for st, depth in enumerate(model.num_blocks):
        s = model.sharesets[st]
        for i in range(depth):
            t, f = f"stages.{st}.{i}", f"stages_{st}_{i}"
            b, fb = f"{t}.repmlp_block", (f, "repmlp_block")
            rules += tio.bn(f"{t}.prebn1", (f, "prebn1")) + tio.bn(f"{t}.prebn2", (f, "prebn2"))
            rules += tio.conv(f"{b}.gp.fc1", (*fb, "gp", "fc1"), bias=True)
            rules += tio.conv(f"{b}.gp.fc2", (*fb, "gp", "fc2"), bias=True)
            rules.append(tio.Rule(f"{b}.fc3.weight", ("params", *fb, "fc3", "kernel"),
                                  lambda w, s=s: fc3_from_torch(w, s), fc3_to_torch))
            if model.deploy:
                rules.append(tio.Rule(f"{b}.fc3.bias", ("params", *fb, "fc3", "bias"),
                                      lambda v, s=s: v.reshape(s, -1), lambda v: v.reshape(-1)))
            else:
                rules += tio.bn(f"{b}.fc3_bn", (*fb, "fc3_bn"))
                for k in model.reparam_conv_k:
                    rules += tio.conv(f"{b}.repconv{k}.conv", (*fb, f"repconv{k}", "conv"))
                    rules += tio.bn(f"{b}.repconv{k}.bn", (*fb, f"repconv{k}", "bn"))
            for fc in ("ffn_fc1", "ffn_fc2"):
                rules += tio.conv(f"{t}.ffn_block.{fc}.conv", (f, "ffn_block", fc, "conv"))
                rules += tio.bn(f"{t}.ffn_block.{fc}.bn", (f, "ffn_block", fc, "bn"))
        if st < len(model.num_blocks) - 1:
            rules += tio.conv(f"embeds.{st}.conv", (f"embeds_{st}", "conv")) + tio.bn(f"embeds.{st}.bn",
                                                                                    (f"embeds_{st}", "bn"))
    return rules + tio.bn("head_norm", ("head_norm",)) + tio.linear("head", ("head",))


def native_size(model: RepMLPNet) -> tuple[int, int]:
    """The input size at which every stage's map is one partition (what the released weights were made for)."""
    return model.hs[0] * model.patch_size, model.ws[0] * model.patch_size


def infer_model(sd: Mapping[str, Any], deploy: bool | None = None, **kw: Any) -> RepMLPNet:
    """Builds the RepMLPNet whose shapes match an official state_dict (square partitions h = w = sqrt(hw); the
    form read off the keys unless `deploy` is given)."""
    sd = tio.strip_module_prefix(sd)
    deploy = not any(".fc3_bn." in k for k in sd) if deploy is None else deploy
    if "conv_embedding.conv.weight" not in sd or "head.weight" not in sd:
        raise ValueError("not a RepMLPNet state_dict (no conv_embedding / head)")
    units: dict[int, int] = {}
    for k in sd:
        m = re.fullmatch(r"stages\.(\d+)\.(\d+)\.prebn1\.weight", k)
        if m:
            units[int(m[1])] = max(units.get(int(m[1]), 0), int(m[2]) + 1)
    stages = range(len(units))
    fc3 = [np.shape(sd[f"stages.{s}.0.repmlp_block.fc3.weight"]) for s in stages]
    hs = tuple(round(float(np.sqrt(w[1]))) for w in fc3)
    conv_key = r"stages\.0\.0\.repmlp_block\.repconv(\d+)\.conv\.weight"
    ks = sorted({int(m[1]) for k in sd if (m := re.fullmatch(conv_key, k))})
    c0 = np.shape(sd["stages.0.0.prebn1.weight"])[0]
    cfg: dict[str, Any] = dict(
        num_blocks=tuple(units[s] for s in stages), hs=hs, ws=hs, deploy=deploy,
        channels=tuple(np.shape(sd[f"stages.{s}.0.prebn1.weight"])[0] for s in stages),
        sharesets=tuple(w[0] // w[1] for w in fc3), reparam_conv_k=tuple(ks),
        gp_reduce=c0 // np.shape(sd["stages.0.0.repmlp_block.gp.fc1.weight"])[0],
        patch_size=int(np.shape(sd["conv_embedding.conv.weight"])[-1]),
        num_classes=int(np.shape(sd["head.weight"])[0]))
    return RepMLPNet(**{**cfg, **kw})


def infer(state_dict: Mapping[str, Any], model: RepMLPNet) -> RepMLPNet:
    """`model` in the form the state_dict holds (deploy without `fc3_bn`), with its number of classes."""
    sd = tio.strip_module_prefix(state_dict)
    if "head.weight" not in sd:
        raise ValueError("not a RepMLPNet state_dict: no 'head.weight'")
    return model.clone(deploy=not any(".fc3_bn." in k for k in sd), num_classes=int(np.shape(sd["head.weight"])[0]))


def from_torch(state_dict: Mapping[str, Any], model: RepMLPNet) -> dict[str, Any]:
    """Official RepMLPNet state_dict -> variables of `model` (numpy), strict (`WeightImportError` lists
    missing/unexpected keys and shape mismatches). A 'module.' prefix is stripped; `num_batches_tracked` is
    dropped."""
    return tio.from_torch_state_dict(state_dict, torch_rules(model), abstract_variables(model, *native_size(model)))


def to_torch(variables: Mapping[str, Any], model: RepMLPNet) -> dict[str, np.ndarray]:
    """repjax variables -> official state_dict (numpy; `num_batches_tracked` added for strict torch loading)."""
    return tio.to_torch_state_dict(variables, torch_rules(model))


FAMILY = Family("repmlpnet", RepMLPNet, tiny="repmlpnet_tiny", macs=macs, from_torch=from_torch, to_torch=to_torch,
                reparameterize=reparameterize, deploy=deploy, infer=infer)

for _name, _cfg in _CONFIGS.items():
    register(f"repmlpnet_{_name}", FAMILY, input_size=_cfg[2])(_make(*_cfg))
register("repmlpnet_cifar", FAMILY, input_size=32)(repmlpnet_cifar)
register("repmlpnet_imagenette", FAMILY, input_size=128)(repmlpnet_imagenette)
register("repmlpnet_tiny", FAMILY, input_size=16)(repmlpnet_tiny)
