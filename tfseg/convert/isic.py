"""ISIC lesion segmentation: image folders paired with ``*_segmentation.png`` mask folders.

Recognised anywhere under the input:

- ISIC 2018: ``ISIC2018_Task1-2_{Training,Validation,Test}_Input/ISIC_*.jpg`` +
  ``ISIC2018_Task1_{Training,Validation,Test}_GroundTruth/ISIC_*_segmentation.png``;
- ISIC 2017: ``ISIC-2017_{Training,Validation,Test_v2}_Data/ISIC_*.jpg`` (the ``_superpixels``
  PNGs beside them are ignored) + ``ISIC-2017_*_Part1_GroundTruth/ISIC_*_segmentation.png``;
- any other images folder whose stems match a folder of ``<stem>_segmentation.png`` files
  (e.g. ``example_image`` + ``example_segmentation``).

Each images folder is paired with the mask folder sharing most stems. When the folders name at
least two of Training/Validation/Test, those are the splits; otherwise cases split by hash.
Masks {0, 255} -> {0, 1} (thresholded at 128, which also absorbs resampled edges).
"""

from __future__ import annotations

import logging
import os
import re


from tfseg import photos
from tfseg.convert.base import BadCase, Case, Layout, LayoutInfo, Loaded2D, read_binary_mask, read_image
from tfseg.errors import TfsegError

log = logging.getLogger(__name__)

MASK_SUFFIX = "_segmentation"
_SKIP_SUFFIXES = (MASK_SUFFIX, "_superpixels")


def official_split(dirname: str) -> str | None:
    """``ISIC2018_Task1-2_Validation_Input`` -> ``val``; None when the name says nothing."""
    name = dirname.lower()
    if re.search(r"(^|[_\-])(training|train)([_\-]|$)", name):
        return "train"
    if re.search(r"(^|[_\-])(validation|val)([_\-]|$)", name):
        return "val"
    if re.search(r"(^|[_\-])test", name):
        return "test"
    return None


class IsicLayout(Layout):
    """ISIC 2016-2018 Task 1 layouts (no options)."""

    name = "isic"

    def info(self) -> LayoutInfo:
        return LayoutInfo(name=self.name, ndim=2, channels=3, class_names=("background", "lesion"))

    def list_cases(self, root: str) -> list[Case]:
        image_dirs: dict[str, dict[str, str]] = {}
        mask_dirs: dict[str, dict[str, str]] = {}
        for d, subdirs, files in os.walk(root):
            subdirs.sort()
            for f in sorted(files):
                stem, ext = os.path.splitext(f)
                if ext.lower() not in photos.IMAGE_EXTENSIONS:
                    continue
                if stem.endswith(MASK_SUFFIX) and ext.lower() == ".png":
                    mask_dirs.setdefault(d, {})[stem[: -len(MASK_SUFFIX)]] = os.path.join(d, f)
                elif not stem.endswith(_SKIP_SUFFIXES):
                    image_dirs.setdefault(d, {})[stem] = os.path.join(d, f)
        if not mask_dirs:
            raise TfsegError(f"{root}: no ISIC masks (*{MASK_SUFFIX}.png) found")
        pairs = []
        for d, images in sorted(image_dirs.items()):
            best = max(mask_dirs, key=lambda m: (len(images.keys() & mask_dirs[m].keys()), m))
            if not images.keys() & mask_dirs[best].keys():
                log.info("%s: no matching %s masks, skipped", d, MASK_SUFFIX)
                continue
            pairs.append((d, best))
        if not pairs:
            raise TfsegError(f"{root}: no images folder matches a folder of *{MASK_SUFFIX}.png masks")
        splits = {d: official_split(os.path.basename(d)) for d, _ in pairs}
        use_official = len({s for s in splits.values() if s}) >= 2
        seen: dict[str, int] = {}
        for d, _ in pairs:
            for stem in image_dirs[d]:
                seen[stem] = seen.get(stem, 0) + 1
        cases = []
        for d, m in pairs:
            for stem, path in sorted(image_dirs[d].items()):
                files = [("image", path)]
                if stem in mask_dirs[m]:
                    files.append(("mask", mask_dirs[m][stem]))
                case_id = stem if seen[stem] == 1 else f"{os.path.basename(d)}/{stem}"
                cases.append(Case(case_id=case_id, files=tuple(files), group=stem,
                                  split=splits[d] if use_official else None))
        return cases

    def load_case(self, case: Case) -> Loaded2D:
        paths = case.paths
        if "mask" not in paths:
            raise BadCase(paths["image"], f"no mask ({os.path.basename(case.case_id)}{MASK_SUFFIX}.png absent)")
        loaded = read_image(paths["image"], 3)
        loaded.mask = read_binary_mask(paths["mask"])
        return loaded

