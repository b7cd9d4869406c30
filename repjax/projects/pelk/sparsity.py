"""Dynamic sparsity in the style of SLaK (Liu et al., ICLR 2023): masked weights, periodic prune-and-regrow.

A rule's `final_transforms` entry (it must see the final update, after the learning rate and weight decay):

    optim.rules = [(r"kernel$", {"final_transforms": [("dynamic_sparsity", dict(
        sparsity=0.4, init="erk", update_every=100, prune_rate=0.3, decay_steps=total_steps, seed=0))]})]

Every leaf of the group with `ndim >= min_ndim` (convs and linears, as SLaK) carries a boolean mask in the
optimizer state (so checkpoints hold it); other leaves of the group stay dense (shape-() True mask). The
update becomes `where(keep, u, -p)`: after `optax.apply_updates` inactive weights are exactly zero (from the
first step on; `apply_masks` zeroes them at init if wanted). Every `update_every` steps, on the post-step
weights, each layer drops its `n = round(rate * active)` smallest-magnitude active weights and activates `n`
random inactive ones (weights inactive before this step first, just-dropped ones only if too few): the
density of every layer stays fixed, and regrown weights start from exactly zero. `rate` is `prune_rate`,
cosine-decayed to 0 over `decay_steps` (`schedule="cosine"`) or `"constant"`.

Initial masks: `init="uniform"` (every layer at 1 - sparsity) or `"erk"` (Erdős-Rényi-Kernel: density
proportional to sum(shape) / prod(shape), layers that would exceed 1 are dense, the total is 1 - sparsity).
SLaK's SNIP initialisation is not implemented. The base optimizer's state (momentum, Adam moments) of
inactive weights is left as it is: the transform only sees the final update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from repjax.optim.optimizers import TRANSFORMS
from repjax.sharding import path_str

NAME = "dynamic_sparsity"


class SparsityState(NamedTuple):
    count: jax.Array  # int32: updates done
    key: jax.Array  # raw uint32 PRNG key (mask init and random growth)
    masks: Any  # bool tree like the group's params; shape-() True for dense leaves

    def init_params(self, params: Any) -> Any:
        """`params` with every inactive weight zeroed (`repjax.optim.hooks`: sparse from step 0)."""
        return jax.tree.map(lambda p, m: p if isinstance(m, optax.MaskedNode) else jnp.where(m, p, 0), params,
                            self.masks, is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def erk_densities(shapes: Sequence[tuple[int, ...]], density: float) -> list[float]:
    """Erdős-Rényi-Kernel densities d_l = min(1, eps * sum(shape_l) / prod(shape_l)), total = `density`."""
    sizes = [math.prod(s) for s in shapes]
    dense: set[int] = set()
    while True:
        free = [i for i in range(len(shapes)) if i not in dense]
        budget = density * sum(sizes) - sum(sizes[i] for i in dense)
        denom = sum(sum(shapes[i]) for i in free)
        if not free or denom == 0:
            return [1.0] * len(shapes)
        eps = budget / denom
        over = {i for i in free if eps * sum(shapes[i]) / sizes[i] > 1.0}
        if not over:
            return [1.0 if i in dense else eps * sum(shapes[i]) / sizes[i] for i in range(len(shapes))]
        dense |= over


def layer_densities(shapes: Sequence[tuple[int, ...]], sparsity: float, init: str) -> list[float]:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if init == "uniform":
        return [1.0 - sparsity] * len(shapes)
    if init == "erk":
        return erk_densities(shapes, 1.0 - sparsity)
    raise ValueError(f"Unknown sparse init {init!r}: use 'uniform' or 'erk' (SNIP is not implemented)")


def _rank(x: jax.Array) -> jax.Array:
    """Ascending rank of every element of `x` (ties: lower flat index first), shaped like `x`."""
    flat = x.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    return jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32)).reshape(x.shape)


def _init_mask(key: jax.Array, shape: tuple[int, ...], density: float) -> jax.Array:
    active = min(math.prod(shape), max(1, round(density * math.prod(shape))))
    return _rank(jax.random.uniform(key, shape)) < active


def _prune_regrow(weight: jax.Array, mask: jax.Array, key: jax.Array, rate: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(new mask, regrown): drop the n smallest |weight| among active, activate n random others."""
    n = jnp.round(rate * jnp.sum(mask)).astype(jnp.int32)
    dropped = mask & (_rank(jnp.where(mask, jnp.abs(weight), jnp.inf)) < n)
    r = jax.random.uniform(key, mask.shape)
    priority = jnp.where(mask, jnp.where(dropped, r, -1.0), 1.0 + r)  # inactive before > just dropped > kept
    grown = _rank(-priority) < n
    return (mask & ~dropped) | grown, grown


def prune_rate_at(step: jax.Array, rate: float, schedule: str, decay_steps: int | None) -> jax.Array:
    if schedule == "constant":
        return jnp.asarray(rate, jnp.float32)
    frac = jnp.minimum(step, decay_steps) / decay_steps
    return rate * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))


