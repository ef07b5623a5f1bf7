"""One case -> one serialized record: validation, class pixel counts, optional resizing, encoding.

Pure functions that run in the Beam workers (the job's LoadAndEncode step) and are tested
without Beam; records are serialized by :mod:`tfseg.schema`, deterministically, so the same case
gives the same bytes in every process.
"""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib
from typing import Any, NamedTuple

import numpy as np

from tfseg import preprocess, schema
from tfseg.convert.base import MAX_PIXELS, BadCase, Case, Loaded2D, Loaded3D

# zlib level 3: ~4 ms for a 1918x1280 binary mask vs ~10 ms at 6, for a mask ~2x larger
# (still ~2% of the JPEG beside it).
_MASK_ZLIB_LEVEL = 3


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    """What a worker needs besides the layout.

    Attributes:
      ndim: 2 or 3.
      channels: image channels the records hold.
      num_classes: labels must be in [0, num_classes) or equal ``ignore_index``.
      ignore_index: the ignore label, or None.
      image_size: (H, W) to resize 2D cases to, or None to keep the originals.
    """

    ndim: int
    channels: int
    num_classes: int
    ignore_index: int | None = None
    image_size: tuple[int, int] | None = None


class CaseStats(NamedTuple):
    """Statistics of one converted case, combined per split.

    Attributes:
      class_counts: pixels (voxels) per class id, ignore excluded; None if unlabelled.
      shape: (H, W) or (D, H, W) as stored.
      image_format: ``"jpeg"``/``"png"`` for 2D, None for 3D.
      exif_orientation: the EXIF orientation the photo was turned by (1: stored as read).
    """

    class_counts: tuple[int, ...] | None
    shape: tuple[int, ...]
    image_format: str | None
    exif_orientation: int = 1


class Encoded(NamedTuple):
    """One converted case on its way to a shard: its serialized record (the convert job writes
    it to its batch's fragment at once, so no PCollection of the job carries pixel data)."""

    split: str
    shard: int
    case_id: str
    record: bytes
    stats: CaseStats


def encode_png_gray(array: np.ndarray, level: int = _MASK_ZLIB_LEVEL) -> bytes:
    """Encodes (H, W) uint8 as an 8-bit grayscale PNG.

    Written directly (filter type 0 + zlib) because PIL's adaptive row filtering makes it ~4x
    slower on large masks, where filtering gains nothing.
    """
    a = np.ascontiguousarray(array, dtype=np.uint8)
    h, w = a.shape
    rows = np.empty((h, w + 1), np.uint8)
    rows[:, 0] = 0
    rows[:, 1:] = a

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), level)) + chunk(b"IEND", b""))


def _label_file(case: Case) -> str:
    paths = case.paths
    for key in ("mask", "label", "labels", "seg", "annotation"):
        if key in paths:
            return paths[key]
    return case.main_path


def count_classes(labels: np.ndarray, opts: EncodeOptions, path: str) -> tuple[int, ...]:
    """Pixels per class id, validating the label range.

    Args:
      labels: integer array of any shape.
      path: the label file, named in the error.

    Returns:
      ``num_classes`` counts (ignore pixels excluded).

    Raises:
      BadCase: values outside [0, num_classes) other than the ignore index.
    """
    k = opts.num_classes
    if labels.dtype != np.uint8:
        lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
        if lo < 0 or hi > 255:
            raise BadCase(path, f"label values {lo}..{hi} outside 0..{k - 1}")
        labels = labels.astype(np.uint8)
    # For few classes, per-class count_nonzero is ~8x faster than bincount (which widens to intp).
    if k <= 16:
        counts = [int(np.count_nonzero(labels == c)) for c in range(k)]
    else:
        counts = np.bincount(labels.reshape(-1), minlength=256)[:k].tolist()
    n_ignore = 0
    if opts.ignore_index is not None and opts.ignore_index >= k:
        n_ignore = int(np.count_nonzero(labels == opts.ignore_index))
    if sum(counts) + n_ignore != labels.size:
        bad = [int(v) for v in np.unique(labels) if v >= k and v != opts.ignore_index]
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        extra = f" or {opts.ignore_index}" if opts.ignore_index is not None else ""
        raise BadCase(path, f"label values [{shown}] outside 0..{k - 1}{extra}")
    return tuple(counts)


