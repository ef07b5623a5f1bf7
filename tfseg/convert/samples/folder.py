"""Sample data in the folder layout's original file formats (``tfseg sample``, the demo and the tests)."""

from __future__ import annotations

import logging
import os

import numpy as np

log = logging.getLogger(__name__)


def write(output: str, count: int, seed: int = 0, *, image_size: tuple[int, int] = (64, 128)) -> None:
    """Writes ``count`` finger-vein-like grayscale images (a bright finger band crossed by
    dark branching veins) to ``images/`` and {0, 255} vein masks to ``masks/`` (same stems)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = image_size
    os.makedirs(os.path.join(output, "images"), exist_ok=True)
    os.makedirs(os.path.join(output, "masks"), exist_ok=True)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(count):
        finger = np.exp(-(((yy - h / 2) / (0.38 * h)) ** 6))
        img = 40 + 150 * finger
        veins = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(2, 5))):
            y0, amp = rng.uniform(0.3, 0.7) * h, rng.uniform(0.03, 0.12) * h
            freq, phase = rng.uniform(1, 3), rng.uniform(0, 6)
            centre = y0 + amp * np.sin(2 * np.pi * freq * xx[0] / w + phase)
            thick = rng.uniform(1.0, 2.0)
            x0, x1 = sorted(rng.uniform(0, w, 2))
            x1 = max(x1, x0 + w / 3)
            veins |= (np.abs(yy - centre[None, :]) < thick) & (xx >= x0) & (xx <= x1)
        veins &= finger > 0.5
        img = img - 45 * veins
        img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
        stem = f"vein_{i:04d}"
        Image.fromarray(img).save(os.path.join(output, "images", f"{stem}.png"))
        Image.fromarray(veins.astype(np.uint8) * 255).save(os.path.join(output, "masks", f"{stem}.png"))
    log.info("wrote %d folder-layout (finger vein) samples to %s", count, output)
