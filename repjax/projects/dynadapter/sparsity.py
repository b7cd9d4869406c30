"""Bidirectional sparsity of Dyn-Adapter (Zhang et al., ECCV'24, arXiv 2407.14302), both readings of "backward".

What is known (spec `dynadapter_petl.md` §3): a *higher dropout rate in shallow layers* (forward) and a
*"random masked gradient update"* (backward), both only as the ICLR-2024 reviewers paraphrase them [R]. The
paper's rates, mask granularity, keep probability and rescaling are unknown, so every one is a switch here.

Forward: `stage_rates(num_stages, first, last)` gives one dropout rate per stage (linear in depth; the model
applies rate `r_s` at the adapter bottleneck of every block of stage `s`). ASSUMPTION: the site (the host's
own adapter dropout) and the rates (0.3 -> 0.1, host default 0.1 at the deepest stage).

Backward, reading 1 (default): `random_grad_mask`, an optax transform in the style of Child-Tuning-F (Xu et
al., EMNLP'21): every step, each gradient element of a trainable leaf is kept with probability p and the kept
ones are scaled by 1/p, so that E[masked g] = g:

    g~ = g * m / p,   m ~ Bernoulli(p) iid per element  (or one draw per tensor: `granularity="tensor"`)

It must sit *before* the optimizer's moments (`optim.rules` `transforms=[("random_grad_mask", {...})]`, which
`repjax.optim` chains before the base rule). The mask key lives in the transform's state: the step key is
`fold_in(key, count)` and each leaf folds in the CRC32 of its parameter path, so masks do not depend on how
the rules group the leaves, and a run resumed from a checkpointed opt-state draws the same masks.

Backward, reading 2 (in-model, `gradient_gate`): a custom VJP at stage boundaries, identity forward, masked
(and optionally 1/p-rescaled) cotangent backward, so that deeper exits' losses reach the shallower adapters only
through a random subset of paths. An optimizer transform cannot do this: by the time optax sees a gradient it
is the sum over all exit losses. `detach` (stop-gradient at the boundaries) is the p=0 limit.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from repjax.optim.optimizers import TRANSFORMS
from repjax.sharding import path_str

GRANULARITIES = ("element", "tensor")


def stage_rates(num_stages: int, first: float = 0.3, last: float = 0.1) -> tuple[float, ...]:
    """Per-stage forward dropout rates, linear from `first` (stage 1) to `last` (stage S). ASSUMPTION: the
    paper says only that shallow layers get the higher rate."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    for name, r in (("first", first), ("last", last)):
        if not 0.0 <= r < 1.0:
            raise ValueError(f"stage dropout rate {name}={r} must be in [0, 1)")
    if num_stages == 1:
        return (float(first),)
    return tuple(float(first + (last - first) * s / (num_stages - 1)) for s in range(num_stages))


class RandomMaskState(NamedTuple):
    """Optimizer state of `random_grad_mask`: a raw uint32 PRNG key and the number of masks drawn so far."""

    key: jax.Array
    count: jax.Array


def _check_prob(p: float, what: str) -> float:
    if not 0.0 < float(p) <= 1.0:
        raise ValueError(f"{what} must be in (0, 1], got {p}")
    return float(p)


def leaf_keep_prob(path: str, keep_prob: float, levels: Sequence[tuple[str, float]]) -> float:
    """The keep probability of the parameter at `path`: the first `levels` regex found in it, else `keep_prob`."""
    for pattern, p in levels:
        if re.search(pattern, path):
            return float(p)
    return float(keep_prob)


