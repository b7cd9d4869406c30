"""repjax.nn.dwconv: every algorithm equals XLA's grouped conv (forward and gradients), PeLK Eq. 1 expansion.

Tolerances (float32): max |a - b| <= RTOL * max |reference| with RTOL = 1e-5 for outputs and 2e-5 for gradients
(FFT round-off grows slowly with the transform size). bf16 inputs: the non-native algorithms upcast to float32,
compute, and cast the result back to bf16; compared at bf16 resolution (2e-2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repjax.nn.dwconv import METHODS, choose, choose_piecewise, depthwise_conv, expand_piecewise, piecewise_conv
from repjax.nn.dwconv.boxsum import cells
from repjax.nn.dwconv.fft import fast_size

RTOL, GRAD_RTOL = 1e-5, 2e-5
FAST = ["shift", "fft", "boxsum", "matmul", "auto"]
# (N, H, W, C, K): odd/even, non-square maps, kernels larger than the map (51 on 14x14, 13 on 7x7).
CASES = [(2, 6, 6, 3, 1), (2, 7, 5, 3, 3), (1, 8, 9, 4, 7), (2, 5, 6, 2, 13), (1, 14, 14, 2, 51), (2, 7, 7, 3, 13)]
GRIDS = {13: (2, 2, 1, 1, 1, 1, 1, 2, 2), 51: (9, 8, 4, 2, 1, 1, 1, 1, 1, 2, 4, 8, 9), 17: (5, 2, 1, 1, 1, 2, 5),
         5: (2, 1, 2)}


def _close(a, b, rtol: float) -> None:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    err, scale = np.abs(a - b).max(), np.abs(b).max()
    assert scale > 0 and err <= rtol * scale, f"max err {err:.3g} > {rtol:g} * {scale:.3g}"


def _normal(shape, seed):
    """numpy's generator: jax.random would compile a threefry kernel per shape (slow on the test machine)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _data(n, h, w, c, kh, kw=None, seed=0):
    kw = kh if kw is None else kw
    return _normal((n, h, w, c), seed), _normal((kh, kw, 1, c), seed + 1)


@jax.jit
def _native(x, k):
    return depthwise_conv(x, k, "native")


def _vjp(fn, *args, seed=3):
    """Output and the gradients of <fn(*args), g> for a random cotangent g, under jit."""
    def run(g, *a):
        y, back = jax.vjp(fn, *a)
        return y, back(g.astype(y.dtype))
    shape = jax.eval_shape(fn, *args).shape
    return jax.jit(run)(_normal(shape, seed), *args)


def test_native_matches_numpy_loop():
    x, k = _data(2, 5, 4, 3, 5, 3)
    xn, kn = np.asarray(x, np.float64), np.asarray(k, np.float64)
    ref = np.zeros(xn.shape)
    for i in range(5):
        for j in range(4):
            for u in range(5):
                for v in range(3):
                    a, b = i + u - 2, j + v - 1
                    if 0 <= a < 5 and 0 <= b < 4:
                        ref[:, i, j, :] += xn[:, a, b, :] * kn[u, v, 0, :]
    _close(_native(x, k), ref, RTOL)


# Dense kernels through boxsum (an all-ones grid) are only meant for small K; its real grids are tested below.
@pytest.mark.parametrize("method,case", [(m, c) for m in FAST for c in CASES if not (m == "boxsum" and c[-1] > 13)],
                         ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v)))
def test_method_matches_native_forward_and_grads(method, case):
    n, h, w, c, k = case
    x, kern = _data(n, h, w, c, k)
    y, (dx, dk) = _vjp(lambda a, b: depthwise_conv(a, b, method), x, kern)
    y0, (dx0, dk0) = _vjp(lambda a, b: depthwise_conv(a, b, "native"), x, kern)
    _close(y, y0, RTOL)
    _close(dx, dx0, GRAD_RTOL)
    _close(dk, dk0, GRAD_RTOL)


@pytest.mark.parametrize("method", ["shift", "fft"])
def test_non_square_kernel(method):
    x, kern = _data(2, 6, 9, 3, 3, 7)
    y, (dx, dk) = _vjp(lambda a, b: depthwise_conv(a, b, method), x, kern)
    y0, (dx0, dk0) = _vjp(lambda a, b: depthwise_conv(a, b, "native"), x, kern)
    _close(y, y0, RTOL), _close(dx, dx0, GRAD_RTOL), _close(dk, dk0, GRAD_RTOL)


