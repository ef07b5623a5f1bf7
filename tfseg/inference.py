"""Whole-image and sliding-window inference with a tfseg model (numpy in, numpy out).

Two ways to run a 2D model on an image of any size:

* ``mode="resize"``: resize the image to the model's training size, predict, resize the
  probabilities back (bilinear). The exported ``serving_default`` signature does exactly this in
  the graph (:mod:`tfseg.export`), so both paths give the same masks.
* ``mode="tile"``: slide a ``size`` window over the image at full resolution with the given
  overlap and blend the overlapping patch predictions with a Gaussian importance map (sigma =
  1/8 of the patch side, as nnU-Net and MONAI do), so patch borders, where the model sees the
  least context, count least. Images smaller than a patch are zero-padded.

3D volumes are always tiled (:func:`predict_volume`). There is one sliding window,
:func:`sliding_window_tf`, in TensorFlow: evaluation and prediction run it (traced once per
setting for a Keras model) and the exported serving graph (:mod:`tfseg.export`) embeds it, so
both compute the same thing; :class:`InferenceOptions` is what they share. The model is called on at most
``batch_size`` patches at a time and the only full-size buffers are the accumulated probabilities
and weights, so memory is bounded by the patch batch, not by the image or volume.

Flip test-time augmentation averages the predictions over combinations of flips, each flipped
back before averaging. ``tta=True`` uses every spatial axis (4 views in 2D, 8 in 3D); a tuple of
spatial axes (0 = first spatial axis: H in 2D, D in 3D) uses only those, which is what evaluation
and prediction pass: the flips the model was trained with (:func:`tfseg.rundir.training_flip_axes`),
since a flip the model never saw (an upside-down person) makes the average worse, not better.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import weakref
from typing import Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

GAUSSIAN_SIGMA_SCALE = 1.0 / 8
# Window overlap and windows per model call: 2D tiles, 3D patches.
TILE_OVERLAP, TILE_BATCH = 0.25, 8
VOLUME_OVERLAP, VOLUME_BATCH = 0.5, 2


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """How a model is run on an image or volume: what evaluate scores and the export serves.

    Attributes:
      mode: ``"resize"`` (2D: to the model size and back), ``"tile"`` (2D: windows at full
        resolution) or ``"sliding_window"`` (3D, always).
      tta_flip_axes: spatial axes whose flips are averaged (0 = H in 2D, D in 3D); () for none.
      overlap, batch_size: the windows' overlap and how many go through the model at once.
    """

    mode: str = "resize"
    tta_flip_axes: tuple = ()
    overlap: float = TILE_OVERLAP
    batch_size: int = TILE_BATCH

    @classmethod
    def make(cls, ndim: int, *, tile: bool = False, flips=()) -> "InferenceOptions":
        if ndim == 3:
            return cls("sliding_window", tuple(flips), VOLUME_OVERLAP, VOLUME_BATCH)
        return cls("tile" if tile else "resize", tuple(flips), TILE_OVERLAP, TILE_BATCH)

    @property
    def tile(self) -> bool:
        return self.mode != "resize"

    def to_json(self) -> dict:
        return {"mode": self.mode, "tta_flip_axes": list(self.tta_flip_axes), "overlap": self.overlap,
                "batch_size": self.batch_size}

    @classmethod
    def from_json(cls, d: dict | None, ndim: int) -> "InferenceOptions":
        """tfseg.json's ``inference`` (an export from before it was recorded resized, no TTA)."""
        if not d:
            return cls.make(ndim)
        base = cls.make(ndim, tile=d.get("mode") == "tile")
        return cls(base.mode, tuple(int(a) for a in d.get("tta_flip_axes") or ()),
                   float(d.get("overlap", base.overlap)), int(d.get("batch_size", base.batch_size)))


def gaussian_weights(patch_shape: Sequence[int], sigma_scale: float = GAUSSIAN_SIGMA_SCALE) -> np.ndarray:
    """The Gaussian importance map used to blend overlapping patches.

    Args:
      patch_shape: spatial patch size, e.g. (H, W) or (D, H, W).
      sigma_scale: sigma along each axis as a fraction of that axis's size.

    Returns:
      float32 array of ``patch_shape``, maximum 1 at the centre, strictly positive everywhere
      (zeros are raised to the smallest positive value so every pixel has a defined blend).
    """
    axes = []
    for n in patch_shape:
        centre = (n - 1) / 2.0
        sigma = max(n * sigma_scale, 1e-6)
        x = np.arange(n, dtype=np.float64)
        axes.append(np.exp(-0.5 * ((x - centre) / sigma) ** 2))
    w = axes[0]
    for a in axes[1:]:
        w = np.multiply.outer(w, a)
    w = w / w.max()
    positive = w[w > 0]
    w[w <= 0] = positive.min() if positive.size else 1.0
    return w.astype(np.float32)


