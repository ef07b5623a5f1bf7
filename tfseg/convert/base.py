"""What every dataset layout provides to the Beam conversion job.

A layout reads one dataset in its original on-disk layout. It lists cases cheaply (paths only,
on the launcher), and loads one case into numpy arrays (in a Beam worker). Everything shared
(validation, resizing, encoding, statistics, sharding, splits) lives in
:mod:`tfseg.convert.pipeline`, so a new layout is two small functions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from typing import Any

import numpy as np


class BadCase(Exception):
    """A case that cannot be converted; the job records it in rejected.jsonl and goes on.

    Args:
      path: the offending file.
      reason: one line, e.g. "truncated JPEG" or "mask 640x480 != image 1918x1280".
    """

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Case:
    """One example to convert, as listed on the launcher (paths only, nothing loaded).

    Attributes:
      case_id: unique id, written as the record's source id (e.g. the file stem).
      files: named source paths, e.g. ``{"image": ..., "mask": ...}``; layout-specific.
      group: cases sharing a group always land in the same split (Carvana's car id).
      split: the dataset's official split for this case, or None to split by hash of ``group``.
    """

    case_id: str
    files: tuple[tuple[str, str], ...]
    group: str = ""
    split: str | None = None

    @property
    def paths(self) -> dict[str, str]:
        return dict(self.files)

    @property
    def main_path(self) -> str:
        return self.files[0][1] if self.files else self.case_id


@dataclasses.dataclass
class Loaded2D:
    """A decoded 2D case.

    Attributes:
      image: (H, W, C) uint8.
      mask: (H, W) uint8 class ids after the layout's label mapping (ignore = ignore_index),
        or None for unlabelled cases.
      image_bytes: the original encoded image when it can be stored as-is (JPEG/PNG), else None.
      image_format: ``"jpeg"`` or ``"png"`` for ``image_bytes``.
      image_shape: (H, W, C) of ``image_bytes`` when the layout validated the file without
        keeping its pixels (``image`` is then None): the pipeline stores the bytes as they are
        and decodes them only if it must resize. See :func:`read_image`.
    """

    image: np.ndarray | None
    mask: np.ndarray | None
    image_bytes: bytes | None = None
    image_format: str | None = None
    image_shape: tuple[int, int, int] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the image, whether or not its pixels are loaded."""
        if self.image is not None:
            return tuple(self.image.shape)
        return tuple(self.image_shape)


@dataclasses.dataclass
class Loaded3D:
    """A decoded, normalized 3D case.

    Attributes:
      volume: (D, H, W, C) float32, normalized.
      label: (D, H, W) uint8 class ids after the layout's label mapping, or None.
      spacing: voxel spacing in mm along D, H, W.
    """

    volume: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class LayoutInfo:
    """Static facts about a layout, copied into dataset.json."""

    name: str
    ndim: int
    channels: int
    class_names: tuple[str, ...]
    ignore_index: int | None = None
    label_mapping: dict = dataclasses.field(default_factory=dict)
    regions: dict = dataclasses.field(default_factory=dict)
    label_convention: str | None = None
    modalities: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class Layout:
    """Base class of the dataset layouts. Subclasses set ``name`` and implement three methods.

    Layout objects are pickled to Beam workers: keep their state to plain options.
    """

    name: str = ""

    def info(self) -> LayoutInfo:
        raise NotImplementedError

    def list_cases(self, root: str) -> list[Case]:
        """Lists the cases under ``root``; raises TfsegError if the layout is not found there."""
        raise NotImplementedError

    def load_case(self, case: Case) -> Any:
        """Loads one case as Loaded2D or Loaded3D; raises BadCase for unreadable inputs."""
        raise NotImplementedError

    @classmethod
    def make_sample(cls, output: str, count: int, seed: int = 0) -> None:
        """Writes ``count`` synthetic cases in this layout's original file formats to ``output``,
        with shapes a model can learn (``tfseg sample``; used by tests and the demo)."""
        raise NotImplementedError


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) from a string: the same on every machine, Python and run."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def parse_split_spec(spec: str) -> list[tuple[str, float]]:
    """Parses ``"train=0.8,val=0.1,test=0.1"`` into normalized (name, fraction) pairs.

    Raises:
      ValueError: malformed, negative or all-zero fractions.
    """
    parts = []
    for item in spec.split(","):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"split spec {spec!r}: expected NAME=FRACTION,... got {item!r}")
        frac = float(value)
        if frac < 0:
            raise ValueError(f"split spec {spec!r}: negative fraction for {name!r}")
        parts.append((name.strip(), frac))
    total = sum(f for _, f in parts)
    if total <= 0:
        raise ValueError(f"split spec {spec!r}: fractions sum to 0")
    return [(n, f / total) for n, f in parts]


def assign_split(case: Case, spec: list[tuple[str, float]]) -> str:
    """The official split if the case has one, otherwise by a stable hash of its group id."""
    if case.split:
        return case.split
    x = hash_fraction(case.group or case.case_id)
    acc = 0.0
    for name, frac in spec:
        acc += frac
        if x < acc:
            return name
    return spec[-1][0]



# --------------------------------------------------------------------------------------------
# 2D file readers shared by the layouts (PIL only, run in the Beam workers).
# --------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")

