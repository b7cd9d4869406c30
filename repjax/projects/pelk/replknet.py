"""RepLKNet (Ding et al., CVPR 2022): large depthwise kernels with a parallel small-kernel re-param branch.

Structure (paper Fig. 4 / Sec. 4): stem conv3x3/2 -> DW3x3 -> 1x1 -> DW3x3/2 (each conv-BN-ReLU); four
stages of units [RepLK block, ConvFFN]; transitions 1x1 conv-BN-ReLU -> DW3x3/2 conv-BN-ReLU; head
BN -> GAP -> Linear.
    RepLK block: x + DropPath(pw2(ReLU(LK(pw1(BN(x)))))), pw1 = 1x1 conv-BN-ReLU (C -> dw_ratio C),
                 LK = (k x k DW conv -> BN) + (5x5 DW conv -> BN), pw2 = 1x1 conv-BN (no act).
    ConvFFN:     x + DropPath(pw2(GELU(pw1(BN(x))))), pw1/pw2 = 1x1 conv-BN (C -> 4C -> C).
Switches: `small_kernel` (5; None drops the branch), `lk_act` (ReLU after the LK, the official
`lk_nonlinear`), `stem_stride2` (False for 32x32 inputs: the stem's last DW conv has stride 1).
`reparameterize(variables, model)` merges every LK + 5x5 pair (with their BNs) into one k x k kernel with
bias (the other conv-BN pairs stay, as in the official deploy form). `features=True` returns the 4 stage
outputs. Family `replknet` (`repjax.models.family`): `from_torch` / `to_torch` / `infer` read and write the
official DingXiaoH/RepLKNet-pytorch state_dict in both forms (`lkb_origin` + `small_conv`, or `lkb_reparam`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from repjax.io import torch as tio
from repjax.models import Family, abstract_variables, register
from repjax.nn.activations import gelu
from repjax.nn.layers import ConvBN, batch_norm
from repjax.projects.pelk import lk_mixers as lkm
from repjax.projects.pelk.lk_convnext import drop_path, odd

Dtype = Any


class RepLKBlock(nn.Module):
    dw_channels: int
    kernel_size: int
    small_kernel: int | None = 5
    lk_act: bool = True
    drop_path: float = 0.0
    deploy: bool = False
    dwconv_method: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = batch_norm(train, self.dtype, name="prelkb_bn")(x)
        y = ConvBN(self.dw_channels, 1, dtype=self.dtype, name="pw1")(y, train)
        y = lkm.DenseMixer(self.kernel_size, self.small_kernel, True, self.deploy, self.dwconv_method, self.dtype,
                           name="large_kernel")(y, train)
        y = nn.relu(y) if self.lk_act else y
        y = ConvBN(x.shape[-1], 1, act=None, dtype=self.dtype, name="pw2")(y, train)
        return x + drop_path(self, y, self.drop_path, train)


class ConvFFN(nn.Module):
    ratio: int = 4
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        y = batch_norm(train, self.dtype, name="preffn_bn")(x)
        y = ConvBN(self.ratio * c, 1, act=None, dtype=self.dtype, name="pw1")(y, train)
        y = ConvBN(c, 1, act=None, dtype=self.dtype, name="pw2")(gelu(y), train)
        return x + drop_path(self, y, self.drop_path, train)


class RepLKNet(nn.Module):
    depths: Sequence[int] = (2, 2, 18, 2)
    channels: Sequence[int] = (128, 256, 512, 1024)
    kernel_sizes: Sequence[int] = (31, 29, 27, 13)
    small_kernel: int | None = 5
    dw_ratio: int = 1
    ffn_ratio: int = 4
    lk_act: bool = True
    stem_stride2: bool = True
    drop_path_rate: float = 0.0
    num_classes: int = 1000
    deploy: bool = False
    dwconv_method: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, features: bool = False) -> jax.Array | list[jax.Array]:
        c0, dt = self.channels[0], self.dtype
        x = ConvBN(c0, 3, 2, dtype=dt, name="stem_0")(x.astype(dt), train)
        x = ConvBN(c0, 3, 1, groups=c0, dtype=dt, name="stem_1")(x, train)
        x = ConvBN(c0, 1, dtype=dt, name="stem_2")(x, train)
        x = ConvBN(c0, 3, 2 if self.stem_stride2 else 1, groups=c0, dtype=dt, name="stem_3")(x, train)
        n, feats, unit = sum(self.depths), [], 0
        for st, depth in enumerate(self.depths):
            c = self.channels[st]
            if st:
                x = ConvBN(c, 1, dtype=dt, name=f"transition_{st}_0")(x, train)
                x = ConvBN(c, 3, 2, groups=c, dtype=dt, name=f"transition_{st}_1")(x, train)
            for i in range(depth):
                rate = self.drop_path_rate * unit / max(1, n - 1)
                x = RepLKBlock(self.dw_ratio * c, self.kernel_sizes[st], self.small_kernel, self.lk_act, rate,
                               self.deploy, self.dwconv_method, dt, name=f"stages_{st}_{2 * i}")(x, train)
                x = ConvFFN(self.ffn_ratio, rate, dt, name=f"stages_{st}_{2 * i + 1}")(x, train)
                unit += 1
            feats.append(x)
        if features:
            return [f.astype(jnp.float32) for f in feats]
        x = jnp.mean(batch_norm(train, dt, name="norm")(x), axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=dt, name="head")(x).astype(jnp.float32)


def deploy(model: RepLKNet) -> RepLKNet:
    """The deploy-form module of `model`: every large kernel merged (`large_kernel/reparam`)."""
    return model.clone(deploy=True)


def reparameterize(variables: Mapping[str, Any], model: RepLKNet, eps: float = 1e-5) -> dict[str, Any]:
    """Training-form variables -> those of `deploy(model)`: each `large_kernel` (LK -> BN + 5x5 -> BN) becomes
    {'reparam': {kernel, bias}} (RepVGG Eq. 3-4, zero-padded small kernel); exact in eval mode only. The
    other BNs stay (official deploy form), so both collections are returned. `model` is unused."""
    del model
    params, stats = dict(variables["params"]), dict(variables.get("batch_stats", {}))
    for name, blk in variables["params"].items():
        if isinstance(blk, Mapping) and "large_kernel" in blk:
            fused = lkm.fuse_dense(blk["large_kernel"], stats[name]["large_kernel"], eps)
            params[name] = {**blk, "large_kernel": fused}
            stats[name] = {k: v for k, v in stats[name].items() if k != "large_kernel"}
    return {"params": params, "batch_stats": stats}


def macs(model: RepLKNet, height: int, width: int | None = None, branches: bool = False) -> int:
    """Multiply-accumulates of one image's forward pass (convs, linears; BN/elementwise not counted) in the
    deploy form (one k x k kernel per large kernel: the contract's convention, and the paper's 15.3G for 31B);
    `branches=True` counts a training-form model's k x k and 5x5 branches separately."""
    ch, s = model.channels, (model.small_kernel or 0) if branches and not model.deploy else 0
    h, w = height // 2, (width or height) // 2
    total = (27 * ch[0] + 9 * ch[0] + ch[0] ** 2) * h * w
    if model.stem_stride2:
        h, w = h // 2, w // 2
    total += 9 * ch[0] * h * w
    for st, depth in enumerate(model.depths):
        c, dw, k = ch[st], model.dw_ratio * ch[st], model.kernel_sizes[st]
        if st:
            total += ch[st - 1] * c * h * w
            h, w = h // 2, w // 2
            total += 9 * c * h * w
        block = (2 * c * dw + (k * k + min(s, k) ** 2) * dw) * h * w
        ffn = 2 * model.ffn_ratio * c * c * h * w
        total += depth * (block + ffn)
    return total + ch[-1] * model.num_classes


