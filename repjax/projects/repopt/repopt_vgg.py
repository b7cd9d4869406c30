"""RepOpt-VGG (Ding et al., ICLR 2023): a plain VGG trained with RepOptimizers, and its search/CSLA forms.

Modes (same depths, widths and strides; one BN per block in all of them):
- `'hs'` (Hyper-Search) and `'csla'`: LinearAddBlock `ReLU(BN(s*conv3x3 x + t*conv1x1 x [+ d*x]))` with
  per-output-channel scales `scale_conv` (s), `scale_1x1` (t) and `scale_identity` (d; only when in == out
  and stride 1). In `'hs'` all are trained; in `'csla'` s and t are constants (gradient stopped here; freeze
  them in the optimizer with `hs_rules(csla=True)`) and d is trained.
- `'target'`: `ReLU(BN(conv3x3 x))`, trained with RepOpt-SGD (`repjax.projects.repopt.grad_mult`, which holds
  all of RepOpt's optimizer rules). With `init_scales` (a scale file, `repjax.projects.repopt.scales`) its 3x3
  kernels start from the Rule of Initialization (§1.4).

Family contract (`repjax.models.family`): the deploy form of every mode is the RepVGG deploy model
(`rbr_reparam` conv with bias per block, same block names), so `reparameterize` maps hs/csla/target variables
to it and RepOpt-VGG and RepVGG share one deploy architecture; `from_torch` / `to_torch` use the official
module names (`stage1.0.conv.weight`, `.conv_1x1`, `.scale_conv.weight`, `.bn`, `linear`; the layout of
`repoptvgg_model.py` as the spec describes it, not checked against a released checkpoint: none is at hand).

Parameter tree: `stage0`, `stage{s}_{i}`, `linear`; a block holds `conv` (3x3, HWIO) and `bn`, plus
`conv_1x1`, `scale_conv`, `scale_1x1`, `scale_identity` in hs/csla form. Batch statistics are identical in
all modes, so CSLA and target runs can be compared leaf by leaf. Convs use PyTorch's default init
(kaiming_uniform a=sqrt(5), i.e. U(+-1/sqrt(fan_in))), which the re-initialization relies on.
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from repjax.io import torch as tio
from repjax.models import Family, abstract_variables, register
from repjax.nn.conv import Conv
from repjax.nn.layers import batch_norm, torch_padding
from repjax.nn.reparam import fuse_conv_bn, identity_kernel, pad_kernel
from repjax.projects.repopt import repvgg, scales as scale_files
from repjax.projects.repopt.repvgg import RepVGG, repvgg_widths
from repjax.projects.repopt.scales import Scales, ScalesLike, as_scales, block_names

MODES = ("hs", "csla", "target")
# PyTorch's default conv/linear weight init: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), +1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class BlockSpec(NamedTuple):
    name: str  # Flax module name, e.g. 'stage2_0'
    torch_prefix: str  # official PyTorch prefix, e.g. 'stage2.0'
    in_ch: int
    out_ch: int
    stride: int
    index: int  # position within its stage

    @property
    def identity(self) -> bool:
        return self.in_ch == self.out_ch and self.stride == 1

    @property
    def scale_init(self) -> float:
        """Initial s and t (§1.5): 1 for a stage's first block, else sqrt(2 / i)."""
        return 1.0 if self.index == 0 else math.sqrt(2.0 / self.index)


def block_specs(num_blocks: Sequence[int], widths: Sequence[int], strides: Sequence[int],
                in_ch: int = 3) -> list[BlockSpec]:
    """stage0 (one block), then stages 1..n whose first block has the stage's stride."""
    if len(widths) != len(num_blocks) + 1 or len(strides) != len(widths):
        raise ValueError(f"need len(widths) == len(strides) == len(num_blocks) + 1, got {widths}, {strides}, "
                         f"{num_blocks}")
    specs = [BlockSpec("stage0", "stage0", in_ch, widths[0], strides[0], 0)]
    for s, depth in enumerate(num_blocks, start=1):
        for i in range(depth):
            specs.append(BlockSpec(f"stage{s}_{i}", f"stage{s}.{i}", widths[s - 1] if i == 0 else widths[s],
                                   widths[s], strides[s] if i == 0 else 1, i))
    return specs


