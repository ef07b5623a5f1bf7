"""Pascal VOC segmentation: ``VOCdevkit/VOC2012`` with JPEGImages, SegmentationClass (palette
PNGs whose indices are the class ids, 255 = object boundaries / ignore) and the official
``ImageSets/Segmentation/{train,val}.txt`` lists; 21 classes.

The input may be the folder holding ``VOCdevkit``, ``VOCdevkit`` itself, or ``VOC2012`` (any
``VOC20xx`` with the same sub-folders). Masks saved as RGB instead of palette PNGs are mapped
back through the VOC colour map.
"""

from __future__ import annotations

import glob
import logging
import os

import numpy as np

from tfseg.convert.base import BadCase, Case, Layout, LayoutInfo, Loaded2D, read_image, read_label_image, read_list_file
from tfseg.errors import TfsegError
from tfseg.schema import IGNORE_INDEX

log = logging.getLogger(__name__)

CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def voc_colormap(n: int = 256) -> np.ndarray:
    """The VOC palette: (n, 3) uint8, class id bits spread over the RGB high bits."""
    cmap = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def _find_voc_root(root: str) -> str | None:
    candidates = [root] + sorted(glob.glob(os.path.join(root, "VOC20*"))) + sorted(
        glob.glob(os.path.join(root, "VOCdevkit", "VOC20*")))
    for c in candidates:
        if os.path.isdir(os.path.join(c, "JPEGImages")) and os.path.isdir(os.path.join(c, "ImageSets", "Segmentation")):
            return c
    return None


class VocLayout(Layout):
    """VOC2012 segmentation (no options); the official train/val lists are the splits."""

    name = "voc"

    def info(self) -> LayoutInfo:
        return LayoutInfo(name=self.name, ndim=2, channels=3, class_names=CLASS_NAMES, ignore_index=IGNORE_INDEX,
                          label_convention="voc: palette indices are class ids, 255 marks boundaries (ignored)")

    def list_cases(self, root: str) -> list[Case]:
        voc = _find_voc_root(root)
        if voc is None:
            raise TfsegError(f"{root}: not a VOC layout (expected VOCdevkit/VOC2012 with JPEGImages, "
                             "SegmentationClass and ImageSets/Segmentation)")
        sets = os.path.join(voc, "ImageSets", "Segmentation")
        lists = [(s, os.path.join(sets, f"{s}.txt")) for s in ("train", "val")]
        lists = [(s, p) for s, p in lists if os.path.isfile(p)]
        official = True
        if not lists:
            if not os.path.isfile(os.path.join(sets, "trainval.txt")):
                raise TfsegError(f"{sets}: no train.txt, val.txt or trainval.txt")
            lists, official = [(None, os.path.join(sets, "trainval.txt"))], False
        cases, seen = [], set()
        for split, path in lists:
            ids = [line.split()[0] for line in read_list_file(path)]
            for i in ids:
                if i in seen:
                    continue
                seen.add(i)
                files = [("image", os.path.join(voc, "JPEGImages", f"{i}.jpg"))]
                mask = os.path.join(voc, "SegmentationClass", f"{i}.png")
                if os.path.isfile(mask):
                    files.append(("mask", mask))
                cases.append(Case(case_id=i, files=tuple(files), split=split if official else None))
        return cases

    def load_case(self, case: Case) -> Loaded2D:
        paths = case.paths
        if not os.path.isfile(paths["image"]):
            raise BadCase(paths["image"], "listed in ImageSets but missing")
        if "mask" not in paths:
            raise BadCase(paths["image"], f"no mask (SegmentationClass/{case.case_id}.png absent)")
        loaded = read_image(paths["image"], 3)
        labels = read_label_image(paths["mask"])
        if labels.ndim == 3:
            labels = _rgb_to_index(labels, paths["mask"])
        loaded.mask = labels
        return loaded


def _rgb_to_index(rgb: np.ndarray, path: str) -> np.ndarray:
    cmap = voc_colormap().astype(np.int64)
    keys = (cmap[:, 0] << 16) | (cmap[:, 1] << 8) | cmap[:, 2]
    lut = {int(k): i for i, k in enumerate(keys) if i < len(CLASS_NAMES) or i == IGNORE_INDEX}
    px = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    uniq, inverse = np.unique(px, return_inverse=True)
    missing = [int(u) for u in uniq if int(u) not in lut]
    if missing:
        u = missing[0]
        raise BadCase(path, f"colour ({u >> 16}, {(u >> 8) & 255}, {u & 255}) is not a VOC class colour")
    return np.asarray([lut[int(u)] for u in uniq], np.uint8)[inverse.reshape(px.shape)]
