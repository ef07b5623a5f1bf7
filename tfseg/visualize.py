"""Class colours, palette PNG masks, overlays and legends: numpy and Pillow only.

One colour per class, the same everywhere a mask is shown (predict's PNGs and overlays, evaluate's
pictures, the export's README, TensorBoard):

* colours recorded in dataset.json: ``class_colors`` when present, else the folder layout's
  ``--palette`` (``label_mapping["palette"]``: ``{"R,G,B": class id}``);
* Pascal VOC's colour map for the ``voc`` layout (the colours of VOC's own palette PNGs);
* otherwise a fixed map of distinct colours (:data:`DISTINCT`, Kelly's colours of maximum
  contrast), class 0 black.

A predicted mask is written as a palette (mode ``P``) PNG: its pixel values are the class ids,
so every loader (``np.array(Image.open(path))``, ``tf.io.decode_png``) reads the ids unchanged,
and every image viewer shows the colours.
"""

from __future__ import annotations

import colorsys
import io
import json
import logging
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

# Kelly (1965)'s colours of maximum contrast, white and black left out, in his order: each next
# colour is the one most distinct from those before it.
DISTINCT = np.array([
    (243, 195, 0), (135, 86, 146), (243, 132, 0), (161, 202, 241), (190, 0, 50), (194, 178, 128),
    (132, 132, 130), (0, 136, 86), (230, 143, 172), (0, 103, 165), (249, 147, 121), (96, 78, 151),
    (246, 166, 0), (179, 68, 108), (220, 211, 0), (136, 45, 23), (141, 182, 0), (101, 69, 34),
    (226, 88, 34), (43, 61, 38),
], np.uint8)
IGNORE_COLOR = np.array([255, 255, 255], np.uint8)
_BACKGROUND_NAMES = {"background", "_background_", "bg", "null"}


# --------------------------------------------------------------------------------------------
# Colour maps.
# --------------------------------------------------------------------------------------------


def voc_colormap(n: int = 256) -> np.ndarray:
    """Pascal VOC's colour map: (n, 3) uint8, class 0 black, the id's bits spread over the high
    bits of R, G and B (aeroplane (128, 0, 0), bicycle (0, 128, 0), ..., 255 (224, 224, 192))."""
    out = np.zeros((n, 3), np.uint8)
    for c in range(n):
        r = g = b = 0
        cid = c
        for shift in range(7, -1, -1):
            r |= ((cid >> 0) & 1) << shift
            g |= ((cid >> 1) & 1) << shift
            b |= ((cid >> 2) & 1) << shift
            cid >>= 3
        out[c] = (r, g, b)
    return out


def default_colors(num_classes: int) -> np.ndarray:
    """The fixed map for datasets without colours: (num_classes, 3) uint8, class 0 black, then
    :data:`DISTINCT`, then hues spaced by the golden angle (all distinct, never black)."""
    out = np.zeros((max(int(num_classes), 0), 3), np.uint8)
    for c in range(1, len(out)):
        if c - 1 < len(DISTINCT):
            out[c] = DISTINCT[c - 1]
        else:
            k = c - 1 - len(DISTINCT)
            hue = (k * 0.618033988749895) % 1.0
            light = (0.45, 0.6, 0.35)[k % 3]
            out[c] = np.round(np.array(colorsys.hls_to_rgb(hue, light, 0.75)) * 255)
    return out


