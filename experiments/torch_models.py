"""PyTorch references of the repjax model families, built from a repjax module's own fields, for timing.

    net = build(models.create("repvgg_a0"))     # same architecture, NCHW, PyTorch default init

Each builder reads the fields of the repjax Flax module (depths, widths, kernel sizes, ...) so that the two
frameworks time the same network; `experiments/bench_models.py` checks that both have the same parameter
count (a cheap structural check: a missing branch or a wrong width changes it). Layouts follow what a
PyTorch user would write (the official code where one exists): NCHW convolutions, ConvNeXt blocks permute to
channels-last for LayerNorm/Linear as the official ConvNeXt does. Not for weight import (no key mapping);
ResNet-20 is `experiments/torch_reference.py` (which does map keys). No repjax import here beyond the module
fields: this file must run where only torch is installed too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int | tuple[int, int], stride: int = 1, groups: int = 1) -> nn.Sequential:
    kh, kw = (k, k) if isinstance(k, int) else k
    return nn.Sequential(nn.Conv2d(cin, cout, (kh, kw), stride, (kh // 2, kw // 2), groups=groups, bias=False),
                         nn.BatchNorm2d(cout))


# ------------------------------------------------------------------------------------------------- RepVGG


class RepVGGBlock(nn.Module):
    """Training form BN(conv3x3) + BN(conv1x1) [+ BN(x)] -> ReLU, or deploy form conv3x3 (bias) -> ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int, deploy: bool):
        super().__init__()
        self.deploy = deploy
        if deploy:
            self.rbr_reparam = nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=True)
            return
        self.rbr_dense = conv_bn(cin, cout, 3, stride, groups)
        self.rbr_1x1 = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, groups=groups, bias=False),
                                     nn.BatchNorm2d(cout))
        self.rbr_identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return F.relu(self.rbr_reparam(x))
        y = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            y = y + self.rbr_identity(x)
        return F.relu(y)


