"""Sliding-window / resize inference (tfseg.inference) against direct numpy computations."""

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from tfseg import inference  # noqa: E402


def pointwise_model(ndim: int, channels: int, classes: int, seed: int = 0):
    """A 1x1(x1) convolution + softmax: every output pixel depends only on its input pixel, so
    any tiling must reproduce the whole-image prediction exactly."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((None,) * ndim + (channels,))
    conv = keras.layers.Conv2D if ndim == 2 else keras.layers.Conv3D
    x = keras.layers.Rescaling(1 / 255.0)(inp) if ndim == 2 else inp
    out = conv(classes, 1, activation="softmax" if classes > 1 else "sigmoid")(x)
    return keras.Model(inp, out)


def test_gaussian_weights_match_formula():
    w = inference.gaussian_weights((17, 9))
    sigma_h, sigma_w = 17 / 8, 9 / 8
    i, j = np.meshgrid(np.arange(17), np.arange(9), indexing="ij")
    expected = np.exp(-0.5 * ((i - 8) / sigma_h) ** 2 - 0.5 * ((j - 4) / sigma_w) ** 2)
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-7)
    assert w.max() == pytest.approx(1.0) and w[8, 4] == pytest.approx(1.0)
    assert (w > 0).all()


def test_window_starts_cover_and_respect_overlap():
    assert inference.window_starts(12, 8, 0.5) == [0, 4]
    assert inference.window_starts(5, 8, 0.5) == [0]
    starts = inference.window_starts(35, 16, 0.5)
    assert starts[0] == 0 and starts[-1] == 35 - 16
    assert max(b - a for a, b in zip(starts, starts[1:])) <= 8


def test_blend_is_gaussian_weighted_mean():
    # Each patch predicts its own index everywhere; a pixel seen by two patches must get the
    # Gaussian-weighted mean of the two indices.
    calls = []

    def patch_index_model(batch):
        n = len(calls)
        calls.append(batch.shape)
        return np.stack([np.full(batch.shape[1:3] + (1,), n * len(batch) + k, np.float32) for k in range(len(batch))])

    image = np.zeros((8, 12, 1), np.float32)
    out = inference.sliding_window(patch_index_model, image, (8, 8), overlap=0.5, batch_size=1)
    sigma = 1.0
    g = np.exp(-0.5 * ((np.arange(8) - 3.5) / sigma) ** 2)
    # column 5 is local column 5 of patch 0 (value 0) and local column 1 of patch 1 (value 1)
    expected = (g[5] * 0 + g[1] * 1) / (g[5] + g[1])
    assert out.shape == (8, 12, 1)
    np.testing.assert_allclose(out[:, 5, 0], expected, rtol=1e-5)
    np.testing.assert_allclose(out[:, :4, 0], 0.0)
    np.testing.assert_allclose(out[:, 8:, 0], 1.0)


def test_tile_equals_direct_prediction_2d():
    model = pointwise_model(2, 3, 4)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (45, 37, 3), dtype=np.uint8)
    direct = np.asarray(model(image[None].astype(np.float32)))[0]
    tiled = inference.predict_image(model, image, size=(16, 16), mode="tile", overlap=0.25, batch_size=3)
    assert tiled.shape == (45, 37, 4) and tiled.dtype == np.float32
    np.testing.assert_allclose(tiled, direct, atol=1e-5)


def test_tile_pads_images_smaller_than_a_patch():
    model = pointwise_model(2, 1, 1)
    image = np.random.default_rng(1).integers(0, 256, (5, 11), dtype=np.uint8)
    direct = np.asarray(model(image[None, ..., None].astype(np.float32)))[0]
    tiled = inference.predict_image(model, image, size=(16, 16), mode="tile")
    assert tiled.shape == (5, 11, 1)
    np.testing.assert_allclose(tiled, direct, atol=1e-5)


@pytest.mark.parametrize("shape", [(33, 34, 35), (5, 6, 7)])
def test_volume_odd_sizes_equal_direct(shape):
    model = pointwise_model(3, 2, 3)
    volume = np.random.default_rng(2).normal(size=shape + (2,)).astype(np.float32)
    direct = np.asarray(model(volume[None]))[0]
    tiled = inference.predict_volume(model, volume, patch_size=(16, 16, 16), overlap=0.5, batch_size=2)
    assert tiled.shape == shape + (3,)
    np.testing.assert_allclose(tiled, direct, atol=1e-5)


def test_patch_batch_bounds_model_inputs():
    seen = []

    def recorder(batch):
        seen.append(batch.shape)
        return np.ones(batch.shape[:-1] + (2,), np.float32) / 2

    image = np.zeros((100, 90, 3), np.uint8)
    out = inference.predict_image(recorder, image, size=(16, 16), mode="tile", overlap=0.25, batch_size=3)
    n_h = len(inference.window_starts(100, 16, 0.25))
    n_w = len(inference.window_starts(90, 16, 0.25))
    assert sum(s[0] for s in seen) == n_h * n_w
    assert all(s[0] <= 3 and s[1:] == (16, 16, 3) for s in seen)
    np.testing.assert_allclose(out, 0.5)


def test_tta_averages_flips():
    # A model that outputs its column coordinate: the average of it and its flipped-back mirror
    # is the constant (W - 1) / 2; rows are symmetric the same way.
    def ramp(batch):
        b, h, w, _ = batch.shape
        cols = np.broadcast_to(np.arange(w, dtype=np.float32), (b, h, w))
        return cols[..., None].copy()

    x = np.zeros((1, 6, 8, 1), np.float32)
    no_tta = inference._with_tta(ramp, x, False)
    tta = inference._with_tta(ramp, x, True)
    np.testing.assert_allclose(no_tta[0, 0, :, 0], np.arange(8))
    np.testing.assert_allclose(tta, 3.5)


def test_tta_flips_only_the_named_axes():
    # A model that outputs the input's row index plus 100 x its column index, read from the
    # input itself: every view it sees comes back flipped, so averaging views shows which flips ran.
    def coords(batch):
        return batch.copy()

    h, w = 4, 6
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    x = (rows + 100 * cols).astype(np.float32)[None, ..., None]
    calls = []

    def counting(batch):
        calls.append(batch.copy())
        return coords(batch)

    out = inference._with_tta(counting, x, (1,))
    assert len(calls) == 2  # as is + left-right
    np.testing.assert_array_equal(calls[1][0, :, :, 0], x[0, :, ::-1, 0])  # width flipped, rows kept
    np.testing.assert_allclose(out, x)  # each view flipped back before averaging
    assert inference.flip_combinations(2, (1,)) == [(), (1,)]
    assert inference.flip_combinations(2, True) == [(), (0,), (1,), (0, 1)]
    assert inference.flip_combinations(3, False) == [()]
    assert len(inference.flip_combinations(3, True)) == 8
    with pytest.raises(ValueError, match="outside"):
        inference.flip_combinations(2, (2,))


def test_training_flip_axes_follow_the_run_augmentation():
    from tfseg.rundir import training_flip_axes

    assert training_flip_axes({"ndim": 2, "config": {"augment": {"hflip": 0.5}}}) == (1,)
    assert training_flip_axes({"ndim": 2, "config": {"augment": {"hflip": 0.5, "vflip": 0.5}}}) == (0, 1)
    assert training_flip_axes({"ndim": 2, "config": {"augment": {"rotate": 10}}}) == ()
    assert training_flip_axes({"ndim": 2, "config": {"augment": None}}) == ()
    assert training_flip_axes({"ndim": 3, "config": {"augment": {"flip3d": 0.5}}}) == (0, 1, 2)


def test_tta_keeps_flip_equivariant_model_unchanged():
    model = pointwise_model(2, 3, 2)
    image = np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    a = inference.predict_image(model, image, size=(16, 16))
    b = inference.predict_image(model, image, size=(16, 16), tta=True)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_resize_mode_returns_original_size():
    model = pointwise_model(2, 3, 3)
    image = np.full((20, 50, 3), 100, np.uint8)  # constant: resizing changes nothing
    probs = inference.predict_image(model, image, size=(16, 16), mode="resize")
    one_pixel = np.asarray(model(np.full((1, 1, 1, 3), 100, np.float32)))[0, 0, 0]
    assert probs.shape == (20, 50, 3)
    np.testing.assert_allclose(probs, np.broadcast_to(one_pixel, probs.shape), atol=1e-5)
    with pytest.raises(ValueError):
        inference.predict_image(model, image, size=(16, 16), mode="bogus")


def test_probs_to_mask_hand_cases():
    binary = np.array([[[0.2], [0.6]], [[0.5], [0.51]]], np.float32)
    np.testing.assert_array_equal(inference.probs_to_mask(binary, True), [[0, 1], [0, 1]])
    multi = np.array([[[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], [[0.0, 0.1, 0.9], [0.3, 0.3, 0.4]]], np.float32)
    mask = inference.probs_to_mask(multi, False)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, [[1, 0], [2, 2]])