@pytest.mark.parametrize("method", ["shift", "fft"])
def test_cropped_taps_get_exactly_zero_gradient(method):
    x, kern = _data(1, 7, 5, 2, 15)  # taps beyond offset 6 (rows) / 4 (cols) only read padding
    _, (_, dk) = _vjp(lambda a, b: depthwise_conv(a, b, method), x, kern)
    dk = np.asarray(dk)
    inner = dk[1:14, 3:12]
    assert np.all(np.abs(inner).max(axis=(2, 3)) > 0)
    mask = np.ones(dk.shape[:2], bool)
    mask[1:14, 3:12] = False
    assert np.all(dk[mask] == 0.0)


@pytest.mark.parametrize("chunk_bytes", [1, 2 * 5 * 6 * 3 * 4, 1 << 30], ids=["one-image", "two-images", "whole"])
def test_shift_kernel_grad_in_batch_chunks(chunk_bytes, monkeypatch):
    """'shift' sums its kernel gradient over batch chunks of at most KGRAD_CHUNK_BYTES: one image, two of six, or
    the whole batch give XLA's gradient."""
    from repjax.nn.dwconv import shift as shift_module

    monkeypatch.setattr(shift_module, "KGRAD_CHUNK_BYTES", chunk_bytes)
    x, kern = _data(6, 5, 6, 3, 3, 5)
    dk_jaxpr = str(jax.make_jaxpr(lambda a, g: shift_module.kernel_grad(a, g, 3, 5))(x, x))
    looped = "scan" in dk_jaxpr or "while" in dk_jaxpr  # fori_loop: a scan when its trip count is static
    assert looped == (chunk_bytes < x.nbytes)  # the chunked cases loop over chunks
    _, (dx, dk) = _vjp(lambda a, b: depthwise_conv(a, b, "shift"), x, kern)
    _, (dx0, dk0) = _vjp(lambda a, b: depthwise_conv(a, b, "native"), x, kern)
    _close(dx, dx0, GRAD_RTOL), _close(dk, dk0, GRAD_RTOL)


def test_expand_piecewise_is_eq1_loop():
    sizes = (3, 2, 1, 2, 3)
    theta = _normal((5, 5, 1, 2), 0)
    edges = np.concatenate([[0], np.cumsum(sizes)])
    ref = np.zeros((11, 11, 1, 2), np.float32)
    for a in range(5):
        for b in range(5):  # Z_ab = [edges[a], edges[a+1]) x [edges[b], edges[b+1]] takes theta[a, b]
            ref[edges[a]:edges[a + 1], edges[b]:edges[b + 1]] = np.asarray(theta[a, b])
    np.testing.assert_array_equal(np.asarray(jax.jit(expand_piecewise, static_argnums=1)(theta, sizes)), ref)


def test_theta_grad_is_region_sum_of_dense_grad():
    sizes = GRIDS[13]
    x, _ = _data(2, 9, 8, 3, 1)
    theta = _normal((9, 9, 1, 3), 1)
    dense = expand_piecewise(theta, sizes)
    _, (_, g_dense) = _vjp(lambda a, b: depthwise_conv(a, b, "native"), x, dense)
    edges = np.concatenate([[0], np.cumsum(sizes)])
    g = np.asarray(g_dense)
    ref = np.array([[g[edges[a]:edges[a + 1], edges[b]:edges[b + 1]].sum(axis=(0, 1)) for b in range(9)]
                    for a in range(9)])
    for method in ("native", "fft", "boxsum", "matmul", "auto"):
        _, (_, g_theta) = _vjp(lambda a, t, m=method: piecewise_conv(a, t, sizes, m), x, theta)
        _close(g_theta, ref, GRAD_RTOL)


@pytest.mark.parametrize("method", ["boxsum", "fft", "shift", "matmul", "auto"])
@pytest.mark.parametrize("case", [(2, 7, 7, 3, 13), (1, 14, 14, 2, 51), (2, 9, 12, 2, 17), (1, 6, 5, 3, 51),
                                  (2, 4, 4, 2, 5)], ids=lambda c: "x".join(map(str, c)))
