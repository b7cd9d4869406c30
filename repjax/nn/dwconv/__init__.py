"""One depthwise convolution for every model in repjax, with several exact algorithms.

    y = depthwise_conv(x, kernel)                       # x [N, H, W, C], kernel [kh, kw, 1, C] (HWIO)
    y = piecewise_conv(x, theta, sizes)                  # kernel = expand_piecewise(theta, sizes)

Stride 1, zero padding kh//2 / kw//2 ('same' output size), odd kernel sizes. `method` picks the algorithm
('native' is XLA's grouped convolution, the reference); 'auto' chooses by backend, shape and kernel
structure. Every algorithm computes the same function (tests compare each against 'native').
"""

from __future__ import annotations

from repjax.nn.dwconv.ops import METHODS, depthwise_conv, expand_piecewise, piecewise_conv

__all__ = ["METHODS", "depthwise_conv", "expand_piecewise", "piecewise_conv"]
