"""Peripheral convolution (PeLK): grids and ratios from the paper, Eq. 1 expansion, Eq. 3 PE semantics,
partial split, and the theta-form re-parameterization of the s x s branch.

Tolerances (float32, CPU): against numpy loops 1e-5 absolute on O(1) values; deploy vs training form in
eval mode with randomized BN statistics, max|diff| <= 1e-5 * max|ref|.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repjax.nn import dwconv
from repjax.nn.reparam import pad_kernel
from repjax.projects.pelk import lk_mixers as lkm, peripheral as pk

# (k, r_c, half grid outer -> centre, k', ratio rounded) -- spec table 1.1 (Fig. 1b, Tab. 5 #5, Tab. 6, PeLK-101)
GRIDS = [
    (31, 2, (7, 4, 2, 1, 1, 1), 11, 0.126),
    (33, 2, (8, 4, 2, 1, 1, 1), 11, 0.111),
    (51, 0, (11, 8, 4, 2, 1), 9, 0.031),
    (51, 1, (10, 8, 4, 2, 1, 1), 11, 0.047),
    (51, 2, (9, 8, 4, 2, 1, 1, 1), 13, 0.065),
    (51, 3, (8, 8, 4, 2, 1, 1, 1, 1), 15, 0.087),
    (101, 3, (17, 16, 8, 4, 2, 1, 1, 1, 1), 17, 0.028),
    (67, 3, (16, 8, 4, 2, 1, 1, 1, 1), 15, 0.050),
    (69, 3, (1, 16, 8, 4, 2, 1, 1, 1, 1), 17, 0.061),
    (13, 2, (2, 2, 1, 1, 1), 9, 0.479),
]


@pytest.mark.parametrize("k,r_c,half,kp,ratio", GRIDS)
def test_grid_table(k, r_c, half, kp, ratio):
    """Every printed grid, Sum S = k, mirror symmetry, k' = 2 (r_c + n_p) + 1, ratio (k'/k)^2."""
    assert pk.half_grid(k, r_c) == half
    s = pk.sharing_grid(k, r_c)
    assert sum(s) == k and s == s[::-1] and len(s) == kp == pk.reduced_size(k, r_c)
    assert round(pk.param_ratio(s), 3) == ratio


def test_degenerate_outer_cell_switch():
    """k=69, r_c=3 leaves a 1-wide outer cell: kept by default, merged into its neighbour on request."""
    assert pk.half_grid(69, 3, merge_degenerate=True) == (17, 8, 4, 2, 1, 1, 1, 1)
    assert pk.half_grid(101, 3, merge_degenerate=True) == pk.half_grid(101, 3)  # 17 is not degenerate


def test_table5_explicit_grids():
    """Tab. 5 (k=33): ratios 1.00 / 0.27 / 0.33 / 0.16 / 0.11 / 0.11; #5 is the Eq. 2 grid for r_c=2."""
    halves = [(1,) * 17, (2,) * 8 + (1,), (2,) * 7 + (1, 1, 1), (4, 4, 4, 2, 1, 1, 1), (8, 4, 2, 1, 1, 1),
              (1, 1, 2, 4, 8, 1)]
    ratios = [1.00, 0.27, 0.33, 0.16, 0.11, 0.11]
    for half, want in zip(halves, ratios, strict=True):
        s = pk.symmetric_grid(half)
        assert sum(s) == 33 and round(pk.param_ratio(s), 2) == want
    assert pk.symmetric_grid(halves[4]) == pk.sharing_grid(33, 2)


def test_table6_central_ratios_and_m():
    assert [round(100 * pk.central_ratio(51, r), 2) for r in range(4)] == [0.04, 0.35, 0.96, 1.88]
    assert pk.half_grid(51, 2, m=3) == (11, 9, 3, 1, 1, 1)  # cells 3, 9, then the clipped rest (23 - 12)
    assert len(pk.sharing_grid(51, 2, m=3)) == pk.reduced_size(51, 2, m=3)
    for k in range(3, 161, 2):  # closed form vs generator over a sweep
        for r_c in range(4):
            assert len(pk.sharing_grid(k, r_c)) == pk.reduced_size(k, r_c)


