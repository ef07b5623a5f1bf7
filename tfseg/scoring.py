"""Numpy scoring from confusion matrices: the reference every metric in tfseg is checked against.

A confusion matrix ``cm`` has ``cm[t, p]`` = number of pixels of true class ``t`` predicted as
``p``; pixels whose truth is the ignore index are left out before counting.
"""

from __future__ import annotations

import numpy as np

# The HD95 BraTS scores when exactly one of truth and prediction is empty for a region: the
# diagonal of its 240x240x155 volume at 1 mm, sqrt(240**2 + 240**2 + 155**2) = 373.13 mm. tfseg's
# BraTS volumes are cropped to the brain at conversion, so the diagonal of the scored array would
# be a smaller, case-dependent number: the constant is used instead, whatever the array.
BRATS_EMPTY_HD95_MM = 373.13


def scored_pixels(y_true, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """Flat boolean mask of the labels that count: a class id in [0, num_classes), not ignored."""
    t = np.asarray(y_true).reshape(-1)
    keep = (t >= 0) & (t < num_classes)
    if ignore_index is not None:
        keep &= t != ignore_index
    return keep


def mean_iou(cm: np.ndarray) -> float:
    """Mean IoU over the classes present in truth or prediction; NaN when none is."""
    return nanmean(per_class_iou(cm))


def confusion_matrix(y_true, y_pred, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """(num_classes, num_classes) int64 confusion matrix of integer label arrays of equal shape."""
    t = np.asarray(y_true).reshape(-1).astype(np.int64)
    p = np.asarray(y_pred).reshape(-1).astype(np.int64)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} elements, y_pred {p.size}")
    keep = scored_pixels(t, num_classes, ignore_index)
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


# --------------------------------------------------------------------------------------------
# Per-image means (the seeds' definition), binary and region scores, surface distances.
# --------------------------------------------------------------------------------------------


def images_with_class(cms: np.ndarray) -> np.ndarray:
    """(K,) int64: how many images contain each class in their truth.

    Args:
      cms: (N, K, K) per-image confusion matrices.
    """
    cms = np.asarray(cms)
    return (cms.sum(axis=2) > 0).sum(axis=0).astype(np.int64)


def per_image_class_mean(cms: np.ndarray, metric) -> np.ndarray:
    """The seeds' per-image mean of a per-class metric.

    For each class: the sum of the per-image metric over the images whose truth contains the
    class, divided by the number of such images. Images without the class in their truth are
    skipped (as the seeds do), so a false positive on such an image costs nothing here; the
    dataset-level scores do count it. Where an image contains the class but the metric is
    undefined (precision when the class is never predicted), it counts as 0.

    Args:
      cms: (N, K, K) per-image confusion matrices.
      metric: a per-class function of one confusion matrix, e.g. :func:`per_class_iou`.

    Returns:
      (K,) float64; NaN for classes no image contains.
    """
    cms = np.asarray(cms)
    k = cms.shape[-1]
    total = np.zeros(k)
    for cm in cms:
        present = cm.sum(axis=1) > 0
        total += np.where(present, np.nan_to_num(metric(cm), nan=0.0), 0.0)
    return _ratio(total, images_with_class(cms))


def binary_jaccard(cm: np.ndarray) -> float:
    """Foreground (class 1) Jaccard of one image's 2x2 confusion matrix; 1.0 when truth and
    prediction are both empty (nothing to find, nothing found)."""
    tp, fp, fn = cm[1, 1], cm[0, 1], cm[1, 0]
    union = tp + fp + fn
    return 1.0 if union == 0 else float(tp / union)


def binary_dice(cm: np.ndarray) -> float:
    """Foreground Dice of one image's 2x2 confusion matrix; 1.0 when both are empty."""
    tp, fp, fn = cm[1, 1], cm[0, 1], cm[1, 0]
    den = 2 * tp + fp + fn
    return 1.0 if den == 0 else float(2 * tp / den)


def thresholded_jaccard(jaccards, threshold: float = 0.65) -> float:
    """ISIC 2018's score: the mean of per-image Jaccard indices, each below ``threshold`` set to 0."""
    j = np.asarray(jaccards, dtype=np.float64)
    if j.size == 0:
        return float("nan")
    return float(np.mean(np.where(j < threshold, 0.0, j)))


def mask_dice(truth, pred) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    t, p = np.asarray(truth, bool), np.asarray(pred, bool)
    den = t.sum() + p.sum()
    return 1.0 if den == 0 else float(2 * np.logical_and(t, p).sum() / den)


def surface(mask) -> np.ndarray:
    """The voxels of a boolean mask that touch its outside (6-connectivity in 3D, 4 in 2D).

    Voxels on the array's border count as surface: outside the array is outside the mask.
    """
    from scipy import ndimage

    m = np.asarray(mask, bool)
    structure = ndimage.generate_binary_structure(m.ndim, 1)
    return m & ~ndimage.binary_erosion(m, structure=structure, border_value=0)


def _directed_surface_distances(src: np.ndarray, dst: np.ndarray, spacing) -> np.ndarray:
    """Distances in mm from every voxel of surface ``src`` to the nearest voxel of surface ``dst``."""
    from scipy import ndimage

    # The EDT of "not dst" gives, at every voxel, the exact Euclidean distance to the nearest
    # dst voxel, in physical units through `sampling`.
    dist = ndimage.distance_transform_edt(~dst, sampling=spacing)
    return dist[src]


def hausdorff_distance(truth, pred, spacing=None, percentile: float = 95.0,
                       empty_distance: float | None = BRATS_EMPTY_HD95_MM) -> float:
    """Symmetric percentile Hausdorff distance between the surfaces of two boolean masks, in mm.

    The larger of the two directed ``percentile``-th percentiles of surface-to-surface
    distances (truth -> prediction and prediction -> truth), as MONAI and medpy compute HD95.
    ``percentile=100`` gives the classic Hausdorff distance.

    Empty-set conventions (the BraTS challenge's):
      - both masks empty: 0.0 (nothing to find and nothing found);
      - exactly one empty: ``empty_distance``, by default :data:`BRATS_EMPTY_HD95_MM` (373.13 mm,
        the diagonal of BraTS's 240x240x155 volumes at 1 mm, whatever the scored array's size);
        None: the diagonal of this array in mm (the largest distance possible inside it).

    Args:
      truth, pred: boolean masks of equal shape (D, H, W) or (H, W).
      spacing: voxel size in mm per axis; 1 mm when None.
      percentile: 0..100.
      empty_distance: the distance when exactly one mask is empty (None: the array's diagonal).

    Returns:
      float, in the units of ``spacing``.
    """
    t, p = np.asarray(truth, bool), np.asarray(pred, bool)
    if t.shape != p.shape:
        raise ValueError(f"truth shape {t.shape} != prediction shape {p.shape}")
    spacing = np.ones(t.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    t_any, p_any = t.any(), p.any()
    if not t_any and not p_any:
        return 0.0
    if not t_any or not p_any:
        if empty_distance is not None:
            return float(empty_distance)
        return float(np.sqrt(np.sum((np.array(t.shape) * spacing) ** 2)))
    # Crop to the union's bounding box plus one voxel: the surfaces and the distances between
    # them are unchanged, and the distance transforms shrink from the whole volume to the tumour.
    union = np.argwhere(t | p)
    lo = np.maximum(union.min(0) - 1, 0)
    hi = np.minimum(union.max(0) + 2, t.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    st, sp = surface(t[box]), surface(p[box])
    d_tp = _directed_surface_distances(st, sp, spacing)
    d_pt = _directed_surface_distances(sp, st, spacing)
    return float(max(np.percentile(d_tp, percentile), np.percentile(d_pt, percentile)))


def hd95(truth, pred, spacing=None, empty_distance: float | None = BRATS_EMPTY_HD95_MM) -> float:
    """95th-percentile Hausdorff distance in mm; see :func:`hausdorff_distance` for conventions
    (373.13 mm when exactly one mask is empty, 0 when both are)."""
    return hausdorff_distance(truth, pred, spacing, percentile=95.0, empty_distance=empty_distance)