_PIL_FORMATS = {"JPEG": "jpeg", "PNG": "png"}


def _open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadCase(path, f"cannot read file ({e.strerror or e})") from None
    if not data:
        raise BadCase(path, "empty file")
    try:
        return Image.open(io.BytesIO(data)), data
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadCase(path, f"not a decodable image ({e})") from None


def _load_pixels(img, path: str) -> None:
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL says "image file is truncated (N bytes not processed)" for cut-off files.
        raise BadCase(path, f"undecodable or truncated image ({e})") from None


def read_image(path: str, channels: int = 3, *, keep_pixels: bool = False) -> Loaded2D:
    """Reads and validates one image file for a 2D case (mask left None).

    JPEG and PNG files in a mode the records can hold as-is are returned as their original bytes
    (``image_bytes``, ``image_shape``) without keeping pixels: the file is still fully decoded to
    catch truncation, JPEGs at 1/8 scale (libjpeg's DCT scaling still reads every entropy-coded
    block, so a cut-off file fails, at a fraction of the cost). Other formats and modes are
    decoded and converted to ``channels``.

    Args:
      path: image file.
      channels: 1 (grayscale) or 3 (RGB).
      keep_pixels: also return the full-resolution pixels in ``image``.

    Returns:
      Loaded2D with ``mask=None``; ``image`` (H, W, channels) uint8 when decoded.

    Raises:
      BadCase: unreadable, undecodable or truncated file.
    """
    img, data = _open_image(path)
    fmt = _PIL_FORMATS.get(img.format or "")
    # A grayscale file in an RGB dataset stays as-is: decode_image(channels=3) replicates it.
    passthrough = fmt is not None and (img.mode == ("RGB" if channels == 3 else "L") or (
        channels == 3 and img.mode == "L"))
    width, height = img.size
    if passthrough and not keep_pixels:
        if fmt == "jpeg":
            img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
        _load_pixels(img, path)
        return Loaded2D(image=None, mask=None, image_bytes=data, image_format=fmt,
                        image_shape=(height, width, channels))
    _load_pixels(img, path)
    want = "RGB" if channels == 3 else "L"
    try:
        pixels = np.asarray(img if img.mode == want else img.convert(want))
    except (OSError, ValueError) as e:
        raise BadCase(path, f"cannot convert {img.mode} image to {want} ({e})") from None
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if passthrough:
        return Loaded2D(image=pixels, mask=None, image_bytes=data, image_format=fmt,
                        image_shape=(height, width, channels))
    return Loaded2D(image=pixels, mask=None)


def read_label_image(path: str) -> np.ndarray:
    """Reads a label image as stored: palette images as their indices, grayscale as values.

    Returns:
      (H, W) uint8 for palette/grayscale files, (H, W, 3) uint8 for RGB files (colour-coded
      labels, mapped by the caller), bool-free and unscaled.

    Raises:
      BadCase: unreadable, undecodable or truncated file, or a mode labels cannot be in.
    """
    img, _ = _open_image(path)
    _load_pixels(img, path)
    if img.mode in ("P", "L"):
        return np.asarray(img)
    if img.mode == "1":
        return np.asarray(img).astype(np.uint8)
    if img.mode in ("RGB", "RGBA"):
        return np.asarray(img.convert("RGB"))
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):
        arr = np.asarray(img)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise BadCase(path, f"label values {int(arr.min())}..{int(arr.max())} do not fit in uint8")
        return arr.astype(np.uint8)
    raise BadCase(path, f"unsupported label image mode {img.mode}")


def palette_gray(path_or_img) -> np.ndarray | None:
    """The palette of a ``P``-mode image as 256 gray levels (None for other modes), so that a
    binary GIF/PNG mask can be thresholded without converting the whole image."""
    img = path_or_img
    if img.mode != "P":
        return None
    pal = np.zeros((256, 3), np.float32)
    raw = np.frombuffer(bytes(img.getpalette() or b""), np.uint8)[: 256 * 3].reshape(-1, 3)
    pal[: len(raw)] = raw
    return (pal @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)


def read_binary_mask(path: str, threshold: int = 128) -> np.ndarray:
    """Reads a black/white mask (GIF, PNG, ...) as (H, W) uint8 {0, 1}.

    Palette images are thresholded on their colours' gray level (Carvana's GIFs are indices
    0/1 with a black/white palette), grayscale on value; masks that are already {0, 1} stay so.

    Raises:
      BadCase: unreadable or undecodable file.
    """
    img, _ = _open_image(path)
    _load_pixels(img, path)
    if img.mode == "P":
        lut = (palette_gray(img) >= threshold).astype(np.uint8)
        lo, hi = img.getextrema()
        if np.array_equal(lut[lo:hi + 1], np.arange(lo, hi + 1)):
            # Indices already are the 0/1 mask (Carvana's GIFs): skip a 2.5 MP table lookup.
            return np.asarray(img)
        return lut[np.asarray(img)]
    arr = np.asarray(img.convert("L") if img.mode not in ("L", "1") else img).astype(np.uint8)
    if arr.size and arr.max() <= 1:
        return arr
    return (arr >= threshold).astype(np.uint8)
