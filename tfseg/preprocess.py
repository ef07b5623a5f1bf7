"""2D preprocessing, one definition from the records to TF Serving.

Every path that turns an image into model input, and probabilities back into a mask at the
image's size, calls these functions: convert ``--image-size``, the input pipeline's evaluation
path (:mod:`tfseg.data`), :mod:`tfseg.inference` (evaluate, predict from a run), and the export
graph (:mod:`tfseg.export`), so what ``tfseg evaluate`` scores is what TF Serving computes.

The steps, in order:

1. :func:`decode_image`: encoded JPEG/PNG/GIF/BMP bytes -> (H, W, C) uint8, converted to the
   model's channels, refused from its header when above a pixel limit (no decompression bomb).
2. :func:`source_resize`: what ``convert --image-size`` did to the originals (dataset.json's
   ``preprocessing.resize``, :data:`CONVERT_RESIZE`): bilinear with antialiasing, rounded to
   uint8 and stored losslessly (PNG), so the record holds exactly these pixels. The served graph
   and predict apply it to original images; records are already at that size (a no-op).
3. :func:`to_model_size`: bilinear without antialiasing to the model's input size, as the
   training pipeline resized (a no-op at equal size).
4. :func:`resize_back`: bilinear probabilities back to the image's size, then threshold/argmax.

Masks follow images with :func:`resize_mask` (nearest neighbour). All functions take and give
tensors and run eagerly or inside a ``tf.function``.
"""

from __future__ import annotations

import numpy as np

# The resize ``convert --image-size`` applies, recorded in dataset.json (``preprocessing``) and
# carried by run.json and the export's tfseg.json, so every later stage can reproduce it.
CONVERT_RESIZE = {"method": "bilinear", "antialias": True, "dtype": "uint8", "format": "png"}
# The pixel limits of one 2D image (height x width), one place, each with its reason. They grow in
# this order, MAX_INPUT_PIXELS < DEFAULT_MAX_PIXELS < MAX_DECODE_PIXELS: a model runs at a size it
# can hold, a served request may bring a larger photo (resized in the graph), convert may read a
# larger scan (to resize with --image-size).
#   MAX_INPUT_PIXELS: the largest size a model trains or runs at (fit's image_size, every size read
#     from a run or an export): 2**24 (4096 x 4096); a typo such as 100000x100000 fails at once.
MAX_INPUT_PIXELS = 2**24
#   DEFAULT_MAX_PIXELS: the largest photo the serving graph and predict decode by default
#     (export --max-pixels): 40 M, a phone's largest.
DEFAULT_MAX_PIXELS = 40_000_000
#   MAX_DECODE_PIXELS: the largest image convert decodes, and the largest --image-size: 2**26
#     (8192 x 8192); above it a decompression bomb. One RGB case that size peaks at ~10 bytes a
#     pixel (~0.7 GB) and convert bounds the pixels its threads hold, staying under ~4 GB.
MAX_DECODE_PIXELS = 2**26


def check_size(size, where: str) -> tuple[int, ...]:
    """``size`` (h, w) or (d, h, w) read from a run, an export or an option, as ints, bounded like
    ``--image-size``.

    Raises:
      TfsegError: not positive whole numbers, or more than :data:`MAX_INPUT_PIXELS` pixels.
    """
    from tfseg.errors import TfsegError

    try:
        dims = tuple(int(s) for s in size)
        ok = all(float(s) == d for s, d in zip(size, dims)) and all(d > 0 for d in dims) and len(dims) in (2, 3)
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise TfsegError(f"{where}: size {size!r} is not 2 or 3 positive whole numbers")
    if int(np.prod(dims, dtype=np.float64)) > MAX_INPUT_PIXELS:
        shown = "x".join(map(str, dims))
        raise TfsegError(f"{where}: size {shown} exceeds the {MAX_INPUT_PIXELS:,} pixels a model runs at "
                         "(e.g. 4096x4096)")
    return dims