def test_piecewise_matches_native(method, case):
    n, h, w, c, k = case
    sizes = GRIDS[k]
    x, _ = _data(n, h, w, c, 1)
    theta = _normal((len(sizes), len(sizes), 1, c), 5)
    y, (dx, dt) = _vjp(lambda a, t: piecewise_conv(a, t, sizes, method), x, theta)
    y0, (dx0, dt0) = _vjp(lambda a, t: depthwise_conv(a, expand_piecewise(t, sizes), "native"), x, theta)
    _close(y, y0, RTOL), _close(dx, dx0, GRAD_RTOL), _close(dt, dt0, GRAD_RTOL)


def test_boxsum_cells_clip_to_map():
    # 51-wide grid on a 6-wide map keeps offsets -5..5: the 9- and 8-cells vanish, the 4-cells keep one tap.
    assert cells(GRIDS[51], 6) == [(2, -5, 1), (3, -4, 2), (4, -2, 1), (5, -1, 1), (6, 0, 1), (7, 1, 1), (8, 2, 1),
                                   (9, 3, 2), (10, 5, 1)]
    assert sum(s for _, _, s in cells(GRIDS[51], 100)) == 51


def test_bf16_input():
    x, kern = _data(2, 7, 6, 3, 5)
    ref = _native(x, kern)
    for method in ("native", *FAST):
        y = jax.jit(lambda a, b, m=method: depthwise_conv(a, b, m))(x.astype(jnp.bfloat16), kern)
        assert y.dtype == jnp.bfloat16
        _close(y.astype(jnp.float32), ref, 2e-2)
    g = jax.jit(jax.grad(lambda a, b: depthwise_conv(a, b, "fft").astype(jnp.float32).sum(), argnums=(0, 1)))(
        x.astype(jnp.bfloat16), kern)
    assert g[0].dtype == jnp.bfloat16 and g[1].dtype == jnp.float32


def test_choose():
    assert choose((8, 56, 56, 128), (51, 51, 1, 128), "cpu") == "fft"
    assert choose((8, 56, 56, 96), (7, 7, 1, 96), "cpu") == "fft"
    assert choose((8, 56, 56, 96), (1, 1, 1, 96), "cpu") == "shift"
    assert choose((8, 56, 56, 96), (3, 3, 1, 96), "cpu") == "shift"
    assert choose((32, 8, 8, 96), (3, 3, 1, 96), "cpu") == "shift"  # a small map with many channels
    assert choose((768, 8, 8, 4), (3, 3, 1, 4), "cpu") == "matmul"  # a small map with few channels
    assert choose((768, 8, 8, 4), (1, 1, 1, 4), "cpu") == "shift"  # 1x1: a multiply
    assert choose((8, 56, 56, 96), (5, 5, 1, 96), "cpu") == "fft"
    assert choose((8, 1, 1, 96), (51, 51, 1, 96), "cpu") == "shift"  # cropped to 1x1
    assert choose((8, 7, 7, 374), (13, 13, 1, 374), "cpu") == "matmul"  # small map: one hw x hw matrix
    assert choose((8, 14, 14, 187), (47, 47, 1, 187), "cpu") == "fft"
    assert choose((8, 56, 56, 96), (7, 7, 1, 96), "gpu") == "native"
    assert choose((8, 56, 56, 96), (51, 51, 1, 96), "gpu") == "fft"
    assert choose_piecewise((8, 56, 56, 46), GRIDS[51], "cpu") == "fft"
    assert choose_piecewise((8, 7, 7, 374), GRIDS[13], "cpu") == "matmul"
    assert set(METHODS.names()) == {"native", "shift", "fft", "boxsum", "matmul"}


def test_errors_and_fft_sizes():
    x = jnp.zeros((1, 5, 5, 2))
    with pytest.raises(ValueError):
        depthwise_conv(x, jnp.zeros((4, 4, 1, 2)))
    with pytest.raises(ValueError):
        depthwise_conv(x, jnp.zeros((3, 3, 1, 3)))
    with pytest.raises(KeyError):
        depthwise_conv(x, jnp.zeros((3, 3, 1, 2)), "fftt")
    assert [fast_size(n) for n in (1, 11, 13, 81, 97, 143)] == [1, 12, 14, 81, 98, 144]


def test_benchmark_quick_runs(tmp_path):
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_dwconv.py"
    spec = importlib.util.spec_from_file_location("bench_dwconv", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["quick"] and len(report["results"]) == 3 and (tmp_path / "speedup.png").exists()
    assert all(r["ms"]["auto"] > 0 and r["ms"]["torch"] > 0 for r in report["results"])
