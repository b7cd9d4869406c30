"""RepOpt-VGG scale files: the released files, the key layout read back from torch.save / .npz, strict checks."""

import numpy as np
import pytest

from repjax import models
from repjax.projects.repopt import repopt_vgg
from repjax.projects.repopt.scales import ScaleFileError, load_scales, save_scales

B1_BLOCKS = (4, 6, 16, 1)


def _layout(num_blocks=B1_BLOCKS, widths=(4, 4, 6, 8, 12)):
    """Expected blocks {flax name: (official prefix, channels, has identity)} of a RepOpt-VGG."""
    blocks = {"stage0": ("stage0", widths[0], False)}
    for s, depth in enumerate(num_blocks, start=1):
        for i in range(depth):
            blocks[f"stage{s}_{i}"] = (f"stage{s}.{i}", widths[s], i > 0)
    return blocks


def _official(blocks, seed=0):
    """Random scales under the official key names, some stored (C,), some (1, C, 1, 1) as in ScaleLayer dumps."""
    rng = np.random.default_rng(seed)
    state = {}
    for n, (prefix, c, identity) in enumerate(blocks.values()):
        shape = (c,) if n % 2 else (1, c, 1, 1)
        names = ["conv", "1x1"] + (["identity"] if identity else [])
        for name in names:
            state[f"{prefix}.scale_{name}.weight"] = rng.normal(0.8, 0.5, shape).astype(np.float32)
    return state


def _check(scales, blocks, state):
    assert list(scales) == list(blocks)  # block order: stage0, stage1_0, stage1_1, ...
    for name, (prefix, c, identity) in blocks.items():
        assert set(scales[name]) == ({"s", "t", "d"} if identity else {"s", "t"})
        for letter, key in (("s", "conv"), ("t", "1x1"), ("d", "identity")):
            if letter in scales[name]:
                got = scales[name][letter]
                assert got.shape == (c,) and got.dtype == np.float32
                np.testing.assert_array_equal(got, state[f"{prefix}.scale_{key}.weight"].reshape(-1))


def test_released_layout_from_torch_save_and_npz_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    blocks = _layout()
    state = _official(blocks)
    assert len(state) == 79  # B1: 28 blocks x 2 + 23 identities
    path = tmp_path / "RepOpt-VGG-B1-scales.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    expected = {name: identity for name, (_, _, identity) in blocks.items()}
    scales = load_scales(path, expected)
    assert len(scales) == 28 and sum("d" in v for v in scales.values()) == 23
    _check(scales, blocks, state)
    # Official prefixes are accepted as block names; .npz copies read back identically.
    assert list(load_scales(path, [p for p, _, _ in blocks.values()])) == list(blocks)
    save_scales(tmp_path / "b1.npz", scales)
    _check(load_scales(tmp_path / "b1.npz", expected), blocks, state)
    # DataParallel prefix and {'model': ...} wrapper.
    torch.save({"model": {"module." + k: torch.from_numpy(v) for k, v in state.items()}}, tmp_path / "dp.pth")
    _check(load_scales(tmp_path / "dp.pth", expected), blocks, state)


def _npz(tmp_path, state, name="s.npz"):
    path = tmp_path / name
    np.savez(path, **state)
    return path


def test_missing_and_unexpected_keys_are_reported_together(tmp_path):
    blocks = _layout((2, 2, 2, 1))
    expected = {name: identity for name, (_, _, identity) in blocks.items()}
    state = _official(blocks)
    broken = dict(state)
    del broken["stage2.1.scale_identity.weight"], broken["stage1.0.scale_1x1.weight"]
    broken["stage3.0.scale_identity.weight"] = np.ones(8, np.float32)  # stride-2 block: no identity
    broken["stage5.0.scale_conv.weight"] = np.ones(8, np.float32)
    broken["linear.weight"] = np.ones((3, 12), np.float32)
    with pytest.raises(ScaleFileError) as err:
        load_scales(_npz(tmp_path, broken), expected)
    msg = str(err.value)
    for text in ("missing keys (2)", "stage2.1.scale_identity.weight", "stage1.0.scale_1x1.weight",
                 "stage3.0.scale_identity.weight (block has no identity)", "stage5.0.* (block not expected)",
                 "linear.weight (not a scale)"):
        assert text in msg
    # A whole Hyper-Search checkpoint: other keys may be skipped on request.
    extra = {**state, "linear.weight": np.ones((3, 12), np.float32), "stage0.conv.weight": np.ones((4, 3, 3, 3))}
    with pytest.raises(ScaleFileError, match="unexpected keys"):
        load_scales(_npz(tmp_path, extra), expected)
    _check(load_scales(_npz(tmp_path, extra), expected, ignore_other_keys=True), blocks, state)


