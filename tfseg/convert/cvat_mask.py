"""CVAT's "Segmentation mask 1.1" export: a VOC-like folder with a ``labelmap.txt``.

Input layout (CVAT: Export dataset -> Segmentation mask 1.1, with "Save images")::

    ROOT/labelmap.txt                         # label:color_rgb:parts:actions
    ROOT/ImageSets/Segmentation/SUBSET.txt    # one image id a line (CVAT's subset: default, Train, ...)
    ROOT/JPEGImages/ID.jpg                    # ids may hold sub-folders (frame_000001, dir/img)
    ROOT/SegmentationClass/ID.png             # RGB, one colour per label (labelmap.txt)
    ROOT/SegmentationObject/ID.png            # instances (not read)

Classes are the lines of ``labelmap.txt`` in order (CVAT writes ``background:0,0,0::`` first), names
and colours from it (dataset.json's ``label_mapping["palette"]``, which tfseg's pictures use).
Every mask colour is mapped through the label map; a colour that is not in it rejects the case,
naming the colour. Masks saved as palette PNGs are read by their palette colours.

Splits: the subset files of ``ImageSets/Segmentation``. Subsets named train/val/test (also
Train, Validation, ...) are the official splits when there are at least two of them; otherwise
(CVAT's single ``default`` subset) cases split by hash (``--split``).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from tfseg import photos
from tfseg.convert.base import BadCase, Case, Layout, LayoutInfo, Loaded2D, read_image, read_list_file
from tfseg.convert.coco import official_split
from tfseg.errors import TfsegError

log = logging.getLogger(__name__)

LABELMAP = "labelmap.txt"


def read_labelmap(path: str) -> tuple[list[str], list[tuple[int, int, int]]]:
    """``labelmap.txt`` -> (names, colours) in file order.

    Raises:
      TfsegError: unreadable file, a malformed line, or a name or colour given twice.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TfsegError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    names, colours = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, rest = line.partition(":")
        colour = rest.split(":", 1)[0]
        try:
            rgb = tuple(int(v) for v in colour.split(","))
            if not sep or len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb) or not name.strip():
                raise ValueError
        except ValueError:
            raise TfsegError(f"{path}:{n}: expected 'label:R,G,B::', got {line!r}") from None
        if name.strip() in names:
            raise TfsegError(f"{path}:{n}: label {name.strip()!r} given twice")
        if rgb in colours:
            raise TfsegError(f"{path}:{n}: colour {rgb} is also {names[colours.index(rgb)]!r}")
        names.append(name.strip())
        colours.append(rgb)
    if len(names) < 2:
        raise TfsegError(f"{path}: {len(names)} label(s); a segmentation needs at least 2 (background and one)")
    if len(names) > 255:
        raise TfsegError(f"{path}: {len(names)} labels; tfseg's masks hold at most 255 classes")
    return names, colours


