"""Predictions in TensorBoard while training: a Keras callback.

Every ``every`` epochs (default: about :data:`TIMES_PER_RUN` times per run, and after the last
epoch) :class:`PredictionImages` predicts a fixed set of validation examples (the first
``num_images`` of the split, preprocessed as validation is) and writes one picture,
``val_predictions``, to ``RUN_DIR/logs/predictions``: a row per example, image | truth |
prediction, the masks in the dataset's class colours (:mod:`tfseg.visualize`) over the image,
with a legend strip naming every class. 3D examples show the middle axial slice of the
validation patch (first modality).

The picture is its own TensorBoard run (``predictions``) beside Keras's ``train`` and
``validation``: TensorBoard reads one event file at a time per directory, so two writers in one
directory could hide each other's events. Cost: one forward pass over ``num_images`` examples and
a PNG encode per picture (BENCHMARKS.md: tools/bench_tb_images.py).
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np

from tfseg import rundir, visualize

log = logging.getLogger(__name__)

TIMES_PER_RUN = 4
LOG_SUBDIR = "predictions"
TAG = "val_predictions"
_MIN_SIDE = 128  # small training images are enlarged (nearest) to at least this
_MAX_SIDE = 256  # large ones shrunk (striding) to at most this


def default_every(epochs: int) -> int:
    """Epochs between pictures: about :data:`TIMES_PER_RUN` pictures per run."""
    return max(1, math.ceil(int(epochs) / TIMES_PER_RUN))


def _resize_panel(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    if max(h, w) > _MAX_SIDE:
        step = math.ceil(max(h, w) / _MAX_SIDE)
        return np.ascontiguousarray(a[::step, ::step])
    if min(h, w) < _MIN_SIDE:
        k = max(1, min(_MIN_SIDE // max(min(h, w), 1), _MAX_SIDE // max(h, w)))
        return np.repeat(np.repeat(a, k, axis=0), k, axis=1)
    return a


def prediction_grid(images, truths, preds, class_names, colors, *, ignore_index=None) -> np.ndarray:
    """The picture: one row per example (image | truth | prediction) and a legend strip below.

    Args:
      images: (N, H, W, C) (2D) or (N, D, H, W, C) (3D: the middle axial slice is shown).
      truths, preds: (N, H, W) / (N, D, H, W) class ids (a trailing 1 channel is dropped).

    Returns:
      (height, width, 3) uint8.
    """
    paint0 = not visualize.is_background(class_names)
    rows = []
    for image, truth, pred in zip(images, truths, preds):
        image, truth, pred = np.asarray(image), np.asarray(truth), np.asarray(pred)
        if truth.ndim == image.ndim:
            truth = truth[..., 0]
        if pred.ndim == image.ndim:
            pred = pred[..., 0]
        if image.ndim == 4:  # (D, H, W, C): middle axial slice, first modality
            mid = image.shape[0] // 2
            image, truth, pred = image[mid, ..., :1], truth[mid], pred[mid]
        shown = visualize.to_display(image)
        panels = [shown] + [
            visualize.overlay(shown, m, colors, ignore_index=ignore_index, paint_background=paint0)
            for m in (truth, pred)
        ]
        rows.append([_resize_panel(p) for p in panels])
    body = visualize.grid(rows)
    legend = visualize.legend_strip(list(class_names), colors, body.shape[1])
    return np.concatenate([body, legend], axis=0)


def _keras_callback_base():
    import keras

    return keras.callbacks.Callback


class PredictionImages(_keras_callback_base()):
    """Writes a grid of validation predictions to TensorBoard every ``every`` epochs.

    Args:
      data_dir: the converted dataset (dataset.json + shards).
      split: the validation split.
      log_dir: the run's TensorBoard directory (RUN_DIR/logs); pictures go to ``LOG_SUBDIR``
        inside it.
      epochs: the run's total epochs (the default ``every``, and a picture after the last one).
      every: epochs between pictures; None for :func:`default_every`.
      num_images: validation examples shown (the first ones of the split, always the same).
      size: the model's input size, (H, W) or (D, H, W); None reads it from the model.
    """

    def __init__(self, data_dir: str, split: str, log_dir: str, *, epochs: int, every: int | None = None,
                 num_images: int = 4, size=None):
        super().__init__()
        self.data_dir, self.split = data_dir, split
        self.log_dir = os.path.join(log_dir, LOG_SUBDIR)
        self.epochs = int(epochs)
        self.every = int(every) if every else default_every(epochs)
        self.num_images = int(num_images)
        self.size = tuple(size) if size else None
        self._batch = None
        self._writer = None
        self._disabled = False

    # -- setup -----------------------------------------------------------------------------

    def _model_size(self):
        shape = getattr(self.model, "input_shape", None)
        if isinstance(shape, list):
            shape = shape[0]
        dims = tuple(shape[1:-1]) if shape else ()
        return dims if dims and all(isinstance(d, int) for d in dims) else None

    def _load(self) -> None:
        import tensorflow as tf

        from tfseg import schema
        from tfseg.data import make_dataset

        info = schema.load_dataset_info(self.data_dir)
        size = self.size or self._model_size()
        key = rundir.size_key(info.ndim)
        # Fixed-size batches need a size; a fully convolutional model without one sees images
        # one at a time at their stored size.
        batch = self.num_images if size else 1
        ds = make_dataset(self.data_dir, self.split, batch_size=batch, training=False,
                          **({key: size} if size else {}))
        images, masks = [], []
        for x, y in ds.take(self.num_images if batch == 1 else 1):
            images.extend(np.asarray(x))
            masks.extend(np.asarray(y))
        if not images:
            raise ValueError(f"split {self.split!r} is empty")
        self._batch = [np.stack(images) if batch > 1 else images, np.stack(masks) if batch > 1 else masks]
        k = int(info.num_classes)
        self.class_names = visualize.class_names_or_default(info.class_names, k)
        self.colors = visualize.dataset_colors(info)
        self.ignore_index = info.ignore_index
        self.binary = k == 2
        self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_train_begin(self, logs=None):
        from tfseg import runtime

        if not runtime.is_chief():
            self._disabled = True  # the chief's run directory holds the run's pictures
            return
        try:
            self._load()
        except Exception as e:  # pictures must never stop a training run
            log.warning("TensorBoard predictions off: cannot read %s/%s (%s: %s)",
                        self.data_dir, self.split, type(e).__name__, e)
            self._disabled = True

    # -- per epoch -------------------------------------------------------------------------

    def _predict(self, images) -> list[np.ndarray]:
        import tensorflow as tf

        from tfseg.inference import probs_to_mask

        if isinstance(images, np.ndarray):
            batches = [images]
        else:
            batches = [img[None] for img in images]
        out = []
        for x in batches:
            probs = self.model(tf.constant(x, tf.float32), training=False)
            probs = np.asarray(tf.cast(probs, tf.float32))
            out.extend(probs_to_mask(probs, self.binary))
        return out

    def write(self, step: int) -> None:
        """Predicts the fixed examples and writes the picture at ``step`` (the epoch number)."""
        import tensorflow as tf

        images, masks = self._batch
        preds = self._predict(images)
        picture = prediction_grid(list(images), list(masks), preds, self.class_names, self.colors,
                                  ignore_index=self.ignore_index)
        with self._writer.as_default():
            tf.summary.image(TAG, picture[None], step=step,
                             description="validation examples: image | truth | prediction")
        self._writer.flush()

    def on_epoch_end(self, epoch, logs=None):
        if self._disabled or self._batch is None:
            return
        done = epoch + 1
        if done % self.every and done != self.epochs:
            return
        try:
            self.write(done)
        except Exception as e:  # a picture must never stop a training run
            log.warning("TensorBoard predictions off after epoch %d (%s: %s)", done, type(e).__name__, e)
            self._disabled = True

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