class PlainBlock(nn.Module):
    """RepOpt-VGG target block: conv3x3 (no bias) -> BN -> ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class VGGNet(nn.Module):
    def __init__(self, blocks: list[nn.Module], width: int, num_classes: int):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.linear = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.blocks(x).mean(dim=(2, 3)))


def repvgg(m: Any) -> VGGNet:
    """RepVGG (repjax.projects.repopt.repvgg.RepVGG fields; SE not supported)."""
    if m.use_se:
        raise ValueError("torch reference: RepVGG with SE is not implemented")
    from repjax.projects.repopt.repvgg import block_specs

    blocks = [RepVGGBlock(b.in_ch, b.out_ch, b.stride, b.groups, m.deploy) for b in block_specs(m)]
    return VGGNet(blocks, m.widths[-1], m.num_classes)


def repopt_target(m: Any) -> VGGNet:
    """RepOpt-VGG in 'target' mode (conv-BN-ReLU blocks)."""
    if m.mode != "target":
        raise ValueError(f"torch reference: RepOpt-VGG mode {m.mode!r} not implemented (only 'target')")
    from repjax.projects.repopt.repopt_vgg import block_specs

    specs = block_specs(m.num_blocks, m.widths, m.strides)
    return VGGNet([PlainBlock(b.in_ch, b.out_ch, b.stride) for b in specs], m.widths[-1], m.num_classes)


# ---------------------------------------------------------------------------------------- ConvNeXt family


class StripeMixer(nn.Module):
    def __init__(self, c: int, k: int, s: int):
        super().__init__()
        self.h, self.w, self.small = conv_bn(c, c, (k, s), groups=c), conv_bn(c, c, (s, k), groups=c), \
            conv_bn(c, c, s, groups=c)

    def forward(self, x: torch.Tensor, pe: torch.Tensor | None) -> torch.Tensor:
        return self.h(x) + self.w(x) + self.small(x)


class DenseMixer(nn.Module):
    """ConvNeXt's depthwise conv with bias, or (use_bn) k x k -> BN (+ small -> BN)."""

    def __init__(self, c: int, k: int, small: int | None, use_bn: bool):
        super().__init__()
        self.use_bn = use_bn
        if not use_bn:
            self.lk = nn.Conv2d(c, c, k, 1, k // 2, groups=c, bias=True)
            return
        self.lk = conv_bn(c, c, k, groups=c)
        self.small = conv_bn(c, c, min(small, k), groups=c) if small else None

    def forward(self, x: torch.Tensor, pe: torch.Tensor | None) -> torch.Tensor:
        y = self.lk(x)
        return y + self.small(x) if self.use_bn and self.small is not None else y


class PeripheralMixer(nn.Module):
    """PeLK partial peripheral conv: theta expanded over the sharing grid (Eq. 1) -> conv (+ PE, 'valid_taps'
    semantics: corr(ones, w * h)) -> BN, + small conv (+ PE centre) -> BN, on the first g channels."""

    def __init__(self, c: int, g: int, grid: tuple[int, ...], small: int | None, pe_mode: str):
        super().__init__()
        kp, self.k, self.g = len(grid), sum(grid), g
        self.register_buffer("reps", torch.tensor(grid), persistent=False)
        self.theta = nn.Parameter(torch.randn(g, 1, kp, kp) * 0.02)
        self.lk_bn = nn.BatchNorm2d(g)
        self.small = nn.Conv2d(g, g, small, 1, small // 2, groups=g, bias=False) if small else None
        self.small_bn = nn.BatchNorm2d(g) if small else None
        if pe_mode != "valid_taps":
            raise ValueError(f"torch reference: pe_mode {pe_mode!r} not implemented")

    def _pe(self, w: torch.Tensor, pe: torch.Tensor | None, hw: tuple[int, int]) -> torch.Tensor | float:
        if pe is None:
            return 0.0
        k = w.shape[-1]
        lo = pe.shape[-1] // 2 - k // 2
        wh = w * pe[:, None, lo:lo + k, lo:lo + k]
        ones = torch.ones(1, self.g, *hw, dtype=w.dtype)
        return F.conv2d(ones, wh, padding=k // 2, groups=self.g)

    def forward(self, x: torch.Tensor, pe: torch.Tensor | None) -> torch.Tensor:
        xg, rest = x[:, :self.g], x[:, self.g:]
        hw = tuple(x.shape[-2:])
        w = self.theta.repeat_interleave(self.reps, dim=2, output_size=self.k).repeat_interleave(
            self.reps, dim=3, output_size=self.k)
        y = self.lk_bn(F.conv2d(xg, w, padding=self.k // 2, groups=self.g) + self._pe(w, pe, hw))
        if self.small is not None:
            y = y + self.small_bn(self.small(xg) + self._pe(self.small.weight, pe, hw))
        return torch.cat([y, rest], dim=1)


class LKBlock(nn.Module):
    """mixer (NCHW) -> permute -> LN -> Linear 4C -> GELU -> Linear C -> gamma -> permute -> + x (ConvNeXt)."""

    def __init__(self, c: int, mixer: nn.Module, layer_scale: float):
        super().__init__()
        self.mixer, self.norm = mixer, nn.LayerNorm(c, eps=1e-6)
        self.pwconv1, self.pwconv2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), layer_scale)) if layer_scale > 0 else None

    def forward(self, x: torch.Tensor, pe: torch.Tensor | None) -> torch.Tensor:
        y = self.mixer(x, pe).permute(0, 2, 3, 1)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = y * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ChannelsFirstLN(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class LKConvNeXt(nn.Module):
    def __init__(self, m: Any):
        super().__init__()
        from repjax.projects.pelk import peripheral as pk

        if m.deploy:
            raise ValueError("torch reference: LKConvNeXt deploy form not implemented")
        dims = list(m.dims)
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], m.patch_size, m.patch_size), ChannelsFirstLN(dims[0], 1e-6))
        self.down = nn.ModuleList([nn.Sequential(ChannelsFirstLN(dims[i - 1], 1e-6),
                                                 nn.Conv2d(dims[i - 1], dims[i], 2, 2)) for i in range(1, len(dims))])
        self.stages, self.pes = nn.ModuleList(), nn.ParameterList()
        for st, depth in enumerate(m.depths):
            kw, c = m.mixer_kw(st), dims[st]
            blocks = []
            for _ in range(depth):
                if m.mixer == "dense":
                    mixer: nn.Module = DenseMixer(c, kw["kernel_size"], kw["small_kernel"], kw["use_bn"])
                elif m.mixer == "stripe":
                    mixer = StripeMixer(c, kw["kernel_size"], kw["small_kernel"])
                else:
                    g = pk.partial_channels(c, m.partial_ratio, m.rounding)
                    grid = pk.sharing_grid(kw["kernel_size"], kw["r_c"], kw["m"], kw["merge_degenerate"])
                    mixer = PeripheralMixer(c, g, grid, kw["small_kernel"], kw["pe_mode"])
                blocks.append(LKBlock(c, mixer, m.layer_scale_init))
            self.stages.append(nn.ModuleList(blocks))
            if m.mixer == "peripheral" and m.pe_mode is not None:
                k, g = kw["kernel_size"], pk.partial_channels(c, m.partial_ratio, m.rounding)
                self.pes.append(nn.Parameter(torch.randn(g, k, k) * 0.02))
        self.norm, self.head = nn.LayerNorm(dims[-1], eps=1e-6), nn.Linear(dims[-1], m.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for st, blocks in enumerate(self.stages):
            if st:
                x = self.down[st - 1](x)
            pe = self.pes[st] if len(self.pes) else None
            for b in blocks:
                x = b(x, pe)
        return self.head(self.norm(x.mean(dim=(2, 3))))


# ---------------------------------------------------------------------------------------------- RepMLPNet


class RepMLPBlock(nn.Module):
    """GP gate * (BN_S(FC3(parts)) + sum_k BN_S(dwconv_k(parts))), partitions h x w, share-set c mod S."""

    def __init__(self, c: int, h: int, w: int, s: int, ks: tuple[int, ...], gp_reduce: int, deploy: bool):
        super().__init__()
        self.h, self.w, self.s, self.deploy = h, w, s, deploy
        self.fc1, self.fc2 = nn.Conv2d(c, c // gp_reduce, 1), nn.Conv2d(c // gp_reduce, c, 1)
        bound = 1.0 / math.sqrt(h * w)
        self.fc3 = nn.Parameter(torch.empty(s, h * w, h * w).uniform_(-bound, bound))
        self.fc3_bias = nn.Parameter(torch.zeros(s, h * w, 1)) if deploy else None
        self.fc3_bn = None if deploy else nn.BatchNorm2d(s)
        self.repconv = nn.ModuleList([] if deploy else [conv_bn(s, s, k, groups=s) for k in ks])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = x.shape
        h, w, s = self.h, self.w, self.s
        hp, wp, g = hh // h, ww // w, c // s
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))
        parts = x.reshape(n, g, s, hp, h, wp, w).permute(0, 3, 5, 1, 2, 4, 6).reshape(-1, s, h, w)
        y = torch.einsum("bsp,spq->bsq", parts.reshape(-1, s, h * w), self.fc3)
        if self.deploy:
            y = (y + self.fc3_bias).reshape(-1, s, h, w)
        else:
            y = self.fc3_bn(y.reshape(-1, s, h, w))
            for conv in self.repconv:
                y = y + conv(parts)
        y = y.reshape(n, hp, wp, g, s, h, w).permute(0, 3, 4, 1, 5, 2, 6).reshape(n, c, hh, ww)
        return y * gate