def equivalent_kernel(w3: jax.Array, w1: jax.Array, s: jax.Array, t: jax.Array,
                      d: jax.Array | None = None) -> jax.Array:
    """W' = s*W3 + pad(t*W1) [+ pad(diag d)]: the one 3x3 kernel of a CSLA block (Rule of Initialization)."""
    k = w3 * s + pad_kernel(w1 * t, w3.shape[:2])
    if d is not None:
        k = k + identity_kernel(w3.shape[-1], w3.shape[:2], dtype=w3.dtype) * d
    return k


def _reinit_initializer(s: np.ndarray, t: np.ndarray, d: np.ndarray | None) -> Callable:
    """Kernel init of a target block: W3 as the plain init draws it (same key), a fresh W1, combined (§1.4)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        w3 = torch_default_init(key, shape, dtype)
        w1 = torch_default_init(jax.random.fold_in(key, 1), (1, 1, *shape[2:]), dtype)
        return equivalent_kernel(w3, w1, s, t, d)

    return init


class LinearAddBlock(nn.Module):
    """HS / CSLA block: ReLU(BN(s*conv3x3(x) + t*conv1x1(x) [+ d*x])) with per-output-channel s, t, d."""

    features: int
    stride: int = 1
    scale_init: float = 1.0
    csla: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(Conv, self.features, strides=self.stride, use_bias=False, dtype=self.dtype,
                                 param_dtype=jnp.float32, kernel_init=torch_default_init)
        scale = lambda name, v: self.param(name, nn.initializers.constant(v), (self.features,), jnp.float32)
        s, t = scale("scale_conv", self.scale_init), scale("scale_1x1", self.scale_init)
        if self.csla:  # constant scales (§1.2); the optimizer rules freeze them too
            s, t = jax.lax.stop_gradient(s), jax.lax.stop_gradient(t)
        y = conv((3, 3), padding=torch_padding(3), name="conv")(x) * s.astype(self.dtype)
        y = y + conv((1, 1), padding=((0, 0), (0, 0)), name="conv_1x1")(x) * t.astype(self.dtype)
        if x.shape[-1] == self.features and self.stride == 1:
            y = y + x * scale("scale_identity", 1.0).astype(self.dtype)
        return nn.relu(batch_norm(train, self.dtype, name="bn")(y))


class RealVGGBlock(nn.Module):
    """Target block: ReLU(BN(conv3x3(x)))."""

    features: int
    stride: int = 1
    kernel_init: Callable = torch_default_init
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Conv(self.features, (3, 3), self.stride, padding=torch_padding(3), use_bias=False, dtype=self.dtype,
                 param_dtype=jnp.float32, kernel_init=self.kernel_init, name="conv")(x)
        return nn.relu(batch_norm(train, self.dtype, name="bn")(x))


class RepOptVGG(nn.Module):
    """RepOpt-VGG: stage0 (one block), stages 1..n (first block strided), GAP, `linear` head.

    Attributes:
      num_blocks: blocks per stage 1..n; widths / strides: of stage0..n.
      mode: 'hs', 'csla' or 'target' (module docstring).
      init_scales: target mode only, a scale file (`repjax.projects.repopt.scales.load_scales`): the 3x3
        kernels are initialized as s*W3 + pad(t*W1) + pad(diag d) (§1.4) instead of plain W3.
      use_identity_scales: use the searched d in that init (official default) rather than 1.
    """

    num_blocks: Sequence[int]
    widths: Sequence[int]
    strides: Sequence[int] = (2, 2, 2, 2, 2)
    mode: str = "target"
    num_classes: int = 1000
    init_scales: str | None = None
    use_identity_scales: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.init_scales and self.mode != "target":
            raise ValueError("init_scales is for mode='target' (the re-initialized plain model)")
        scales = (scale_files.load_scales(self.init_scales) if self.init_scales and self.is_initializing()
                  else None)
        specs = block_specs(self.num_blocks, self.widths, self.strides, x.shape[-1])
        if scales is not None:
            _check_blocks(scales, specs)
        x = x.astype(self.dtype)
        for b in specs:
            if self.mode == "target":
                init = torch_default_init
                if scales is not None:
                    sc = scales[b.name]
                    d = (sc["d"] if self.use_identity_scales else np.ones_like(sc["s"])) if "d" in sc else None
                    init = _reinit_initializer(sc["s"], sc["t"], d)
                x = RealVGGBlock(b.out_ch, b.stride, init, self.dtype, name=b.name)(x, train)
            else:
                x = LinearAddBlock(b.out_ch, b.stride, b.scale_init, self.mode == "csla", self.dtype,
                                   name=b.name)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=torch_default_init,
                     name="linear")(x)
        return x.astype(jnp.float32)


def model_block_specs(model: RepOptVGG) -> list[BlockSpec]:
    return block_specs(model.num_blocks, model.widths, model.strides)


def _check_blocks(scales: Scales, specs: Sequence[BlockSpec]) -> None:
    """Scales must name exactly the model's blocks, with 'd' exactly on the identity blocks."""
    names = {b.name for b in specs}
    missing, extra = sorted(names - set(scales)), sorted(set(scales) - names)
    if missing or extra:
        raise ValueError(f"scales do not fit the model: missing blocks {missing}, unexpected blocks {extra}")
    for b in specs:
        if ("d" in scales[b.name]) != b.identity:
            raise ValueError(f"block {b.name}: identity branch {'expected' if b.identity else 'unexpected'} "
                             f"({b.in_ch}->{b.out_ch}, stride {b.stride}) but scales {sorted(scales[b.name])}")