def check_preprocessing(preprocessing: dict, where: str) -> None:
    """A recorded ``preprocessing`` (run.json, tfseg.json): its 2D resize, if any, bounded like
    ``--image-size`` (a hand-edited 1e5 x 1e5 would exhaust memory in the graph).

    Raises:
      TfsegError: naming ``where``.
    """
    from tfseg.errors import TfsegError

    resize = preprocessing.get("resize")
    if resize is None:
        return
    if not isinstance(resize, dict) or "size" not in resize or not isinstance(resize["size"], (list, tuple)):
        raise TfsegError(f"{where}: preprocessing.resize must hold a 'size' [h, w]")
    check_size(resize["size"], f"{where}: preprocessing.resize")


def resize_record(size) -> dict:
    """dataset.json's ``preprocessing`` for a conversion that resized its images to ``size``."""
    return {"resize": dict(CONVERT_RESIZE, size=[int(s) for s in size])}


def source_size(preprocessing: dict | None):
    """The (h, w) convert resized to, or None when the records hold the original images."""
    resize = (preprocessing or {}).get("resize") or None
    return tuple(int(s) for s in resize["size"]) if resize else None


def source_resize(image, preprocessing: dict | None):
    """An original (H, W, C) image (or a (B, H, W, C) batch of one size) as ``convert
    --image-size`` stored it: float32 0..255 pixels.

    Bilinear with antialiasing to the recorded size, rounded and clipped to 0..255 (the uint8
    PNG pixels of the record). Without a recorded resize, or at that size already, the image
    is returned as float32 unchanged.
    """
    import tensorflow as tf

    image = tf.cast(image, tf.float32)
    size = source_size(preprocessing)
    if size is None:
        return image
    same = tf.reduce_all(tf.equal(tf.shape(image)[-3:-1], size))

    def resized():
        x = tf.image.resize(image, size, method="bilinear", antialias=True)
        return tf.clip_by_value(tf.round(x), 0.0, 255.0)

    return tf.cond(same, lambda: image, resized)


def to_model_size(image, size):
    """(H, W, C) or (B, H, W, C) float32 pixels resized (bilinear) to the model's (h, w)."""
    import tensorflow as tf

    image = tf.cast(image, tf.float32)
    size = tf.cast(size, tf.int32)
    hw = tf.shape(image)[-3:-1]
    same = tf.reduce_all(tf.equal(hw, size))
    return tf.cond(same, lambda: image, lambda: tf.image.resize(image, size, method="bilinear"))


def model_input(image, size, preprocessing: dict | None = None):
    """An original image as the model takes it: :func:`source_resize`, then :func:`to_model_size`."""
    return to_model_size(source_resize(image, preprocessing), size)


def uint8_model_input(image, size, preprocessing: dict | None = None):
    """An (H, W, C) image as the LiteRT and ONNX exports take it: (h, w, C) uint8 at the model's
    size, :func:`model_input` rounded to uint8 (their input is uint8 pixels). At the model's
    size already (records converted at the training size), the pixels are unchanged."""
    import numpy as np

    x = model_input(np.asarray(image), tuple(int(s) for s in size), preprocessing)
    return np.clip(np.round(np.asarray(x)), 0, 255).astype(np.uint8)


def resize_mask(mask, size):
    """(H, W, 1) labels resized with nearest neighbour to ``size`` (a no-op at equal size)."""
    import tensorflow as tf

    mask = tf.convert_to_tensor(mask)
    size = tf.cast(size, tf.int32)
    same = tf.reduce_all(tf.equal(tf.shape(mask)[-3:-1], size))
    return tf.cond(same, lambda: mask, lambda: tf.image.resize(mask, size, method="nearest"))


