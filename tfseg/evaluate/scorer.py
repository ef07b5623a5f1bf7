"""Scoring, independent of models and files: :class:`SegmentationScorer` accumulates per-image
confusion matrices (and 3D region scores) and builds metrics.json's tables, each with its
definition (see :mod:`tfseg.evaluate.run` for the two definitions side by side).
"""

from __future__ import annotations

import math

import numpy as np

from tfseg import scoring

ISIC_JACCARD_THRESHOLD = 0.65

DATASET_LEVEL_DEFINITION = (
    "one confusion matrix over all pixels of the split (Pascal VOC / TF Model Garden); "
    "ignore pixels excluded"
)
PER_IMAGE_DEFINITION = (
    "for each class: sum of the per-image metric over the images whose truth contains the class, "
    "divided by the number of such images (the seeds' definition); an image that contains the "
    "class but where the metric is undefined (precision with the class never predicted) counts 0"
)
BINARY_DEFINITION = (
    "foreground = class 1. per-image Jaccard and Dice are 1 when truth and prediction are both "
    "empty; thresholded Jaccard (ISIC 2018) = mean over all images of the per-image Jaccard, "
    f"set to 0 below {ISIC_JACCARD_THRESHOLD}"
)
REGION_DEFINITION = (
    "region = union of its class ids, in truth and prediction. Dice: 1 when both are empty. "
    "HD95: max of the two directed 95th percentiles of surface-to-surface distances in mm "
    "(surfaces = voxels with a 6-neighbour outside the region, distances from Euclidean distance "
    "transforms with the voxel spacing); 0 when both are empty; 373.13 mm when exactly one is empty "
    "(BraTS's convention: the diagonal of its 240x240x155 volumes at 1 mm, whatever the scored crop)"
)


