"""Segmentation metrics accumulated as a confusion matrix over the whole dataset.

Each metric holds one (K, K) confusion matrix, ``cm[t, p]`` = pixels of true class t predicted as
p, in a float64 variable with SUM aggregation (exact up to 2**53 pixels). Ratios are computed only
in ``result()``, so under ``MirroredStrategy`` the replicas' matrices are summed before any ratio
is taken, never per-replica ratios averaged. Scores follow :mod:`tfseg.scoring` (the numpy
reference): NaN where a ratio is undefined (0 / 0), means over the defined values only.

``update_state(y_true, y_pred)`` takes:

  y_true: (B, *spatial, 1) integer class ids; pixels equal to ``ignore_index`` or outside
    ``[0, num_classes)`` are not counted.
  y_pred: model probabilities, (B, *spatial, 1) sigmoid (binary: thresholded at 0.5) or
    (B, *spatial, K) softmax (argmax); or (B, *spatial) / (B, *spatial, 1) integer class ids.
"""

from __future__ import annotations

import keras
from keras import ops


def _to_ids(y_pred, num_classes: int):
    """Predicted class ids (flat int32) from probabilities or ids."""
    if "int" in str(y_pred.dtype):
        return ops.reshape(ops.cast(y_pred, "int32"), (-1,))
    y_pred = ops.cast(y_pred, "float32")
    if y_pred.shape[-1] == 1:
        if num_classes != 2:
            raise ValueError(f"a 1-channel prediction needs num_classes == 2, got {num_classes}")
        return ops.reshape(ops.cast(y_pred > 0.5, "int32"), (-1,))
    if y_pred.shape[-1] != num_classes:
        raise ValueError(f"y_pred has {y_pred.shape[-1]} channels for {num_classes} classes")
    return ops.reshape(ops.cast(ops.argmax(y_pred, axis=-1), "int32"), (-1,))


def _ratio(num, den):
    """num / den, NaN where den == 0 (as tfseg.scoring)."""
    return ops.where(den > 0, num / ops.where(den > 0, den, 1.0), float("nan"))


def _nanmean(x):
    defined = ops.logical_not(ops.isnan(x))
    total = ops.sum(ops.where(defined, x, 0.0))
    return total / ops.sum(ops.cast(defined, x.dtype))  # 0 / 0 -> NaN when nothing is defined


