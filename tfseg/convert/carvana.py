"""Kaggle Carvana Image Masking: ``train/*.jpg`` + ``train_masks/*_mask.gif`` (1918x1280, binary).

When the GIFs are absent, masks come from ``train_masks.csv`` (``img,rle_mask``; run-length
pairs ``start length``, 1-based, over the row-major flattened 1280x1918 mask, as in the
competition's own file). Each car has 16 views ``<car id>_01.jpg`` .. ``_16.jpg``; the car id is
the split group, so no car straddles train and validation.
"""

from __future__ import annotations

import csv
import io
import logging
import os

import numpy as np

from tfseg.convert.base import (
    BadCase,
    Case,
    Layout,
    LayoutInfo,
    Loaded2D,
    read_binary_mask,
    read_image,
)
from tfseg.errors import TfsegError
from tfseg.io import fs

log = logging.getLogger(__name__)

IMAGE_DIRS = ("train", "train_hq")
MASK_DIR = "train_masks"
MASK_CSV = "train_masks.csv"


def rle_encode(mask: np.ndarray) -> str:
    """(H, W) {0, 1} -> ``"start length ..."`` (1-based, row-major), Carvana's format."""
    flat = np.concatenate([[0], (np.asarray(mask).reshape(-1) > 0).astype(np.int8), [0]])
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts, ends = edges[::2], edges[1::2]
    return " ".join(f"{s} {e - s}" for s, e in zip(starts, ends))


def rle_decode(rle: str, shape: tuple[int, int], path: str = "") -> np.ndarray:
    """Inverse of :func:`rle_encode`: -> (H, W) uint8 {0, 1}.

    Raises:
      BadCase: malformed run-length string or runs outside the image.
    """
    size = shape[0] * shape[1]
    out = np.zeros(size, np.uint8)
    try:
        nums = np.asarray(rle.split(), dtype=np.int64)
    except ValueError:
        raise BadCase(path, "malformed run-length mask (non-integer values)") from None
    if len(nums) % 2:
        raise BadCase(path, "malformed run-length mask (odd number of values)")
    starts, lengths = nums[0::2] - 1, nums[1::2]
    if len(nums) and (starts.min() < 0 or lengths.min() < 0 or (starts + lengths).max() > size):
        raise BadCase(path, f"run-length mask runs outside a {shape[1]}x{shape[0]} image")
    for s, n in zip(starts, lengths):
        out[s:s + n] = 1
    return out.reshape(shape)


def car_id(stem: str) -> str:
    """``00087a6bd4dc_01`` -> ``00087a6bd4dc``."""
    return stem.rsplit("_", 1)[0] if "_" in stem else stem


class CarvanaLayout(Layout):
    """Carvana's Kaggle layout (no options)."""

    name = "carvana"
    remote_input = True

    def __init__(self):
        self._rle: dict[str, str] | None = None

    def __getstate__(self):
        # The parsed CSV is not shipped to workers; each loads it once on first use.
        return {**self.__dict__, "_rle": None}

    def info(self) -> LayoutInfo:
        return LayoutInfo(name=self.name, ndim=2, channels=3, class_names=("background", "car"))

    def list_cases(self, root: str) -> list[Case]:
        # Through base's file helpers: --input may be local or gs://, s3://, hdfs://.
        image_dir = next((fs.join(root, d) for d in IMAGE_DIRS if fs.isdir(fs.join(root, d))), None)
        if image_dir is None:
            raise TfsegError(
                f"{root}: not a Carvana layout (expected train/*.jpg with train_masks/*_mask.gif or {MASK_CSV})")
        images = [n for n in fs.listdir(image_dir) if n.endswith(".jpg") and not n.startswith(".")]
        if not images:
            raise TfsegError(f"{image_dir}: no .jpg images")
        mask_dir = fs.join(root, MASK_DIR)
        csv_path = fs.join(root, MASK_CSV)
        has_csv = fs.isfile(csv_path)
        masks = set(fs.listdir(mask_dir)) if fs.isdir(mask_dir) else None
        if masks is None and not has_csv:
            raise TfsegError(f"{root}: no masks (expected {MASK_DIR}/*_mask.gif or {MASK_CSV})")
        cases = []
        for name in images:
            stem = os.path.splitext(name)[0]
            files = [("image", fs.join(image_dir, name))]
            if masks is not None and f"{stem}_mask.gif" in masks:
                files.append(("mask", fs.join(mask_dir, f"{stem}_mask.gif")))
            elif has_csv:
                files.append(("rle", csv_path))
            cases.append(Case(case_id=stem, files=tuple(files), group=car_id(stem)))
        return cases

    def _rle_table(self, csv_path: str) -> dict[str, str]:
        if self._rle is None:
            try:
                text = fs.read_bytes(csv_path).decode("utf-8")
                rows = csv.DictReader(io.StringIO(text, newline=""))
                self._rle = {os.path.splitext(r["img"])[0]: r["rle_mask"] for r in rows}
            except (OSError, KeyError, csv.Error, UnicodeDecodeError) as e:
                raise BadCase(csv_path, f"cannot read run-length masks ({e})") from None
        return self._rle

    def load_case(self, case: Case) -> Loaded2D:
        paths = case.paths
        loaded = read_image(paths["image"], 3)
        if "mask" in paths:
            mask = read_binary_mask(paths["mask"])
        elif "rle" in paths:
            rle = self._rle_table(paths["rle"]).get(case.case_id)
            if rle is None:
                raise BadCase(paths["image"],
                              f"no mask ({MASK_DIR}/{case.case_id}_mask.gif absent, no row in {MASK_CSV})")
            mask = rle_decode(rle, loaded.shape[:2], paths["rle"])
        else:
            raise BadCase(paths["image"], f"no mask ({MASK_DIR}/{case.case_id}_mask.gif absent)")
        loaded.mask = mask
        return loaded