def random_grad_mask(keep_prob: float = 1.0, *, levels: Sequence[tuple[str, float]] = (), rescale: bool = True,
                     seed: int = 0, granularity: str = "element") -> optax.GradientTransformation:
    """Random masked gradient update (Child-Tuning-F style), before the optimizer's moments.

    keep_prob: default keep probability p (1.0: identity). levels: `(regex, p)` pairs on parameter paths, first
    match wins: per-level keep probabilities (e.g. `("blocks_[0-2]/", 0.5)`). rescale: divide kept entries by p
    (unbiased; ASSUMPTION, Child-Tuning-F does it; `False` keeps them as they are). granularity: `element` (one
    Bernoulli draw per entry; ASSUMPTION, as Child-Tuning-F) or `tensor` (the whole leaf kept or dropped).
    """
    _check_prob(keep_prob, "random_grad_mask keep_prob")
    levels = tuple((str(pattern), _check_prob(p, f"random_grad_mask levels[{pattern!r}]")) for pattern, p in levels)
    for pattern, _ in levels:
        re.compile(pattern)
    if granularity not in GRANULARITIES:
        raise ValueError(f"random_grad_mask granularity must be one of {GRANULARITIES}, got {granularity!r}")

    def init_fn(params: Any) -> RandomMaskState:
        del params
        return RandomMaskState(key=jax.random.PRNGKey(seed), count=jnp.zeros((), jnp.int32))

    def update_fn(updates: Any, state: RandomMaskState, params: Any = None) -> tuple[Any, RandomMaskState]:
        del params
        step_key = jax.random.fold_in(state.key, state.count)

        def mask(path, g):
            name = path_str(path)
            p = leaf_keep_prob(name, keep_prob, levels)
            if p == 1.0:
                return g
            key = jax.random.fold_in(step_key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
            shape = g.shape if granularity == "element" else ()
            keep = jax.random.bernoulli(key, p, shape)
            scale = 1.0 / p if rescale else 1.0
            return jnp.where(keep, g * jnp.asarray(scale, g.dtype), jnp.zeros_like(g))

        return jax.tree_util.tree_map_with_path(mask, updates), RandomMaskState(state.key, state.count + 1)

    return optax.GradientTransformation(init_fn, update_fn)


@TRANSFORMS.register("random_grad_mask")
def _random_grad_mask_factory(params: Any, cfg: Any, **kwargs: Any) -> optax.GradientTransformation:
    """`optim.rules` entry: `transforms=[("random_grad_mask", dict(keep_prob=.., levels=[..], ...))]`."""
    del params, cfg
    allowed = {"keep_prob", "levels", "rescale", "seed", "granularity"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise ValueError(f"random_grad_mask got unknown arguments {sorted(unknown)}; allowed: {sorted(allowed)}")
    if "levels" in kwargs:
        kwargs["levels"] = [tuple(level) for level in kwargs["levels"]]
    return random_grad_mask(**kwargs)


@jax.custom_vjp
def _gate(x: jax.Array, mask: jax.Array) -> jax.Array:
    return x


def _gate_fwd(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    return x, mask


def _gate_bwd(mask: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    return g * mask.astype(g.dtype), jnp.zeros_like(mask)


_gate.defvjp(_gate_fwd, _gate_bwd)


def gradient_gate(x: jax.Array, key: jax.Array, keep_prob: float, *, rescale: bool = True,
                  granularity: str = "element") -> jax.Array:
    """Identity forward; backward multiplies the cotangent by `m / p` (`m` Bernoulli(p); `m` alone without
    `rescale`). granularity: `element` (per activation entry) or `sample` (all of one example's path)."""
    _check_prob(keep_prob, "gradient gate keep_prob")
    if keep_prob == 1.0:
        return x
    if granularity not in ("element", "sample"):
        raise ValueError(f"gradient gate granularity must be 'element' or 'sample', got {granularity!r}")
    shape = x.shape if granularity == "element" else x.shape[:1] + (1,) * (x.ndim - 1)
    keep = jax.random.bernoulli(key, keep_prob, shape)
    mask = keep.astype(x.dtype) * (1.0 / keep_prob if rescale else 1.0)
    return _gate(x, jax.lax.stop_gradient(jnp.broadcast_to(mask, x.shape)))
