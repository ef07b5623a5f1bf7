"""Whole-image and sliding-window inference with a tfseg model (numpy in, numpy out).

Two ways to run a 2D model on an image of any size:

* ``mode="resize"``: resize the image to the model's training size, predict, resize the
  probabilities back (bilinear). The exported ``serving_default`` signature does exactly this in
  the graph (:mod:`tfseg.export`), so both paths give the same masks.
* ``mode="tile"``: slide a ``size`` window over the image at full resolution with the given
  overlap and blend the overlapping patch predictions with a Gaussian importance map (sigma =
  1/8 of the patch side, as nnU-Net and MONAI do), so patch borders, where the model sees the
  least context, count least. Images smaller than a patch are zero-padded.

3D volumes are always tiled (:func:`predict_volume`). The model is called on at most
``batch_size`` patches at a time and the only full-size buffers are the accumulated probabilities
and weights, so memory is bounded by the patch batch, not by the image or volume.

Flip test-time augmentation averages the predictions over combinations of flips, each flipped
back before averaging. ``tta=True`` uses every spatial axis (4 views in 2D, 8 in 3D); a tuple of
spatial axes (0 = first spatial axis: H in 2D, D in 3D) uses only those, which is what evaluation
and prediction pass: the flips the model was trained with (:func:`tfseg.rundir.training_flip_axes`),
since a flip the model never saw (an upside-down person) makes the average worse, not better.
"""

from __future__ import annotations

import itertools
import logging
from typing import Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

GAUSSIAN_SIGMA_SCALE = 1.0 / 8


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


def _forward(model, batch: np.ndarray) -> np.ndarray:
    """Calls a Keras model (or any callable taking a float32 batch) and returns numpy float32."""
    import keras

    if isinstance(model, keras.Model):
        out = model(batch, training=False)
    else:
        out = model(batch)
    return np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float32)


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


def _with_tta(model, batch: np.ndarray, tta) -> np.ndarray:
    """Model probabilities for a (B, *spatial, C) batch, averaged over the flips ``tta`` names."""
    combos = [tuple(a + 1 for a in c) for c in flip_combinations(batch.ndim - 2, tta)]
    if combos == [()]:
        return _forward(model, batch)
    total = None
    for axes in combos:
        x = np.flip(batch, axis=axes) if axes else batch
        y = _forward(model, np.ascontiguousarray(x))
        y = np.flip(y, axis=axes) if axes else y
        total = y if total is None else total + y
    return total / len(combos)


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
    """Gaussian-blended sliding-window prediction over the spatial axes of one image or volume.

    Args:
      model: a Keras model (or callable) mapping (B, *patch_size, C) float32 to (B, *patch_size, K).
      array: (*spatial, C) float32 input, spatial rank == len(patch_size).
      patch_size: the window's spatial size.
      overlap: fraction of a window shared with its neighbour, in [0, 1).
      batch_size: patches per model call; bounds the memory of the model calls.
      tta: flips to average over (see :func:`flip_combinations`).
      progress: optional callback receiving the number of patches done after each call.

    Returns:
      (*spatial, K) float32 probabilities, the weighted mean of the patch predictions.
    """
    patch_size = tuple(int(p) for p in patch_size)
    spatial = array.shape[:-1]
    if len(spatial) != len(patch_size):
        raise ValueError(f"input has spatial shape {spatial}, patch size {patch_size}")
    # Zero padding (at the end, so coordinates stay aligned) for axes shorter than a patch.
    pad = [(0, max(0, p - s)) for s, p in zip(spatial, patch_size)] + [(0, 0)]
    padded = np.pad(array.astype(np.float32, copy=False), pad) if any(b for _, b in pad) else array
    padded_spatial = padded.shape[:-1]
    starts = list(itertools.product(*(window_starts(s, p, overlap) for s, p in zip(padded_spatial, patch_size))))
    weights = gaussian_weights(patch_size)
    acc = None
    norm = np.zeros(padded_spatial, np.float32)
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        slices = [tuple(slice(s, s + p) for s, p in zip(start, patch_size)) for start in chunk]
        batch = np.stack([padded[sl] for sl in slices]).astype(np.float32, copy=False)
        probs = _with_tta(model, batch, tta)
        if acc is None:
            acc = np.zeros(padded_spatial + (probs.shape[-1],), np.float32)
        for sl, p in zip(slices, probs):
            acc[sl] += p * weights[..., None]
            norm[sl] += weights
        if progress is not None:
            progress(len(chunk))
    out = acc / norm[..., None]
    return out[tuple(slice(0, s) for s in spatial)]


def resize_probs(probs: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Bilinear resize of (H, W, K) float probabilities to ``size`` (the graph's tf.image.resize)."""
    import tensorflow as tf

    if tuple(probs.shape[:2]) == tuple(size):
        return probs.astype(np.float32, copy=False)
    return tf.image.resize(probs, size, method="bilinear").numpy().astype(np.float32)


def predict_image(
    model,
    image: np.ndarray,
    *,
    size: Sequence[int],
    mode: str = "resize",
    overlap: float = 0.25,
    batch_size: int = 8,
    tta=False,
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

    Returns:
      (H, W, K) float32 probabilities; K = 1 (the foreground probability) for binary models.
    """
    import tensorflow as tf

    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W, C), got shape {image.shape}")
    size = tuple(int(s) for s in size)
    height, width = image.shape[:2]
    x = image.astype(np.float32)
    if mode == "tile":
        return sliding_window(model, x, size, overlap=overlap, batch_size=batch_size, tta=tta)
    if mode != "resize":
        raise ValueError(f"mode must be 'resize' or 'tile', got {mode!r}")
    if (height, width) != size:
        # Same op and arguments as the exported serving graph, so the two paths agree.
        x = tf.image.resize(x, size, method="bilinear").numpy()
    probs = _with_tta(model, x[None], tta)[0]
    return resize_probs(probs, (height, width))


def predict_volume(
    model,
    volume: np.ndarray,
    *,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 2,
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