# ---------------------------------------------------------------------------------------------- PyTorch
# Official layout (DingXiaoH/RepLKNet-pytorch `replknet.py`; conv_bn = Sequential{conv (no bias), bn}):
#   stem.{0..3}.{conv,bn}; stages.s.blocks.{2i}: RepLK block {prelkb_bn, pw1, pw2, large_kernel.{lkb_origin,
#   small_conv} | large_kernel.lkb_reparam {weight, bias}}; stages.s.blocks.{2i+1}: ConvFFN {preffn_bn, pw1,
#   pw2}; transitions.{s-1}.{0,1}.{conv,bn} (before stage s); norm (BN); head (Linear). The downstream-only
#   `stages.s.norm` (norm_intermediate_features) is not part of this model and is reported as unexpected.


def _conv_bn(prefix: str, path: tio.Path) -> list[tio.Rule]:
    return tio.conv(f"{prefix}.conv", (*path, "conv")) + tio.bn(f"{prefix}.bn", (*path, "bn"))


def torch_rules(model: RepLKNet) -> list[tio.Rule]:
    """Official key <-> leaf rules of `model` (training or deploy form, per `model.deploy`)."""
    rules = [r for j in range(4) for r in _conv_bn(f"stem.{j}", (f"stem_{j}",))]
    for st, depth in enumerate(model.depths):
        if st:
            rules += [r for j in range(2) for r in _conv_bn(f"transitions.{st - 1}.{j}", (f"transition_{st}_{j}",))]
        for i in range(2 * depth):
            t, f = f"stages.{st}.blocks.{i}", f"stages_{st}_{i}"
            rules += tio.bn(f"{t}.{'preffn_bn' if i % 2 else 'prelkb_bn'}", (f, "preffn_bn" if i % 2 else "prelkb_bn"))
            rules += _conv_bn(f"{t}.pw1", (f, "pw1")) + _conv_bn(f"{t}.pw2", (f, "pw2"))
            if i % 2:
                continue
            lk, path = f"{t}.large_kernel", (f, "large_kernel")
            if model.deploy:
                rules += tio.conv(f"{lk}.lkb_reparam", (*path, "reparam"), bias=True)
                continue
            rules += tio.conv(f"{lk}.lkb_origin.conv", (*path, "lk")) + tio.bn(f"{lk}.lkb_origin.bn", (*path, "lk_bn"))
            if model.small_kernel:
                rules += tio.conv(f"{lk}.small_conv.conv", (*path, "small"))
                rules += tio.bn(f"{lk}.small_conv.bn", (*path, "small_bn"))
    return rules + tio.bn("norm", ("norm",)) + tio.linear("head", ("head",))