def window_starts(length: int, patch: int, overlap: float) -> list[int]:
    """Start offsets of windows of ``patch`` covering ``[0, length)``, evenly spread.

    The step is at most ``patch * (1 - overlap)``; the first window starts at 0 and the last ends
    at ``length`` (``length >= patch`` is assumed: shorter axes are padded first).
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if length <= patch:
        return [0]
    max_step = max(1, int(patch * (1.0 - overlap)))
    steps = int(np.ceil((length - patch) / max_step)) + 1
    return [int(round(i * (length - patch) / (steps - 1))) for i in range(steps)]


def _keras_forward(model):
    """The TF callable of a Keras model: (B, *patch, C) float32 -> float32 probabilities."""
    import tensorflow as tf

    def forward(batch):
        return tf.cast(model(batch, training=False), tf.float32)

    return forward


def _eager_forward(model):
    """The TF callable of any other model (a plain function of numpy batches, as in tests)."""
    import tensorflow as tf

    def forward(batch):
        return tf.convert_to_tensor(np.asarray(model(batch.numpy()), np.float32))

    return forward


def _is_keras(model) -> bool:
    import keras

    return isinstance(model, keras.Model)


def flip_combinations(spatial_rank: int, tta) -> list[tuple[int, ...]]:
    """The flips averaged by test-time augmentation, as tuples of spatial axes (``()`` = as is).

    Args:
      spatial_rank: 2 or 3.
      tta: False (no flips), True (every spatial axis) or a sequence of spatial axes.

    Raises:
      ValueError: an axis outside ``range(spatial_rank)``.
    """
    if tta is False or tta is None:
        return [()]
    axes = tuple(range(spatial_rank)) if tta is True else tuple(sorted(set(int(a) for a in tta)))
    if any(a < 0 or a >= spatial_rank for a in axes):
        raise ValueError(f"tta axes {axes} outside the {spatial_rank} spatial axes")
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def flip_average(forward, batch, tta):
    """TF: ``forward``'s probabilities for a (B, *spatial, C) batch averaged over the flips ``tta``
    names (:func:`flip_combinations`), each flipped back before averaging. Graph or eager."""
    import tensorflow as tf

    rank = batch.shape.rank - 2
    combos = [tuple(a + 1 for a in c) for c in flip_combinations(rank, tta)]
    total = None
    for axes in combos:
        x = tf.reverse(batch, list(axes)) if axes else batch
        y = forward(x)
        y = tf.reverse(y, list(axes)) if axes else y
        total = y if total is None else total + y
    return total if len(combos) == 1 else total / float(len(combos))


def window_starts_tf(length, patch: int, overlap: float):
    """TF twin of :func:`window_starts` for a length known only at run time (>= ``patch``)."""
    import tensorflow as tf

    max_step = max(1, int(patch * (1.0 - overlap)))
    span = tf.cast(length - patch, tf.float64)
    steps = tf.cast(tf.math.ceil(span / max_step), tf.int32) + 1
    i = tf.cast(tf.range(steps), tf.float64)
    denom = tf.cast(tf.maximum(steps - 1, 1), tf.float64)
    # tf.round and Python's round both round half to even.
    return tf.cast(tf.round(i * span / denom), tf.int32)


def sliding_window_tf(forward, array, patch_size: Sequence[int], *, overlap: float, batch_size: int, tta=False):
    """Gaussian-blended sliding window, in TensorFlow: the one implementation, used by evaluation
    and prediction (:func:`sliding_window`) and inside the exported serving graph.

    Works in a ``tf.function`` (shapes known only at run time) and eagerly.

    Args:
      forward: TF callable, (b, *patch_size, C) float32 -> (b, *patch_size, K) float32.
      array: (*spatial, C) float32 tensor, spatial rank == len(patch_size).
      patch_size: the window's spatial size.
      overlap: fraction of a window shared with its neighbour, in [0, 1).
      batch_size: windows per ``forward`` call.
      tta: flips averaged for every window (:func:`flip_combinations`).

    Returns:
      (*spatial, K) float32 tensor.
    """
    import tensorflow as tf

    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    patch = tuple(int(p) for p in patch_size)
    rank = len(patch)
    x = tf.convert_to_tensor(array, tf.float32)
    if x.shape.rank is not None and x.shape.rank != rank + 1:
        raise ValueError(f"input has shape {tuple(x.shape)}, patch size {patch}")
    shape = tf.shape(x)[:rank]
    # Zero padding at the end (coordinates stay aligned) for axes shorter than a patch.
    pads = tf.maximum(tf.constant(patch, tf.int32) - shape, 0)
    v = tf.pad(x, tf.concat([tf.stack([tf.zeros_like(pads), pads], 1), [[0, 0]]], 0))
    padded = tf.shape(v)[:rank]
    axes = [window_starts_tf(padded[i], patch[i], overlap) for i in range(rank)]
    starts = tf.reshape(tf.stack(tf.meshgrid(*axes, indexing="ij"), axis=-1), [-1, rank])
    n = tf.shape(starts)[0]
    grid = np.stack(np.meshgrid(*[np.arange(p) for p in patch], indexing="ij"), axis=-1).astype(np.int32)
    grid = tf.constant(grid)[None]  # (1, *patch, rank)
    w = tf.constant(gaussian_weights(patch))

    def windows(i):
        s = tf.gather(starts, tf.range(i, tf.minimum(i + batch_size, n)))
        coords = grid + tf.reshape(s, [-1] + [1] * rank + [rank])  # (b, *patch, rank)
        return coords, flip_average(forward, tf.gather_nd(v, coords), tta)

    coords, probs = windows(0)
    k = tf.shape(probs)[-1]
    acc = tf.tensor_scatter_nd_add(tf.zeros(tf.concat([padded, [k]], 0), tf.float32), coords, probs * w[..., None])
    norm = tf.tensor_scatter_nd_add(tf.zeros(padded, tf.float32), coords,
                                    tf.broadcast_to(w, tf.shape(coords)[:-1]))

    def body(i, acc, norm):
        coords, probs = windows(i)
        acc = tf.tensor_scatter_nd_add(acc, coords, probs * w[..., None])
        norm = tf.tensor_scatter_nd_add(norm, coords, tf.broadcast_to(w, tf.shape(coords)[:-1]))
        return i + batch_size, acc, norm

    _, acc, norm = tf.while_loop(lambda i, *_: i < n, body, (tf.constant(batch_size), acc, norm))
    out = acc / norm[..., None]
    return tf.slice(out, tf.zeros([rank + 1], tf.int32), tf.concat([shape, [-1]], 0))


_WINDOW_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _window_fn(model, channels: int, patch: tuple, overlap: float, batch_size: int, flips: tuple):
    """:func:`sliding_window_tf` for a Keras model as one traced tf.function per setting (any
    input size without retracing)."""
    import tensorflow as tf

    cache = _WINDOW_FNS.setdefault(model, {})
    key = (channels, patch, overlap, batch_size, flips)
    if key not in cache:
        # A weak reference: the cached function must not keep its model (the cache's key) alive.
        ref = weakref.ref(model)

        def forward(batch):
            return tf.cast(ref()(batch, training=False), tf.float32)

        spec = tf.TensorSpec([None] * len(patch) + [channels], tf.float32)
        cache[key] = tf.function(
            lambda x: sliding_window_tf(forward, x, patch, overlap=overlap, batch_size=batch_size, tta=flips),
            input_signature=[spec],
        )
    return cache[key]


def _with_tta(model, batch: np.ndarray, tta) -> np.ndarray:
    """Model probabilities for a (B, *spatial, C) numpy batch, averaged over the flips ``tta`` names."""
    import tensorflow as tf

    forward = _keras_forward(model) if _is_keras(model) else _eager_forward(model)
    return flip_average(forward, tf.convert_to_tensor(np.asarray(batch, np.float32)), tta).numpy()


def sliding_window(
    model,
    array: np.ndarray,
    patch_size: Sequence[int],
    *,
    overlap: float,
    batch_size: int,
    tta=False,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Gaussian-blended sliding-window prediction over the spatial axes of one image or volume
    (numpy in and out; :func:`sliding_window_tf` does the work, as in the exported graph).

    Args:
      model: a Keras model (or callable of numpy batches) mapping (B, *patch_size, C) float32 to
        (B, *patch_size, K).
      array: (*spatial, C) float32 input, spatial rank == len(patch_size).
      patch_size: the window's spatial size.
      overlap: fraction of a window shared with its neighbour, in [0, 1).
      batch_size: patches per model call; bounds the memory of the model calls.
      tta: flips to average over (see :func:`flip_combinations`).
      progress: optional callback receiving the number of patches done (once, at the end).

    Returns:
      (*spatial, K) float32 probabilities, the weighted mean of the patch predictions.
    """
    patch_size = tuple(int(p) for p in patch_size)
    spatial = array.shape[:-1]
    if len(spatial) != len(patch_size):
        raise ValueError(f"input has spatial shape {spatial}, patch size {patch_size}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    # The flipped spatial axes (the last combination names them all), () for none.
    flips = flip_combinations(len(patch_size), tta)[-1]
    x = np.ascontiguousarray(array, np.float32)
    if _is_keras(model):
        out = _window_fn(model, x.shape[-1], patch_size, float(overlap), int(batch_size), flips)(x)
    else:
        out = sliding_window_tf(_eager_forward(model), x, patch_size, overlap=overlap, batch_size=batch_size,
                                tta=flips)
    if progress is not None:
        padded = [max(s, p) for s, p in zip(spatial, patch_size)]
        progress(int(np.prod([len(window_starts(s, p, overlap)) for s, p in zip(padded, patch_size)])))
    return out.numpy()


def resize_probs(probs: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Bilinear resize of (H, W, K) float probabilities to ``size`` (:func:`tfseg.preprocess.resize_back`)."""
    from tfseg import preprocess

    if tuple(probs.shape[:2]) == tuple(size):
        return probs.astype(np.float32, copy=False)
    return preprocess.resize_back(probs, size).numpy().astype(np.float32)


def predict_image(
    model,
    image: np.ndarray,
    *,
    size: Sequence[int],
    mode: str = "resize",
    overlap: float = TILE_OVERLAP,
    batch_size: int = TILE_BATCH,
    tta=False,
    preprocessing: dict | None = None,
) -> np.ndarray:
    """Class probabilities for one 2D image at its original size.

    Args:
      model: a tfseg 2D model (input 0..255 float32, output probabilities).
      image: (H, W, C) uint8 (or any numeric dtype in the 0..255 range).
      size: (h, w), the model's training size: the resize target or the tile size.
      mode: ``"resize"`` or ``"tile"`` (see the module docstring).
      overlap: tile overlap, ``mode="tile"`` only.
      batch_size: tiles per model call, ``mode="tile"`` only.
      tta: flips to average over: True for both axes, or spatial axes (1 = left-right).
      preprocessing: the run's record of what conversion did to originals
        (:attr:`tfseg.rundir.RunInfo.preprocessing`); a no-op on records.

    Returns:
      (H, W, K) float32 probabilities; K = 1 (the foreground probability) for binary models.
    """
    from tfseg import preprocess

    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W, C), got shape {image.shape}")
    size = tuple(int(s) for s in size)
    if mode not in ("resize", "tile"):
        raise ValueError(f"mode must be 'resize' or 'tile', got {mode!r}")
    height, width = image.shape[:2]
    # The functions the exported serving graph runs (tfseg.preprocess), so the two paths agree.
    x = preprocess.source_resize(image, preprocessing)
    if mode == "tile":
        probs = sliding_window(model, x.numpy(), size, overlap=overlap, batch_size=batch_size, tta=tta)
    else:
        probs = _with_tta(model, preprocess.to_model_size(x, size).numpy()[None], tta)[0]
    return resize_probs(probs, (height, width))


def predict_volume(
    model,
    volume: np.ndarray,
    *,
    patch_size: Sequence[int],
    overlap: float = VOLUME_OVERLAP,
    batch_size: int = VOLUME_BATCH,
    tta=False,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Sliding-window class probabilities for one 3D volume.

    Args:
      model: a tfseg 3D model (input z-scored float32 volumes, output probabilities).
      volume: (D, H, W, C) float, normalized as at conversion.
      patch_size: (d, h, w), the training patch size.
      overlap: fraction of a patch shared with its neighbour.
      batch_size: patches per model call.
      tta: flips to average over: True for all 8 combinations, or spatial axes.

    Returns:
      (D, H, W, K) float32 probabilities.
    """
    if volume.ndim == 3:
        volume = volume[..., None]
    if volume.ndim != 4:
        raise ValueError(f"volume must be (D, H, W, C), got shape {volume.shape}")
    return sliding_window(
        model, volume.astype(np.float32), patch_size, overlap=overlap, batch_size=batch_size, tta=tta,
        progress=progress,
    )


def probs_to_mask(probs: np.ndarray, binary: bool) -> np.ndarray:
    """Class ids from probabilities.

    Args:
      probs: (..., K) float probabilities; K == 1 for binary models.
      binary: threshold the single foreground channel at 0.5 instead of taking the argmax.

    Returns:
      (...) uint8 class ids.
    """
    if binary:
        return (probs[..., 0] > 0.5).astype(np.uint8)
    return np.argmax(probs, axis=-1).astype(np.uint8)