# ----------------------------------------------------------------------------------------------------------
# Scales and re-initialization (pure functions on parameter dicts)


def expected_blocks(model: RepOptVGG) -> dict[str, bool]:
    """`{block: has_identity}` of `model`: what its scale file must hold (`scales.load_scales(path, ...)`)."""
    return {b.name: b.identity for b in model_block_specs(model)}


def extract_scales(hs_params: Mapping[str, Any], model: RepOptVGG | None = None) -> Scales:
    """Per-block `{'s', 't'[, 'd']}` read from HS/CSLA params (§1.5 read-out; `scales.from_params`), strictly:
    every block must be present (and, given `model`, exactly its blocks, with `d` exactly where it has an
    identity branch)."""
    out = scale_files.from_params(hs_params)
    if model is not None:
        _check_blocks(out, model_block_specs(model))
    return out


def _target_blocks(target_params: Mapping[str, Any], scales: Scales) -> list[str]:
    names = block_names(target_params)
    missing, extra = sorted(set(names) - set(scales)), sorted(set(scales) - set(names))
    if missing or extra:
        raise ValueError(f"scales do not fit the params: missing blocks {missing}, unexpected blocks {extra}")
    return names


def csla_params_for(target_params: Mapping[str, Any], scales: ScalesLike, rng: jax.Array,
                    use_identity_scales: bool = True) -> dict[str, Any]:
    """The CSLA params that the Rule of Initialization (§1.4) merges: the target's own W3, a fresh
    PyTorch-default W1 per block (key `fold_in(rng, position)`), the given s, t and d (or 1 for d)."""
    scales = as_scales(scales)
    out = dict(target_params)
    for pos, n in enumerate(_target_blocks(target_params, scales)):
        sc, p = scales[n], target_params[n]
        w3 = p["conv"]["kernel"]
        w1 = torch_default_init(jax.random.fold_in(rng, pos), (1, 1, *w3.shape[2:]), w3.dtype)
        block = {"conv": {"kernel": w3}, "conv_1x1": {"kernel": w1}, "bn": p["bn"],
                 "scale_conv": jnp.asarray(sc["s"]), "scale_1x1": jnp.asarray(sc["t"])}
        if "d" in sc:
            block["scale_identity"] = jnp.asarray(sc["d"] if use_identity_scales else np.ones_like(sc["d"]))
        out[n] = block
    return out


def csla_to_target(csla_params: Mapping[str, Any]) -> dict[str, Any]:
    """HS/CSLA params -> target params: each block's kernel becomes s*W3 + pad(t*W1) + pad(diag d) (exact:
    the branches are linear and share the BN); BN and head are copied."""
    out = dict(csla_params)
    for n in block_names(csla_params):
        p = csla_params[n]
        kernel = equivalent_kernel(p["conv"]["kernel"], p["conv_1x1"]["kernel"], p["scale_conv"], p["scale_1x1"],
                                   p.get("scale_identity"))
        out[n] = {"conv": {"kernel": kernel}, "bn": p["bn"]}
    return out