def detect_form(state_dict: Mapping[str, Any]) -> str:
    """'train' (`lkb_origin`) or 'deploy' (`lkb_reparam`) of an official RepLKNet state_dict; a clear error
    for anything else."""
    lk = [k for k in state_dict if k.startswith("stages.0.blocks.0.large_kernel.")]
    if "stem.0.conv.weight" in state_dict and lk:
        if any(".lkb_origin." in k for k in lk):
            return "train"
        if any(".lkb_reparam." in k for k in lk):
            return "deploy"
    raise ValueError("not an official RepLKNet state_dict (stem.0.conv, stages.0.blocks.0.large_kernel."
                     f"{{lkb_origin,lkb_reparam}}); first keys: {sorted(state_dict)[:6]}")


def infer(state_dict: Mapping[str, Any], model: RepLKNet) -> RepLKNet:
    """`model` in the form `state_dict` holds (training: lkb_origin + small_conv; deploy: lkb_reparam) with
    its head's number of classes; the architecture stays `model`'s (the strict import lists any difference)."""
    classes = {"num_classes": int(np.shape(state_dict["head.weight"])[0])} if "head.weight" in state_dict else {}
    return model.clone(deploy=detect_form(state_dict) == "deploy", **classes)


def from_torch(state_dict: Mapping[str, Any], model: RepLKNet) -> dict[str, Any]:
    """Official RepLKNet state_dict -> `model`'s variables, strictly (`WeightImportError` lists missing,
    unexpected and mis-shaped keys; `num_batches_tracked` dropped). `model` must be in the state_dict's form
    (`infer(state_dict, model)` gives it)."""
    sd = tio.numpy_state_dict(state_dict)
    if (detect_form(sd) == "deploy") != model.deploy:
        raise ValueError(f"model.deploy={model.deploy} but the state_dict is in the other form: use "
                         "infer(state_dict, model)")
    target = abstract_variables(model, 32)
    return jax.tree.map(jnp.asarray, tio.from_torch_state_dict(sd, torch_rules(model), target))


