"""ImageNet-C corruptions checked image by image against the maintained reference (`imagecorruptions`).

Random corruptions are compared given the same draws: the reference draws from numpy's global generator, ours
from a `RandomState` seeded alike. Tolerance: at most 1 grey level, on at most 0.5% of the values (float
rounding before the uint8 truncation; frost's texture resize is OpenCV fixed point there, float here). Impulse
noise (the reference draws from an unseeded generator) is compared in distribution.
"""

import warnings

import numpy as np
import pytest

from repjax.projects.lkrobust import corruptions as C


@pytest.fixture(scope="module")
def reference():
    """The reference package, shimmed for numpy 2 (`np.float_`) and scikit-image >= 0.19 (`multichannel`)."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    pytest.importorskip("cv2")
    if not hasattr(np, "float_"):
        np.float_ = np.float64
    ic = pytest.importorskip("imagecorruptions")
    import skimage.filters
    from imagecorruptions import corruptions as icc

    def gaussian(image, sigma=1, multichannel=None, **kw):
        return skimage.filters.gaussian(image, sigma=sigma, **({"channel_axis": -1} if multichannel else {}), **kw)

    icc.gaussian = gaussian
    return ic


def _image(h=48, w=56, seed=0):
    """Smooth colour gradients plus texture: both flat and busy regions, non-square."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([yy, xx, 0.5 + 0.5 * np.sin(6 * (xx + yy))], -1) * 200 + rng.normal(0, 20, (h, w, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", [n for n in C.ALL if n != "impulse_noise"])
def test_matches_reference(reference, name):
    img = _image()
    for s in range(1, 6):
        np.random.seed(100 + s)
        ref = reference.corrupt(img, severity=s, corruption_name=name).astype(int)
        ours = C.corrupt(img, name, s, np.random.RandomState(100 + s)).astype(int)
        diff = np.abs(ref - ours)
        assert diff.max() <= 1 and np.mean(diff > 0) <= 0.005, (name, s, diff.max(), np.mean(diff > 0))


def test_batch_equals_single_images(reference):
    imgs = np.stack([_image(seed=i) for i in range(3)])
    for name in C.ALL:
        batch = C.corrupt(imgs, name, 3, [np.random.RandomState(i) for i in range(3)])
        for i in range(3):
            np.testing.assert_array_equal(batch[i], C.corrupt(imgs[i], name, 3, np.random.RandomState(i)), name)


def test_impulse_noise_in_distribution(reference):
    img = np.full((64, 64, 3), 128, np.uint8)
    for s in range(1, 6):
        c = C.PARAMS["impulse_noise"][s - 1]
        ref = reference.corrupt(img, severity=s, corruption_name="impulse_noise")
        ours = C.corrupt(img, "impulse_noise", s, np.random.default_rng(s))
        n = img.size
        for out in (ref, ours):  # salt and pepper each with probability c / 2 per value, independently
            for value in (0, 255):
                assert abs(np.mean(out == value) - c / 2) < 5 * np.sqrt(c / 2 / n)
            assert np.all((out == 0) | (out == 255) | (out == 128))


def test_seeded_and_checked():
    img = _image()
    a, b = C.corrupt(img[None], "gaussian_noise", 2, seed=1), C.corrupt(img[None], "gaussian_noise", 2, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, C.corrupt(img[None], "gaussian_noise", 2, seed=2))
    with pytest.raises(ValueError, match="unknown corruption 'fogg'"):
        C.corrupt(img, "fogg", 1)
    with pytest.raises(ValueError, match="severity"):
        C.corrupt(img, "fog", 6)
    with pytest.raises(ValueError, match="at least 32x32"):
        C.corrupt(img[:20], "fog", 1)
    assert len(C.COMMON) == 15 and len(C.EXTRA) == 4 and set(C.CORRUPTIONS) == set(C.ALL)
