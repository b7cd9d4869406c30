"""One depthwise convolution for every model in repjax, with several exact algorithms.

    y = depthwise_conv(x, kernel)                       # x [N, H, W, C], kernel [kh, kw, 1, C] (HWIO)
    y = piecewise_conv(x, theta, sizes)                  # kernel = expand_piecewise(theta, sizes)

Stride 1, zero padding kh//2 / kw//2 ('same' output size), odd kernel sizes. `method` picks the algorithm:
'native' (XLA's grouped convolution, the reference), 'shift' (shift-and-add, small kernels), 'fft' (FFT,
large kernels), 'boxsum' (box sums over the cells of a piecewise-constant kernel, PeLK Eq. 1); 'auto' chooses
by backend, shape and kernel structure (`choose`, `choose_piecewise`). Every algorithm computes the same
function with gradients for x and the kernel; kernels larger than the map are cropped exactly to (2H-1)x(2W-1).
`with forced_method('native'):` overrides every choice while tracing (what cost analysis uses to count the
convolution rather than the algorithm).
"""

from __future__ import annotations

from repjax.nn.dwconv.ops import (
    METHODS,
    choose,
    choose_piecewise,
    depthwise_conv,
    expand_piecewise,
    forced_method,
    piecewise_conv,
)

__all__ = ["METHODS", "choose", "choose_piecewise", "depthwise_conv", "expand_piecewise", "forced_method",
           "piecewise_conv"]