def to_torch(variables: Mapping[str, Any], model: RepLKNet) -> dict[str, np.ndarray]:
    """`model`'s variables -> the official state_dict (numpy; `num_batches_tracked` added for strict loading)."""
    return tio.to_torch_state_dict(variables, torch_rules(model))  # with num_batches_tracked


FAMILY = Family("replknet", RepLKNet, tiny="replknet_test", macs=macs, from_torch=from_torch, to_torch=to_torch,
                reparameterize=reparameterize, deploy=deploy, infer=infer)


@register("replknet_31b", FAMILY, input_size=224)
def replknet_31b(**kw: Any) -> RepLKNet:
    """RepLKNet-31B: depths 2-2-18-2, channels 128-1024, kernels 31-29-27-13 (paper: 79M, 15.3G @224)."""
    return RepLKNet(**kw)


@register("replknet_31l", FAMILY, input_size=384)
def replknet_31l(**kw: Any) -> RepLKNet:
    """RepLKNet-31L: channels 192-1536 (paper: 172M, 96.0G @384)."""
    return RepLKNet(**{"channels": (192, 384, 768, 1536), **kw})


def _small(map_size: int, stem_stride2: bool, depths, channels, kw: dict[str, Any]) -> RepLKNet:
    kernels = tuple(odd(k * map_size / 56) for k in (31, 29, 27, 13))
    cfg = dict(depths=depths, channels=channels, kernel_sizes=kernels, stem_stride2=stem_stride2, num_classes=10)
    return RepLKNet(**{**cfg, **kw})


@register("replknet_cifar", FAMILY, input_size=32)
def replknet_cifar(**kw: Any) -> RepLKNet:
    """CIFAR-10 (32x32): stem stride 2 (maps 16, 8, 4, 2), channels 32-256, depths 1-1-3-1, kernels 9-9-7-3."""
    return _small(16, False, (1, 1, 3, 1), (32, 64, 128, 256), kw)


@register("replknet_imagenette", FAMILY, input_size=64)
def replknet_imagenette(image_size: int = 64, **kw: Any) -> RepLKNet:
    """Imagenette at `image_size` (multiple of 32): stem stride 4, channels 48-384, depths 2-2-4-2, kernels
    scaled to the first map (64 px: 9-9-7-3; 96: 13-13-11-5)."""
    if image_size % 32:
        raise ValueError(f"image_size must be a multiple of 32, got {image_size}")
    return _small(image_size // 4, True, (2, 2, 4, 2), (48, 96, 192, 384), kw)


@register("replknet_test", FAMILY, input_size=32)
def replknet_test(**kw: Any) -> RepLKNet:
    """Test size (the family's `tiny`): 32x32, stem stride 2 (maps 16-2), channels 8-16-16-24, depths 1-1-1-1,
    kernels 9-7-7-5 (small kernel 5 <= every kernel, as the official code asserts), 10 classes."""
    cfg = dict(depths=(1, 1, 1, 1), channels=(8, 16, 16, 24), kernel_sizes=(9, 7, 7, 5), stem_stride2=False,
               num_classes=10)
    return RepLKNet(**{**cfg, **kw})
