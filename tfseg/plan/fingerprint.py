"""The fingerprint of a converted dataset (:func:`fingerprint`): what the plan's rules read (see
:mod:`tfseg.plan.rules` for what is measured and why)."""

from __future__ import annotations

import os

import numpy as np

from tfseg.errors import TfsegError
from tfseg.io import fs


def _components(mask: np.ndarray, cls: int) -> np.ndarray:
    """Sizes (pixel counts) of the connected components of class ``cls`` in ``mask``."""
    from scipy import ndimage

    labels, n = ndimage.label(mask == cls)
    if n == 0:
        return np.zeros(0, np.int64)
    return np.bincount(labels.ravel())[1:]


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    values, weights = values[order], weights[order]
    cum = np.cumsum(weights)
    return float(values[np.searchsorted(cum, cum[-1] / 2.0)])


def _profile(values: np.ndarray, bins: int = 32) -> np.ndarray:
    """A 1D profile resampled to ``bins`` points (so images of any size can be averaged)."""
    x = np.linspace(0, len(values) - 1, bins)
    return np.interp(x, np.arange(len(values)), values)


def fingerprint(data_dir: str, *, sample: int = 64) -> dict:
    """Measures a converted dataset (what and why: :mod:`tfseg.plan.rules`).

    Args:
      data_dir: a ``tfseg convert`` output.
      sample: training records read for sizes, intensities, presence, objects and positions
        (3D: at most 8 volumes).

    Returns:
      A JSON-ready dict.

    Raises:
      TfsegError: missing dataset.json, no train split, no labelled training record.
    """
    from tfseg.data.input import read_examples
    from tfseg.schema import load_dataset_info

    info = load_dataset_info(data_dir)
    where = os.path.join(data_dir, "dataset.json")
    if "train" not in info.splits:
        raise TfsegError(f"{where}: no 'train' split (has {sorted(info.splits)})")
    k = info.num_classes
    ndim = info.ndim
    limit = min(sample, 8) if ndim == 3 else sample
    sizes, spacings, n_read = [], [], 0
    presence = np.zeros(k, np.int64)
    pix = np.zeros(k, np.int64)
    comp_sizes: list[list[np.ndarray]] = [[] for _ in range(k)]
    pos_sum = np.zeros((k, ndim))
    pos_px = np.zeros(k)
    ch_values: list[np.ndarray] = []
    profiles = [[] for _ in range(ndim)]
    rng = np.random.default_rng(0)
    for ex in read_examples(data_dir, "train"):
        if not bool(ex["has_mask"].numpy()):
            continue
        image = ex["image"].numpy().astype(np.float32)
        mask = ex["mask"].numpy()[..., 0]
        spatial = mask.shape
        sizes.append(list(spatial))
        if ndim == 3 and "spacing" in ex:
            spacings.append([float(s) for s in ex["spacing"].numpy()])
        flat = image.reshape(-1, image.shape[-1])
        ch_values.append(flat[rng.integers(0, len(flat), min(len(flat), 4096))])
        gray = image.mean(-1)
        scale = float(gray.std()) or 1.0
        for axis in range(ndim):
            other = tuple(a for a in range(ndim) if a != axis)
            profiles[axis].append(_profile(gray.mean(axis=other)) / scale)
        counts = np.bincount(mask.ravel(), minlength=256)[:k]
        pix += counts
        presence += counts > 0
        grids = np.indices(spatial, dtype=np.float32)
        for c in range(k):
            if counts[c] == 0:
                continue
            sel = mask == c
            for axis in range(ndim):
                pos_sum[c, axis] += float((grids[axis][sel] / max(1, spatial[axis] - 1)).sum())
            pos_px[c] += counts[c]
            comp_sizes[c].append(_components(mask, c))
        n_read += 1
        if n_read >= limit:
            break
    if not n_read:
        raise TfsegError(f"{where}: no labelled training record to plan from")

    sizes_a = np.asarray(sizes, np.float64)
    counts_train = (info.class_pixel_counts or {}).get("train")
    freq_source = "dataset.json" if counts_train and len(counts_train) == k else "sample"
    total = np.asarray(counts_train if freq_source == "dataset.json" else pix, np.float64)
    freq = total / max(1.0, total.sum())
    objects = []
    for c in range(k):
        comps = np.concatenate(comp_sizes[c]) if comp_sizes[c] else np.zeros(0)
        if comps.size:
            diam = comps ** (1.0 / ndim)
            objects.append({"components": int(comps.size), "median_px": round(_weighted_median(diam, comps), 1),
                            "p90_px": round(float(np.percentile(diam, 90)), 1)})
        else:
            objects.append({"components": 0, "median_px": None, "p90_px": None})
    values = np.concatenate(ch_values)
    mirror = []
    for axis in range(ndim):
        p = np.mean(profiles[axis], axis=0)
        mirror.append(round(float(np.abs(p - p[::-1]).mean()), 3))
    position = [[round(float(v), 3) for v in (pos_sum[c] / pos_px[c])] if pos_px[c] else None for c in range(k)]
    fp = {
        "data": fs.normalize(data_dir),
        "name": info.name,
        "ndim": ndim,
        "channels": info.channels,
        "num_classes": k,
        "class_names": list(info.class_names),
        "ignore_index": info.ignore_index,
        "binary": info.binary,
        "splits": {s: int(v.get("count", 0)) for s, v in info.splits.items()},
        "sampled": n_read,
        "conversion_args": {k: v for k, v in (info.conversion_args or {}).items()
                            if k in ("layout_options", "split", "image_size", "compression")},
        "size": {
            "median": [int(v) for v in np.median(sizes_a, axis=0)],
            "min": [int(v) for v in sizes_a.min(axis=0)],
            "max": [int(v) for v in sizes_a.max(axis=0)],
        },
        "intensity": {
            "mean": [round(float(v), 3) for v in values.mean(0)],
            "std": [round(float(v), 3) for v in values.std(0)],
            "p0.5": [round(float(v), 3) for v in np.percentile(values, 0.5, axis=0)],
            "p99.5": [round(float(v), 3) for v in np.percentile(values, 99.5, axis=0)],
        },
        "class_frequency": [round(float(f), 6) for f in freq],
        "class_frequency_source": freq_source,
        "class_presence": [round(float(p) / n_read, 3) for p in presence],
        "objects": objects,
        "class_position": position,
        "intensity_mirror_difference": mirror,
    }
    if ndim == 2:
        med = fp["size"]["median"]
        fp["size"]["aspect"] = round(med[1] / med[0], 3)
    if spacings:
        sp = np.median(np.asarray(spacings), axis=0)
        fp["spacing"] = [round(float(v), 3) for v in sp]
        fp["anisotropy"] = round(float(sp.max() / sp.min()), 2)
    return fp