def test_without_expected_blocks_each_block_needs_s_and_t(tmp_path):
    blocks = _layout((1, 2, 1, 1))
    state = _official(blocks)
    _check(load_scales(_npz(tmp_path, state)), blocks, state)
    del state["stage2.1.scale_conv.weight"]
    with pytest.raises(ScaleFileError, match=r"stage2\.1\.scale_conv\.weight"):
        load_scales(_npz(tmp_path, state))


def test_prefix_shape_and_length_errors(tmp_path):
    blocks = _layout((1, 1, 1, 1))
    state = _official(blocks)
    mixed = {("module." + k if i % 2 else k): v for i, (k, v) in enumerate(state.items())}
    with pytest.raises(ScaleFileError, match=r"'module\.' prefix"):
        load_scales(_npz(tmp_path, mixed))
    _check(load_scales(_npz(tmp_path, {"module." + k: v for k, v in state.items()})), blocks, state)
    bad = {**state, "stage1.0.scale_conv.weight": np.ones((4, 4), np.float32),
           "stage2.0.scale_1x1.weight": np.ones(3, np.float32)}
    with pytest.raises(ScaleFileError, match=r"not 1-D(.|\n)*stage2\.0: \{s: 6, t: 3\}"):
        load_scales(_npz(tmp_path, bad))
    with pytest.raises(ScaleFileError, match="unknown scale file format"):
        load_scales(tmp_path / "scales.json")


def test_retired_block_slash_letter_layout_is_refused(tmp_path):
    """The retired `<block>/<s|t|d>` .npz layout is refused with a message that says how to convert it."""
    blocks = _layout((2, 1, 1, 1))
    state = _official(blocks)
    letters = {"conv": "s", "1x1": "t", "identity": "d"}
    flax_keys = {}
    for name, (prefix, _, _) in blocks.items():
        for key, letter in letters.items():
            if f"{prefix}.scale_{key}.weight" in state:
                flax_keys[f"{name}/{letter}"] = state[f"{prefix}.scale_{key}.weight"].reshape(-1)
    expected = {name: identity for name, (_, _, identity) in blocks.items()}
    with pytest.raises(ScaleFileError, match=r"retired `<block>/<s\|t\|d>` layout(.|\n)*save_scales"):
        load_scales(_npz(tmp_path, flax_keys), expected)


# Released files: (blocks, identity blocks, channels of stage0..4) of the matching RepOpt-VGG (spec §1.5).
RELEASED = {"B1": (28, 23, (64, 128, 256, 512, 2048)), "B2": (28, 23, (64, 160, 320, 640, 2560)),
            "L1": (48, 43, (64, 128, 256, 512, 2048)), "L2": (48, 43, (64, 160, 320, 640, 2560))}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_scale_files(shared_weights, name, tmp_path):
    """Every block of the matching RepOpt-VGG is found with its channels, `d` exactly on the identity blocks;
    the values are the published ranges (s, t around 0.1-1.7 with a few negative entries; d 0.2-2.5), and an
    .npz copy reads back identically."""
    model = models.create(f"repopt_vgg_{name.lower()}")
    specs = repopt_vgg.model_block_specs(model)
    scales = load_scales(shared_weights / f"RepOpt-VGG-{name}-scales.pth", repopt_vgg.expected_blocks(model))
    blocks, identities, widths = RELEASED[name]
    assert list(scales) == [b.name for b in specs] and len(scales) == blocks
    assert sum("d" in v for v in scales.values()) == identities
    assert tuple(model.widths) == widths
    for b in specs:
        assert set(scales[b.name]) == ({"s", "t", "d"} if b.identity else {"s", "t"}), b.name
        assert all(v.shape == (b.out_ch,) and v.dtype == np.float32 for v in scales[b.name].values()), b.name
    st = np.concatenate([v[k] for v in scales.values() for k in ("s", "t")])
    d = np.concatenate([v["d"] for v in scales.values() if "d" in v])
    assert 0 < np.mean(st < 0) < 0.05 and d.min() > 0.2 and d.max() < 2.6
    save_scales(tmp_path / "copy.npz", scales)
    again = load_scales(tmp_path / "copy.npz", repopt_vgg.expected_blocks(model))
    assert list(again) == list(scales)
    for b, group in scales.items():
        for k, v in group.items():
            np.testing.assert_array_equal(again[b][k], v)
