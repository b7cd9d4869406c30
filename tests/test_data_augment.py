"""The pp string DSL, its ops (per example and batched), RandAugment, mixup/cutmix."""

import numpy as np
import pytest

from repjax.data import augment, mixup, randaugment


def _images(n=6, h=9, w=7, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def _rngs(n, seed=0):
    return [np.random.default_rng([seed, i]) for i in range(n)]


def test_parse_forms_and_errors():
    assert augment.parse("pad_crop(4)| flip_lr |normalize(cifar10)") == [
        ("pad_crop", [4], {}), ("flip_lr", [], {}), ("normalize", ["cifar10"], {})]
    assert augment.parse("normalize((0.5, 0.5), std=(0.2, 0.3))") == [
        ("normalize", [(0.5, 0.5)], {"std": (0.2, 0.3)})]
    with pytest.raises(KeyError, match="flip_lr"):
        augment.build("flip_rl")
    with pytest.raises(ValueError, match="Cannot parse"):
        augment.build("pad_crop(4")
    with pytest.raises(ValueError, match="pad_crop"):
        augment.build("pad_crop(1, 2, 3)")
    with pytest.raises(ValueError, match="unknown statistics"):
        augment.build("normalize(cifar100)")


def test_normalize_and_value_range_values():
    x = np.array([[[0, 255, 51]]], np.uint8)
    out = augment.build("normalize(imagenet)")(x, None)
    expected = (np.array([0, 1, 0.2]) - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], expected, rtol=1e-5)
    grey = np.array([[[255]]], np.uint8)
    np.testing.assert_allclose(augment.build("normalize(digits)")(grey, None), (1 - 0.3053) / 0.3759, rtol=1e-5)
    custom = augment.build("normalize(0.5, 0.25)")(np.array([[[0.75]]], np.float32), None)
    np.testing.assert_allclose(custom, 1.0)
    np.testing.assert_allclose(augment.build("value_range(-1, 1)")(x, None)[0, 0], [-1, 1, -0.6], rtol=1e-6)
    with pytest.raises(ValueError, match="channel"):
        augment.build("normalize(cifar10)")(grey, None)


def test_pad_crop_is_a_shifted_window():
    x = _images(1, 6, 5)[0]
    out = augment.build("pad_crop(2)")(x, np.random.default_rng(3))
    padded = np.pad(x, ((2, 2), (2, 2), (0, 0)))
    windows = [padded[dy:dy + 6, dx:dx + 5] for dy in range(5) for dx in range(5)]
    assert out.shape == x.shape and any(np.array_equal(out, w) for w in windows)
    seen = {augment.build("pad_crop(2)")(x, np.random.default_rng(s)).tobytes() for s in range(60)}
    assert len(seen) > 10  # many different offsets


def test_flip_lr():
    x = _images(1)[0]
    outs = [augment.build("flip_lr")(x, np.random.default_rng(s)) for s in range(20)]
    assert any(np.array_equal(o, x[:, ::-1]) for o in outs) and any(np.array_equal(o, x) for o in outs)
    assert all(np.array_equal(o, x[:, ::-1]) or np.array_equal(o, x) for o in outs)


@pytest.mark.parametrize("pp", [
    "pad_crop(3)|flip_lr|normalize(cifar10)",
    "to_rgb|center_crop(5)|value_range(0, 1)",
    "randaugment(2, 9)|pad_crop(1)|flip_lr|normalize(imagenet)",
    "random_resized_crop(6)|flip_lr",
    "resize_small(4)|center_crop(4)|flip_lr",
])
def test_batch_equals_per_example(pp):
    images = _images()
    fn = augment.build(pp)
    single = np.stack([fn(img, rng) for img, rng in zip(images, _rngs(len(images)))])
    batched = fn.batch(images, _rngs(len(images)))
    listed = fn.batch(list(images), _rngs(len(images)))
    np.testing.assert_array_equal(batched, single)
    np.testing.assert_array_equal(listed, single)
    assert batched.dtype == single.dtype


