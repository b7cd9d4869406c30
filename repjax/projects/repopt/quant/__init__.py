"""Simulated int8 post-training quantization (fake-quant) for any Flax Linen model; see `ptq` and `fake_quant`.
The evaluator `int8_ptq` (`repjax.projects.repopt.quant.evaluator`) runs it over a data split."""

from repjax.projects.repopt.quant.fake_quant import (
    ActQParams,
    act_qparams,
    fake_quant_act,
    fake_quant_weight,
    quantize_weight,
    weight_scales,
)
from repjax.projects.repopt.quant.ptq import LAYERS, Ranges, calibrate, layer_paths, quantize_weights, quantized_apply

__all__ = [
    "LAYERS",
    "ActQParams",
    "Ranges",
    "act_qparams",
    "calibrate",
    "fake_quant_act",
    "fake_quant_weight",
    "layer_paths",
    "quantize_weight",
    "quantize_weights",
    "quantized_apply",
    "weight_scales",
]
