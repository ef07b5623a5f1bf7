"""Augmentation ops against numpy: the affine warp, photometric ops, 3D flips/rotations, config parsing."""

import math

import numpy as np
import pytest

from tfseg.errors import TfsegError

tf = pytest.importorskip("tensorflow")

from tfseg.data import augment as aug  # noqa: E402


def _pair(h=32, w=32, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3)).astype(np.float32)
    mask = rng.integers(0, 5, (h, w, 1)).astype(np.int32)
    return image, mask


def _warp(image, mask, out_hw=None, fill=255, **kw):
    out_hw = out_hw or image.shape[:2]
    t = aug.affine_transform(image.shape[:2], out_hw, **kw)
    x, y = aug.warp(tf.constant(image), tf.constant(mask), t, out_hw, fill)
    return x.numpy(), y.numpy()


def test_identity_transform_is_exact():
    image, mask = _pair(7, 9)
    x, y = _warp(image, mask)
    np.testing.assert_array_equal(x, image)
    np.testing.assert_array_equal(y, mask)


def test_flips_and_quarter_turn_match_numpy():
    image, mask = _pair(12, 12)
    x, y = _warp(image, mask, flip_x=-1.0)
    np.testing.assert_allclose(x, image[:, ::-1], atol=1e-3)
    np.testing.assert_array_equal(y, mask[:, ::-1])
    x, y = _warp(image, mask, flip_y=-1.0)
    np.testing.assert_array_equal(y, mask[::-1])
    x, y = _warp(image, mask, angle=math.pi / 2)
    turned = [k for k in (1, 3) if np.array_equal(y, np.rot90(mask, k))]
    assert len(turned) == 1
    np.testing.assert_allclose(x, np.rot90(image, turned[0]), atol=1e-2)


def test_shift_moves_content_and_fills_the_gap():
    image, mask = _pair(16, 20)
    x, y = _warp(image, mask, shift_x=5.0, shift_y=-3.0, fill=255)
    np.testing.assert_allclose(x[:13, 5:], image[3:, :15], atol=1e-3)
    np.testing.assert_array_equal(y[:13, 5:], mask[3:, :15])
    assert (y[:, :5] == 255).all() and (y[13:] == 255).all()
    assert (x[:, :5] == 0).all() and (x[13:] == 0).all()


def test_zoom_scales_about_the_centre():
    # Zoom 2 on 16x16: output pixel (r, c) samples source (r + 7.5) / 2 - 0.5 + ...: the central
    # 8x8 of the source fills the output, each source pixel becoming a 2x2 block of the mask.
    image, mask = _pair(16, 16)
    _, y = _warp(image, mask, zoom=2.0)
    np.testing.assert_array_equal(y[1:-1:2, 1:-1:2], mask[4:11, 4:11])


def test_resize_through_the_transform_matches_half_pixel_resize():
    image, mask = _pair(32, 24)
    x, y = _warp(image, mask, out_hw=(16, 12))
    ref = tf.image.resize(image, (16, 12), method="bilinear").numpy()
    np.testing.assert_allclose(x, ref, atol=1e-3)
    # Nearest on an exact 2x downsample picks one of the two candidates on each axis.
    for r in range(16):
        for c in range(12):
            assert y[r, c, 0] in mask[2 * r:2 * r + 2, 2 * c:2 * c + 2, 0]


def test_augment_2d_nearest_masks_and_pixel_fill():
    image, mask = _pair(32, 32, seed=4)
    mask[mask == 4] = 255
    cfg = aug.parse_augment({"rotate": 40, "scale": [0.6, 1.4], "shift": 0.2}, ndim=2, channels=3)
    for k in range(5):
        x, y = aug.augment_2d(tf.constant(image), tf.constant(mask), tf.constant([k, 1], tf.int64), cfg,
                              (24, 28), mask_fill=255)
        assert x.shape == (24, 28, 3) and y.shape == (24, 28, 1) and y.dtype == tf.int32
        assert set(np.unique(y.numpy())) <= {0, 1, 2, 3, 255}
        assert float(tf.reduce_min(x)) >= 0.0 and float(tf.reduce_max(x)) <= 255.0


def test_augment_2d_same_seed_same_result():
    image, mask = _pair()
    cfg = aug.parse_augment({"hflip": 0.5, "rotate": 20, "noise": 5.0, "hue": 0.1, "blur": 0.5}, ndim=2, channels=3)
    run = lambda s: aug.augment_2d(image, mask, tf.constant(s, tf.int64), cfg, (32, 32), 0)  # noqa: E731
    a, b, c = run([1, 2]), run([1, 2]), run([1, 3])
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    assert not np.array_equal(a[0].numpy(), c[0].numpy())