def affine_row(in_hw, out_hw, *, flip_x, flip_y, cos, sin, zoom, shift_x, shift_y, base_hw=None):
    """Augment-then-resize as one map: the six coefficients of the sampling transform.

    The augmentation acts on the source image about its centre, in source pixels: flip, zoom,
    rotate (``cos``, ``sin`` of the angle), then shift. The resize uses half-pixel centres, like
    ``tf.image.resize``; with no augmentation and equal sizes the map is the identity. Plain
    arithmetic, so Python floats, numpy values and TensorFlow tensors all work (the tf.data
    augmentation, :func:`tfseg.data.augment.affine_transform`, and tools that run without
    TensorFlow).

    Args:
      in_hw: source height and width; out_hw: output height and width.
      flip_x, flip_y: -1.0 to flip along width / height, 1.0 otherwise.
      zoom: magnification (> 1 enlarges the content); shift_x, shift_y: in source pixels.
      base_hw: the size the source is resized to when the output is a centred window of it (a
        crop); None: ``out_hw``.

    Returns:
      (a0, a1, a2, b0, b1, b2): output pixel (x, y) samples source pixel
      (a0 x + a1 y + a2, b0 x + b1 y + b2).
    """
    hi, wi = in_hw
    ho, wo = out_hw
    hb, wb = out_hw if base_hw is None else base_hw
    # The forward map on centred source coordinates is q = R(angle) * zoom * F * p + t;
    # sampling needs its inverse, p = F * R(-angle) / zoom * (q - t), composed with the
    # resize q = diag(wi/wo, hi/ho) * o.
    c, s = cos / zoom, sin / zoom
    a00, a01 = flip_x * c, flip_x * s
    a10, a11 = -flip_y * s, flip_y * c
    sx, sy = wi / wb, hi / hb
    m00, m01, m10, m11 = a00 * sx, a01 * sy, a10 * sx, a11 * sy
    ox, oy = 0.5 - wo / 2.0, 0.5 - ho / 2.0
    tx = a00 * shift_x + a01 * shift_y
    ty = a10 * shift_x + a11 * shift_y
    a2 = m00 * ox + m01 * oy - tx + wi / 2.0 - 0.5
    b2 = m10 * ox + m11 * oy - ty + hi / 2.0 - 0.5
    return m00, m01, a2, m10, m11, b2


def resize_back(probs, size):
    """(h, w, K) or (B, h, w, K) probabilities resized (bilinear) to the image's (H, W)."""
    import tensorflow as tf

    return tf.image.resize(probs, size, method="bilinear")


def convert_resize(image: np.ndarray, mask: np.ndarray | None, size) -> tuple[np.ndarray, np.ndarray | None]:
    """What ``convert --image-size`` stores: uint8 (h, w, C) pixels and (h, w) labels, numpy."""
    import tensorflow as tf

    if image.ndim == 2:
        image = image[..., None]
    rec = resize_record(size)
    out = source_resize(tf.constant(image), rec).numpy().astype(np.uint8)
    if mask is not None:
        mask = resize_mask(tf.constant(mask[..., None] if mask.ndim == 2 else mask), size).numpy()[..., 0]
    return out, mask


# --------------------------------------------------------------------------------------------
# Decoding with header checks (bytes from clients are untrusted).
# --------------------------------------------------------------------------------------------


def _le(head, start: int, n: int):
    """Little-endian unsigned integer from bytes head[start:start+n] (int64 tensor)."""
    import tensorflow as tf

    return tf.add_n([head[start + i] * (1 << (8 * i)) for i in range(n)]) if n > 1 else head[start]


def _be(head, start: int, n: int):
    import tensorflow as tf

    return tf.add_n([head[start + i] * (1 << (8 * (n - 1 - i))) for i in range(n)])


def _header_check(data, max_pixels: int):
    """Asserts that ``data`` is a non-empty JPEG/PNG/GIF/BMP within ``max_pixels``, from its header.

    Checking the header before decoding means a small file announcing a huge image (a
    decompression bomb) is refused without allocating it.

    Returns:
      A list of assertion ops to use as control dependencies.
    """
    import tensorflow as tf

    not_empty = tf.debugging.assert_greater(
        tf.strings.length(data), 0, message="empty image string"
    )
    with tf.control_dependencies([not_empty]):
        magic4 = tf.strings.substr(data, 0, 4)
    is_png = tf.equal(magic4, b"\x89PNG")
    is_gif = tf.equal(tf.strings.substr(data, 0, 3), b"GIF")
    is_bmp = tf.equal(tf.strings.substr(data, 0, 2), b"BM")
    is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")
    # Zero-padding to 32 bytes keeps the header slices in range for truncated files, whose
    # decoding then fails on its own.
    padded = tf.strings.substr(tf.strings.join([data, tf.constant(b"\0" * 32)]), 0, 32)
    head = tf.cast(tf.io.decode_raw(padded, tf.uint8), tf.int64)
    # The first bytes go into the error as numbers: raw bytes (WebP, binary junk) would make the
    # message undecodable for clients (a UnicodeDecodeError instead of InvalidArgument).
    known = tf.debugging.Assert(
        is_png | is_gif | is_bmp | is_jpeg,
        ["input is not a JPEG, PNG, GIF or BMP image; its first bytes are", head[:8]],
    )

    def jpeg_hw():
        shape = tf.io.extract_jpeg_shape(data, output_type=tf.int32)
        return tf.cast(shape[0], tf.int64), tf.cast(shape[1], tf.int64)

    bmp_h = _le(head, 22, 4)
    bmp_h = tf.abs(tf.where(bmp_h >= 2**31, bmp_h - 2**32, bmp_h))  # negative = top-down rows
    h, w = tf.case(
        [
            (is_png, lambda: (_be(head, 20, 4), _be(head, 16, 4))),
            (is_gif, lambda: (_le(head, 8, 2), _le(head, 6, 2))),
            (is_bmp, lambda: (bmp_h, _le(head, 18, 4))),
            (is_jpeg, jpeg_hw),
        ],
        default=lambda: (tf.constant(0, tf.int64), tf.constant(0, tf.int64)),
    )
    with tf.control_dependencies([known]):
        size_ok = tf.debugging.assert_less_equal(
            h * w, tf.constant(max_pixels, tf.int64),
            message=f"image larger than the limit of {max_pixels} pixels",
        )
    return [not_empty, known, size_ok], is_gif | is_bmp