def dynamic_sparsity(sparsity: float = 0.4, init: str = "erk", update_every: int = 100, prune_rate: float = 0.3,
                     schedule: str = "cosine", decay_steps: int | None = None, seed: int = 0,
                     min_ndim: int = 2) -> optax.GradientTransformation:
    """The transform (see the module docstring); use it after the base optimizer."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"Unknown prune-rate schedule {schedule!r}: use 'cosine' or 'constant'")
    if schedule == "cosine" and not (decay_steps and decay_steps > 0):
        raise ValueError("dynamic_sparsity with schedule='cosine' needs decay_steps (usually config.total_steps)")
    if update_every < 1 or not 0.0 <= prune_rate <= 1.0:
        raise ValueError(f"need update_every >= 1 and 0 <= prune_rate <= 1, got {update_every}, {prune_rate}")

    def init_fn(params: Any) -> SparsityState:
        leaves, treedef = jax.tree.flatten(params)
        sparse = [i for i, p in enumerate(leaves) if p.ndim >= min_ndim]
        densities = dict(zip(sparse, layer_densities([tuple(leaves[i].shape) for i in sparse], sparsity, init)))
        key = jax.random.PRNGKey(seed)
        masks = [_init_mask(jax.random.fold_in(key, i), tuple(p.shape), densities[i]) if i in densities
                 else jnp.ones((), bool) for i, p in enumerate(leaves)]
        return SparsityState(jnp.zeros((), jnp.int32), key, jax.tree.unflatten(treedef, masks))

    def update_fn(updates: Any, state: SparsityState, params: Any = None) -> tuple[Any, SparsityState]:
        if params is None:
            raise ValueError("dynamic_sparsity needs the parameters (tx.update(grads, state, params))")
        count = state.count + 1
        rate = prune_rate_at(count, prune_rate, schedule, decay_steps)
        u, treedef = jax.tree.flatten(updates)
        m, p = treedef.flatten_up_to(state.masks), treedef.flatten_up_to(params)
        sparse = [i for i in range(len(u)) if m[i].ndim > 0]

        def regrow(_):
            step_key = jax.random.fold_in(state.key, count)
            new = [_prune_regrow(jnp.where(m[i], p[i] + u[i], 0.0), m[i], jax.random.fold_in(step_key, i), rate)
                   for i in sparse]
            return [a for a, _ in new], [b for _, b in new]

        def keep(_):
            return [m[i] for i in sparse], [jnp.zeros_like(m[i]) for i in sparse]

        do = (count % update_every == 0) & (rate > 0)
        new_masks, grown = jax.lax.cond(do, regrow, keep, None) if sparse else ([], [])
        out, masks = list(u), list(m)
        for j, i in enumerate(sparse):
            out[i] = jnp.where(new_masks[j] & ~grown[j], u[i], -p[i]).astype(u[i].dtype)
            masks[i] = new_masks[j]
        return jax.tree.unflatten(treedef, out), SparsityState(count, state.key, jax.tree.unflatten(treedef, masks))

    return optax.GradientTransformation(init_fn, update_fn)


@TRANSFORMS.register(NAME)
def _factory(params: Any, cfg: Any, **kwargs: Any) -> optax.GradientTransformation:
    """Rule transform `("dynamic_sparsity", {...})` for `final_transforms` (kwargs of `dynamic_sparsity`)."""
    return dynamic_sparsity(**kwargs)


def sparsity_states(opt_state: Any) -> list[SparsityState]:
    """Every `SparsityState` inside an optimizer state."""
    found = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SparsityState))
    return [s for s in found if isinstance(s, SparsityState)]


def apply_masks(params: Any, opt_state: Any) -> Any:
    """`params` with every inactive weight set to zero (e.g. right after `tx.init`, before the first step)."""
    for state in sparsity_states(opt_state):
        params = state.init_params(params)
    return params


def mask_densities(opt_state: Any) -> dict[str, float]:
    """`{param path: fraction of active weights}` from the masks in the optimizer state."""
    out = {}
    for state in sparsity_states(opt_state):
        for path, m in jax.tree_util.tree_leaves_with_path(state.masks):
            if m.ndim:
                out[path_str(path)] = float(np.mean(np.asarray(m)))
    return out


def density_report(params: Any, min_ndim: int = 2) -> dict[str, Any]:
    """Realised sparsity from the weights: `layers` {path: non-zero fraction} over leaves with `ndim >= min_ndim`,
    `density` over those leaves, `params` (dense count) and `nonzero_params` (all leaves; SLaK's accounting)."""
    layers, total, nonzero, w_total, w_nonzero = {}, 0, 0, 0, 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        x = np.asarray(leaf)
        nz = int(np.count_nonzero(x))
        total, nonzero = total + x.size, nonzero + nz
        if x.ndim >= min_ndim:
            layers[path_str(path)] = nz / max(x.size, 1)
            w_total, w_nonzero = w_total + x.size, w_nonzero + nz
    return {"layers": layers, "density": w_nonzero / max(w_total, 1), "params": total, "nonzero_params": nonzero}