def reinit_target(target_params: Mapping[str, Any], scales: ScalesLike, rng: jax.Array,
                  use_identity_scales: bool = True) -> dict[str, Any]:
    """Rule of Initialization (§1.4): W'(0) = s*W3 + pad(t*W1) + pad(diag d), W3 the target's own initial
    kernel, W1 fresh. Only for a model trained from scratch: raises if any BN gamma is not 1."""
    for n in block_names(target_params):
        gamma = np.asarray(target_params[n]["bn"]["scale"])
        if not np.all(gamma == 1.0):
            raise ValueError(f"{n}/bn/scale is not all 1: re-initialization is only for training from scratch")
    return csla_to_target(csla_params_for(target_params, scales, rng, use_identity_scales))


# ----------------------------------------------------------------------------------------------------------
# The family contract


def deploy(model: RepOptVGG | RepVGG) -> RepVGG:
    """The deploy form of any mode: `RepVGG(deploy=True)` with the same depths, widths and strides."""
    if isinstance(model, RepVGG):
        if not model.deploy:
            raise ValueError("a training-form RepVGG is not a RepOpt-VGG: use the repvgg family")
        return model
    return RepVGG(num_blocks=tuple(model.num_blocks), widths=tuple(model.widths), strides=tuple(model.strides),
                  num_classes=model.num_classes, deploy=True, dtype=model.dtype)


def reparameterize(variables: Mapping[str, Any], model: RepOptVGG) -> dict[str, Any]:
    """hs / csla / target variables (eval statistics) -> `deploy(model)`'s {'params'}: the branches merge into one
    kernel (`csla_to_target`, exact: they are linear and share the BN), then conv -> BN fuses into a conv with
    bias. Exact only in eval mode."""
    params, stats = variables["params"], variables["batch_stats"]
    if model.mode != "target":
        params = csla_to_target(params)
    out: dict[str, Any] = {"linear": params["linear"]}
    for n in block_names(params):
        bn, st = params[n]["bn"], stats[n]["bn"]
        kernel, bias = fuse_conv_bn(params[n]["conv"]["kernel"], None, bn["scale"], bn["bias"], st["mean"], st["var"],
                                    repvgg.BN_EPS)
        out[n] = {"rbr_reparam": {"kernel": kernel, "bias": bias}}
    return {"params": out}


def macs(model: RepOptVGG | RepVGG, height: int, width: int | None = None) -> int:
    """Multiply-accumulates of one image in the deploy form (one 3x3 conv per block, the head)."""
    return repvgg.macs(deploy(model), height, width)


def torch_rules(model: RepOptVGG) -> list[tio.Rule]:
    """Official RepOpt-VGG key <-> repjax leaf rules for `model`'s mode (`stage1.0.conv.weight`, `.bn.*`; in
    hs/csla also `.conv_1x1.weight` and the per-channel `.scale_conv.weight`, `.scale_1x1.weight`,
    `.scale_identity.weight`)."""
    rules: list[tio.Rule] = []
    for b in model_block_specs(model):
        t, f = b.torch_prefix, b.name
        rules += tio.conv(f"{t}.conv", (f, "conv")) + tio.bn(f"{t}.bn", (f, "bn"))
        if model.mode != "target":
            rules += tio.conv(f"{t}.conv_1x1", (f, "conv_1x1"))
            names = ("scale_conv", "scale_1x1") + (("scale_identity",) if b.identity else ())
            rules += [tio.Rule(f"{t}.{n}.weight", ("params", f, n)) for n in names]
    return rules + tio.linear("linear", ("linear",))


def _input_size(model: RepOptVGG) -> int:
    return math.prod(model.strides)