def _parse_rgb(key: str) -> tuple[int, int, int] | None:
    key = key.strip()
    try:
        if key.startswith("#") and len(key) == 7:
            return tuple(int(key[i: i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
        parts = [int(p) for p in key.split(",")]
    except ValueError:
        return None
    return tuple(parts) if len(parts) == 3 and all(0 <= p <= 255 for p in parts) else None  # type: ignore


def _get(info, key, default=None):
    if isinstance(info, dict):
        return info.get(key, default)
    return getattr(info, key, default)


def dataset_colors(info) -> np.ndarray:
    """The class colours of a dataset: (num_classes, 3) uint8.

    Args:
      info: a :class:`tfseg.schema.DatasetInfo` or the dict of a dataset.json.
    """
    k = int(_get(info, "num_classes") or len(_get(info, "class_names") or []) or 0)
    given = _get(info, "class_colors")
    if given is not None:
        try:
            arr = np.asarray(given, dtype=np.float64)
        except (TypeError, ValueError):  # strings, ragged rows
            arr = np.zeros((0,))
        if arr.shape == (k, 3) and np.all((arr >= 0) & (arr <= 255)):
            return arr.astype(np.uint8)
        log.warning("dataset.json class_colors: expected %d [R, G, B] triples; using the default colours", k)
    if _get(info, "name") == "voc":
        return voc_colormap(k)
    out = default_colors(k)
    pal = (_get(info, "label_mapping") or {}).get("palette")
    if isinstance(pal, dict):
        seen = set()
        for key in sorted(pal):  # the same colour for a class every time, whatever the order
            value = pal[key]
            if isinstance(value, dict):
                value = value.get("id", value.get("class_id"))
            rgb = _parse_rgb(str(key))
            if rgb is None or not isinstance(value, int) or not 0 <= value < k or value in seen:
                continue
            seen.add(value)
            out[value] = rgb
    return out


def run_colors(run_cfg: dict) -> np.ndarray:
    """The class colours of a fit run (run.json): ``class_colors`` when recorded, else those of
    the dataset.json it was trained on when that is still readable, else the fixed map."""
    k = int(run_cfg.get("num_classes") or len(run_cfg.get("class_names") or []) or 0)
    if run_cfg.get("class_colors") is not None:
        return dataset_colors({"num_classes": k, "class_colors": run_cfg["class_colors"]})
    data_dir = run_cfg.get("data_dir")
    if data_dir:
        from tfseg import schema
        from tfseg.io import fs

        try:
            info = json.loads(fs.read_text(fs.join(data_dir, schema.DATASET_JSON)))
            if int(info.get("num_classes", -1)) == k:
                return dataset_colors(info)
        except Exception:  # noqa: BLE001 - gone, unreadable (tf.errors on remote paths): the fixed map
            pass
    return default_colors(k)


def class_names_or_default(names: Sequence[str] | None, num_classes: int) -> list[str]:
    """``names`` when there is one per class, else ``class_0`` ... ``class_{K-1}``."""
    names = list(names or [])
    return names if len(names) == num_classes else [f"class_{i}" for i in range(num_classes)]


def is_background(names: Sequence[str] | None) -> bool:
    """True when class 0 is background (by its name), so overlays leave it unpainted."""
    return not names or str(names[0]).strip().lower() in _BACKGROUND_NAMES


def hex_color(rgb) -> str:
    return "#%02x%02x%02x" % tuple(int(v) for v in rgb)


# --------------------------------------------------------------------------------------------
# Palette PNGs.
# --------------------------------------------------------------------------------------------


def palette_list(colors: np.ndarray, ignore_index: int | None = None) -> list[int]:
    """A 256-entry PIL palette (768 ints): the class colours, the ignore index white, rest black."""
    pal = np.zeros((256, 3), np.uint8)
    colors = np.asarray(colors, np.uint8)[:256]
    pal[: len(colors)] = colors
    if ignore_index is not None and len(colors) <= ignore_index < 256:
        pal[ignore_index] = IGNORE_COLOR
    return pal.reshape(-1).tolist()


def palette_image(mask: np.ndarray, colors: np.ndarray, ignore_index: int | None = None):
    """A (H, W) class-id mask as a PIL ``P`` image whose indices are the ids."""
    from PIL import Image

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a palette PNG needs a (H, W) mask, got {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"class ids {mask.min()}..{mask.max()} do not fit a palette PNG (0..255)")
    h, w = mask.shape
    img = Image.frombytes("P", (w, h), np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    img.putpalette(palette_list(colors, ignore_index))
    return img


def encode_palette_png(mask: np.ndarray, colors: np.ndarray, ignore_index: int | None = None) -> bytes:
    """PNG bytes of :func:`palette_image`."""
    buf = io.BytesIO()
    palette_image(mask, colors, ignore_index).save(buf, "PNG", optimize=False)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Colouring, overlays.
# --------------------------------------------------------------------------------------------


def colorize(mask: np.ndarray, colors: np.ndarray, ignore_index: int | None = None) -> np.ndarray:
    """Class ids (H, W) -> (H, W, 3) uint8 RGB; ignore pixels white, unknown ids black."""
    mask = np.asarray(mask)
    colors = np.asarray(colors, np.uint8)
    out = np.zeros(mask.shape + (3,), np.uint8)
    valid = (mask >= 0) & (mask < len(colors))
    out[valid] = colors[mask[valid].astype(np.int64)]
    if ignore_index is not None:
        out[mask == ignore_index] = IGNORE_COLOR
    return out


def to_display(image: np.ndarray) -> np.ndarray:
    """Any (H, W), (H, W, 1) or (H, W, C) image -> (H, W, 3) uint8 for display.

    uint8 images are shown as they are (first three channels, gray repeated); float images (3D
    z-scored slices, model inputs) are stretched between their 1st and 99th percentiles, except
    float images already in 0..255 with values above 1 (2D model inputs), which are clipped.
    """
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] not in (1, 3):
        img = img[..., :1]
    if img.ndim == 2:
        img = img[..., None]
    if img.dtype != np.uint8 and img.size and np.issubdtype(img.dtype, np.floating) and img.min() >= 0 \
            and 1.5 < img.max() <= 255:
        img = np.clip(np.round(img), 0, 255).astype(np.uint8)  # a 2D model input: 0..255 floats
    if img.dtype != np.uint8:
        lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
        scale = hi - lo if hi > lo else 1.0
        img = (np.clip((img.astype(np.float64) - lo) / scale, 0, 1) * 255).astype(np.uint8)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return img


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    colors: np.ndarray,
    *,
    alpha: float = 0.5,
    ignore_index: int | None = None,
    paint_background: bool = False,
) -> np.ndarray:
    """Blends a colourized mask over an image.

    Args:
      image: (H, W[, C]) image (any dtype, see :func:`to_display`).
      mask: (H, W) class ids of the same size.
      alpha: weight of the class colour.
      paint_background: also colour class 0 (for datasets whose class 0 is a real class, like
        sky); by default class 0 leaves the image as it is.

    Returns:
      (H, W, 3) uint8.
    """
    base = to_display(image).astype(np.float64)
    mask = np.asarray(mask)
    if base.shape[:2] != mask.shape:
        raise ValueError(f"image {base.shape[:2]} and mask {mask.shape} differ in size")
    color = colorize(mask, colors, ignore_index).astype(np.float64)
    painted = np.ones(mask.shape, bool) if paint_background else mask != 0
    out = base.copy()
    out[painted] = (1 - alpha) * base[painted] + alpha * color[painted]
    return np.clip(out, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Legends and grids.
# --------------------------------------------------------------------------------------------


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=max(6, int(size)))
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _text_width(draw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return int(right - left)


def draw_legend(image: np.ndarray, entries: Sequence[tuple[str, Sequence[int]]], *, font_size: int | None = None,
                corner: str = "top-left") -> np.ndarray:
    """Draws a legend box (colour swatch + name per entry) inside an image; the size is unchanged.

    An image too small for the box (it would cover more than half of it) is returned as it is.

    Args:
      image: (H, W, 3) uint8.
      entries: (name, RGB) pairs, drawn top to bottom.
      font_size: pixels; default about 1/30 of the image's short side (at least 10).

    Returns:
      A new (H, W, 3) uint8 array.
    """
    from PIL import Image, ImageDraw

    base = Image.fromarray(np.ascontiguousarray(image, np.uint8)).convert("RGBA")
    if not entries:
        return np.asarray(base.convert("RGB"))
    h, w = base.height, base.width
    size = font_size or max(10, min(h, w) // 30)
    font = _font(size)
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    pad, row = max(2, size // 3), int(size * 1.35)
    text_w = max(_text_width(draw, name, font) for name, _ in entries)
    box_w, box_h = pad * 3 + size + text_w, pad * 2 + row * len(entries)
    if box_w * box_h > 0.5 * w * h:
        log.debug("%dx%d image: no room for a %dx%d legend", w, h, box_w, box_h)
        return np.asarray(base.convert("RGB"))
    x0 = pad if corner.endswith("left") else max(0, w - box_w - pad)
    y0 = pad if corner.startswith("top") else max(0, h - box_h - pad)
    draw.rectangle([x0, y0, x0 + box_w, y0 + box_h], fill=(0, 0, 0, 150))
    for i, (name, rgb) in enumerate(entries):
        y = y0 + pad + i * row
        draw.rectangle([x0 + pad, y + 1, x0 + pad + size, y + size], fill=tuple(int(v) for v in rgb) + (255,),
                       outline=(255, 255, 255, 255))
        draw.text((x0 + 2 * pad + size, y), name, fill=(255, 255, 255, 255), font=font)
    return np.asarray(Image.alpha_composite(base, layer).convert("RGB"))


def legend_strip(names: Sequence[str], colors: np.ndarray, width: int, *, font_size: int = 12) -> np.ndarray:
    """A (h, width, 3) uint8 strip listing every class (swatch + name), wrapped over rows."""
    from PIL import Image, ImageDraw

    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad, row = 4, int(font_size * 1.5)
    items, x, y = [], pad, pad
    for c, name in enumerate(names):
        item_w = font_size + pad + _text_width(probe, name, font) + 3 * pad
        if x + item_w > width and x > pad:
            x, y = pad, y + row
        items.append((x, y, c, name))
        x += item_w
    strip = Image.new("RGB", (int(width), y + row + pad), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for x, y, c, name in items:
        draw.rectangle([x, y + 1, x + font_size, y + font_size], fill=tuple(int(v) for v in colors[c]),
                       outline=(80, 80, 80))
        draw.text((x + font_size + pad, y), name, fill=(0, 0, 0), font=font)
    return np.asarray(strip)


def legend_entries(mask: np.ndarray, names: Sequence[str], colors: np.ndarray, *,
                   skip_background: bool = True) -> list[tuple[str, Sequence[int]]]:
    """(name, colour) of the classes present in ``mask``, in id order (class 0 left out when it
    is background, as overlays leave it unpainted)."""
    present = np.unique(np.asarray(mask))
    out = []
    for c in present.tolist():
        if (c == 0 and skip_background) or not 0 <= c < len(colors):
            continue
        out.append((names[c] if c < len(names) else f"class_{c}", colors[c]))
    return out


def overlay_with_legend(image: np.ndarray, mask: np.ndarray, names: Sequence[str], colors: np.ndarray, *,
                        alpha: float = 0.5, ignore_index: int | None = None) -> np.ndarray:
    """:func:`overlay` plus a legend of the classes present, inside the image (same size)."""
    background = is_background(names)
    out = overlay(image, mask, colors, alpha=alpha, ignore_index=ignore_index, paint_background=not background)
    return draw_legend(out, legend_entries(mask, names, colors, skip_background=background))


def grid(rows: Sequence[Sequence[np.ndarray]], *, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tiles (H, W, 3) uint8 panels into one image: rows top to bottom, panels left to right.

    Panels of different sizes get cells as large as the largest panel of their column/row.
    """
    heights = [max(p.shape[0] for p in r) for r in rows]
    ncols = max(len(r) for r in rows)
    widths = [max((r[c].shape[1] for r in rows if c < len(r)), default=0) for c in range(ncols)]
    out = np.full((sum(heights) + pad * (len(rows) + 1), sum(widths) + pad * (ncols + 1), 3), fill, np.uint8)
    y = pad
    for r, h in zip(rows, heights):
        x = pad
        for c, p in enumerate(r):
            out[y: y + p.shape[0], x: x + p.shape[1]] = p
            x += widths[c] + pad
        y += h + pad
    return out


def write_image(path: str, rgb: np.ndarray, *, quality: int = 90) -> str:
    """Writes an RGB array as PNG, or as JPEG when ``path`` ends in .jpg/.jpeg."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(rgb, np.uint8))
    if path.lower().endswith((".jpg", ".jpeg")):
        img.save(path, "JPEG", quality=quality)
    else:
        img.save(path, "PNG")
    return path