# How far into a file the EXIF orientation is looked for: a JPEG's APP1 segment is at most 64 KiB and
# comes before the image data; a PNG's eXIf chunk comes before its first IDAT.
_EXIF_SCAN_BYTES = 1 << 18
_EXIF_MAX_SEGMENTS = 64  # JPEG segments / PNG chunks walked before giving up
_EXIF_MAX_ENTRIES = 64  # IFD0 entries read (a phone writes about a dozen)


def exif_orientation(data):
    """The EXIF orientation (1-8) of encoded image bytes, in the graph: a JPEG's APP1 ``Exif``
    segment or a PNG's ``eXIf`` chunk, IFD0 tag 0x0112 in either byte order; 1 when absent, out
    of range or unreadable (the pixels are still the image). The graph twin of
    :func:`tfseg.photos.orientation`, for the serving signature's decoder: TensorFlow's decoders
    ignore the tag."""
    import tensorflow as tf

    padded = tf.strings.join([tf.strings.substr(data, 0, _EXIF_SCAN_BYTES), tf.constant(b"\0" * 16)])
    b = tf.cast(tf.io.decode_raw(padded, tf.uint8), tf.int64)  # 4-byte offsets overflow int32
    last = tf.shape(b, out_type=tf.int64)[0] - 1

    def i64(v):
        return tf.constant(v, tf.int64)

    def uint(pos, n, little):
        idx = tf.clip_by_value(pos[..., None] + tf.range(n, dtype=tf.int64), 0, last)
        v = tf.gather(b, idx)
        weights = tf.where(little, i64([256**k for k in range(n)]), i64([256**k for k in range(n - 1, -1, -1)]))
        return tf.reduce_sum(v * weights, axis=-1)

    def tag_at(pos, text: bytes):
        return tf.reduce_all(tf.gather(b, tf.clip_by_value(pos + tf.range(len(text), dtype=tf.int64), 0, last))
                             == i64(list(text)))

    big = tf.constant(False)
    is_jpeg = tag_at(i64(0), b"\xff\xd8")
    is_png = tag_at(i64(0), b"\x89PNG\r\n\x1a\n")

    def step(i, pos, found):
        # JPEG: FF marker, 2-byte length (counting itself); APP1 "Exif\0\0" holds a TIFF block.
        jpeg_next = pos + 2 + uint(pos + 2, 2, big)
        jpeg_found = (uint(pos, 2, big) == 0xFFE1) & tag_at(pos + 4, b"Exif\0\0")
        jpeg_stop = (b[tf.minimum(pos, last)] != 0xFF) | (uint(pos, 2, big) == 0xFFDA)
        # PNG: 4-byte length, 4-byte type, data, 4-byte CRC; eXIf's data is the TIFF block.
        png_next = pos + 12 + uint(pos, 4, big)
        png_found = tag_at(pos + 4, b"eXIf")
        png_stop = tag_at(pos + 4, b"IDAT") | tag_at(pos + 4, b"IEND")
        found_here = tf.where(is_jpeg, jpeg_found, png_found)
        stop = tf.where(is_jpeg, jpeg_stop, png_stop)
        tiff = tf.where(is_jpeg, pos + 10, pos + 8)
        found = tf.where(found_here & ~stop, tiff, tf.where(stop, i64(-2), found))
        return i + 1, tf.where(is_jpeg, jpeg_next, png_next), found

    def more(i, pos, found):
        return (i < _EXIF_MAX_SEGMENTS) & (found == -1) & (pos < last)

    start = tf.where(is_jpeg, i64(2), i64(8))
    _, _, tiff = tf.while_loop(more, step, (tf.constant(0), start, tf.where(is_jpeg | is_png, i64(-1), i64(-2))))
    order = uint(tiff, 2, big)
    little = tf.equal(order, 0x4949)  # "II"; "MM" is big-endian
    valid = (tiff >= 0) & (little | tf.equal(order, 0x4D4D)) & tf.equal(uint(tiff + 2, 2, little), 42)
    ifd = tiff + uint(tiff + 4, 4, little)
    count = uint(ifd, 2, little)
    entries = ifd + 2 + 12 * tf.range(_EXIF_MAX_ENTRIES, dtype=tf.int64)
    tags = uint(entries, 2, little)
    kinds = uint(entries + 2, 2, little)
    values = tf.where(kinds == 4, uint(entries + 8, 4, little), uint(entries + 8, 2, little))
    hit = (tf.range(_EXIF_MAX_ENTRIES, dtype=tf.int64) < count) & tf.equal(tags, 0x0112)
    value = tf.reduce_max(tf.where(hit, values, i64(0)))
    return tf.cast(tf.where(valid & (value >= 1) & (value <= 8), value, i64(1)), tf.int32)


