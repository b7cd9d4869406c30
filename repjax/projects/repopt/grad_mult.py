"""RepOptimizers (Ding et al., ICLR 2023): Gradient Re-parameterization of a plain VGG-style model.

A CSLA block `s*conv3x3(x; W3) + t*conv1x1(x; W1) [+ d*x]` with constant per-output-channel scales s, t and
a trainable identity weight d trains exactly like one conv W' = s W3 + pad(t W1) + pad(diag d) whose gradient
is multiplied by the Grad Mult (paper Eq. 3, HWIO kernels, o = output channel = last axis, p = `power`):

    M[..., i, o] = s_o^p  +  [centre] t_o^p  +  [centre, i == o, identity branch] 1.

RepOpt-SGD (p = 2) multiplies the raw gradient before coupled weight decay and Nesterov momentum: with the
`sgd` base rule, a pre-transform (`repopt_sgd_rules`). RepOpt-AdamW (p = 1) multiplies the gradient before
the moments and the preconditioned direction again before decoupled decay (`repopt_adamw_rules`, which uses
`post_transforms`); it matches CSLA + AdamW only up to Adam's eps and only for positive scales.

Scales are `repjax.projects.repopt.scales` dicts `{block: {'s', 't', 'd' (identity blocks only)}}` or the path
of a scale file. Gradient clipping breaks the equivalence (paper §3, README): the transform refuses
`optim.clip_norm`. This module holds all of RepOpt's optimizer rules: `repopt_sgd_rules`, `repopt_adamw_rules`
for the plain target and `hs_rules` for the Hyper-Search / CSLA models.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from repjax.optim.optimizers import TRANSFORMS
from repjax.projects.repopt.scales import ScalesLike, as_scales, block_names
from repjax.sharding import path_str

GRAD_MULT = "repopt_grad_mult"
NO_DECAY = r"(^|/)bn/|(^|/)bias$"  # BN gamma/beta and biases: no weight decay (official `set_weight_decay`)
BLOCK_KERNELS = r"^stage\d+(_\d+)?/conv/kernel$"  # the 3x3 kernels of the plain (target) blocks


def _pow(x: jax.Array, power: float) -> jax.Array:
    # Integer powers keep the sign rules of x**2 for negative scales (a float pow would give NaN there).
    return x ** int(power) if float(power).is_integer() else x ** power


def mult_tensor(shape: tuple[int, ...], s: Any, t: Any, identity: bool, power: float) -> jax.Array:
    """The Grad Mult M of one HWIO kernel (paper Eq. 3): s^p everywhere, + t^p at the centre, + 1 on the
    centre's diagonal (i == o) when the block has an identity branch. Traceable (builds no C x C constant)."""
    kh, kw, cin, cout = shape
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"Grad Mult needs an odd kernel with a centre, got {kh}x{kw}")
    if identity and cin != cout:
        raise ValueError(f"identity branch needs in == out channels, got {cin} -> {cout}")
    s, t = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    m = jnp.broadcast_to(_pow(s, power), shape)
    centre = jnp.broadcast_to(_pow(t, power), (cin, cout))
    if identity:
        centre = centre + jnp.eye(cin, cout, dtype=jnp.float32)
    return m.at[kh // 2, kw // 2].add(centre)


def mult_table(params: Any, scales: ScalesLike, kernel: str = "conv/kernel") -> dict[str, tuple]:
    """`{'<block>/<kernel>': (shape, s, t, has_identity)}`, checked both ways: every scaled block has its kernel
    in `params` with matching channels, and every `<block>/<kernel>` leaf of `params` has scales."""
    scales = as_scales(scales)
    leaves = {path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
    table = {}
    for block, entry in scales.items():
        path = f"{block}/{kernel}"
        if path not in leaves:
            raise ValueError(f"scales for block {block!r} but no parameter {path!r}")
        shape = tuple(leaves[path].shape)
        if len(shape) != 4:
            raise ValueError(f"{path} has shape {shape}; the Grad Mult needs an HWIO conv kernel")
        for k, v in entry.items():
            if v.shape != (shape[-1],):
                raise ValueError(f"scales[{block!r}][{k!r}] has shape {v.shape}, the kernel {shape[-1]} out channels")
        table[path] = (shape, entry["s"], entry["t"], "d" in entry)
    unscaled = [p for p in leaves if p.endswith(f"/{kernel}") and p.count("/") == kernel.count("/") + 1
                and p not in table]
    if unscaled:
        raise ValueError(f"no scales for {unscaled}: the scales do not describe this model")
    return table


def grad_mult(params: Any, scales: ScalesLike, power: float = 2.0,
              kernel: str = "conv/kernel") -> optax.GradientTransformation:
    """Multiplies the update of each `<block>/<kernel>` in `scales` by its Grad Mult; other leaves (and
    `optax.MaskedNode`s of other `multi_transform` groups) pass unchanged. Stateless."""
    table = mult_table(params, scales, kernel)

    def update_fn(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        def mult(path: tuple, g: jax.Array) -> jax.Array:
            entry = table.get(path_str(path))
            if entry is None:
                return g
            shape, s, t, identity = entry
            return g * mult_tensor(shape, s, t, identity, power).astype(g.dtype)

        return jax.tree_util.tree_map_with_path(mult, updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


@TRANSFORMS.register(GRAD_MULT)
def _grad_mult_factory(params: Any, cfg: Any, scales: ScalesLike, power: float = 2.0,
                       kernel: str = "conv/kernel") -> optax.GradientTransformation:
    """Rule transform `("repopt_grad_mult", {"scales": <.npz path | dict>, "power": 2.0})`."""
    if cfg.get("clip_norm"):
        raise ValueError(f"optim.clip_norm={cfg.clip_norm} with RepOptimizer: gradient clipping breaks the "
                         "equivalence with the CSLA model (RepOptimizers README); set optim.clip_norm = 0")
    return grad_mult(params, scales, power, kernel)


def _mult_spec(scales: ScalesLike, power: float) -> tuple[str, dict[str, Any]]:
    return (GRAD_MULT, {"scales": os.fspath(scales) if isinstance(scales, os.PathLike) else scales,
                        "power": float(power)})


def repopt_sgd_rules(scales: ScalesLike, power: float = 2.0) -> list[tuple[str, dict]]:
    """`optim.rules` for RepOpt-SGD (use with `optim.name='sgd'`, momentum 0.9, nesterov): no decay on BN and
    biases; block kernels get the Grad Mult on the raw gradient, before weight decay is added (§1.6)."""
    return [(NO_DECAY, {"weight_decay": 0.0}), (BLOCK_KERNELS, {"transforms": [_mult_spec(scales, power)]})]


def repopt_adamw_rules(scales: ScalesLike, power: float = 1.0) -> list[tuple[str, dict]]:
    """`optim.rules` for RepOpt-AdamW (use with `optim.name='adamw'`): M on the gradient before the moments
    and again on the direction before decoupled decay (§1.6); exact only up to eps, for positive scales."""
    mult = _mult_spec(scales, power)
    return [(NO_DECAY, {"weight_decay": 0.0}), (BLOCK_KERNELS, {"transforms": [mult], "post_transforms": [mult]})]


def hs_rules(csla: bool = False) -> list[tuple[str, dict]]:
    """`optim.rules` for HS / CSLA training, as the official `set_weight_decay`: no decay on BN, biases and
    s, t (frozen with `csla=True`); decay on conv kernels, the head kernel and the identity scale d."""
    st = {"frozen": True} if csla else {"weight_decay": 0.0}
    return [(r"(^|/)scale_(conv|1x1)$", st), (NO_DECAY, {"weight_decay": 0.0})]


def grad_mults(scales: ScalesLike, target_params: Mapping[str, Any], power: float) -> dict[str, Any]:
    """Grad Mult tensors (paper Eq. 3) `{block: {'conv': {'kernel': M}}}` for the target's 3x3 kernels
    (HWIO, per output channel): s^p everywhere, + t^p at the centre, + 1 at the centre diagonal with identity.
    Only the block kernels get one; BN and head are updated normally."""
    scales = as_scales(scales)
    names = block_names(target_params)
    missing, extra = sorted(set(names) - set(scales)), sorted(set(scales) - set(names))
    if missing or extra:
        raise ValueError(f"scales do not fit the params: missing blocks {missing}, unexpected blocks {extra}")
    out = {}
    for n in names:
        sc = scales[n]
        shape = tuple(target_params[n]["conv"]["kernel"].shape)
        out[n] = {"conv": {"kernel": mult_tensor(shape, sc["s"], sc["t"], "d" in sc, power)}}
    return out
