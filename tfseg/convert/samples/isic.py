"""Sample data in the isic layout's original file formats (``tfseg sample``, the demo and the tests)."""

from __future__ import annotations

import logging
import os

import numpy as np

from tfseg.convert.isic import MASK_SUFFIX

log = logging.getLogger(__name__)


def write(output: str, count: int, seed: int = 0, *, image_size: tuple[int, int] = (96, 128)) -> None:
    """Writes ``count`` dermoscopy-like images (skin tone, a dark irregular lesion) in the
    ISIC 2018 training layout, masks as {0, 255} PNGs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = image_size
    img_dir = os.path.join(output, "ISIC2018_Task1-2_Training_Input")
    mask_dir = os.path.join(output, "ISIC2018_Task1_Training_GroundTruth")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(mask_dir, exist_ok=True)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(count):
        cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
        r = rng.uniform(0.15, 0.3) * min(h, w)
        theta = np.arctan2(yy - cy, xx - cx)
        wobble = 1 + 0.15 * np.sin(3 * theta + rng.uniform(0, 6)) + 0.08 * np.sin(5 * theta + rng.uniform(0, 6))
        lesion = np.hypot(yy - cy, xx - cx) < r * wobble
        skin = np.array([rng.uniform(190, 235), rng.uniform(140, 180), rng.uniform(120, 160)])
        img = np.broadcast_to(skin, (h, w, 3)) * (0.9 + 0.1 * np.cos(xx / w * np.pi))[..., None]
        dark = np.array([rng.uniform(70, 120), rng.uniform(40, 80), rng.uniform(30, 60)])
        img = np.where(lesion[..., None], dark, img)
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        stem = f"ISIC_{i:07d}"
        Image.fromarray(img).save(os.path.join(img_dir, f"{stem}.jpg"), quality=92)
        Image.fromarray(lesion.astype(np.uint8) * 255).save(os.path.join(mask_dir, f"{stem}{MASK_SUFFIX}.png"))
    log.info("wrote %d ISIC-layout samples to %s", count, output)
