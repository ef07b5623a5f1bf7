"""Cityscapes (fine annotations) -> the benchmark's 19 training classes.

Input layout (cityscapes-dataset.com, ``leftImg8bit_trainvaltest.zip`` + ``gtFine_trainvaltest.zip``)::

    ROOT/leftImg8bit/{train,val,test}/CITY/CITY_SEQ_FRAME_leftImg8bit.png
    ROOT/gtFine/{train,val,test}/CITY/CITY_SEQ_FRAME_gtFine_labelIds.png    (+ _color, _instanceIds, _polygons.json)

The label table is ``cityscapesscripts.helpers.labels``, the benchmark's own package: each
``labelIds`` value (0..33) becomes its ``trainId`` (19 classes, 0..18); labels whose trainId is 255
or -1 (unlabeled, ego vehicle, rectification border, out of roi, static, dynamic, ground,
parking, rail track, guard rail, bridge, tunnel, polegroup, caravan, trailer, license plate)
become the ignore index 255. Names and colours are the table's. A value outside the table
rejects the case, naming it. When a frame has no ``labelIds`` but a ``labelTrainIds`` PNG (the
output of cityscapesscripts' ``createTrainIdLabelImgs``), that one is read as train ids.

The official train and val splits are kept. ``test`` is left out: its public annotations are
placeholders (the benchmark's server holds the labels). Coarse annotations (``gtCoarse``,
``train_extra``) are not read.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from tfseg.convert.base import BadCase, Case, Layout, LayoutInfo, Loaded2D, read_image, read_label_image
from tfseg.errors import TfsegError
from tfseg.schema import IGNORE_INDEX

log = logging.getLogger(__name__)

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"
SPLITS = ("train", "val")


def label_table() -> tuple[np.ndarray, tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    """The benchmark's mapping from cityscapesscripts' label table.

    Returns:
      (lut, names, colours): ``lut`` (256,) int16 labelId -> trainId (255 ignored, -1 for values
      that are no label id), the 19 train class names and their (R, G, B) colours in trainId order.
    """
    from cityscapesscripts.helpers.labels import labels

    lut = np.full(256, -1, np.int16)
    names: dict[int, str] = {}
    colours: dict[int, tuple[int, int, int]] = {}
    for label in labels:
        if label.id < 0:  # license plate: -1, not in labelIds images
            continue
        train = label.trainId if 0 <= label.trainId < 255 else IGNORE_INDEX
        lut[label.id] = train
        if train != IGNORE_INDEX:
            names.setdefault(train, label.name)
            colours.setdefault(train, tuple(int(c) for c in label.color))
    k = len(names)
    if sorted(names) != list(range(k)):
        raise TfsegError(f"cityscapesscripts' label table has train ids {sorted(names)}, not 0..{k - 1}")
    return lut, tuple(names[i] for i in range(k)), tuple(colours[i] for i in range(k))


class CityscapesLayout(Layout):
    """Cityscapes gtFine (no options); the official train/val splits."""

    name = "cityscapes"

    def __init__(self):  # no options (an explicit signature, so an option given names this layout)
        pass

    def info(self) -> LayoutInfo:
        lut, names, colours = label_table()
        mapping = {
            "source": "cityscapesscripts.helpers.labels (labelIds -> trainId)",
            "table": {str(i): int(lut[i]) for i in range(256) if lut[i] >= 0},
            "palette": {",".join(map(str, c)): i for i, c in enumerate(colours)},
        }
        return LayoutInfo(name=self.name, ndim=2, channels=3, class_names=names, ignore_index=IGNORE_INDEX,
                          label_mapping=mapping,
                          label_convention="cityscapes: gtFine labelIds mapped to the 19 trainIds, others 255")

    def list_cases(self, root: str) -> list[Case]:
        base = _find_root(root)
        if base is None:
            raise TfsegError(f"{root}: not a Cityscapes layout (expected leftImg8bit/{{train,val}}/CITY/"
                             f"*{IMAGE_SUFFIX} and gtFine/ beside it)")
        cases = []
        if os.path.isdir(os.path.join(base, "leftImg8bit", "test")):
            log.info("cityscapes: leftImg8bit/test left out (its public labels are placeholders)")
        for split in SPLITS:
            img_root = os.path.join(base, "leftImg8bit", split)
            if not os.path.isdir(img_root):
                continue
            for city in sorted(os.listdir(img_root)):
                d = os.path.join(img_root, city)
                if not os.path.isdir(d):
                    continue
                for f in sorted(os.listdir(d)):
                    if not f.endswith(IMAGE_SUFFIX):
                        continue
                    stem = f[: -len(IMAGE_SUFFIX)]
                    gt = os.path.join(base, "gtFine", split, city, stem)
                    files = [("image", os.path.join(d, f))]
                    if os.path.isfile(gt + LABEL_SUFFIX):
                        files.append(("mask", gt + LABEL_SUFFIX))
                    elif os.path.isfile(gt + TRAIN_ID_SUFFIX):
                        files.append(("train_ids", gt + TRAIN_ID_SUFFIX))
                    cases.append(Case(case_id=stem, files=tuple(files), group=city, split=split))
        if not cases:
            raise TfsegError(f"{base}/leftImg8bit: no *{IMAGE_SUFFIX} images in train/ or val/")
        return cases

    def load_case(self, case: Case) -> Loaded2D:
        paths = case.paths
        if "mask" not in paths and "train_ids" not in paths:
            raise BadCase(paths["image"], f"no gtFine label ({case.case_id}{LABEL_SUFFIX} absent)")
        loaded = read_image(paths["image"], 3)
        if "mask" in paths:
            loaded.mask = to_train_ids(read_label_image(paths["mask"]), paths["mask"])
        else:
            raw = read_label_image(paths["train_ids"])
            if raw.ndim == 3:
                raise BadCase(paths["train_ids"], "labelTrainIds PNG is RGB, expected one channel")
            loaded.mask = raw  # values >= 19 other than 255 are rejected by the pipeline, named
        return loaded


def _find_root(root: str) -> str | None:
    for c in (root, os.path.join(root, "cityscapes"), os.path.join(root, "Cityscapes")):
        if os.path.isdir(os.path.join(c, "leftImg8bit")) and os.path.isdir(os.path.join(c, "gtFine")):
            return c
    return None


def to_train_ids(label_ids: np.ndarray, path: str) -> np.ndarray:
    """(H, W) labelIds -> (H, W) uint8 trainIds (255 ignored).

    Raises:
      BadCase: an RGB file (the ``_color`` PNG given as labels) or a value that is no label id.
    """
    if label_ids.ndim == 3:
        raise BadCase(path, "labelIds PNG is RGB (the _gtFine_color PNG?); expected one channel of label ids")
    lut, _, _ = _cached_table()
    mapped = lut[label_ids]
    if np.any(mapped < 0):
        bad = sorted({int(v) for v in np.unique(label_ids[mapped < 0])})
        raise BadCase(path, f"label id(s) {', '.join(map(str, bad[:8]))} are not in the Cityscapes label table")
    return mapped.astype(np.uint8)


_TABLE = None


def _cached_table():
    global _TABLE
    if _TABLE is None:
        _TABLE = label_table()
    return _TABLE