def _expand_loop(theta: np.ndarray, sizes) -> np.ndarray:
    """Eq. 1 literally: Z_ab = [sum(S[:a]), sum(S[:a+1])) x [sum(S[:b]), sum(S[:b+1])) takes theta[a, b]."""
    k, off = sum(sizes), np.concatenate([[0], np.cumsum(sizes)])
    w = np.zeros((k, k, *theta.shape[2:]), theta.dtype)
    for a in range(len(sizes)):
        for b in range(len(sizes)):
            w[off[a]:off[a + 1], off[b]:off[b + 1]] = theta[a, b]
    return w


def test_expansion_and_gradient():
    """expand_piecewise == Eq. 1 loop; d/dtheta == region sums of the dense-kernel gradient."""
    sizes = pk.sharing_grid(31, 2)
    theta = np.random.default_rng(0).normal(size=(len(sizes), len(sizes), 1, 3)).astype(np.float32)
    np.testing.assert_array_equal(dwconv.expand_piecewise(jnp.asarray(theta), sizes), _expand_loop(theta, sizes))
    g_dense = jnp.asarray(np.random.default_rng(1).normal(size=(31, 31, 1, 3)), jnp.float32)
    grad = jax.grad(lambda t: jnp.sum(dwconv.expand_piecewise(t, sizes) * g_dense))(jnp.asarray(theta))
    off = np.concatenate([[0], np.cumsum(sizes)])
    want = np.array([[np.asarray(g_dense)[off[a]:off[a + 1], off[b]:off[b + 1]].sum(axis=(0, 1))
                      for b in range(len(sizes))] for a in range(len(sizes))])
    np.testing.assert_allclose(grad, want, atol=1e-4)


def _eq3_loop(x: np.ndarray, w: np.ndarray, h: np.ndarray, valid_only: bool) -> np.ndarray:
    """Eq. 3 literally: Y(p) = sum_t w(t) (X(p+t) + h(t)); X zero outside; h added at every tap or only
    at taps inside the map."""
    hh, ww = x.shape[1:3]
    k, r = w.shape[0], w.shape[0] // 2
    y = np.zeros_like(x)
    for i in range(hh):
        for j in range(ww):
            for a in range(k):
                for b in range(k):
                    p, q = i + a - r, j + b - r
                    inside = 0 <= p < hh and 0 <= q < ww
                    xv = x[:, p, q] if inside else 0.0
                    hv = h[a, b] if (inside or not valid_only) else 0.0
                    y[:, i, j] += w[a, b, 0] * (xv + hv)
    return y


@pytest.mark.parametrize("mode", pk.PE_MODES)
@pytest.mark.parametrize("hw,k", [((5, 6), 7), ((4, 4), 3), ((3, 4), 9)])  # incl. kernel larger than the map
def test_pe_semantics(mode, hw, k):
    """conv + pe_term == the Eq. 3 loop; all_taps is a per-channel constant <w, h>."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, *hw, 3)).astype(np.float32)
    w = rng.normal(size=(k, k, 1, 3)).astype(np.float32)
    h = rng.normal(size=(k, k, 3)).astype(np.float32)
    term = pk.pe_term(jnp.asarray(w), jnp.asarray(h), hw, mode)
    y = dwconv.depthwise_conv(jnp.asarray(x), jnp.asarray(w)) + term
    np.testing.assert_allclose(y, _eq3_loop(x, w, h, mode == "valid_taps"), atol=1e-4)
    if mode == "all_taps":
        np.testing.assert_allclose(term, np.einsum("abc,abc->c", w[:, :, 0], h), rtol=1e-5)


def test_all_taps_pe_is_cancelled_by_train_bn():
    """The reason for the 'valid_taps' default: an all_taps PE is a per-channel constant, which the LK
    branch's train-mode BatchNorm subtracts exactly, so h gets no gradient through it."""
    mixer = lkm.PeripheralMixer(13, small_kernel=None, partial_ratio=1.0, pe_mode="all_taps")
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 6, 6, 4)), jnp.float32)
    v = mixer.init(jax.random.key(0), x, False, jnp.zeros((13, 13, 4)))
    h = 0.1 * jnp.ones((13, 13, 4))

    def loss(h, mode):
        m = mixer.clone(pe_mode=mode)
        y, _ = m.apply(v, x, True, h, mutable=["batch_stats"])
        return jnp.sum(y * x)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    assert float(jnp.max(jnp.abs(grad(h, "all_taps")))) < 1e-5
    assert float(jnp.max(jnp.abs(grad(h, "valid_taps")))) > 1e-3


