"""Sample data in the ade20k layout's original file formats (``tfseg sample``, the demo and the tests)."""

from __future__ import annotations

import logging
import os

import numpy as np

from tfseg.convert.ade20k import OBJECT_NAMES

log = logging.getLogger(__name__)


def write(output: str, count: int, seed: int = 0, *, image_size: tuple[int, int] = (96, 128),
          object_list: bool = True) -> None:
    """Writes ``count`` indoor-like scenes (wall, floor, ceiling, a window, a bed or table) in the
    ADEChallengeData2016 layout (1 in 5 to validation), annotations as 8-bit PNGs with 0 for
    unlabelled pixels, plus ``objectInfo150.txt`` (``object_list=False`` leaves it out)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = image_size
    base = os.path.join(output, "ADEChallengeData2016")
    # 1-based annotation values of the objects drawn.
    wall, floor, ceiling, window, bed, table, lamp = 1, 4, 6, 9, 8, 16, 37
    colours = {v: rng.uniform(40, 230, 3) for v in (0, wall, floor, ceiling, window, bed, table, lamp)}
    stems = []
    for i in range(count):
        folder = "validation" if count > 1 and i % 5 == 4 else "training"
        prefix = "ADE_val" if folder == "validation" else "ADE_train"
        ann = np.full((h, w), wall, np.uint8)
        top, bottom = int(h * rng.uniform(0.1, 0.2)), int(h * rng.uniform(0.6, 0.75))
        ann[:top] = ceiling
        ann[bottom:] = floor
        wh, ww = max(2, h // 10), max(4, w // 6)
        wy, wx = int(rng.integers(top + 1, max(top + 2, bottom - wh))), int(rng.integers(0, w - ww))
        ann[wy:wy + wh, wx:wx + ww] = window
        fh, fw = max(2, h // 10), max(6, w // 3)
        fy, fx = int(rng.integers(bottom - fh, h - fh)), int(rng.integers(0, w - fw))
        ann[fy:fy + fh, fx:fx + fw] = bed if i % 2 else table
        ann[top:top + max(2, h // 16), w // 2:w // 2 + max(2, w // 32)] = lamp
        ann[:3, :] = 0  # a strip nobody labelled
        img = np.zeros((h, w, 3), np.float32)
        for v, c in colours.items():
            img[ann == v] = c
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        stem = f"{prefix}_{i + 1:08d}"
        stems.append(stem)
        for sub in ("images", "annotations"):
            os.makedirs(os.path.join(base, sub, folder), exist_ok=True)
        Image.fromarray(img).save(os.path.join(base, "images", folder, stem + ".jpg"), quality=92)
        Image.fromarray(ann).save(os.path.join(base, "annotations", folder, stem + ".png"))
    if object_list:
        with open(os.path.join(base, "objectInfo150.txt"), "w", encoding="utf-8") as f:
            f.write("Idx\tRatio\tTrain\tVal\tName\n")
            for k, name in enumerate(OBJECT_NAMES, 1):
                f.write(f"{k}\t0.0\t0\t0\t{name}\n")
    with open(os.path.join(base, "sceneCategories.txt"), "w") as f:
        f.write("".join(f"{stem} bedroom\n" for stem in stems))
    log.info("wrote %d ADE20K-layout samples to %s", count, output)
