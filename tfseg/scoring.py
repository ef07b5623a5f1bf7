"""Numpy scoring from confusion matrices: the reference every metric in tfseg is checked against.

A confusion matrix ``cm`` has ``cm[t, p]`` = number of pixels of true class ``t`` predicted as
``p``; pixels whose truth is the ignore index are left out before counting.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true, y_pred, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """(num_classes, num_classes) int64 confusion matrix of integer label arrays of equal shape."""
    t = np.asarray(y_true).reshape(-1).astype(np.int64)
    p = np.asarray(y_pred).reshape(-1).astype(np.int64)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} elements, y_pred {p.size}")
    keep = (t >= 0) & (t < num_classes)
    if ignore_index is not None:
        keep &= t != ignore_index
    t, p = t[keep], np.clip(p[keep], 0, num_classes - 1)
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def _ratio(num, den):
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def per_class_iou(cm: np.ndarray) -> np.ndarray:
    """IoU per class, NaN for classes absent from both truth and prediction."""
    tp = np.diag(cm)
    return _ratio(tp, cm.sum(0) + cm.sum(1) - tp)


def per_class_precision(cm: np.ndarray) -> np.ndarray:
    """TP / predicted, NaN where the class is never predicted."""
    return _ratio(np.diag(cm), cm.sum(0))


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    """TP / true, NaN where the class never occurs."""
    return _ratio(np.diag(cm), cm.sum(1))


def per_class_dice(cm: np.ndarray) -> np.ndarray:
    tp = np.diag(cm)
    return _ratio(2 * tp, cm.sum(0) + cm.sum(1))


def nanmean(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")