def test_photometric_ops_match_their_definitions():
    rng = np.random.default_rng(1)
    image = rng.uniform(60, 190, (16, 16, 3)).astype(np.float32)
    mask = np.zeros((16, 16, 1), np.int32)
    seed = tf.constant([3, 4], tf.int64)
    cfg = aug.parse_augment({"brightness": 0.2}, ndim=2, channels=3)
    x, y = aug.augment_2d(image, mask, seed, cfg, (16, 16), 0)
    delta = x.numpy() - image
    assert np.ptp(delta) < 1e-3 and 0 < abs(delta.mean()) <= 0.2 * 255
    np.testing.assert_array_equal(y.numpy(), mask)

    cfg = aug.parse_augment({"contrast": 0.3}, ndim=2, channels=3)
    x = aug.augment_2d(image, mask, seed, cfg, (16, 16), 0)[0].numpy()
    mean = image.mean(axis=(0, 1))
    factor = (x - mean) / (image - mean)
    assert np.ptp(factor) < 1e-3 and 0.7 <= factor.mean() <= 1.3 and abs(factor.mean() - 1) > 1e-4

    cfg = aug.parse_augment({"blur": 1.0, "blur_kernel": 3}, ndim=2, channels=3)
    x = aug.augment_2d(image, mask, seed, cfg, (16, 16), 0)[0].numpy()
    box = sum(image[1 + dy:15 + dy, 1 + dx:15 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9
    np.testing.assert_allclose(x[1:15, 1:15], box, atol=1e-3)
    flat = np.full((16, 16, 3), 100.0, np.float32)
    np.testing.assert_allclose(aug.augment_2d(flat, mask, seed, cfg, (16, 16), 0)[0].numpy(), flat, atol=1e-4)

    cfg = aug.parse_augment({"noise": 10.0}, ndim=2, channels=3)
    noise = aug.augment_2d(image, mask, seed, cfg, (16, 16), 0)[0].numpy() - image
    assert 0 < noise.std() <= 10.0 * 1.2 and abs(noise.mean()) < 3 * noise.std() / 16
    np.testing.assert_allclose(noise[..., 1:], noise[..., :1].repeat(2, axis=2), atol=1e-3)  # shared by channels

    cfg = aug.parse_augment({"hue": 0.2}, ndim=2, channels=3)
    grey = np.full((16, 16, 3), 128.0, np.float32)
    np.testing.assert_allclose(aug.augment_2d(grey, mask, seed, cfg, (16, 16), 0)[0].numpy(), grey, atol=0.5)


def test_parse_augment_validates():
    assert aug.parse_augment(None, ndim=2, channels=3) is None
    assert aug.parse_augment({"hflip": 0.0}, ndim=2, channels=3) is None
    cfg = aug.parse_augment({"hflip": True, "scale": 0.1}, ndim=2, channels=1)
    assert cfg.hflip == 0.5 and cfg.scale == (0.9, 1.1) and cfg.geometric
    cfg3 = aug.parse_augment({"flip3d": True, "rot90": True, "intensity": 0.1}, ndim=3, channels=4)
    assert (cfg3.flip3d, cfg3.rot90, cfg3.intensity_scale, cfg3.intensity_shift) == (0.5, 0.5, 0.1, 0.1)
    for bad, ndim, ch, match in [
        ({"hue": 0.1}, 2, 1, "RGB"),
        ({"hflip": 1.5}, 2, 3, r"^augment: hflip must be in \[0, 1\], got 1.5$"),
        ({"rotate": True}, 2, 3, r"^augment: rotate = True is not a valid number$"),
        ({"noise": float("nan")}, 2, 3, r"^augment: noise must be a finite number"),
        ({"scale": [1.2, 0.8]}, 2, 3, r"^augment: scale: expected 0.001 <= lo <= hi, got \[1.2, 0.8\]$"),
        ({"scale": 1.5}, 2, 3, r"^augment: scale: expected a in \(0, 0.999\]"),
        ({"crop": "big"}, 2, 3, r"^augment: crop: expected \[h, w\]"),
        ({"blur_kernel": 4}, 2, 3, "^augment: blur_kernel must be odd, got 4$"),
        ({"blur_kernel": 65}, 2, 3, r"^augment: blur_kernel must be in \[3, 63\] \(odd\), got 65$"),
        ({"intensity_scale": 2}, 3, 4, r"^augment: intensity_scale must be in \[0, 1\], got 2$"),
        ({"rot90": 0.5}, 2, 3, "not a 2D augmentation"),
        ({"rotate": 10}, 3, 4, "not a 3D augmentation"),
        (["hflip"], 2, 3, "mapping"),
    ]:
        with pytest.raises(TfsegError, match=match):
            aug.parse_augment(bad, ndim=ndim, channels=ch)


def test_augment_3d_keeps_image_and_mask_together():
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 4, (6, 8, 8, 1)).astype(np.int32)
    image = np.concatenate([mask * 1.0, mask * 3.0], axis=-1).astype(np.float32)
    cfg = aug.parse_augment({"flip3d": 0.5, "rot90": 1.0}, ndim=3, channels=2)
    seen = set()
    for k in range(12):
        x, y = aug.augment_3d(tf.constant(image), tf.constant(mask), tf.constant([k, 0], tf.int64), cfg)
        x, y = x.numpy(), y.numpy()
        np.testing.assert_array_equal(x[..., 0], y[..., 0])
        np.testing.assert_array_equal(x[..., 1], 3.0 * y[..., 0])
        # The result is one of the 8 flips composed with one of the 4 in-plane rotations.
        match = [
            (fd, fh, fw, r)
            for fd in (0, 1) for fh in (0, 1) for fw in (0, 1) for r in range(4)
            if np.array_equal(y, np.rot90(mask[::-1 if fd else 1, ::-1 if fh else 1, ::-1 if fw else 1], r, (1, 2)))
        ]
        assert match
        seen.add(y.tobytes())
    assert len(seen) > 3  # different seeds, different transforms


def test_augment_3d_rot90_on_non_square_patches_is_a_half_turn_and_intensity_is_affine():
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 4, (4, 6, 8, 1)).astype(np.int32)
    image = rng.normal(size=(4, 6, 8, 2)).astype(np.float32)
    cfg = aug.parse_augment({"rot90": 1.0}, ndim=3, channels=2)
    _, y = aug.augment_3d(tf.constant(image), tf.constant(mask), tf.constant([0, 0], tf.int64), cfg)
    np.testing.assert_array_equal(y.numpy(), mask[:, ::-1, ::-1])
    cfg = aug.parse_augment({"intensity_scale": 0.2, "intensity_shift": 0.5}, ndim=3, channels=2)
    x, y = aug.augment_3d(tf.constant(image), tf.constant(mask), tf.constant([5, 0], tf.int64), cfg)
    x = x.numpy()
    np.testing.assert_array_equal(y.numpy(), mask)
    for c in range(2):
        a, b = np.polyfit(image[..., c].ravel(), x[..., c].ravel(), 1)
        assert 0.8 <= a <= 1.2 and -0.5 <= b <= 0.5
        np.testing.assert_allclose(x[..., c], a * image[..., c] + b, atol=1e-4)


