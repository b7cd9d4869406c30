"""RepVGG (Ding et al., CVPR 2021): multi-branch training form, plain 3x3 deploy form.

Training block: ReLU(SE(BN(conv3x3 x) + BN(conv1x1 x) [+ BN(x) if in == out and stride 1])), SE only in
the D2se variant. Deploy block: ReLU(SE(conv3x3 x + b)). `reparameterize` turns eval-mode training
variables into deploy variables (paper Eq. 3-4); `from_torch` / `to_torch` speak the official PyTorch
state_dict layout (`stage1.0.rbr_dense.conv.weight`, ..., `stage1.0.rbr_reparam.weight`, `linear.weight`);
`infer` reads the form off a file; `macs` counts the deploy form (the paper's FLOPs column). All of it is the
family contract (`repjax.models.family`), registered as `FAMILY`.

Parameter tree (mirrors the official module names): `stage0`, `stage{s}_{i}` (s = 1..4), `linear`; a block
holds `rbr_dense`/`rbr_1x1` ({conv, bn}) and `rbr_identity` (a BN) in training form, or `rbr_reparam` in
deploy form, plus `se` ({down, up}) when used.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from repjax.io import torch as tio
from repjax.models import Family, abstract_variables, register
from repjax.nn.conv import Conv
from repjax.nn.layers import ConvBN, batch_norm, he_normal, torch_padding
from repjax.nn.reparam import fuse_conv_bn, identity_kernel, merge_branches

BN_EPS = 1e-5  # eps of `batch_norm` (PyTorch default)


class SEBlock(nn.Module):
    """Squeeze-excitation as in RepVGG-D2se: GAP -> 1x1 conv (C/r) -> ReLU -> 1x1 conv (C) -> sigmoid gate."""

    internal: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.relu(nn.Conv(self.internal, (1, 1), dtype=self.dtype, name="down")(s))
        s = nn.sigmoid(nn.Conv(x.shape[-1], (1, 1), dtype=self.dtype, name="up")(s))
        return x * s


class RepVGGBlock(nn.Module):
    """One RepVGG layer; `deploy` selects the multi-branch or the single-conv form."""

    features: int
    stride: int = 1
    groups: int = 1
    use_se: bool = False
    se_reduction: int = 16
    deploy: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.deploy:
            y = Conv(self.features, (3, 3), self.stride, padding=torch_padding(3), feature_group_count=self.groups,
                     dtype=self.dtype, kernel_init=he_normal, name="rbr_reparam")(x)
        else:
            branch = dict(strides=self.stride, groups=self.groups, act=None, dtype=self.dtype)
            y = ConvBN(self.features, 3, **branch, name="rbr_dense")(x, train)
            y = y + ConvBN(self.features, 1, **branch, name="rbr_1x1")(x, train)
            if x.shape[-1] == self.features and self.stride == 1:
                y = y + batch_norm(train, self.dtype, name="rbr_identity")(x)
        if self.use_se:
            y = SEBlock(self.features // self.se_reduction, self.dtype, name="se")(y)
        return nn.relu(y)


class RepVGG(nn.Module):
    """RepVGG network: stage0 (one block), stages 1-4 (first block strided), GAP, `linear` head.

    Attributes:
      num_blocks: blocks in stages 1-4.
      widths: output channels of stage0..stage4 (5 ints); see `repvgg_widths`.
      strides: stride of the first block of stage0..stage4.
      groups_map: (layer_index, groups) pairs; layers are counted from 1 at stage1's first block
        (stage0 is never grouped), as in the official `override_groups_map`.
    """

    num_blocks: Sequence[int]
    widths: Sequence[int]
    strides: Sequence[int] = (2, 2, 2, 2, 2)
    groups_map: tuple[tuple[int, int], ...] = ()
    use_se: bool = False
    se_reduction: int = 16
    num_classes: int = 1000
    deploy: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.astype(self.dtype)
        for b in block_specs(self):
            x = RepVGGBlock(b.out_ch, b.stride, b.groups, self.use_se, self.se_reduction, self.deploy, self.dtype,
                            name=b.name)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="linear")(x)
        return x.astype(jnp.float32)


class BlockSpec(NamedTuple):
    name: str  # Flax module name, e.g. 'stage2_0'
    torch_prefix: str  # official PyTorch prefix, e.g. 'stage2.0'
    in_ch: int
    out_ch: int
    stride: int
    groups: int

    @property
    def identity(self) -> bool:
        return self.in_ch == self.out_ch and self.stride == 1


def block_specs(model: RepVGG) -> list[BlockSpec]:
    """The blocks of `model` in order: stage0, then stage1..4 (layer indices 1, 2, ... for `groups_map`)."""
    groups, w = dict(model.groups_map), model.widths
    specs = [BlockSpec("stage0", "stage0", 3, w[0], model.strides[0], 1)]
    for s, depth in enumerate(model.num_blocks, start=1):
        for i in range(depth):
            specs.append(BlockSpec(f"stage{s}_{i}", f"stage{s}.{i}", w[s - 1] if i == 0 else w[s], w[s],
                                   model.strides[s] if i == 0 else 1, groups.get(len(specs), 1)))
    return specs


# ----------------------------------------------------------------------------------------------------------
# Re-parameterization (training variables -> deploy variables)


def fuse_block(params: Mapping[str, Any], stats: Mapping[str, Any], eps: float = BN_EPS) -> dict[str, jax.Array]:
    """Equivalent {'kernel', 'bias'} of one training-form block's branches (eval-mode BN).

    The identity branch's groups follow from the 3x3 kernel: groups = out_channels / kernel.shape[2].
    """

    def conv_bn(name: str) -> tuple[jax.Array, jax.Array]:
        p, s = params[name], stats[name]
        return fuse_conv_bn(p["conv"]["kernel"], None, p["bn"]["scale"], p["bn"]["bias"],
                            s["bn"]["mean"], s["bn"]["var"], eps)

    branches = [conv_bn("rbr_dense"), conv_bn("rbr_1x1")]
    if "rbr_identity" in params:
        k3 = params["rbr_dense"]["conv"]["kernel"]
        channels = k3.shape[-1]
        ident = identity_kernel(channels, k3.shape[:2], channels // k3.shape[2], k3.dtype)
        p, s = params["rbr_identity"], stats["rbr_identity"]
        branches.append(fuse_conv_bn(ident, None, p["scale"], p["bias"], s["mean"], s["var"], eps))
    kernel, bias = merge_branches(branches)
    return {"kernel": kernel, "bias": bias}


def reparameterize(variables: Mapping[str, Any], model: RepVGG | None = None) -> dict[str, Any]:
    """Training-form {'params', 'batch_stats'} -> deploy-form {'params'} (pure; jit-able; paper Eq. 3-4).

    Exact only for the model in eval mode (running statistics), never for train-mode batch statistics.
    The blocks are found in the tree itself; `model` (the contract's signature) is not needed.
    """
    params, stats = variables["params"], variables.get("batch_stats", {})
    out: dict[str, Any] = {}
    for name, p in params.items():
        if isinstance(p, Mapping) and "rbr_dense" in p:
            block = {"rbr_reparam": fuse_block(p, stats[name])}
            block.update({k: v for k, v in p.items() if k not in ("rbr_dense", "rbr_1x1", "rbr_identity")})
            out[name] = block
        else:
            out[name] = p
    return {"params": out}


def deploy(model: RepVGG) -> RepVGG:
    """The deploy form (one 3x3 conv with bias per block) of `model`."""
    return model.clone(deploy=True)


def macs(model: RepVGG, height: int, width: int | None = None) -> int:
    """Multiply-accumulates of one image in the deploy form: one 3x3 (grouped) conv per block, SE's two 1x1
    convs on the pooled vector, the head."""
    h, w, total = height, width or height, 0
    for b in block_specs(model):
        if b.stride > 1:
            h, w = (h - 1) // b.stride + 1, (w - 1) // b.stride + 1
        total += 9 * (b.in_ch // b.groups) * b.out_ch * h * w
        if model.use_se:
            total += 2 * b.out_ch * (b.out_ch // model.se_reduction)
    return total + model.widths[-1] * model.num_classes


# ----------------------------------------------------------------------------------------------------------
# Variants


def repvgg_widths(a: float, b: float) -> tuple[int, ...]:
    """Channels of stage0..4: [min(64, 64a), 64a, 128a, 256a, 512b]."""
    return (min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b))


GROUP_LAYERS = tuple(range(2, 27, 2))  # official optional_groupwise_layers: 2, 4, ..., 26
_DEPTHS = {"a": (2, 4, 14, 1), "b": (4, 6, 16, 1), "d": (8, 14, 24, 1)}
_CONFIGS: dict[str, tuple[str, float, float, int, bool]] = {  # name: (depths, a, b, groups, se)
    "a0": ("a", 0.75, 2.5, 1, False),
    "a1": ("a", 1.0, 2.5, 1, False),
    "a2": ("a", 1.5, 2.75, 1, False),
    "b0": ("b", 1.0, 2.5, 1, False),
    "b1": ("b", 2.0, 4.0, 1, False),
    "b1g2": ("b", 2.0, 4.0, 2, False),
    "b1g4": ("b", 2.0, 4.0, 4, False),
    "b2": ("b", 2.5, 5.0, 1, False),
    "b2g2": ("b", 2.5, 5.0, 2, False),
    "b2g4": ("b", 2.5, 5.0, 4, False),
    "b3": ("b", 3.0, 5.0, 1, False),
    "b3g2": ("b", 3.0, 5.0, 2, False),
    "b3g4": ("b", 3.0, 5.0, 4, False),
    "d2se": ("d", 2.5, 5.0, 1, True),
}


def _make(depths: str, a: float, b: float, groups: int, se: bool):
    def factory(**kw: Any) -> RepVGG:
        gm = tuple((layer, groups) for layer in GROUP_LAYERS) if groups > 1 else ()
        cfg = dict(num_blocks=_DEPTHS[depths], widths=repvgg_widths(a, b), groups_map=gm, use_se=se)
        return RepVGG(**{**cfg, **kw})

    return factory


def repvgg_tiny(**kw: Any) -> RepVGG:
    """CIFAR-scale RepVGG: widths 16-128, depths (1, 2, 2, 1), strides (1, 1, 2, 2, 2) so 32x32 -> 4x4;
    groups 2 on layer 3 (stride 1, with identity) and 4 on layer 4 (stride 2, channel change)."""
    cfg = dict(num_blocks=(1, 2, 2, 1), widths=(16, 16, 32, 64, 128), strides=(1, 1, 2, 2, 2),
               groups_map=((3, 2), (4, 4)), num_classes=10)
    return RepVGG(**{**cfg, **kw})


def repvgg_tiny_se(**kw: Any) -> RepVGG:
    """`repvgg_tiny` with SE blocks (reduction 4, since the widths are small)."""
    kw.setdefault("use_se", True)
    kw.setdefault("se_reduction", 4)
    return repvgg_tiny(**kw)


# ----------------------------------------------------------------------------------------------------------
# Official PyTorch state_dict layout

def torch_rules(model: RepVGG) -> list[tio.Rule]:
    """Official RepVGG key <-> repjax leaf rules for `model` (training or deploy form, per `model.deploy`)."""
    rules: list[tio.Rule] = []
    for b in block_specs(model):
        t, f = b.torch_prefix, b.name
        if model.deploy:
            rules += tio.conv(f"{t}.rbr_reparam", (f, "rbr_reparam"), bias=True)
        else:
            for br in ("rbr_dense", "rbr_1x1"):
                rules += tio.conv(f"{t}.{br}.conv", (f, br, "conv")) + tio.bn(f"{t}.{br}.bn", (f, br, "bn"))
            if b.identity:
                rules += tio.bn(f"{t}.rbr_identity", (f, "rbr_identity"))
        if model.use_se:
            rules += tio.conv(f"{t}.se.down", (f, "se", "down"), bias=True)
            rules += tio.conv(f"{t}.se.up", (f, "se", "up"), bias=True)
    return rules + tio.linear("linear", ("linear",))


def to_torch(variables: Mapping[str, Any], model: RepVGG) -> dict[str, np.ndarray]:
    """repjax variables of `model` (training or deploy form) -> official RepVGG state_dict (numpy arrays, with
    `num_batches_tracked` per BN so that PyTorch's strict `load_state_dict` accepts it)."""
    return tio.to_torch_state_dict(variables, torch_rules(model))


def is_deploy_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether an official state_dict holds the deploy form (`rbr_reparam` convs)."""
    return any(".rbr_reparam." in f".{k}" for k in state_dict)


def infer_model(state_dict: Mapping[str, Any], deploy: bool | None = None, **kw: Any) -> RepVGG:
    """Builds the RepVGG whose parameter shapes match an official state_dict (form read off the keys unless
    `deploy` is given).

    Strides are not stored: a stage's first block gets stride 1 if it has an identity branch (training form),
    else 2; override through `kw` (e.g. `strides=` for a deploy-form CIFAR model)."""
    state_dict = tio.strip_module_prefix(state_dict)
    deploy = is_deploy_state_dict(state_dict) if deploy is None else deploy
    conv = "rbr_reparam" if deploy else "rbr_dense.conv"
    blocks = {}
    for k, v in state_dict.items():
        m = re.fullmatch(rf"stage(\d)(?:\.(\d+))?\.{re.escape(conv)}\.weight", k)
        if m:
            blocks[(int(m[1]), int(m[2] or 0))] = tuple(np.shape(v))
    if (0, 0) not in blocks or "linear.weight" not in state_dict:
        raise ValueError(f"not a {'deploy' if deploy else 'training'}-form RepVGG state_dict (no stage0 / linear)")
    depths = tuple(sum(1 for s, _ in blocks if s == st) for st in range(1, 5))
    widths, groups, layer, c_in = [blocks[(0, 0)][0]], [], 1, blocks[(0, 0)][0]
    for s, d in enumerate(depths, start=1):
        for i in range(d):
            if (s, i) not in blocks:
                raise ValueError(f"state_dict has no block stage{s}.{i}")
            c_out, c_in_g = blocks[(s, i)][:2]
            if c_in // c_in_g > 1:
                groups.append((layer, c_in // c_in_g))
            c_in, layer = c_out, layer + 1
        widths.append(c_in)
    firsts = ["stage0", *(f"stage{s}.0" for s in range(1, 5))]
    strides = tuple(1 if f"{b}.rbr_identity.weight" in state_dict else 2 for b in firsts)
    cfg: dict[str, Any] = dict(num_blocks=depths, widths=tuple(widths), strides=strides, groups_map=tuple(groups),
                               deploy=deploy, num_classes=int(np.shape(state_dict["linear.weight"])[0]))
    if "stage0.se.down.weight" in state_dict:
        cfg.update(use_se=True, se_reduction=widths[0] // int(np.shape(state_dict["stage0.se.down.weight"])[0]))
    return RepVGG(**{**cfg, **kw})


def infer(state_dict: Mapping[str, Any], model: RepVGG) -> RepVGG:
    """`model` in the form the state_dict holds, with its number of classes (the architecture stays)."""
    state_dict = tio.strip_module_prefix(state_dict)
    if "linear.weight" not in state_dict:
        raise ValueError("not a RepVGG state_dict: no 'linear.weight'")
    return model.clone(deploy=is_deploy_state_dict(state_dict),
                       num_classes=int(np.shape(state_dict["linear.weight"])[0]))


def from_torch(state_dict: Mapping[str, Any], model: RepVGG) -> dict[str, Any]:
    """Official RepVGG state_dict (training keys `stage1.0.rbr_dense.conv.weight`, ... or deploy keys
    `stage1.0.rbr_reparam.weight`, as `model.deploy` says) -> repjax variables ({'params', 'batch_stats'}, or
    {'params'} if deploy; numpy).

    Strict (`repjax.io.torch.from_torch_state_dict`): raises `WeightImportError` (a ValueError) listing missing
    and unexpected keys and shape mismatches against `model` (`infer` / `infer_model` build one from the file).
    A 'module.' prefix on every key (DataParallel) is stripped; `num_batches_tracked` entries are dropped.
    """
    return tio.from_torch_state_dict(state_dict, torch_rules(model), abstract_variables(model, 32))


FAMILY = Family("repvgg", RepVGG, tiny="repvgg_tiny", macs=macs, from_torch=from_torch, to_torch=to_torch,
                reparameterize=reparameterize, deploy=deploy, infer=infer)

for _name, _cfg in _CONFIGS.items():
    register(f"repvgg_{_name}", FAMILY, input_size=224)(_make(*_cfg))
register("repvgg_tiny", FAMILY, input_size=32)(repvgg_tiny)
register("repvgg_tiny_se", FAMILY, input_size=32)(repvgg_tiny_se)