def from_torch(state_dict: Mapping[str, Any], model: RepOptVGG | RepVGG) -> dict[str, Any]:
    """Official state_dict -> variables of `model` (strict); a deploy-form file goes through RepVGG's layout."""
    if isinstance(model, RepVGG):
        return repvgg.from_torch(state_dict, model)
    return tio.from_torch_state_dict(state_dict, torch_rules(model), abstract_variables(model, _input_size(model)))


def to_torch(variables: Mapping[str, Any], model: RepOptVGG | RepVGG) -> dict[str, np.ndarray]:
    """repjax variables of `model` -> official state_dict (numpy; `num_batches_tracked` per BN)."""
    if isinstance(model, RepVGG):
        return repvgg.to_torch(variables, model)
    return tio.to_torch_state_dict(variables, torch_rules(model))


def infer(state_dict: Mapping[str, Any], model: RepOptVGG) -> RepOptVGG | RepVGG:
    """`model` in the form a file holds: the RepVGG deploy model (`rbr_reparam` keys), a search model (scale
    keys: `model`'s mode if it is hs or csla, else 'hs') or the target; with the file's number of classes."""
    sd = tio.strip_module_prefix(state_dict)
    if "linear.weight" not in sd:
        raise ValueError("not a RepOpt-VGG state_dict: no 'linear.weight'")
    num_classes = int(np.shape(sd["linear.weight"])[0])
    if repvgg.is_deploy_state_dict(sd):
        return deploy(model).clone(num_classes=num_classes)
    searched = any(".scale_conv." in k for k in sd)
    mode = (model.mode if model.mode != "target" else "hs") if searched else "target"
    return model.clone(mode=mode, num_classes=num_classes, init_scales=None)  # the file holds the kernels


FAMILY = Family("repopt_vgg", RepOptVGG, tiny="repopt_vgg_tiny", macs=macs, from_torch=from_torch,
                to_torch=to_torch, reparameterize=reparameterize, deploy=deploy, infer=infer)


# ----------------------------------------------------------------------------------------------------------
# Variants

_DEPTHS = {"b": (4, 6, 16, 1), "l": (8, 14, 24, 1)}
_CONFIGS = {"b1": ("b", 2.0, 4.0), "b2": ("b", 2.5, 5.0), "l1": ("l", 2.0, 4.0), "l2": ("l", 2.5, 5.0)}


def _make(depths: str, a: float, b: float) -> Callable[..., RepOptVGG]:
    def factory(**kw: Any) -> RepOptVGG:
        return RepOptVGG(**{"num_blocks": _DEPTHS[depths], "widths": repvgg_widths(a, b), **kw})

    factory.__doc__ = f"RepOpt-VGG-{depths.upper()}: depths {_DEPTHS[depths]}, width multipliers a={a}, b={b}."
    return factory


for _name, _cfg in _CONFIGS.items():
    register(f"repopt_vgg_{_name}", FAMILY, input_size=224)(_make(*_cfg))


@register("repopt_vgg_tiny", FAMILY, input_size=8)
def repopt_vgg_tiny(**kw: Any) -> RepOptVGG:
    """Test-size model: widths 8-16, depths (2, 1, 1), strides (1, 1, 2, 2); covers identity blocks, a stride-2
    block with in == out (no identity) and channel-changing blocks."""
    return RepOptVGG(**{"num_blocks": (2, 1, 1), "widths": (8, 8, 8, 16), "strides": (1, 1, 2, 2),
                        "num_classes": 10, **kw})


@register("repopt_vgg_cifar", FAMILY, input_size=32)
def repopt_vgg_cifar(**kw: Any) -> RepOptVGG:
    """CIFAR-scale RepOpt-VGG: widths 32-128, depths (2, 3, 2), strides (1, 1, 2, 2) so 32x32 -> 8x8."""
    return RepOptVGG(**{"num_blocks": (2, 3, 2), "widths": (32, 32, 64, 128), "strides": (1, 1, 2, 2),
                        "num_classes": 10, **kw})


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m repjax.projects.repopt.repopt_vgg <hs workdir | checkpoint dir> <out.npz>`: export searched scales."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    scales = scale_files.from_checkpoint(args.checkpoint)
    scale_files.save_scales(args.out, scales)
    print(f"{len(scales)} blocks ({sum('d' in v for v in scales.values())} with identity) -> {args.out}")


if __name__ == "__main__":
    main()
