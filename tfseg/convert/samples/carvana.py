"""Sample data in the carvana layout's original file formats (``tfseg sample``, the demo and the tests)."""

from __future__ import annotations

import csv
import logging
import os

import numpy as np

from tfseg.convert.carvana import MASK_CSV, MASK_DIR, rle_encode

log = logging.getLogger(__name__)


def write(output: str, count: int, seed: int = 0, *, image_size: tuple[int, int] = (128, 192),
          rle: bool = False, noise: float = 4.0) -> None:
    """Writes ``count`` car photos (JPEG) with GIF masks (or ``train_masks.csv`` if ``rle``).

    Cars have 16 views each (4 for fewer than 160 images, so small samples still split):
    a bright car-like body of random colour on a gray studio background with a floor
    shadow, its position and length changing with the view. ``noise`` is the pixel noise's
    standard deviation (lower gives smaller JPEGs, like Carvana's studio photos).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = image_size
    os.makedirs(os.path.join(output, "train"), exist_ok=True)
    if not rle:
        os.makedirs(os.path.join(output, MASK_DIR), exist_ok=True)
    views = 16 if count >= 160 else 4
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rows = []
    for i in range(count):
        if i % views == 0:
            cid = "".join(rng.choice(list("0123456789abcdef"), 12))
            colour = rng.uniform(120, 255, 3)
            scale = rng.uniform(0.8, 1.0)
        view = i % views + 1
        angle = 2 * np.pi * (view - 1) / views
        length = (0.3 + 0.12 * abs(np.cos(angle))) * w * scale
        cx = w / 2 + rng.uniform(-0.05, 0.05) * w
        cy = h * 0.58
        body = ((xx - cx) / length) ** 2 + ((yy - cy) / (0.16 * h * scale)) ** 2 < 1
        cabin = ((xx - cx - 0.1 * length * np.sin(angle)) / (0.55 * length)) ** 2 + (
            (yy - cy + 0.15 * h * scale) / (0.12 * h * scale)) ** 2 < 1
        wheels = np.zeros_like(body)
        for dx in (-0.6, 0.6):
            wheels |= (xx - cx - dx * length) ** 2 + (yy - cy - 0.12 * h * scale) ** 2 < (0.07 * h * scale) ** 2
        car = body | (cabin & (yy < cy)) | wheels
        background = 90 + 60 * yy / h + rng.normal(0, 0.75 * noise, (h, w))
        shadow = ((xx - cx) / (1.1 * length)) ** 2 + ((yy - cy - 0.2 * h * scale) / (0.05 * h)) ** 2 < 1
        img = np.repeat((background - 40 * shadow)[..., None], 3, -1)
        img[car] = colour * (0.85 + 0.15 * np.sin(xx[car] / 7.0))[:, None]
        img[wheels] = 30
        img = np.clip(img + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)
        stem = f"{cid}_{view:02d}"
        Image.fromarray(img).save(os.path.join(output, "train", f"{stem}.jpg"), quality=92)
        mask = car.astype(np.uint8)
        if rle:
            rows.append((f"{stem}.jpg", rle_encode(mask)))
        else:
            gif = Image.frombytes("P", (w, h), mask.tobytes())
            gif.putpalette([0, 0, 0, 255, 255, 255] + [0, 0, 0] * 254)
            gif.save(os.path.join(output, MASK_DIR, f"{stem}_mask.gif"))
    if rle:
        with open(os.path.join(output, MASK_CSV), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["img", "rle_mask"])
            writer.writerows(rows)
    log.info("wrote %d Carvana-layout samples to %s", count, output)
