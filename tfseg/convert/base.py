"""What every dataset layout provides to the Beam conversion job.

A layout reads one dataset in its original on-disk layout. It lists cases cheaply (paths only,
on the launcher), and loads one case into numpy arrays (in a Beam worker). Everything shared
(validation, resizing and encoding in :mod:`tfseg.convert.encode`, sharding in
:mod:`tfseg.convert.shards`, the Beam graph and statistics in :mod:`tfseg.convert.transforms`,
the launcher in :mod:`tfseg.convert.pipeline`) is written once, so a new layout is two small
functions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from typing import Any

import numpy as np

from tfseg import photos, preprocess
from tfseg.errors import TfsegError, first_line
from tfseg.io import fs

# Label names annotation tools give the background (LabelMe's "_background_", labelme2coco's category
# 0): class 0, never a class of its own.
BACKGROUND_LABELS = ("_background_", "background", "__background__")


def outside_input(path: str, root: str) -> bool:
    """Whether ``path`` (as named by an annotation file) resolves outside the ``--input`` folder
    ``root``, through ``..``, an absolute path or a symbolic link: tfseg reads only inside its
    input (an annotation file must not make it open ``/etc/passwd``)."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real != base and not real.startswith(base.rstrip(os.sep) + os.sep)


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
      exif_orientation: the EXIF orientation (1-8) the photo was turned by to be stored as
        displayed (:mod:`tfseg.photos`); 1 when it was stored as read.
    """

    image: np.ndarray | None
    mask: np.ndarray | None
    image_bytes: bytes | None = None
    image_format: str | None = None
    image_shape: tuple[int, int, int] | None = None
    exif_orientation: int = 1

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
    ``remote_input``: the layout lists and reads its files with the helpers below
    (:func:`list_dir`, :func:`read_bytes`, ...), so ``--input`` may be gs://, s3://, hdfs://.
    """

    name: str = ""
    remote_input: bool = False
    # Annotation files left out by list_cases as byte-identical copies of another (counted in
    # dataset.json's ``duplicates``; ``--strict`` refuses them).
    duplicate_annotation_files: int = 0
    # Cases whose image is byte-identical to another's (set by the convert pipeline; kept in one split).
    duplicate_images: int = 0

    def info(self) -> LayoutInfo:
        raise NotImplementedError

    def list_cases(self, root: str) -> list[Case]:
        """Lists the cases under ``root``; raises TfsegError if the layout is not found there."""
        raise NotImplementedError

    def load_case(self, case: Case) -> Any:
        """Loads one case as Loaded2D or Loaded3D; raises BadCase for unreadable inputs."""
        raise NotImplementedError

    def preprocessing(self) -> dict:
        """3D layouts: dataset.json's ``preprocessing`` (:func:`tfseg.volumes.volume_record`),
        known after :meth:`list_cases`. 2D layouts store pixels as they are (convert records
        its own ``--image-size`` resize)."""
        return {}


def read_list_file(path: str) -> list[str]:
    """The non-blank lines of an id list (VOC's and CVAT's ``ImageSets/Segmentation/*.txt``),
    stripped. A name that is not UTF-8 keeps the bytes it has on disk (surrogate escapes), so it
    still opens its files; its case is then rejected by the rule for stored ids (UTF-8)."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise TfsegError(f"{path}: cannot read ({e.strerror or first_line(e)})") from None


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) from a string: the same on every machine, Python and run."""
    # surrogateescape: a file name that is not UTF-8 hashes by its bytes (its case is rejected later)
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def parse_split_spec(spec: str) -> list[tuple[str, float]]:
    """Parses ``"train=0.8,val=0.1,test=0.1"`` into normalized (name, fraction) pairs.

    Names are letters, digits, ``_`` and ``-`` (they name shard files), each once; fractions are
    finite numbers >= 0 (any scale: they are normalized), not all zero.

    Raises:
      ValueError: malformed, repeated, non-finite, negative or all-zero fractions.
    """
    import math
    import re

    parts = []
    for item in str(spec).split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"{spec!r}: expected NAME=FRACTION,... got {item!r}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
            raise ValueError(f"{spec!r}: split name {name!r} must be letters, digits, '_' or '-'")
        if any(n == name for n, _ in parts):
            raise ValueError(f"{spec!r}: split {name!r} given twice")
        try:
            frac = float(value)
        except ValueError:
            raise ValueError(f"{spec!r}: fraction {value.strip()!r} of {name!r} is not a number") from None
        if not math.isfinite(frac) or frac < 0:
            raise ValueError(f"{spec!r}: fraction {value.strip()!r} of {name!r} must be a finite number >= 0")
        parts.append((name, frac))
    total = sum(f for _, f in parts)
    if total <= 0:
        raise ValueError(f"{spec!r}: fractions sum to 0")
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