def _ramp(h, w):
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.stack([2.0 * x, 3.0 * y, np.zeros_like(x)], axis=-1)
    mask = ((np.mgrid[0:h, 0:w][1] // 4) % 5).astype(np.int32)[..., None]
    return image, mask


@pytest.mark.parametrize("base, slope", [((40, 48), 1.0), ((80, 96), 0.5)])
def test_crop_is_a_random_window_of_the_example_at_the_model_size(base, slope):
    # A linear ramp stays linear under bilinear sampling, so each crop is read off exactly: its
    # slope says the scale (the example resized to ``base``), its offset where the window lies.
    image, mask = _ramp(40, 48)
    cfg = aug.parse_augment({"crop": [16, 20]}, ndim=2, channels=3)
    offsets = []
    for k in range(24):
        x, y = aug.augment_2d(tf.constant(image), tf.constant(mask), tf.constant([k, 7], tf.int64), cfg,
                              base, mask_fill=255)
        x, y = x.numpy(), y.numpy()
        assert x.shape == (16, 20, 3) and y.shape == (16, 20, 1)
        assert 255 not in y  # a window inside the example: nothing pulled from outside
        cols = np.arange(20, dtype=np.float32)
        inner = x[2:-2, 2:-2]
        # Source column of output column c: (c + ox + 0.5) * slope - 0.5 (half-pixel centres).
        ox = inner[..., 0] / 2.0 / slope - cols[2:-2] + 0.5 / slope - 0.5
        oy = inner[..., 1] / 3.0 / slope - np.arange(16, dtype=np.float32)[2:-2, None] + 0.5 / slope - 0.5
        np.testing.assert_allclose(ox, ox.mean(), atol=1e-2)
        np.testing.assert_allclose(oy, oy.mean(), atol=1e-2)
        offsets.append((oy.mean(), ox.mean()))
    offsets = np.array(offsets)
    margin = np.array(base) - np.array([16, 20])
    assert (offsets >= -1e-2).all() and (offsets <= margin + 1e-2).all()
    # The windows spread over the whole margin, both ends included.
    assert (offsets.min(0) < 0.2 * margin).all() and (offsets.max(0) > 0.8 * margin).all()


def test_crop_batches_have_the_crop_size_and_a_crop_larger_than_image_size_is_refused(tmp_path):
    from helpers import write_2d_dataset

    from tfseg.data import make_dataset

    data = write_2d_dataset(str(tmp_path / "d"), {"train": 4})
    ds = make_dataset(data, "train", batch_size=2, training=True, image_size=(32, 24),
                      augment={"hflip": 0.5, "crop": [16, 12]}, seed=1)
    images, masks = next(iter(ds))
    assert images.shape == (2, 16, 12, 3) and masks.shape == (2, 16, 12, 1)
    with pytest.raises(TfsegError, match="crop 40x12 is larger than image_size 32x24"):
        make_dataset(data, "train", batch_size=2, training=True, image_size=(32, 24), augment={"crop": [40, 12]})


def test_parse_augment_reads_crop_sizes():
    assert aug.parse_augment({"crop": "24x16"}, ndim=2, channels=3).crop == (24, 16)
    assert aug.parse_augment({"crop": [24, 16]}, ndim=2, channels=1).crop == (24, 16)
    with pytest.raises(TfsegError, match="^augment: crop: expected"):
        aug.parse_augment({"crop": "big"}, ndim=2, channels=3)