def test_partial_channels_rounding():
    """g for the PeLK widths under each rule (the default 'floor' = int(3/8 C) is what the models use)."""
    assert [pk.partial_channels(c) for c in (124, 249, 499, 998)] == [46, 93, 187, 374]
    assert [pk.partial_channels(c, rounding="round") for c in (124, 249, 499, 998)] == [47, 93, 187, 374]
    assert [pk.partial_channels(c, rounding="ceil") for c in (124, 166)] == [47, 63]
    assert [pk.partial_channels(c, rounding="mult8") for c in (124, 166, 8)] == [48, 64, 8]
    with pytest.raises(ValueError):
        pk.partial_channels(8, rounding="nearest")


def _randomize_bn(variables, seed=0):
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "var":
            return jnp.asarray(rng.uniform(0.2, 2.0, leaf.shape), jnp.float32)
        if name == "mean":
            return jnp.asarray(rng.normal(size=leaf.shape) * 0.5, jnp.float32)
        if name == "scale":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
        if name == "bias":
            return jnp.asarray(rng.normal(size=leaf.shape) * 0.3, jnp.float32)
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(leaf.shape[0] * leaf.shape[1]), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, variables)


@pytest.mark.parametrize("mode", [*pk.PE_MODES, None])
def test_partial_split_and_theta_form_merge(mode):
    """Identity channels are bit-exact and last; the mixed ones equal the reference; the deploy form (BN and
    the 5x5 folded into theta) gives the same output in eval mode and still expands from a k' x k' theta."""
    k, c, hw = 15, 10, (7, 8)
    mixer = lkm.PeripheralMixer(k, r_c=2, small_kernel=5, pe_mode=mode or "valid_taps")
    g = pk.partial_channels(c)
    assert g == 3
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, *hw, c)), jnp.float32)
    pe = None if mode is None else 0.3 * jnp.asarray(np.random.default_rng(5).normal(size=(k, k, g)), jnp.float32)
    v = _randomize_bn(mixer.init(jax.random.key(0), x, False, pe))
    y = mixer.apply(v, x, False, pe)
    np.testing.assert_array_equal(y[..., g:], x[..., g:])
    # reference on the first g channels: dense expanded kernel, explicit BN, explicit PE
    p, s, grid = v["params"], v["batch_stats"], mixer.grid
    assert p["theta"].shape == (len(grid), len(grid), 1, g)

    def bn(z, name):
        return (z - s[name]["mean"]) / jnp.sqrt(s[name]["var"] + 1e-5) * p[name]["scale"] + p[name]["bias"]

    w, w5, xg = dwconv.expand_piecewise(p["theta"], grid), p["small"]["kernel"], x[..., :g]
    lk = dwconv.depthwise_conv(xg, w, "native")
    sm = dwconv.depthwise_conv(xg, w5, "native")
    if pe is not None:
        lk, sm = lk + pk.pe_term(w, pe, hw, mode), sm + pk.pe_term(pad_kernel(w5, k), pe, hw, mode)
    np.testing.assert_allclose(y[..., :g], bn(lk, "lk_bn") + bn(sm, "small_bn"), atol=1e-5)
    # deploy form
    dep = lkm.fuse_peripheral(p, s)
    assert dep["theta"].shape == p["theta"].shape  # still peripheral
    yd = mixer.clone(deploy=True).apply({"params": dep}, x, False, pe)
    assert float(jnp.max(jnp.abs(yd - y)) / jnp.max(jnp.abs(y))) <= 1e-5
    t = p["lk_bn"]["scale"] / jnp.sqrt(s["lk_bn"]["var"] + 1e-5)
    t5 = p["small_bn"]["scale"] / jnp.sqrt(s["small_bn"]["var"] + 1e-5)
    np.testing.assert_allclose(dwconv.expand_piecewise(dep["theta"], grid), w * t + pad_kernel(w5 * t5, k),
                               atol=1e-6)


def test_small_kernel_must_fit_the_centre():
    with pytest.raises(ValueError):
        pk.add_to_centre(jnp.zeros((7, 7)), jnp.ones((5, 5)), pk.sharing_grid(15, 1))
    with pytest.raises(ValueError):
        lkm.PeripheralMixer(15, r_c=1, small_kernel=5).init(jax.random.key(0), jnp.zeros((1, 4, 4, 8)), False)
    theta = pk.add_to_centre(jnp.zeros((7, 7)), jnp.ones((3, 3)), pk.sharing_grid(15, 1))
    assert float(theta.sum()) == 9.0 and float(theta[2:5, 2:5].sum()) == 9.0