class SegmentationScorer:
    """Accumulates per-image confusion matrices (and region scores) and builds the tables.

    Args:
      num_classes: K, including background.
      class_names: K names.
      ignore_index: truth value excluded from every score, or None.
      regions: ``{name: [class ids]}`` for region Dice/HD95 (3D BraTS), or None.
      binary: the model has the sigmoid head (:attr:`tfseg.rundir.RunInfo.binary`): adds the
        foreground scores; None = two classes (:attr:`tfseg.schema.DatasetInfo.binary`'s rule).
    """

    def __init__(
        self,
        num_classes: int,
        class_names: list[str],
        ignore_index: int | None = None,
        regions: dict | None = None,
        binary: bool | None = None,
    ):
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        self.regions = dict(regions or {})
        self._binary = binary
        self.cms: list[np.ndarray] = []
        self.ids: list[str] = []
        self.region_scores: list[dict] = []

    @property
    def binary(self) -> bool:
        return self.num_classes == 2 if self._binary is None else bool(self._binary) and self.num_classes == 2

    def add(self, truth: np.ndarray, pred: np.ndarray, source_id: str = "", spacing=None) -> np.ndarray:
        """Scores one image or volume.

        Args:
          truth: (H, W) or (D, H, W) integer class ids, ignore pixels = ignore_index.
          pred: the predicted class ids, same shape.
          source_id: the case id, for per-case tables.
          spacing: voxel size in mm per axis (3D region HD95); 1 mm when None.

        Returns:
          The image's (K, K) confusion matrix.
        """
        truth, pred = np.asarray(truth), np.asarray(pred)
        if truth.shape != pred.shape:
            raise ValueError(f"{source_id}: truth shape {truth.shape} != prediction shape {pred.shape}")
        cm = scoring.confusion_matrix(truth, pred, self.num_classes, self.ignore_index)
        self.cms.append(cm)
        self.ids.append(source_id)
        if self.regions:
            self.region_scores.append(self._score_regions(truth, pred, spacing))
        return cm

    def _score_regions(self, truth, pred, spacing) -> dict:
        valid = np.ones(truth.shape, bool) if self.ignore_index is None else truth != self.ignore_index
        out = {}
        for name, ids in self.regions.items():
            t = np.isin(truth, ids) & valid
            p = np.isin(pred, ids) & valid
            out[name] = {
                "dice": scoring.mask_dice(t, p),
                "hd95_mm": scoring.hd95(t, p, spacing),
                "truth_voxels": int(t.sum()),
                "predicted_voxels": int(p.sum()),
            }
        return out

    def _by_name(self, values) -> dict:
        return {n: _num(v) for n, v in zip(self.class_names, values)}

    def result(self) -> dict:
        """All tables as a JSON-ready dict (NaN -> None)."""
        if not self.cms:
            raise ValueError("no images scored")
        cms = np.stack(self.cms)
        cm = cms.sum(axis=0)
        fns = {
            "iou": scoring.per_class_iou,
            "precision": scoring.per_class_precision,
            "recall": scoring.per_class_recall,
            "dice": scoring.per_class_dice,
        }
        ds = {k: f(cm) for k, f in fns.items()}
        pi = {k: scoring.per_image_class_mean(cms, f) for k, f in fns.items()}
        total = cm.sum()
        out = {
            "num_images": len(self.cms),
            "class_names": self.class_names,
            "dataset_level": {
                "definition": DATASET_LEVEL_DEFINITION,
                "per_class": {k: self._by_name(v) for k, v in ds.items()},
                "mean_iou": _num(scoring.nanmean(ds["iou"])),
                "mean_dice": _num(scoring.nanmean(ds["dice"])),
                "pixel_accuracy": _num(np.trace(cm) / total if total else float("nan")),
                "truth_pixels": self._by_name(cm.sum(axis=1)),
            },
            "per_image_mean": {
                "definition": PER_IMAGE_DEFINITION,
                "per_class": {k: self._by_name(v) for k, v in pi.items()},
                "mean_iou": _num(scoring.nanmean(pi["iou"])),
                "mean_precision": _num(scoring.nanmean(pi["precision"])),
                "mean_dice": _num(scoring.nanmean(pi["dice"])),
                "images_with_class": self._by_name(scoring.images_with_class(cms)),
            },
            "confusion_matrix": cm.tolist(),
        }
        per_image = []
        for sid, c in zip(self.ids, cms):
            row = {"source_id": sid, "mean_iou": _num(scoring.mean_iou(c))}
            if self.binary:
                row["jaccard"] = scoring.binary_jaccard(c)
                row["dice"] = scoring.binary_dice(c)
            per_image.append(row)
        out["per_image"] = per_image
        if self.binary:
            jac = [r["jaccard"] for r in per_image]
            out["binary"] = {
                "definition": BINARY_DEFINITION,
                "foreground_dice": _num(ds["dice"][1]),
                "foreground_iou": _num(ds["iou"][1]),
                "per_image_dice_mean": _num(np.mean([r["dice"] for r in per_image])),
                "per_image_jaccard_mean": _num(np.mean(jac)),
                "thresholded_jaccard": _num(scoring.thresholded_jaccard(jac, ISIC_JACCARD_THRESHOLD)),
                "jaccard_threshold": ISIC_JACCARD_THRESHOLD,
            }
        if self.regions:
            names = list(self.regions)
            mean = {
                n: {
                    "dice": _num(np.mean([s[n]["dice"] for s in self.region_scores])),
                    "hd95_mm": _num(np.mean([s[n]["hd95_mm"] for s in self.region_scores])),
                    "hd95_mm_median": _num(np.median([s[n]["hd95_mm"] for s in self.region_scores])),
                }
                for n in names
            }
            out["regions"] = {
                "definition": REGION_DEFINITION,
                "class_ids": {n: list(map(int, self.regions[n])) for n in names},
                "mean": mean,
                "per_case": [{"source_id": sid, **s} for sid, s in zip(self.ids, self.region_scores)],
            }
        return out


def _num(v):
    """A JSON-safe number: Python float/int, NaN and inf -> None."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return int(v)
    v = float(v)
    return v if math.isfinite(v) else None