@keras.saving.register_keras_serializable(package="tfseg")
class ConfusionMatrixMetric(keras.metrics.Metric):
    """Accumulates the confusion matrix; ``result()`` returns it (K, K) float32.

    Subclasses override :meth:`score` to turn the matrix into their value.

    Args:
      num_classes: classes including background (2 for binary tasks).
      ignore_index: target id whose pixels are not counted, or None.
    """

    def __init__(
        self, num_classes: int, ignore_index: int | None = None, name: str = "confusion_matrix", dtype=None
    ):
        super().__init__(name=name, dtype=dtype)
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.confusion_matrix = self.add_variable(
            shape=(self.num_classes, self.num_classes),
            initializer="zeros",
            dtype="float64",
            aggregation="sum",
            name="confusion_matrix",
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        k = self.num_classes
        y_true = ops.convert_to_tensor(y_true)
        t = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        p = ops.clip(_to_ids(y_pred, k), 0, k - 1)
        valid = ops.logical_and(t >= 0, t < k)
        if self.ignore_index is not None:
            valid = ops.logical_and(valid, ops.not_equal(t, self.ignore_index))
        weights = ops.cast(valid, "float64")
        if sample_weight is not None:
            sw = ops.cast(sample_weight, "float64")
            while len(sw.shape) < len(y_true.shape):
                sw = ops.expand_dims(sw, -1)
            weights = weights * ops.reshape(ops.broadcast_to(sw, ops.shape(y_true)), (-1,))
        index = ops.where(valid, t * k + p, 0)
        # segment_sum with a static segment count, unlike bincount, compiles under XLA (jit_compile).
        counts = ops.segment_sum(weights, index, num_segments=k * k)
        self.confusion_matrix.assign_add(ops.reshape(counts, (k, k)))

    def score(self, cm):
        """The metric's value from the float64 (K, K) matrix."""
        return cm

    def result(self):
        return ops.cast(self.score(ops.convert_to_tensor(self.confusion_matrix)), "float32")

    def get_config(self):
        return {
            "name": self.name,
            "dtype": self.dtype,
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
        }


def _per_class(cm, kind: str):
    tp = ops.diagonal(cm)
    predicted = ops.sum(cm, axis=0)
    true = ops.sum(cm, axis=1)
    if kind == "iou":
        return _ratio(tp, predicted + true - tp)
    if kind == "dice":
        return _ratio(2.0 * tp, predicted + true)
    if kind == "precision":
        return _ratio(tp, predicted)
    if kind == "recall":
        return _ratio(tp, true)
    raise ValueError(f"unknown per-class score {kind!r}")


@keras.saving.register_keras_serializable(package="tfseg")
class MeanIoU(ConfusionMatrixMetric):
    """Mean over classes of TP / (TP + FP + FN), classes absent from truth and prediction left out."""

    def __init__(self, num_classes: int, ignore_index: int | None = None, name: str = "mean_iou", dtype=None):
        super().__init__(num_classes, ignore_index, name=name, dtype=dtype)

    def score(self, cm):
        return _nanmean(_per_class(cm, "iou"))


class _PerClassMetric(ConfusionMatrixMetric):
    """A per-class score: the (K,) vector, or one class's scalar with ``class_id``."""

    kind = ""

    def __init__(
        self, num_classes: int, ignore_index=None, class_id: int | None = None, name=None, dtype=None
    ):
        if name is None:
            name = f"{self.kind}" if class_id is None else f"{self.kind}_{class_id}"
        super().__init__(num_classes, ignore_index, name=name, dtype=dtype)
        if class_id is not None and not 0 <= int(class_id) < self.num_classes:
            raise ValueError(f"class_id {class_id} is outside 0..{self.num_classes - 1}")
        self.class_id = None if class_id is None else int(class_id)

    def score(self, cm):
        values = _per_class(cm, self.kind)
        return values if self.class_id is None else values[self.class_id]

    def get_config(self):
        return {**super().get_config(), "class_id": self.class_id}


@keras.saving.register_keras_serializable(package="tfseg")
class ClassIoU(_PerClassMetric):
    """Per-class IoU: (K,) vector, or class ``class_id``'s IoU."""

    kind = "iou"


@keras.saving.register_keras_serializable(package="tfseg")
class ClassPrecision(_PerClassMetric):
    """Per-class precision TP / predicted: (K,) vector, or class ``class_id``'s."""

    kind = "precision"


@keras.saving.register_keras_serializable(package="tfseg")
class ClassRecall(_PerClassMetric):
    """Per-class recall TP / true: (K,) vector, or class ``class_id``'s."""

    kind = "recall"


@keras.saving.register_keras_serializable(package="tfseg")
class Dice(ConfusionMatrixMetric):
    """Dice 2 TP / (true + predicted): the foreground class's for binary tasks, else the mean over
    classes (without class 0 when ``include_background`` is False), undefined classes left out."""

    def __init__(
        self, num_classes: int, ignore_index=None, include_background: bool = True, name="dice", dtype=None
    ):
        super().__init__(num_classes, ignore_index, name=name, dtype=dtype)
        self.include_background = bool(include_background)

    def score(self, cm):
        dice = _per_class(cm, "dice")
        if self.num_classes == 2:
            return dice[1]
        return _nanmean(dice if self.include_background else dice[1:])

    def get_config(self):
        return {**super().get_config(), "include_background": self.include_background}


@keras.saving.register_keras_serializable(package="tfseg")
class RegionDice(ConfusionMatrixMetric):
    """Dice of unions of classes, e.g. BraTS regions.

    Args:
      regions: ``{name: [class ids]}``, e.g. MSD ``{"WT": [1, 2, 3], "TC": [2, 3], "ET": [3]}``
        (dataset.json ``regions``).
      region: the region scored; None gives the mean over the regions (undefined ones left out).
    """

    def __init__(
        self,
        num_classes: int,
        regions: dict,
        region: str | None = None,
        ignore_index=None,
        name=None,
        dtype=None,
    ):
        if not regions:
            raise ValueError("RegionDice needs a non-empty regions dict")
        regions = {str(k): [int(c) for c in v] for k, v in regions.items()}
        for key, ids in regions.items():
            if not ids or any(not 0 <= c < int(num_classes) for c in ids):
                raise ValueError(f"region {key} has class ids {ids} outside 0..{int(num_classes) - 1}")
        if region is not None and region not in regions:
            raise ValueError(f"region {region!r} is not one of {sorted(regions)}")
        if name is None:
            name = "dice_regions" if region is None else f"dice_{region}"
        super().__init__(num_classes, ignore_index, name=name, dtype=dtype)
        self.regions = regions
        self.region = region

    def _region_dice(self, cm, ids):
        member = [1.0 if c in ids else 0.0 for c in range(self.num_classes)]
        m = ops.convert_to_tensor(member, dtype="float64")
        tp = ops.sum(cm * m[:, None] * m[None, :])
        true = ops.sum(cm * m[:, None])
        predicted = ops.sum(cm * m[None, :])
        return _ratio(2.0 * tp, true + predicted)

    def score(self, cm):
        if self.region is not None:
            return self._region_dice(cm, self.regions[self.region])
        return _nanmean(ops.stack([self._region_dice(cm, ids) for ids in self.regions.values()]))

    def get_config(self):
        return {**super().get_config(), "regions": self.regions, "region": self.region}


def default_metrics(num_classes: int, ignore_index: int | None = None, regions: dict | None = None) -> list:
    """The metrics ``fit`` compiles with: ``mean_iou``, ``dice`` and one ``dice_<region>`` per region."""
    metrics = [MeanIoU(num_classes, ignore_index), Dice(num_classes, ignore_index)]
    for region in regions or {}:
        metrics.append(RegionDice(num_classes, regions, region=region, ignore_index=ignore_index))
    return metrics
