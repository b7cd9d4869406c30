"""Parameter-efficient transfer hosts for the ViT (`repjax.models.vit`), injected by config.

    model = models.create("vit_b16", num_classes=100, petl=dict(kind="adapter", dim=8))
    rules = petl.optim_rules(model.petl)        # -> config.optim.rules: everything but the host and head frozen

Every host starts as the identity (zero-initialised up-projections / unit scales / zero shifts), so that the
frozen backbone's logits are unchanged at step 0 (tested), except VPT-deep: its prompt tokens are attended to
from the first step (the method's definition; no zero-initialisation makes attention ignore a token).

Hosts (`kind`), their placement per block, and their trainable parameters per ViT-B block at r = 8:

- `adapter` (Houlsby, FFN-only as NOAH/VPT use it): sequential after the MLP, inside the residual,
  `x + y + up(act(down(y)))` with `y = MLP(LN2 x)`: 2*768*8 + 8 + 768 = 13,064.
- `adaptformer` (Chen et al. 2022): parallel to the MLP, reading the pre-LN2 stream,
  `x + MLP(LN2 x) + s * up(relu(down(x)))` (s = 0.1): 13,064.
- `lora` (Hu et al. 2022) on q and v: `q += s (h A_q) B_q`, `v += s (h A_v) B_v`: 2 * 2*768*8 = 24,576.
- `repadapter` (Luo et al. 2023): before attention and before the MLP, `RA(z) = z + s B(drop(A z))` with B a
  grouped (groups=2) 1x1 conv: 2 * (768*8 + 8 + 4*768 + 768) = 19,984.
- `bitfit` (Ben Zaken et al. 2022): no new parameters; every bias (linear and LayerNorm) is trained: 8,448
  (+ the patch-embedding and final-norm biases).
- `ssf` (Lian et al. 2022): a per-channel scale and shift after qkv, proj, fc1, fc2, norm1, norm2 (+ the patch
  embedding and the final norm): 16,896 (+ 3,072).
- `vpt` (VPT-deep, Jia et al. 2022): `length` prompt tokens inserted after the class token at every block's
  input and dropped at its output: length * 768.

RepAdapter and SSF are linear and merge into the frozen layers after training (`repjax.models.vit.merge_petl`,
a pure params -> params function; LoRA merges too). `dropout` (a float, or one rate per block) is the dropout
at the hosts' bottleneck: RepAdapter/AdaptFormer use 0.1 there; Dyn-Adapter's forward sparsity sets it per stage.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from repjax.nn.activations import gelu

KINDS = ("adapter", "adaptformer", "lora", "repadapter", "bitfit", "ssf", "vpt")
MERGEABLE = ("lora", "repadapter", "ssf", "bitfit")  # merge_petl folds these into the plain ViT

# Per kind: the option keys it accepts and their defaults (papers' values; see the module docstring).
_OPTIONS: dict[str, dict[str, Any]] = {
    "adapter": dict(dim=8, scale=1.0, act="gelu", dropout=0.0),
    "adaptformer": dict(dim=8, scale=0.1, act="relu", dropout=0.1),
    "lora": dict(dim=8, scale=1.0, dropout=0.0),
    "repadapter": dict(dim=8, scale=1.0, groups=2, dropout=0.1),
    "bitfit": dict(),
    "ssf": dict(),
    "vpt": dict(length=10, dropout=0.0),
}
_ACTS = {"gelu": gelu, "relu": nn.relu,
         "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x)}

# Parameter-name regexes (on "blocks_0/adapter/down/kernel"-style paths) of each host's own parameters.
_HOST_REGEX = {
    "adapter": r"(^|/)adapter/",
    "adaptformer": r"(^|/)adaptformer/",
    "lora": r"(^|/)lora_[qv]/",
    "repadapter": r"(^|/)repadapter_(attn|mlp)/",
    "bitfit": r"(^|/)bias$",
    "ssf": r"(^|/)ssf_\w+/",
    "vpt": r"(^|/)prompts$",
}


@dataclasses.dataclass(frozen=True)
class PetlConfig:
    """A parsed, validated `petl=dict(kind=..., ...)` (hashable, so it can sit on a Flax module)."""

    kind: str
    dim: int = 8
    scale: float = 1.0
    act: str = "gelu"
    groups: int = 2
    length: int = 10
    dropout: float | tuple[float, ...] = 0.0

    def rate(self, block: int) -> float:
        """The bottleneck dropout rate of block `block`."""
        return float(self.dropout[block] if isinstance(self.dropout, tuple) else self.dropout)


def parse(spec: Mapping[str, Any] | PetlConfig | None, depth: int) -> PetlConfig | None:
    """Validates `petl=dict(kind=..., **options)` against the kind's options; None means no host."""
    if spec is None or isinstance(spec, PetlConfig):
        return spec
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in KINDS:
        raise ValueError(f"petl kind must be one of {KINDS}, got {kind!r}")
    options = dict(_OPTIONS[kind])
    unknown = set(spec) - set(options)
    if unknown:
        raise ValueError(f"petl kind {kind!r} has no options {sorted(unknown)}; allowed: {sorted(options)}")
    options.update(spec)
    if "dropout" in options and not isinstance(options["dropout"], int | float):
        rates = tuple(float(r) for r in options["dropout"])
        if len(rates) != depth:
            raise ValueError(f"petl dropout has {len(rates)} per-block rates for a {depth}-block ViT")
        options["dropout"] = rates
    if "act" in options and options["act"] not in _ACTS:
        raise ValueError(f"petl act must be one of {sorted(_ACTS)}, got {options['act']!r}")
    if kind == "repadapter" and options["dim"] % options["groups"]:
        raise ValueError(f"repadapter dim={options['dim']} must divide into groups={options['groups']}")
    return PetlConfig(kind=kind, **options)