def test_geometry_ops():
    x = _images(1, 40, 60)[0]
    rng = np.random.default_rng(0)
    assert augment.build("resize(16)")(x, rng).shape == (16, 16, 3)
    assert augment.build("resize((10, 20))")(x, rng).shape == (10, 20, 3)
    assert augment.build("resize_small(20)")(x, rng).shape == (20, 30, 3)
    np.testing.assert_array_equal(augment.build("center_crop(20)")(x, rng), x[10:30, 20:40])
    crops = [augment.build("random_resized_crop(24, scale_lo=0.5)")(x, np.random.default_rng(s)) for s in range(4)]
    assert all(c.shape == (24, 24, 3) for c in crops) and not np.array_equal(crops[0], crops[1])
    # The whole image at scale 1 and fixed ratio is a plain resize.
    full = augment.build("random_resized_crop(20, 1.0, 1.0, 1.5, 1.5)")(x, rng)
    np.testing.assert_array_equal(full, augment.build("resize((20, 20))")(x, rng))
    grey = _images(1, 8, 8, 1)[0]
    np.testing.assert_array_equal(augment.build("to_rgb")(grey, rng), np.repeat(grey, 3, -1))
    with pytest.raises(ValueError, match="before normalize"):
        augment.build("normalize(imagenet)|resize(4)")(x, rng)


def test_mixed_shapes_need_fixed_size_op():
    fn = augment.build("flip_lr")
    with pytest.raises(ValueError, match="different shapes"):
        fn.batch([_images(1, 4, 4)[0], _images(1, 5, 4)[0]], _rngs(2))


def test_randaugment_ops_and_determinism():
    rgb, grey = _images(1, 16, 16)[0], _images(1, 16, 16, 1)[0]
    for op, _ in randaugment.TRANSFORMS:
        for image in (rgb, grey):
            for level in (-1.0, 0.5):
                out = augment.from_pil(op(augment.to_pil(image), level))
                assert out.shape == image.shape and out.dtype == np.uint8
    fn = augment.build("randaugment(num_ops=3, magnitude=10)")
    a = fn(rgb, np.random.default_rng(7))
    np.testing.assert_array_equal(a, fn(rgb, np.random.default_rng(7)))
    changed = sum(not np.array_equal(fn(rgb, np.random.default_rng(s)), rgb) for s in range(10))
    assert changed >= 8
    # Magnitude 0 leaves geometric ops as the identity.
    np.testing.assert_array_equal(randaugment.rotate(augment.to_pil(rgb), 0.0), augment.to_pil(rgb))


def test_mixup_and_cutmix():
    images = np.random.default_rng(0).random((4, 8, 8, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 3])
    out, soft = mixup.mixup_cutmix(images, labels, np.random.default_rng(1), num_classes=5, mixup_alpha=0.4)
    lam = soft[0, 0]
    assert 0 <= lam <= 1 and soft.shape == (4, 5) and soft.dtype == np.float32
    np.testing.assert_allclose(soft.sum(1), 1, rtol=1e-6)
    np.testing.assert_allclose(soft[0, 3], 1 - lam, rtol=1e-6)
    np.testing.assert_allclose(out[0], lam * images[0] + (1 - lam) * images[3], rtol=1e-5)
    out, soft = mixup.mixup_cutmix(images, labels, np.random.default_rng(2), num_classes=5, cutmix_alpha=1.0)
    from_self = np.isclose(out[1], images[1]).all(-1).mean()
    np.testing.assert_allclose(soft[1, 1], from_self, rtol=1e-6)
    np.testing.assert_allclose(soft[1, 2], 1 - from_self, rtol=1e-6)
    kinds = {mixup.sample(np.random.default_rng(s), 8, 8, 0.2, 1.0).kind for s in range(20)}
    assert kinds == {"mixup", "cutmix"}
    same, soft = mixup.mixup_cutmix(images, labels, np.random.default_rng(0), num_classes=4)
    np.testing.assert_array_equal(same, images)
    np.testing.assert_array_equal(soft, np.eye(4, dtype=np.float32))
