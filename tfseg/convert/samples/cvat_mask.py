"""Sample data in the cvat_mask layout's original file formats (``tfseg sample``, the demo and the tests)."""

from __future__ import annotations

import logging
import os

import numpy as np

from tfseg.convert.cvat_mask import LABELMAP

log = logging.getLogger(__name__)


def write(output: str, count: int, seed: int = 0, *, image_size: tuple[int, int] = (96, 128)) -> None:
    """Writes ``count`` images in CVAT's segmentation-mask export: ``labelmap.txt``
    (background, road, car, tree), ``ImageSets/Segmentation/default.txt``, ``JPEGImages``,
    RGB ``SegmentationClass`` and ``SegmentationObject`` PNGs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = image_size
    labels = (("background", (0, 0, 0)), ("road", (128, 64, 128)), ("car", (250, 50, 83)),
              ("tree", (51, 221, 255)))
    for d in ("JPEGImages", "SegmentationClass", "SegmentationObject", os.path.join("ImageSets", "Segmentation")):
        os.makedirs(os.path.join(output, d), exist_ok=True)
    with open(os.path.join(output, LABELMAP), "w") as f:
        f.write("# label:color_rgb:parts:actions\n")
        f.write("".join(f"{n}:{','.join(map(str, c))}::\n" for n, c in labels))
    tint = [np.array(c, np.float32) * 0.6 + 50 for _, c in labels]
    ids = []
    for i in range(count):
        cls_map = np.zeros((h, w), np.uint8)
        obj = np.zeros((h, w), np.uint8)
        cls_map[int(h * rng.uniform(0.55, 0.7)):] = 1
        for k in range(int(rng.integers(1, 3))):
            y, x = int(rng.integers(h // 2, h - 12)), int(rng.integers(0, w - 24))
            cls_map[y:y + 10, x:x + 22] = 2
            obj[y:y + 10, x:x + 22] = k + 1
        tx = int(rng.integers(0, w - 12))
        cls_map[5:h // 2, tx:tx + 10] = 3
        img = np.zeros((h, w, 3), np.float32)
        for c in range(len(labels)):
            img[cls_map == c] = tint[c]
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        stem = f"frame_{i:06d}"
        ids.append(stem)
        Image.fromarray(img).save(os.path.join(output, "JPEGImages", stem + ".jpg"), quality=92)
        rgb = np.array([c for _, c in labels], np.uint8)[cls_map]
        Image.fromarray(rgb).save(os.path.join(output, "SegmentationClass", stem + ".png"))
        obj_rgb = np.stack([obj * 80, obj * 40, obj * 20], -1).astype(np.uint8)
        Image.fromarray(obj_rgb).save(os.path.join(output, "SegmentationObject", stem + ".png"))
    with open(os.path.join(output, "ImageSets", "Segmentation", "default.txt"), "w") as f:
        f.write("".join(f"{x}\n" for x in ids))
    log.info("wrote %d CVAT segmentation-mask samples to %s", count, output)