def host_regex(kind: str) -> str:
    """Regex matching the parameters a host adds (BitFit: the biases it trains)."""
    if kind not in KINDS:
        raise ValueError(f"petl kind must be one of {KINDS}, got {kind!r}")
    return _HOST_REGEX[kind]


def optim_rules(spec: Mapping[str, Any] | PetlConfig | str, trainable: Sequence[str] = (r"(^|/)classifier/",)
                ) -> list[tuple[str, dict]]:
    """`config.optim.rules` that train the host's parameters and `trainable` (regexes; the classifier by
    default) and freeze everything else: no update, no optimizer state, no gradient (`repjax.step`)."""
    kind = spec if isinstance(spec, str) else (spec.kind if isinstance(spec, PetlConfig) else spec["kind"])
    pattern = "|".join([host_regex(kind), *trainable])
    return [(pattern, {}), (r".*", {"frozen": True})]


def _lora_a_init(key, shape, dtype=jnp.float32):
    """Kaiming-uniform with a = sqrt(5), fan_in = shape[0] (torch.nn.Linear's default, as LoRA's code)."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class Bottleneck(nn.Module):
    """`scale * up(drop(act(down(x))))` with a zero-initialised `up`: the Houlsby adapter / AdaptFormer body."""

    features: int
    dim: int
    act: str = "gelu"
    scale: float = 1.0
    dropout: float = 0.0
    down_init: str = "xavier"  # xavier (NOAH / Houlsby-FFN) | lora (AdaptFormer's Kaiming-uniform)

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        init = nn.initializers.xavier_uniform() if self.down_init == "xavier" else _lora_a_init
        h = nn.Dense(self.dim, kernel_init=init, name="down")(x)
        h = nn.Dropout(self.dropout, deterministic=not train)(_ACTS[self.act](h))
        h = nn.Dense(self.features, kernel_init=nn.initializers.zeros, name="up")(h)
        return h * self.scale


class LoRA(nn.Module):
    """`scale * drop(x) A B`: the low-rank update of one projection; B = 0 at initialisation."""

    features: int
    dim: int
    scale: float = 1.0
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        a = self.param("a", _lora_a_init, (x.shape[-1], self.dim))
        b = self.param("b", nn.initializers.zeros, (self.dim, self.features))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return (x @ a.astype(x.dtype)) @ b.astype(x.dtype) * self.scale


def grouped_up_matrix(kernel: jnp.ndarray, groups: int) -> jnp.ndarray:
    """The dense (dim, features) matrix of a grouped 1x1 conv stored as (dim / groups, features).

    Output channel o belongs to group g = o // (features / groups) and reads inputs g*dim/g ... (g+1)*dim/g - 1
    (PyTorch `Conv1d(dim, features, 1, groups)`, weight (features, dim/groups, 1) transposed). Block diagonal.
    """
    features = kernel.shape[1]
    per_out = features // groups
    blocks = [kernel[:, g * per_out:(g + 1) * per_out] for g in range(groups)]
    return jax.scipy.linalg.block_diag(*blocks) if groups > 1 else kernel


class GroupedDense(nn.Module):
    """A grouped 1x1 conv on the last axis, `kernel` (dim / groups, features) and `bias` (features), zero-init."""

    features: int
    groups: int

    @nn.compact
    def __call__(self, h: jnp.ndarray) -> jnp.ndarray:
        dim = h.shape[-1]
        per_in, per_out = dim // self.groups, self.features // self.groups
        kernel = self.param("kernel", nn.initializers.zeros, (per_in, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        hg = h.reshape(*h.shape[:-1], self.groups, per_in)
        kg = kernel.reshape(per_in, self.groups, per_out).astype(h.dtype)
        y = jnp.einsum("...gi,igo->...go", hg, kg).reshape(*h.shape[:-1], self.features)
        return y + bias.astype(h.dtype)


class RepAdapter(nn.Module):
    """`RA(z) = z + s * (B(drop(A z + a)) + b)`: linear, so it merges into the next linear layer.

    A: dense dim <- features (Xavier-uniform, zero bias). B: grouped 1x1 conv features <- dim (`groups`,
    zero-initialised, with bias), stored as `up/kernel` (dim / groups, features) and `up/bias` (features).
    """

    features: int
    dim: int = 8
    groups: int = 2
    scale: float = 1.0
    dropout: float = 0.1

    @nn.compact
    def __call__(self, z: jnp.ndarray, train: bool) -> jnp.ndarray:
        if self.features % self.groups:
            raise ValueError(f"repadapter: features={self.features} must divide into groups={self.groups}")
        h = nn.Dense(self.dim, kernel_init=nn.initializers.xavier_uniform(), name="down")(z)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return z + self.scale * GroupedDense(self.features, self.groups, name="up")(h)


class SSF(nn.Module):
    """`x * scale + shift` per channel (scale = 1, shift = 0 at initialisation)."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        shift = self.param("shift", nn.initializers.zeros, (c,))
        return x * scale.astype(x.dtype) + shift.astype(x.dtype)


def ssf(cfg: PetlConfig | None, name: str):
    """An SSF module named `name` when the host is SSF, else the identity."""
    return SSF(name=name) if cfg is not None and cfg.kind == "ssf" else (lambda x: x)