class RepMLPUnit(nn.Module):
    def __init__(self, c: int, block: RepMLPBlock):
        super().__init__()
        self.prebn1, self.block, self.prebn2 = nn.BatchNorm2d(c), block, nn.BatchNorm2d(c)
        self.ffn1 = nn.Sequential(nn.Conv2d(c, 4 * c, 1, bias=False), nn.BatchNorm2d(4 * c))
        self.ffn2 = nn.Sequential(nn.Conv2d(4 * c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.block(self.prebn1(x))
        return y + self.ffn2(F.gelu(self.ffn1(self.prebn2(y))))


def _embed(cin: int, cout: int, patch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, patch, patch, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class RepMLPNet(nn.Module):
    def __init__(self, m: Any):
        super().__init__()
        ch = list(m.channels)
        layers: list[nn.Module] = [_embed(3, ch[0], m.patch_size)]
        for st, depth in enumerate(m.num_blocks):
            for _ in range(depth):
                block = RepMLPBlock(ch[st], m.hs[st], m.ws[st], m.sharesets[st], tuple(m.reparam_conv_k),
                                    m.gp_reduce, m.deploy)
                layers.append(RepMLPUnit(ch[st], block))
            if st < len(m.num_blocks) - 1:
                layers.append(_embed(ch[st], ch[st + 1], 2))
        self.body, self.head_norm = nn.Sequential(*layers), nn.BatchNorm2d(ch[-1])
        self.head = nn.Linear(ch[-1], m.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_norm(self.body(x)).mean(dim=(2, 3)))


# ---------------------------------------------------------------------------------------------- ResNet


def resnet_cifar(m: Any) -> nn.Module:
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from torch_reference import ResNetCifar

    return ResNetCifar(m.depth, m.num_classes, m.width)


# ---------------------------------------------------------------------------------------------- ViT


class ViT(nn.Module):
    """The plain ViT of `repjax.models.vit.ViT` (class token with a learned position, pre-norm blocks, exact GELU,
    final LayerNorm, CLS head) from PyTorch's own pre-norm `TransformerEncoderLayer` (its fused q/k/v
    projection has the parameters of repjax's `qkv`); timm does not import here without torchvision."""

    def __init__(self, m: Any):
        super().__init__()
        if m.pool != "cls" or m.posemb != "learn" or not m.posemb_cls or m.petl is not None:
            raise ValueError("the PyTorch ViT reference covers the plain CLS / learned-position ViT only")
        d, grid = m.width, m.image_size // m.patch_size
        self.patch_embed = nn.Conv2d(3, d, m.patch_size, m.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, d))
        layer = nn.TransformerEncoderLayer(d, m.num_heads, m.mlp_dim or 4 * d, dropout=0.0, activation="gelu",
                                           layer_norm_eps=m.ln_eps, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, m.depth, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(d, eps=m.ln_eps), nn.Linear(d, m.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(t))[:, 0])


# ---------------------------------------------------------------------------------------------- dispatch

BUILDERS: dict[str, Callable[[Any], nn.Module]] = {
    "RepVGG": repvgg,
    "RepOptVGG": repopt_target,
    "LKConvNeXt": LKConvNeXt,
    "RepMLPNet": RepMLPNet,
    "ViT": ViT,
}


def build(model: Any) -> nn.Module:
    """The PyTorch reference of a repjax Flax module (by its class name), in training mode."""
    name = type(model).__name__
    if name in BUILDERS:
        return BUILDERS[name](model).train()
    if name.startswith("ResNet"):
        return resnet_cifar(model).train()
    raise ValueError(f"no PyTorch reference for repjax module {name!r}; known: {sorted(BUILDERS)} and ResNet*")


def param_count(net: nn.Module) -> int:
    return int(sum(p.numel() for p in net.parameters()))


def numpy_batch(batch: int, size: int, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, 3, size, size)).astype(np.float32),
            rng.integers(0, num_classes, batch).astype(np.int64))