def orient(image, orientation):
    """(H, W, C) pixels turned as EXIF ``orientation`` says (the graph twin of
    :func:`tfseg.photos.orient_array`): H and W swap for orientations 5-8."""
    import tensorflow as tf

    branches = [  # each computed only when taken (eager callers decode one photo at a time)
        lambda: image,
        lambda: tf.reverse(image, [1]),
        lambda: tf.reverse(image, [0, 1]),
        lambda: tf.reverse(image, [0]),
        lambda: tf.transpose(image, [1, 0, 2]),
        lambda: tf.image.rot90(image, 3),  # 90 degrees clockwise
        lambda: tf.transpose(tf.reverse(image, [0, 1]), [1, 0, 2]),
        lambda: tf.image.rot90(image, 1),
    ]
    out = tf.switch_case(tf.cast(orientation, tf.int32) - 1, branches)
    out.set_shape([None, None, image.shape[-1]])
    return out


def decode_image(data, channels: int, max_pixels: int):
    """Validated decode of one encoded image (graph or eager).

    Args:
      data: scalar tf.string, JPEG/PNG/GIF/BMP bytes.
      channels: 1 (converted to gray) or 3 (gray images are repeated to RGB).
      max_pixels: largest height x width accepted.

    Returns:
      (H, W, channels) uint8.

    Raises:
      tf.errors.InvalidArgumentError: empty, not an image, corrupt, or above ``max_pixels``.
    """
    import tensorflow as tf

    checks, gif_or_bmp = _header_check(data, max_pixels)
    with tf.control_dependencies(checks):
        if channels == 1:
            # GIF and BMP decoders only produce colour; convert after decoding.
            image = tf.cond(
                gif_or_bmp,
                lambda: tf.image.rgb_to_grayscale(tf.io.decode_image(data, channels=3, expand_animations=False)),
                lambda: tf.io.decode_image(data, channels=1, expand_animations=False),
            )
        else:
            image = tf.io.decode_image(data, channels=channels, expand_animations=False)
    image = orient(image, exif_orientation(data))  # as displayed, like every tfseg reader of photos
    image.set_shape([None, None, channels])
    shape = tf.shape(image)
    decoded_ok = tf.debugging.assert_less_equal(
        tf.cast(shape[0], tf.int64) * tf.cast(shape[1], tf.int64), tf.constant(max_pixels, tf.int64),
        message=f"image larger than the limit of {max_pixels} pixels",
    )
    with tf.control_dependencies([decoded_ok]):
        return tf.identity(image)


