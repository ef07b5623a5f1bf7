"""Predictions in TensorBoard while training (tfseg.fit.tb_images): the event file holds the pictures."""

import glob
import io
import os

import numpy as np
import pytest
from PIL import Image

keras = pytest.importorskip("keras")
from helpers import fit, tiny_fit_config, write_2d_dataset, write_3d_dataset  # noqa: E402
from tfseg import visualize  # noqa: E402
from tfseg.fit import tb_images  # noqa: E402


def read_images(log_dir):
    """{step: [decoded RGB picture, ...]} of the val_predictions summaries under log_dir."""
    import tensorflow as tf

    out = {}
    files = sorted(glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True))
    for path in files:
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                if v.tag != tb_images.TAG:
                    continue
                data = tf.make_ndarray(v.tensor)  # [width, height, png, ...] (tf.summary.image)
                w, h = int(data[0]), int(data[1])
                pics = [np.array(Image.open(io.BytesIO(png)).convert("RGB")) for png in data[2:]]
                assert all(p.shape == (h, w, 3) for p in pics)
                out.setdefault(event.step, []).extend(pics)
    return out


def threshold_model(bias):
    """Binary 'squares' model: sigmoid(0.2 * (mean RGB - bias)); bias 120 reproduces the truth
    exactly (squares are >= 180, the background < 60), bias -1000 predicts square everywhere."""
    inp = keras.Input((32, 32, 3))
    layer = keras.layers.Conv2D(1, 1, activation="sigmoid")
    model = keras.Model(inp, layer(inp))
    layer.set_weights([np.full((1, 1, 3, 1), 0.2 / 3, np.float32), np.array([-0.2 * bias], np.float32)])
    return model


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    return write_2d_dataset(str(tmp_path_factory.mktemp("tb") / "data"), {"train": 8, "val": 5})


def run_callback(data, split, log_dir, model, epochs, **kw):
    cb = tb_images.PredictionImages(data, split, str(log_dir), epochs=epochs, **kw)
    cb.set_model(model)
    cb.on_train_begin()
    for epoch in range(epochs):
        cb.on_epoch_end(epoch)
    cb.on_train_end()
    return cb


def panels(picture, rows, side):
    """The (row, column) panels of a prediction grid (pad 2, square panels of ``side``)."""
    return [[picture[2 + r * (side + 2): 2 + r * (side + 2) + side, 2 + c * (side + 2): 2 + c * (side + 2) + side]
             for c in range(3)] for r in range(rows)]


def test_every_n_epochs_truth_and_prediction_panels(squares, tmp_path):
    assert tb_images.default_every(6) == 2 and tb_images.default_every(2) == 1 and tb_images.default_every(25) == 7
    run_callback(squares, "val", tmp_path / "right", threshold_model(120), 6)
    pics = read_images(tmp_path / "right" / tb_images.LOG_SUBDIR)
    assert sorted(pics) == [2, 4, 6]  # every 2 epochs of 6; the last epoch always
    pic = pics[6][0]
    side = 128  # 32x32 examples enlarged 4x
    assert pic.shape[1] == 3 * side + 4 * 2 and pic.shape[0] > 4 * side + 5 * 2  # + the legend strip
    grid = panels(pic, 4, side)
    square = visualize.default_colors(2)[1]
    for image, truth, pred in grid:
        assert np.array_equal(truth, pred)  # the exact model predicts the truth
        changed = np.any(truth != image, axis=-1)
        assert 0 < changed.mean() < 0.5  # the square is painted, the background shows through
        # painted pixels: half the image, half the class colour
        assert np.abs(truth[changed].astype(int) - (image[changed].astype(int) + square) // 2).max() <= 1

    run_callback(squares, "val", tmp_path / "wrong", threshold_model(-1000), 2)
    pics = read_images(tmp_path / "wrong" / tb_images.LOG_SUBDIR)
    assert sorted(pics) == [1, 2]
    for image, truth, pred in panels(pics[2][0], 4, side):
        assert np.any(pred != image, axis=-1).all()  # everything predicted as square
        assert not np.array_equal(truth, pred)


def test_3d_middle_slices(tmp_path):
    data = write_3d_dataset(str(tmp_path / "cubes"), n=2)
    inp = keras.Input((16, 16, 16, 1))
    model = keras.Model(inp, keras.layers.Conv3D(3, 1, activation="softmax")(inp))
    run_callback(data, "train", tmp_path / "logs", model, 1, num_images=2)
    pics = read_images(tmp_path / "logs" / tb_images.LOG_SUBDIR)
    assert sorted(pics) == [1]
    pic = pics[1][0]
    assert pic.shape[1] == 3 * 128 + 4 * 2 and pic.shape[0] > 2 * 128 + 3 * 2  # 16x16 slices enlarged 8x
    # The truth panel shows the cubes' middle slice: outer ring and inner square in their colours.
    truth = panels(pic, 2, 128)[0][1]
    colors = visualize.default_colors(3)
    image = panels(pic, 2, 128)[0][0].astype(int)
    centre, ring = truth[64, 64].astype(int), truth[36, 36].astype(int)  # slice 8: inner 6:10, outer 4:12
    assert np.abs(centre - (image[64, 64] + colors[2]) // 2).max() <= 1
    assert np.abs(ring - (image[36, 36] + colors[1]) // 2).max() <= 1
    assert np.array_equal(truth[4, 4], image[4, 4].astype(np.uint8))  # class 0 "bg" left unpainted


@pytest.mark.slow  # fast tier at about 3 minutes (issue 31): runs in CI's slow tier
def test_fit_writes_predictions_to_the_runs_logs(squares, tmp_path):
    out = str(tmp_path / "run")
    fit(tiny_fit_config(squares, out, tensorboard=True, epochs=2))
    pics = read_images(os.path.join(out, "logs", tb_images.LOG_SUBDIR))
    assert sorted(pics) == [1, 2]
    assert pics[2][0].shape[1] == 3 * 128 + 4 * 2


def test_unreadable_split_turns_pictures_off_without_stopping(squares, tmp_path, caplog):
    cb = run_callback(squares, "nope", tmp_path / "logs", threshold_model(120), 2)
    assert cb._disabled and "TensorBoard predictions off" in caplog.text