_PIL_FORMATS = {"JPEG": "jpeg", "PNG": "png"}


# The largest image convert decodes (tfseg.preprocess states the three pixel limits together).
MAX_PIXELS = preprocess.MAX_DECODE_PIXELS


# Pixels the conversion threads of one worker process may hold decoded at once: two cases of
# MAX_PIXELS. A thread waits for the budget before decoding a case's image (read_image) and
# gives it back when the case is encoded (release_pixels, called by the pipeline), so memory does
# not grow with the thread count.
PIXEL_BUDGET = 2 * MAX_PIXELS


class _PixelBudget:
    def __init__(self, total: int):
        import threading

        self.total = total
        self.used = 0
        self.cond = threading.Condition()
        self.local = threading.local()

    def reserve(self, n: int) -> None:
        if not getattr(self.local, "active", False):
            return  # outside a conversion case (tests, tools): nothing to give back later
        n = min(int(n), self.total)
        held = getattr(self.local, "held", 0)
        with self.cond:
            # A thread that already holds pixels never waits (no deadlock between two cases).
            while not held and self.used and self.used + n > self.total:
                self.cond.wait()
            self.used += n
        self.local.held = held + n

    def begin(self) -> None:
        self.release()
        self.local.active = True

    def release(self) -> None:
        self.local.active = False
        held = getattr(self.local, "held", 0)
        if held:
            with self.cond:
                self.used -= held
                self.cond.notify_all()
            self.local.held = 0


_BUDGET = _PixelBudget(PIXEL_BUDGET)


def begin_case() -> None:
    """Starts counting the calling thread's pixels against the budget (one conversion case)."""
    _BUDGET.begin()


def reserve_pixels(n: int) -> None:
    """Waits until ``n`` pixels fit the worker's budget (immediately if this thread holds some)."""
    _BUDGET.reserve(n)


def release_pixels() -> None:
    """Gives back the pixels the calling thread reserved (end of a case)."""
    _BUDGET.release()


def check_pixels(width: int, height: int, path: str, what: str = "image") -> None:
    """Rejects images over :data:`MAX_PIXELS` before any pixel is decoded.

    Raises:
      BadCase: ``width * height`` exceeds the limit.
    """
    if width * height > MAX_PIXELS:
        raise BadCase(path, f"{what} {width}x{height} = {width * height} pixels exceeds tfseg's limit of "
                            f"{MAX_PIXELS} pixels (2**26; a decompression bomb or an image to tile first)")


