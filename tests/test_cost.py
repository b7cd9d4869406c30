"""Cost figures: the reference depthwise algorithm for XLA's count, analytic MACs in the cost evaluator."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from repjax import models
from repjax.evals import cost
from repjax.nn import dwconv
from repjax.nn.conv import Conv


class _Depthwise15(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return Conv(32, (15, 15), padding=((7, 7), (7, 7)), feature_group_count=32, use_bias=False)(x)


def test_one_15x15_depthwise_conv_counts_the_convolution():
    """32x32x32 input, 15x15 depthwise, 'same': the direct count is 15*15*32*32*32 = 7,372,800 multiply-adds
    (padding taps included, the papers' convention), read exactly off the traced program. XLA's count with the
    reference algorithm is 2 FLOPs per multiply-add over the taps inside the image: 424 per axis
    (32*15 - 2*(1+...+7)), so 2 * 424^2 * 32; the automatic choice (FFT on CPU) counts something else."""
    model = _Depthwise15()
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 32))))
    assert cost.traced_macs(model, variables, (32, 32, 32)) == 15 * 15 * 32 * 32 * 32 == 7_372_800
    valid = 32 * 15 - 2 * sum(range(1, 8))
    assert cost.inference_flops(model, variables, (32, 32, 32)) == 2 * valid**2 * 32
    assert cost.inference_flops(model, variables, (32, 32, 32), depthwise_method="shift") != 2 * valid**2 * 32


def test_forced_method_overrides_and_restores():
    calls = []
    x, k = jnp.ones((1, 8, 8, 2)), jnp.ones((3, 3, 1, 2))
    original = dwconv.METHODS.get("native")
    with dwconv.forced_method("native"):
        jax.make_jaxpr(lambda x, k: dwconv.depthwise_conv(x, k, "fft"))(x, k)
        calls.append(dwconv.ops._FORCED[-1])
    assert calls == ["native"] and not dwconv.ops._FORCED and dwconv.METHODS.get("native") is original
    with pytest.raises(KeyError, match="Unknown depthwise conv method"), dwconv.forced_method("nope"):
        pass


def test_model_cost_reports_analytic_macs_where_the_family_has_them():
    model = models.create("repvgg_tiny", deploy=True)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    out = cost.model_cost(model, variables, (32, 32, 3))
    assert out["macs_analytic"] == models.variant("repvgg_tiny").family.macs(model, 32, 32)
    assert out["params"] == cost.param_count(variables["params"]) and out["xla_flops_reference"] > 0

    class Plain(nn.Module):  # no family: no analytic count, XLA's still there
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(2)(x)

    v = jax.eval_shape(lambda: Plain().init(jax.random.key(0), jnp.zeros((1, 4))))
    out = cost.model_cost(Plain(), v, (4,))
    assert "macs_analytic" not in out and out["xla_flops_reference"] > 0
