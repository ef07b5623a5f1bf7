"""Segmentation losses on class-id targets and the probabilities tfseg models output.

Every loss takes:

  y_true: (B, *spatial, 1) integer class ids (any numeric dtype); pixels equal to
    ``ignore_index`` (or outside ``[0, num_classes)``) contribute to no numerator or denominator.
  y_pred: float probabilities as the model outputs them: (B, *spatial, 1) sigmoid for binary tasks
    (``num_classes == 2``), (B, *spatial, K) softmax otherwise. Cast to float32 first, so the
    losses are safe under mixed precision.

A binary prediction p is expanded to two-class probabilities (1 - p, p), so one code path serves
binary and multi-class tasks: "bce" is "ce" with two classes, binary Dice is the foreground
class's Dice.

Statistics are pooled over every pixel of the (per-replica) batch: cross-entropy is the mean over
the batch's valid pixels, Dice is computed from the batch's summed intersections and sums (stable
when one image has no foreground). The batch value is returned repeated once per sample, so
Keras' reduction and its per-replica loss scaling under ``tf.distribute`` apply unchanged.

Models with several outputs (deep supervision) get the loss applied to each output by Keras;
tfseg's improved U-Net sums its deep-supervision layers inside the model and has one output.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

_EPS = 1e-7


def class_weights_from_counts(counts, scheme: str = "median_freq") -> list[float]:
    """Class weights from per-class pixel counts (dataset.json ``class_pixel_counts[split]``).

    Args:
      counts: (K,) pixel counts per class, ignore pixels excluded.
      scheme: ``"median_freq"`` (Eigen & Fergus 2015: median frequency / class frequency) or
        ``"inverse_sqrt"`` (1 / sqrt(frequency), scaled to mean 1 over the present classes).

    Returns:
      K floats; classes with no pixels get weight 0.

    Raises:
      ValueError: unknown scheme, negative counts or no pixels at all.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(
            f"class pixel counts must be non-negative with a positive total, got {counts.tolist()}"
        )
    present = counts > 0
    freq = counts / counts.sum()
    weights = np.zeros_like(freq)
    if scheme == "median_freq":
        weights[present] = np.median(freq[present]) / freq[present]
    elif scheme == "inverse_sqrt":
        weights[present] = 1.0 / np.sqrt(freq[present])
        weights[present] /= weights[present].mean()
    else:
        raise ValueError(
            f"unknown class weight scheme {scheme!r}; expected 'median_freq' or 'inverse_sqrt'"
        )
    return [float(w) for w in weights]


def _pixels(y_true, y_pred, num_classes: int, ignore_index):
    """Flattens a batch to per-pixel one-hot targets and probabilities.

    Returns:
      onehot: (N, K) float32, all-zero rows for ignored pixels.
      probs: (N, K) float32 class probabilities.
      valid: (N,) float32, 1 where the pixel counts.
    """
    y_pred = ops.cast(y_pred, "float32")
    channels = y_pred.shape[-1]
    probs = ops.reshape(y_pred, (-1, channels))
    if channels == 1:
        probs = ops.concatenate([1.0 - probs, probs], axis=-1)
    if probs.shape[-1] != num_classes:
        raise ValueError(
            f"y_pred has {channels} channels but num_classes is {num_classes} "
            "(binary tasks: 1 sigmoid channel; multi-class: one softmax channel per class)"
        )
    # Keras' Loss.__call__ hands y_true over as float32; class ids < 2**24 survive exactly.
    labels = ops.cast(ops.round(ops.reshape(ops.cast(y_true, "float32"), (-1,))), "int32")
    valid = ops.logical_and(labels >= 0, labels < num_classes)
    if ignore_index is not None:
        valid = ops.logical_and(valid, ops.not_equal(labels, ignore_index))
    valid = ops.cast(valid, "float32")
    onehot = ops.one_hot(ops.where(valid > 0, labels, 0), num_classes, dtype="float32")
    return onehot * valid[:, None], probs, valid


