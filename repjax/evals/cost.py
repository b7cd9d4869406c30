"""Model cost: parameter count, multiply-accumulates, XLA's FLOP count and inference throughput.

Two counts, named for what they are:
- `macs_analytic`: the family's analytic multiply-accumulates of one image in the inference (deploy) form
  (`Family.macs`), the papers' convention; absent where the family has none.
- `xla_flops_reference`: XLA's cost analysis of one image's forward pass with every depthwise convolution
  traced with the reference algorithm (`repjax.nn.dwconv.forced_method('native')`), so that it counts the
  convolution (2 FLOPs per multiply-add) and not the FFT / matmul / shift arithmetic the automatic choice runs
  (for one 15x15 depthwise conv those count anywhere from 0.49M to 12.6M FLOPs where the convolution is 7.37M
  multiply-adds). XLA leaves out the taps that fall on zero padding (5.75M of those 7.37M on a 32x32 map) and
  counts BN, activations and other elementwise work, which `macs_analytic` leaves out.
- `traced_macs` (tests): the convolutions' and matrix products' multiply-adds read off the traced program,
  padding included: the independent count `Family.macs` is tested against.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp

from repjax import bench, models
from repjax.bench import param_count
from repjax.evals import EVALUATORS
from repjax.nn import dwconv

REFERENCE_METHOD = "native"


def inference_flops(model: nn.Module, variables: dict[str, Any], image_shape: tuple[int, ...],
                    depthwise_method: str | None = REFERENCE_METHOD) -> float:
    """XLA's FLOPs of one image's forward pass in eval mode; depthwise convs traced with `depthwise_method`
    (None: the algorithms the model would run)."""
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    if depthwise_method is None:
        lowered = fn.lower(variables, x)
    else:
        with dwconv.forced_method(depthwise_method):
            lowered = fn.lower(variables, x)
    analysis = lowered.compile().cost_analysis()
    if isinstance(analysis, list | tuple):  # older JAX returned one dict per device
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


def _sub_jaxprs(params: dict[str, Any]) -> list[Any]:
    subs = []
    for v in params.values():
        for item in v if isinstance(v, list | tuple) else (v,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                subs.append(item.jaxpr)
            elif isinstance(item, jax.extend.core.Jaxpr):
                subs.append(item)
    return subs


def _jaxpr_macs(jaxpr: Any) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        out = eqn.outvars[0].aval
        if eqn.primitive.name == "conv_general_dilated":
            rhs = eqn.invars[1].aval
            total += out.size * rhs.size // rhs.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
        elif eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            total += out.size * math.prod(eqn.invars[0].aval.shape[d] for d in lhs_contract)
        for sub in _sub_jaxprs(eqn.params):
            total += _jaxpr_macs(sub)
    return total


def traced_macs(model: nn.Module, variables: dict[str, Any], image_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of the convolutions and matrix products in the traced forward pass of one image
    (eval mode, depthwise convs with the reference algorithm), padding taps included as the papers count them:
    an independent count of what `Family.macs` computes analytically (XLA's count leaves out taps that fall
    on padding and adds elementwise work). Counted as the marginal cost of one more image (batch 2 minus batch
    1), so work that does not depend on the input (PeLK's kernel-wise PE, computed on the weights once per
    call) is left out, as the papers' per-image FLOPs leave it out."""

    def count(batch: int) -> int:
        x = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
        with dwconv.forced_method(REFERENCE_METHOD):
            closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
        return _jaxpr_macs(closed.jaxpr)

    return count(2) - count(1)


def analytic_macs(model: nn.Module, image_shape: tuple[int, ...]) -> int | None:
    """The family's `macs(model, height, width)` for this module, or None when no family declares it. A family
    whose count depends on the input channels takes them as `in_channels` (default 3)."""
    family = models.family_of(model)
    if family is None:
        return None
    extra = {}
    if len(image_shape) > 2 and "in_channels" in inspect.signature(family.macs).parameters:
        extra["in_channels"] = image_shape[2]
    try:
        return int(family.macs(model, image_shape[0], image_shape[1], **extra))
    except (ValueError, NotImplementedError):
        return None


def model_cost(model: nn.Module, variables: dict[str, Any], image_shape: tuple[int, ...]) -> dict[str, float]:
    """`params`, `xla_flops_reference` and, where the family has it, `macs_analytic` (module docstring)."""
    out: dict[str, float] = {"params": param_count(variables["params"]),
                             "xla_flops_reference": inference_flops(model, variables, tuple(image_shape))}
    macs = analytic_macs(model, tuple(image_shape))
    if macs is not None:
        out["macs_analytic"] = macs
    return out


def throughput(model: nn.Module, variables: dict[str, Any], image_shape: tuple[int, ...],
               batch_size: int = 64, iters: int = 10) -> float:
    """Inference images/s at `batch_size` (compiled, warmed up, blocking on results)."""
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    x = jnp.zeros((batch_size, *image_shape), jnp.float32)
    jax.block_until_ready(fn(variables, x))
    return bench.images_per_second(lambda: fn(variables, x), iters, batch_size)


@EVALUATORS.register("cost")
def cost(model: nn.Module, variables: dict[str, Any], config, mesh, *, image_shape: tuple[int, ...],
         batch_size: int = 64, iters: int = 10) -> dict[str, float]:
    return {**model_cost(model, variables, tuple(image_shape)),
            "images_per_s": throughput(model, variables, tuple(image_shape), batch_size, iters)}
