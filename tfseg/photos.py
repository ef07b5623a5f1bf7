"""Photographs as the person who took or annotated them saw them: the file types tfseg reads as
images, and EXIF orientation applied once, the same way, everywhere a photo is read.

A phone stores a JPEG as its sensor read it and writes the rotation a viewer must apply in the EXIF
``Orientation`` tag (1-8). Annotation tools (LabelMe, CVAT, COCO tools) show the rotated image and
store polygons and masks in its coordinates, so a reader that ignores the tag pairs a sideways or
upside-down image with its mask. Every tfseg reader of photos (convert's layouts, predict,
evaluate) applies the tag through :func:`oriented`, the serving signature's decoder through its
graph twin :func:`tfseg.preprocess.exif_orientation`, and a file read with a tag other than 1 is
said so in the record (``exif_orientation``).
"""

from __future__ import annotations

# The image file types tfseg reads as photos (convert's layouts and predict's inputs), lower case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# EXIF tag 0x0112: how to turn the stored pixels into the displayed image.
ORIENTATION_TAG = 0x0112
# orientation -> (PIL transpose operation or None), the same table as PIL.ImageOps.exif_transpose.
_TRANSPOSE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
              6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}


def is_image_name(name: str) -> bool:
    """Whether a file name has one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def orientation(img) -> int:
    """The EXIF orientation (1-8) of an opened PIL image; 1 when absent or not a valid value."""
    try:
        value = img.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels are still the image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def oriented(img):
    """``(image, orientation)``: the PIL image turned as its EXIF orientation says (a new image
    unless the orientation is 1), and the orientation that was applied."""
    value = orientation(img)
    if value == 1:
        return img, 1
    from PIL import Image

    return img.transpose(getattr(Image.Transpose, _TRANSPOSE[value])), value


def displayed_size(img) -> tuple[int, int]:
    """(width, height) of the image as displayed: swapped for orientations 5-8 (90-degree turns)."""
    w, h = img.size
    return (h, w) if orientation(img) >= 5 else (w, h)


def orient_array(pixels, value: int):
    """The numpy equivalent of :func:`oriented` on an (H, W, ...) array already decoded without
    the tag (for readers that decode through TensorFlow)."""
    import numpy as np

    a = pixels
    turned = {1: a, 2: a[:, ::-1], 3: a[::-1, ::-1], 4: a[::-1], 5: np.swapaxes(a, 0, 1),
              6: np.rot90(a, -1), 7: np.swapaxes(a[::-1, ::-1], 0, 1), 8: np.rot90(a, 1)}[value]
    return np.ascontiguousarray(turned)


def as_displayed(data: bytes) -> tuple[bytes, int]:
    """``(bytes, orientation)``: an encoded photo as displayed, for readers that decode with
    TensorFlow (whose decoders ignore EXIF): the bytes unchanged when the orientation is 1 or the
    file is not an image PIL reads (the decoder then says what is wrong), else the turned pixels
    as a PNG."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            value = orientation(img)
            if value == 1:
                return data, 1
            turned, _ = oriented(img)
            out = io.BytesIO()
            turned.save(out, format="PNG")
    except Exception:  # noqa: BLE001 - not for us to judge: the model's decoder reports it
        return data, 1
    return out.getvalue(), value