class SegmentationLoss(keras.losses.Loss):
    """Base of tfseg's losses: class-id targets, ignore index, class weights.

    Args:
      num_classes: classes including background (2 for binary tasks).
      ignore_index: target value whose pixels are left out, or None.
      class_weights: K per-class weights, or None for equal weights.
      name, reduction, dtype: as ``keras.losses.Loss``.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = None,
        class_weights=None,
        name: str | None = None,
        reduction: str = "sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        if class_weights is not None:
            class_weights = [float(w) for w in class_weights]
            if len(class_weights) != self.num_classes:
                raise ValueError(
                    f"class_weights has {len(class_weights)} values for {self.num_classes} classes"
                )
        self.class_weights = class_weights

    def _weights(self):
        if self.class_weights is None:
            return ops.ones((self.num_classes,), dtype="float32")
        return ops.convert_to_tensor(self.class_weights, dtype="float32")

    def batch_loss(self, onehot, probs, valid):
        """The batch's scalar loss from :func:`_pixels`' output."""
        raise NotImplementedError

    def call(self, y_true, y_pred):
        onehot, probs, valid = _pixels(y_true, y_pred, self.num_classes, self.ignore_index)
        loss = self.batch_loss(onehot, probs, valid)
        return ops.broadcast_to(loss, (ops.shape(y_pred)[0],))

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes, ignore_index=self.ignore_index, class_weights=self.class_weights
        )
        return config


def _weighted_mean(values, weights):
    return ops.sum(values * weights) / ops.maximum(ops.sum(weights), _EPS)


def _cross_entropy(onehot, probs, valid, weights, gamma: float = 0.0):
    p = ops.clip(probs, _EPS, 1.0 - _EPS)
    p_true = ops.sum(onehot * p, axis=-1)
    ce = -ops.log(ops.where(valid > 0, p_true, 1.0))
    if gamma:
        ce = ce * ops.power(1.0 - p_true, gamma)
    return _weighted_mean(ce, ops.sum(onehot * weights, axis=-1))


@keras.saving.register_keras_serializable(package="tfseg")
class CrossEntropy(SegmentationLoss):
    """Cross-entropy averaged over valid pixels (binary or categorical from the channel count).

    With class weights, the mean is weighted by the true class's weight (sum w*ce / sum w).
    """

    def batch_loss(self, onehot, probs, valid):
        return _cross_entropy(onehot, probs, valid, self._weights())


@keras.saving.register_keras_serializable(package="tfseg")
class FocalLoss(SegmentationLoss):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true) ** gamma.

    Args:
      gamma: focusing parameter (0 gives cross-entropy).
    """

    def __init__(self, num_classes: int, gamma: float = 2.0, **kwargs):
        super().__init__(num_classes, **kwargs)
        self.gamma = float(gamma)

    def batch_loss(self, onehot, probs, valid):
        return _cross_entropy(onehot, probs, valid, self._weights(), gamma=self.gamma)

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma}


class _OverlapLoss(SegmentationLoss):
    """Losses from per-class soft TP/FP/FN: 1 - (weighted) mean of a per-class score.

    Binary tasks score the foreground class only; multi-class tasks score every class, or every
    class but 0 with ``include_background=False``.
    """

    def __init__(self, num_classes: int, smooth: float = 1.0, include_background: bool = True, **kwargs):
        super().__init__(num_classes, **kwargs)
        self.smooth = float(smooth)
        self.include_background = bool(include_background)

    def _class_mask(self):
        mask = np.ones(self.num_classes, dtype=np.float32)
        if self.num_classes == 2 or not self.include_background:
            mask[0] = 0.0
        return ops.convert_to_tensor(mask)

    def score(self, tp, fp, fn):
        raise NotImplementedError

    def batch_loss(self, onehot, probs, valid):
        probs = probs * valid[:, None]
        tp = ops.sum(onehot * probs, axis=0)
        fp = ops.sum((1.0 - onehot) * probs, axis=0)
        fn = ops.sum(onehot * (1.0 - probs), axis=0)
        return 1.0 - _weighted_mean(self.score(tp, fp, fn), self._weights() * self._class_mask())

    def get_config(self):
        return {**super().get_config(), "smooth": self.smooth, "include_background": self.include_background}


@keras.saving.register_keras_serializable(package="tfseg")
class DiceLoss(_OverlapLoss):
    """Soft Dice loss: 1 - (2 TP + s) / (2 TP + FP + FN + s) per class, averaged over classes."""

    def score(self, tp, fp, fn):
        return (2.0 * tp + self.smooth) / (2.0 * tp + fp + fn + self.smooth)


@keras.saving.register_keras_serializable(package="tfseg")
class TverskyLoss(_OverlapLoss):
    """Tversky loss (Salehi et al. 2017): 1 - (TP + s) / (TP + alpha FP + beta FN + s).

    Args:
      alpha: weight of false positives; beta: weight of false negatives (alpha = beta = 0.5 is Dice).
    """

    def __init__(self, num_classes: int, alpha: float = 0.3, beta: float = 0.7, **kwargs):
        super().__init__(num_classes, **kwargs)
        self.alpha = float(alpha)
        self.beta = float(beta)

    def score(self, tp, fp, fn):
        return (tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "beta": self.beta}


