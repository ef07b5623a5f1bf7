"""Sample data in the voc layout's original file formats (``tfseg sample``, the demo and the tests)."""

from __future__ import annotations

import logging
import os

import numpy as np

from tfseg.convert.voc import voc_colormap
from tfseg.schema import IGNORE_INDEX

log = logging.getLogger(__name__)


def write(output: str, count: int, seed: int = 0, *, image_size: tuple[int, int] = (128, 160)) -> None:
    """Writes ``count`` images with 1-3 objects each (class-specific colour and shape) in the
    VOC2012 layout: palette PNG masks with 255 boundaries, official train/val lists."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = image_size
    voc = os.path.join(output, "VOCdevkit", "VOC2012")
    for d in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
        os.makedirs(os.path.join(voc, d), exist_ok=True)
    cmap = voc_colormap()
    # Class c is drawn in a fixed colour, so the sample is learnable.
    colours = np.stack([cmap[c].astype(np.float32) * 0.6 + 60 for c in range(21)])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ids = []
    for i in range(count):
        img = np.broadcast_to(rng.uniform(80, 170, 3), (h, w, 3)).copy()
        img += 20 * np.sin(xx / rng.uniform(6, 14))[..., None]
        label = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            c = int(rng.integers(1, 21))
            cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
            ry, rx = rng.uniform(0.1, 0.25) * h, rng.uniform(0.1, 0.25) * w
            if c % 2:
                obj = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            else:
                obj = (abs(yy - cy) < ry) & (abs(xx - cx) < rx)
            img[obj] = colours[c]
            label[obj] = c
        # VOC marks a thin band around objects as "void" (255).
        edge = np.zeros_like(label, bool)
        for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):
            edge |= np.roll(label, (dy, dx), (0, 1)) != label
        label[edge] = IGNORE_INDEX
        img = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)
        stem = f"2007_{i:06d}"
        ids.append(stem)
        Image.fromarray(img).save(os.path.join(voc, "JPEGImages", f"{stem}.jpg"), quality=92)
        png = Image.frombytes("P", (w, h), label.tobytes())
        png.putpalette(cmap.reshape(-1).tolist())
        png.save(os.path.join(voc, "SegmentationClass", f"{stem}.png"))
    n_val = max(1, count // 5) if count > 1 else 0
    sets = os.path.join(voc, "ImageSets", "Segmentation")
    for name, part in (("train", ids[n_val:]), ("val", ids[:n_val]), ("trainval", ids)):
        with open(os.path.join(sets, f"{name}.txt"), "w") as f:
            f.write("".join(f"{x}\n" for x in part))
    log.info("wrote %d VOC-layout samples to %s", count, output)