class CvatMaskLayout(Layout):
    """CVAT segmentation-mask export (no options)."""

    name = "cvat-mask"

    def __init__(self):
        self.names: list[str] | None = None
        self.colours: list[tuple[int, int, int]] = []

    def info(self) -> LayoutInfo:
        if self.names is None:
            raise RuntimeError("CvatMaskLayout.info() before list_cases(): labelmap.txt not read yet")
        mapping = {"palette": {",".join(map(str, c)): i for i, c in enumerate(self.colours)},
                   "source": LABELMAP}
        return LayoutInfo(name=self.name, ndim=2, channels=3, class_names=tuple(self.names), label_mapping=mapping,
                          label_convention="cvat-mask: SegmentationClass colours mapped through labelmap.txt")

    def list_cases(self, root: str) -> list[Case]:
        labelmap = os.path.join(root, LABELMAP)
        sets = os.path.join(root, "ImageSets", "Segmentation")
        if not os.path.isfile(labelmap) or not os.path.isdir(os.path.join(root, "SegmentationClass")):
            raise TfsegError(f"{root}: not a CVAT segmentation-mask export "
                             f"(expected {LABELMAP} and SegmentationClass/)")
        self.names, self.colours = read_labelmap(labelmap)
        image_dir = os.path.join(root, "JPEGImages")
        if not os.path.isdir(image_dir):
            raise TfsegError(f"{root}: no JPEGImages/ (export again with CVAT's 'Save images' checked)")
        subsets = sorted(f for f in os.listdir(sets) if f.endswith(".txt")) if os.path.isdir(sets) else []
        lists = []
        for f in subsets:
            lists.append((f[:-4], read_list_file(os.path.join(sets, f))))
        if not lists:  # no subset files: every mask is a case
            masks = []
            for d, subdirs, files in os.walk(os.path.join(root, "SegmentationClass")):
                subdirs.sort()
                rel = os.path.relpath(d, os.path.join(root, "SegmentationClass"))
                masks += [os.path.normpath(os.path.join(rel, os.path.splitext(f)[0])).replace(os.sep, "/")
                          for f in sorted(files) if f.lower().endswith(".png")]
            lists = [("default", masks)]
        official = {name: official_split(name) for name, _ in lists}
        use_official = len({s for s in official.values() if s}) >= 2
        index = _image_index(image_dir)
        cases, seen = [], set()
        for subset, ids in lists:
            for i in ids:
                if i in seen:
                    continue
                seen.add(i)
                files = [("image", index.get(i, os.path.join(image_dir, i + ".jpg")))]
                mask = os.path.join(root, "SegmentationClass", i + ".png")
                if os.path.isfile(mask):
                    files.append(("mask", mask))
                cases.append(Case(case_id=i, files=tuple(files), split=official[subset] if use_official else None))
        return cases

    def load_case(self, case: Case) -> Loaded2D:
        paths = case.paths
        if not os.path.isfile(paths["image"]):
            raise BadCase(paths["image"], "listed in ImageSets but missing from JPEGImages")
        if "mask" not in paths:
            raise BadCase(paths["image"], f"no mask (SegmentationClass/{case.case_id}.png absent)")
        loaded = read_image(paths["image"], 3)
        loaded.mask = colours_to_classes(_read_rgb(paths["mask"]), self.colours, self.names, paths["mask"])
        return loaded


def _image_index(image_dir: str) -> dict[str, str]:
    """{id (path without extension, '/'-separated): image file} under JPEGImages."""
    out = {}
    for d, subdirs, files in os.walk(image_dir):
        subdirs.sort()
        rel = os.path.relpath(d, image_dir)
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            if ext.lower() in photos.IMAGE_EXTENSIONS:
                key = os.path.normpath(os.path.join(rel, stem)).replace(os.sep, "/")
                out.setdefault(key, os.path.join(d, f))
    return out


def _read_rgb(path: str) -> np.ndarray:
    """A colour mask as (H, W, 3) uint8 (palette and grayscale files through their colours).

    Raises:
      BadCase: an unreadable, undecodable or oversized file.
    """
    from PIL import Image

    from tfseg.convert.base import check_pixels, read_label_image

    labels = read_label_image(path)  # validates: readable, decodable, not truncated, size limit
    if labels.ndim == 3:
        return labels
    with Image.open(path) as img:  # palette or grayscale: their colours
        check_pixels(img.size[0], img.size[1], path, "mask")
        return np.asarray(img.convert("RGB"))


def colours_to_classes(rgb: np.ndarray, colours: list, names: list, path: str) -> np.ndarray:
    """(H, W, 3) colours -> (H, W) uint8 class ids through the label map.

    Raises:
      BadCase: a colour that is not in the label map.
    """
    lut = {(c[0] << 16) | (c[1] << 8) | c[2]: i for i, c in enumerate(colours)}
    px = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    uniq, inverse = np.unique(px, return_inverse=True)
    missing = [int(u) for u in uniq if int(u) not in lut]
    if missing:
        shown = ", ".join(f"({u >> 16}, {(u >> 8) & 255}, {u & 255})" for u in missing[:4])
        raise BadCase(path, f"colour(s) {shown} not in {LABELMAP} ({', '.join(names[:8])})")
    return np.asarray([lut[int(u)] for u in uniq], np.uint8)[inverse.reshape(px.shape)]