def lovasz_softmax(onehot, probs, valid, class_mask, max_pixels: int | None = None):
    """The Lovasz-softmax loss (Berman et al. 2018), pooled over the batch's valid pixels.

    For each class, the pixels' errors ``|onehot - p|`` sorted in decreasing order are weighted by
    the gradient of the Lovasz extension of the Jaccard loss at that order; the loss is the mean
    over the classes present in the batch (and allowed by ``class_mask``). A tight convex
    surrogate of 1 - IoU, so it optimizes the metric that is reported.

    Args:
      onehot, probs, valid: as returned by :func:`_pixels`.
      class_mask: (K,) 1 for the classes to average over.
      max_pixels: sort at most about this many pixels per class: a strided subset of the batch
        (an odd stride, so it moves across image rows), since the sort is the costly part on CPUs.

    Returns:
      A float32 scalar.
    """
    n = onehot.shape[0]
    if max_pixels and n is not None and n > max_pixels:
        stride = -(-n // max_pixels) | 1
        onehot, probs, valid = onehot[::stride], probs[::stride], valid[::stride]
    fg = ops.transpose(onehot)  # (K, N)
    errors = ops.transpose(ops.abs(onehot - probs) * valid[:, None])
    order = ops.flip(ops.argsort(errors, axis=-1), axis=-1)  # decreasing error
    errors = ops.take_along_axis(errors, order, axis=-1)
    fg = ops.take_along_axis(fg, order, axis=-1)
    total = ops.sum(fg, axis=-1, keepdims=True)
    intersection = total - ops.cumsum(fg, axis=-1)
    union = total + ops.cumsum(ops.take_along_axis(ops.transpose(valid[:, None] * ops.ones_like(onehot)),
                                                   order, axis=-1) - fg, axis=-1)
    jaccard = 1.0 - intersection / ops.maximum(union, _EPS)
    grad = ops.concatenate([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], axis=-1)
    per_class = ops.sum(errors * ops.stop_gradient(grad), axis=-1)
    present = ops.cast(ops.squeeze(total, -1) > 0, "float32") * class_mask
    return _weighted_mean(per_class, present)


@keras.saving.register_keras_serializable(package="tfseg")
class CrossEntropyDiceLoss(DiceLoss):
    """``ce_weight`` x cross-entropy + ``dice_weight`` x soft Dice loss (the Carvana seed's BCE+Dice),
    plus ``lovasz_weight`` x the Lovasz-softmax loss (:func:`lovasz_softmax`; 0: off) over at most
    ``lovasz_pixels`` pixels of the batch."""

    def __init__(self, num_classes: int, ce_weight: float = 1.0, dice_weight: float = 1.0,
                 lovasz_weight: float = 0.0, lovasz_pixels: int = 65536, **kwargs):
        super().__init__(num_classes, **kwargs)
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.lovasz_weight = float(lovasz_weight)
        self.lovasz_pixels = int(lovasz_pixels)

    def batch_loss(self, onehot, probs, valid):
        ce = _cross_entropy(onehot, probs, valid, self._weights())
        loss = self.ce_weight * ce + self.dice_weight * super().batch_loss(onehot, probs, valid)
        if self.lovasz_weight:
            loss = loss + self.lovasz_weight * lovasz_softmax(
                onehot, probs, valid, self._class_mask(), self.lovasz_pixels)
        return loss

    def get_config(self):
        return {**super().get_config(), "ce_weight": self.ce_weight, "dice_weight": self.dice_weight,
                "lovasz_weight": self.lovasz_weight, "lovasz_pixels": self.lovasz_pixels}


LOSSES = {
    "bce": CrossEntropy,
    "ce": CrossEntropy,
    "dice": DiceLoss,
    "bce_dice": CrossEntropyDiceLoss,
    "ce_dice": CrossEntropyDiceLoss,
    "focal": FocalLoss,
    "tversky": TverskyLoss,
}


def get_loss(
    name: str, *, num_classes: int, ignore_index=None, class_weights=None, **kwargs
) -> SegmentationLoss:
    """Builds a loss by name.

    Args:
      name: one of ``bce``, ``dice``, ``bce_dice``, ``ce``, ``ce_dice``, ``focal``, ``tversky``.
      num_classes: classes including background (2: binary, 1 sigmoid channel).
      ignore_index: target id to leave out (e.g. 255), or None.
      class_weights: K weights (see :func:`class_weights_from_counts`), or None.
      **kwargs: the loss's options: ``smooth``, ``include_background`` (dice, tversky, *_dice),
        ``gamma`` (focal), ``alpha``/``beta`` (tversky), ``ce_weight``/``dice_weight``/``lovasz_weight``/``lovasz_pixels`` (*_dice).

    Raises:
      ValueError: unknown name, "bce"/"bce_dice" for a multi-class task, or bad options.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(sorted(LOSSES))}")
    if name.startswith("bce") and num_classes != 2:
        raise ValueError(f"loss {name} is for binary tasks; use {name[1:]} for {num_classes} classes")
    try:
        return LOSSES[name](
            num_classes, ignore_index=ignore_index, class_weights=class_weights, name=name, **kwargs
        )
    except TypeError as e:
        raise ValueError(f"loss {name}: {e}") from None