def _open_image(path: str, data: bytes | None = None):
    from PIL import Image, UnidentifiedImageError

    _quiet_pil_bomb_warning()
    if data is None:
        try:
            data = fs.read_bytes(path)
        except OSError as e:
            raise BadCase(path, f"cannot read file ({e.strerror or _pil_reason(e)})") from None
    if not data:
        raise BadCase(path, "empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadCase(path, f"decompression bomb rejected ({_pil_reason(e)})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadCase(path, f"not a decodable image ({_pil_reason(e)})") from None
    width, height = img.size
    check_pixels(width, height, path)
    return img, data


def _pil_reason(e: BaseException) -> str:
    """PIL's message without the object reprs it puts in some (``<_io.BytesIO object at 0x..>``)."""
    import re

    text = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", first_line(e))
    return text


_BOMB_WARNING_QUIET = False


def _quiet_pil_bomb_warning() -> None:
    # tfseg checks the pixel count itself (check_pixels, below PIL's warning threshold), so PIL's
    # DecompressionBombWarning would only add a second, multi-line message for the same file.
    global _BOMB_WARNING_QUIET
    if not _BOMB_WARNING_QUIET:
        import warnings

        from PIL import Image

        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        _BOMB_WARNING_QUIET = True


def pixels_to_uint8(img, path: str) -> np.ndarray:
    """The one rule for images that are not 8 bits a channel (grayscale ``I;16``, ``I``, ``F``).

    - 16-bit (``I;16*``): scaled by the type's own range, ``round(v / 257)`` (65535 -> 255, and an
      8-bit image widened by ``v * 257`` comes back exactly);
    - 32-bit float (``F``): values in [0, 1] become ``round(v * 255)``; values outside [0, 1] or
      not finite are rejected (their range is unknown: tfseg will not guess a scale);
    - 32-bit integer (``I``): rejected (save it as 8- or 16-bit).

    Never saturates or zeroes: a value is either mapped by the rule or the case is rejected.

    Returns:
      (H, W) uint8.

    Raises:
      BadCase: a float image outside [0, 1], a 32-bit integer image, or an unsupported mode.
    """
    mode = img.mode
    if mode.startswith("I;16"):
        a = np.asarray(img).astype(np.uint32)
        return ((a + 128) // 257).astype(np.uint8)
    if mode == "F":
        a = np.asarray(img, dtype=np.float32)
        if not np.all(np.isfinite(a)):
            raise BadCase(path, "float image has NaN or infinite pixels")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo < 0 or hi > 1:
            raise BadCase(path, f"float image values {lo:g}..{hi:g} are outside [0, 1]; scale them to [0, 1] "
                                "or save 8- or 16-bit")
        return np.rint(a * 255).astype(np.uint8)
    if mode == "I":
        raise BadCase(path, "32-bit integer image: save it as 8- or 16-bit")
    raise BadCase(path, f"unsupported image mode {mode}")


def _is_wide(img) -> bool:
    return img.mode in ("I", "F") or img.mode.startswith("I;16")


def _load_pixels(img, path: str) -> None:
    from PIL import Image

    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise BadCase(path, f"decompression bomb rejected ({_pil_reason(e)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL says "image file is truncated (N bytes not processed)" for cut-off files.
        raise BadCase(path, f"undecodable or truncated image ({_pil_reason(e)})") from None


def read_image(path: str, channels: int = 3, *, keep_pixels: bool = False, data: bytes | None = None) -> Loaded2D:
    """Reads and validates one image file for a 2D case (mask left None), as displayed: a photo
    with an EXIF orientation other than 1 is turned as the tag says (:mod:`tfseg.photos`), as
    annotation tools showed it, and stored as decoded pixels (``exif_orientation`` says so).

    JPEG and PNG files in a mode the records can hold as-is are returned as their original bytes
    (``image_bytes``, ``image_shape``) without keeping pixels: the file is still fully decoded to
    catch truncation, JPEGs at 1/8 scale (libjpeg's DCT scaling still reads every entropy-coded
    block, so a cut-off file fails, at a fraction of the cost). Other formats and modes are
    decoded and converted to ``channels``; 16-bit and float images by :func:`pixels_to_uint8`.

    Args:
      path: image file (named in messages).
      channels: 1 (grayscale) or 3 (RGB).
      keep_pixels: also return the full-resolution pixels in ``image``.
      data: the file's bytes when already in memory (LabelMe's embedded ``imageData``); None
        reads ``path``.

    Returns:
      Loaded2D with ``mask=None``; ``image`` (H, W, channels) uint8 when decoded.

    Raises:
      BadCase: unreadable, undecodable or truncated file, over :data:`MAX_PIXELS`, or pixels
        :func:`pixels_to_uint8` rejects.
    """
    img, data = _open_image(path, data)
    reserve_pixels(img.size[0] * img.size[1])
    fmt = _PIL_FORMATS.get(img.format or "")
    turn = photos.orientation(img)
    # A grayscale file in an RGB dataset stays as-is: decode_image(channels=3) replicates it.
    # A turned photo cannot: TensorFlow's decoders ignore EXIF, so its pixels are stored.
    passthrough = turn == 1 and fmt is not None and (img.mode == ("RGB" if channels == 3 else "L") or (
        channels == 3 and img.mode == "L"))
    width, height = img.size
    if passthrough and not keep_pixels:
        if fmt == "jpeg":
            img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
        _load_pixels(img, path)
        return Loaded2D(image=None, mask=None, image_bytes=data, image_format=fmt,
                        image_shape=(height, width, channels))
    _load_pixels(img, path)
    if turn != 1:
        img, _ = photos.oriented(img)
    want = "RGB" if channels == 3 else "L"
    if _is_wide(img):
        gray = pixels_to_uint8(img, path)
        pixels = np.repeat(gray[..., None], channels, axis=-1)
        return Loaded2D(image=pixels, mask=None, exif_orientation=turn)
    try:
        pixels = np.asarray(img if img.mode == want else img.convert(want))
    except (OSError, ValueError) as e:
        raise BadCase(path, f"cannot convert {img.mode} image to {want} ({_pil_reason(e)})") from None
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if passthrough:
        return Loaded2D(image=pixels, mask=None, image_bytes=data, image_format=fmt,
                        image_shape=(height, width, channels))
    return Loaded2D(image=pixels, mask=None, exif_orientation=turn)


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
    if img.mode == "I" or img.mode.startswith("I;16"):
        arr = np.asarray(img)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise BadCase(path, f"label values {int(arr.min())}..{int(arr.max())} do not fit in 0..255")
        return arr.astype(np.uint8)
    if img.mode == "F":
        # Labels are class ids, never scaled: a float mask must hold whole numbers in 0..255.
        arr = np.asarray(img)
        if arr.size and not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))
                             and arr.min() >= 0 and arr.max() <= 255):
            raise BadCase(path, f"float label values {float(np.nanmin(arr)):g}..{float(np.nanmax(arr)):g} "
                                "are not class ids (whole numbers in 0..255)")
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