def _resize_2d(loaded: Loaded2D, size: tuple[int, int], path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The image and mask as ``--image-size`` stores them (:func:`tfseg.preprocess.convert_resize`:
    the one resize definition the served graph reproduces on originals). Encoded originals are
    decoded with TensorFlow's decoders, as the served graph and the input pipeline decode them
    (PIL's JPEG decoder gives other pixels: up to 5 levels apart on two thirds of them)."""
    image = loaded.image
    if image is None:
        import tensorflow as tf

        try:
            image = preprocess.decode_image(tf.constant(loaded.image_bytes), loaded.shape[2], MAX_PIXELS).numpy()
        except tf.errors.OpError as e:
            reason = (e.message or "").strip().splitlines()[0] if e.message else type(e).__name__
            raise BadCase(path, f"undecodable or truncated image ({reason})") from None
    return preprocess.convert_resize(image, loaded.mask, size)


def _encode_image(image: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buf = io.BytesIO()
    if fmt == "jpeg":
        pil.save(buf, "JPEG", quality=95)
    else:
        pil.save(buf, "PNG")
    return buf.getvalue()


def encode_case(loaded: Any, case: Case, opts: EncodeOptions) -> tuple[bytes, CaseStats]:
    """Validates, optionally resizes, and serializes one loaded case.

    Args:
      loaded: the layout's Loaded2D or Loaded3D.
      case: the case it came from (its files are named in errors).

    Returns:
      (serialized tf.train.Example, its CaseStats).

    Raises:
      BadCase: the case cannot be converted.
    """
    if isinstance(loaded, Loaded3D):
        return _encode_3d(loaded, case, opts)
    if not isinstance(loaded, Loaded2D):
        raise TypeError(f"load_case returned {type(loaded).__name__}, expected Loaded2D or Loaded3D")
    path = case.paths.get("image", case.main_path)
    mask_path = _label_file(case)
    height, width, channels = loaded.shape
    if channels != opts.channels:
        raise BadCase(path, f"image has {channels} channels, dataset has {opts.channels}")
    mask = loaded.mask
    if mask is not None:
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        if mask.shape != (height, width):
            mh, mw = mask.shape[:2]
            raise BadCase(mask_path, f"mask {mw}x{mh} != image {width}x{height}")
        counts = count_classes(mask, opts, mask_path)
        mask = mask.astype(np.uint8, copy=False)
    if opts.image_size is not None and opts.image_size != (height, width):
        # Lossless: the record holds exactly the pixels tfseg.preprocess.source_resize computes,
        # so the served graph, given the original, sees what evaluation saw.
        fmt = preprocess.CONVERT_RESIZE["format"]
        image, mask = _resize_2d(dataclasses.replace(loaded, mask=mask), opts.image_size, path)
        if mask is not None:
            counts = count_classes(mask, opts, mask_path)
        image_bytes = _encode_image(image, fmt)
        height, width = opts.image_size
    elif loaded.image_bytes is not None:
        fmt, image_bytes = loaded.image_format, loaded.image_bytes
    else:
        fmt, image_bytes = "png", _encode_image(loaded.image, "png")
    record = schema.encode_example_2d(
        image_bytes=image_bytes,
        image_format=fmt,
        height=height,
        width=width,
        channels=channels,
        mask_png=None if mask is None else encode_png_gray(mask),
        source_id=case.case_id,
    )
    return record, CaseStats(counts if mask is not None else None, (height, width), fmt, loaded.exif_orientation)


def _encode_3d(loaded: Loaded3D, case: Case, opts: EncodeOptions) -> tuple[bytes, CaseStats]:
    path = case.main_path
    vol = loaded.volume
    if vol.ndim != 4 or vol.shape[-1] != opts.channels:
        raise BadCase(path, f"volume shape {vol.shape} is not (D, H, W, {opts.channels})")
    if not np.all(np.isfinite(vol)):
        raise BadCase(path, "volume has NaN or infinite values")
    counts = None
    label = loaded.label
    if label is not None:
        if label.shape != vol.shape[:3]:
            raise BadCase(_label_file(case), f"label shape {label.shape} != volume {vol.shape[:3]}")
        counts = count_classes(label, opts, _label_file(case))
    try:
        record = schema.encode_example_3d(volume=vol, label=label, spacing=loaded.spacing, source_id=case.case_id)
    except ValueError as e:
        raise BadCase(path, str(e)) from None
    return record, CaseStats(counts, tuple(vol.shape[:3]), None)
