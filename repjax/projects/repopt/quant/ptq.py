"""Post-training int8 quantization of any Flax Linen model, without changing the model.

`nn.intercept_methods` wraps the `__call__` of every `nn.Conv` / `repjax.nn.conv.Conv` / `nn.Dense` (`LAYERS`):
`calibrate` records the range of each layer's input, and `quantized_apply` fake-quantizes each layer's input per
tensor, while `quantize_weights` rounds their kernels per output channel (see `fake_quant`). Layers are keyed by
module path (`stage1_0/rbr_reparam`); a module called more than once gets `path#1`, `path#2`, ... for its later
calls.

Meant for deploy-form models (BN fused or absent, e.g. RepVGG after `reparameterize`): BatchNorm, biases (int32
in a real int8 kernel, so exact enough to keep in float), pooling, additions and the output logits stay float.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from repjax.nn.conv import Conv
from repjax.projects.repopt.quant.fake_quant import act_qparams, fake_quant_act, fake_quant_weight

LAYERS: tuple[type[nn.Module], ...] = (nn.Conv, Conv, nn.Dense)
METHODS = ("minmax", "percentile")
Ranges = dict[str, tuple[float, float]]


def _tap(fn: Callable[[str, jax.Array], jax.Array], layers: Sequence[type[nn.Module]]) -> Callable:
    """Interceptor that replaces the input x of each quantized layer call by fn(key, x)."""
    calls: collections.Counter = collections.Counter()
    layers = tuple(layers)

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, layers):
            return next_fun(*args, **kwargs)
        path = "/".join(context.module.path)
        key = f"{path}#{calls[path]}" if calls[path] else path
        calls[path] += 1
        if args:
            return next_fun(fn(key, args[0]), *args[1:], **kwargs)
        return next_fun(**{**kwargs, "inputs": fn(key, kwargs["inputs"])})

    return interceptor


def _images(batch: Any) -> Any:
    return batch["image"] if isinstance(batch, Mapping) else batch


def calibrate(model: nn.Module, variables: Mapping[str, Any], batches: Iterable[Any], *, method: str = "minmax",
              percentile: float = 99.99, layers: Sequence[type[nn.Module]] = LAYERS,
              apply_kwargs: Mapping[str, Any] | None = None) -> Ranges:
    """Input range (lo, hi) of every quantized layer over calibration batches (arrays or {'image': ...}).

    `"minmax"`: the smallest and largest value seen. `"percentile"`: the (100 - p)-th and p-th percentiles of
    each batch's values, averaged over batches (clips rare outliers).
    """
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; use one of {METHODS}")
    kwargs = {"train": False} if apply_kwargs is None else dict(apply_kwargs)
    q = jnp.array([100.0 - percentile, percentile])

    def record(key: str, x: jax.Array, out: dict) -> jax.Array:
        xf = x.astype(jnp.float32)
        out[key] = jnp.stack([xf.min(), xf.max()]) if method == "minmax" else jnp.percentile(xf.reshape(-1), q)
        return x

    @jax.jit
    def batch_ranges(variables, x):
        out: dict[str, jax.Array] = {}
        with nn.intercept_methods(_tap(lambda k, a: record(k, a, out), layers)):
            model.apply(variables, x, **kwargs)
        return out

    per_batch = [jax.device_get(batch_ranges(variables, _images(b))) for b in batches]
    if not per_batch:
        raise ValueError("calibrate needs at least one batch")
    ranges = {}
    for key in per_batch[0]:
        lo, hi = np.stack([r[key] for r in per_batch]).T
        lo, hi = (lo.min(), hi.max()) if method == "minmax" else (lo.mean(), hi.mean())
        ranges[key] = (float(lo), float(hi))
    return ranges


def layer_paths(ranges: Iterable[str]) -> set[str]:
    """Module paths of the calibrated layers (repeat-call suffixes removed)."""
    return {key.split("#")[0] for key in ranges}


def quantize_weights(params: Mapping[str, Any], paths: Iterable[str] | None = None) -> dict[str, Any]:
    """Params with every `kernel` (of the modules at `paths`, default: all kernels of rank >= 2) fake-quantized
    to per-output-channel symmetric int8."""
    flat = traverse_util.flatten_dict(dict(params))
    wanted = None if paths is None else set(paths)
    done: set[str] = set()
    out = {}
    for path, leaf in flat.items():
        owner = "/".join(path[:-1])
        if path[-1] == "kernel" and (owner in wanted if wanted is not None else jnp.ndim(leaf) >= 2):
            out[path] = fake_quant_weight(leaf)
            done.add(owner)
        else:
            out[path] = leaf
    if wanted is not None and wanted - done:
        raise KeyError(f"no 'kernel' parameter for quantized layers: {sorted(wanted - done)}")
    return traverse_util.unflatten_dict(out)


def quantized_apply(model: nn.Module, variables: Mapping[str, Any], ranges: Mapping[str, tuple[float, float]],
                    x: jax.Array, *, act_mode: str = "affine", quantize_kernels: bool = True,
                    layers: Sequence[type[nn.Module]] = LAYERS, apply_kwargs: Mapping[str, Any] | None = None) -> Any:
    """`model.apply` with int8-simulated layer inputs (per tensor, from `ranges`) and, unless the params are
    already quantized (`quantize_kernels=False`), per-channel int8 kernels. Jit-able."""
    kwargs = {"train": False} if apply_kwargs is None else dict(apply_kwargs)
    qparams = {k: act_qparams(lo, hi, act_mode) for k, (lo, hi) in ranges.items()}
    if quantize_kernels:
        variables = {**variables, "params": quantize_weights(variables["params"], layer_paths(ranges))}

    def fq(key: str, a: jax.Array) -> jax.Array:
        if key not in qparams:
            raise KeyError(f"layer {key!r} has no calibrated range (calibrate with the same model and layers)")
        return fake_quant_act(a, qparams[key])

    with nn.intercept_methods(_tap(fq, layers)):
        return model.apply(variables, x, **kwargs)
