"""Sample data in the ccp layout's original file formats (``tfseg sample``, the demo and the tests)."""

from __future__ import annotations

import logging
import os

import numpy as np

from tfseg.convert.ccp import _ANNOTATIONS, _LABEL_LIST, _PHOTOS, _TRAIN_LAST_ID, CCP_TAGS
from tfseg.errors import TfsegError

log = logging.getLogger(__name__)


def write(output: str, count: int, seed: int = 0) -> None:
    """Writes ``count`` synthetic CCP cases: person-like stacks of coloured garments.

    Ids follow the official split: about 1 in 8 (at least one when ``count`` >= 2) get ids
    from 0705 on so the sample has a val split. Photos are 64 px wide and 96-112 px high
    (CCP's portrait shape); every seed class but underwear appears in some case, through
    several different tags per class so the 59 -> 14 mapping is exercised.
    """
    import scipy.io
    from PIL import Image

    if count < 1:
        raise TfsegError(f"ccp sample: --count must be >= 1, got {count}")
    rng = np.random.default_rng(seed)
    photos = os.path.join(output, _PHOTOS)
    ann = os.path.join(output, _ANNOTATIONS)
    os.makedirs(photos, exist_ok=True)
    os.makedirs(ann, exist_ok=True)
    cells = np.empty((1, len(CCP_TAGS)), dtype=object)
    cells[0, :] = list(CCP_TAGS)
    scipy.io.savemat(os.path.join(output, _LABEL_LIST), {"label_list": cells})
    n_val = max(1, round(count / 8)) if count >= 2 else 0
    ids = [i + 1 for i in range(count - n_val)] + [_TRAIN_LAST_ID + 1 + j for j in range(n_val)]
    for case_num in ids:
        image, groundtruth = _synthetic_person(rng)
        stem = f"{case_num:04d}"
        Image.fromarray(image).save(os.path.join(photos, stem + ".jpg"), quality=95)
        scipy.io.savemat(os.path.join(ann, stem + ".mat"), {"groundtruth": groundtruth},
                         do_compression=True)
    log.info("ccp sample: %d cases in %s", count, output)


def _synthetic_person(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic photo (H, 64, 3) uint8 and its groundtruth (H, 64) uint8 tag values.

    A standing figure of axis-aligned garments; each tag's colour is fixed (jittered a little)
    so colour and position both tell the classes apart.
    """
    h, w = int(rng.choice([96, 104, 112])), 64
    tag = {name: v for v, name in enumerate(CCP_TAGS)}
    gt = np.zeros((h, w), np.uint8)
    cx = w // 2 + int(rng.integers(-6, 7))

    def box(name, y0, y1, x0, x1):
        gt[max(0, int(y0)):max(0, int(y1)), max(0, int(x0)):max(0, int(x1))] = tag[name]

    def pick(part):
        return str(rng.choice(_SAMPLE_TAGS[part]))

    u = h / 16  # body unit: the figure is about 15 units tall
    box("hair", 0.6 * u, 2.6 * u, cx - 5, cx + 5)
    box("skin", 1.6 * u, 3.2 * u, cx - 4, cx + 4)            # face
    if rng.random() < 0.3:
        box("hat", 0.2 * u, 1.2 * u, cx - 7, cx + 7)
    box("skin", 3.2 * u, 8 * u, cx - 13, cx + 13)             # arms
    if rng.random() < 0.4:
        box(pick("dress"), 3.4 * u, 10.5 * u, cx - 9, cx + 9)
        legs_top = crotch = 10.5 * u
    else:
        box(pick("top"), 3.4 * u, 7.5 * u, cx - 9, cx + 9)
        legs_top, crotch = 7.5 * u, 9 * u
        legwear = pick("legs")
        if legwear == "skirt":
            box("skirt", legs_top, 10 * u, cx - 10, cx + 10)
            crotch = 10 * u
        elif legwear == "shorts":
            box("shorts", legs_top, 9.5 * u, cx - 8, cx + 8)
        else:
            box(legwear, legs_top, 13.6 * u, cx - 8, cx + 8)
    if rng.random() < 0.4:
        coat = pick("coat")
        box(coat, 3.4 * u, 8.5 * u, cx - 10, cx - 5)
        box(coat, 3.4 * u, 8.5 * u, cx + 5, cx + 10)
    legs = gt[int(legs_top):int(13.6 * u), cx - 8:cx + 8]
    legs[legs == 0] = tag["skin"]
    gt[int(crotch):int(13.6 * u), cx - 1:cx + 1] = 0         # gap between the legs
    if rng.random() < 0.4:
        box(pick("socks"), 12.6 * u, 13.6 * u, cx - 8, cx + 8)
        gt[int(12.6 * u):int(13.6 * u), cx - 1:cx + 1] = 0
    shoe = pick("shoes")
    box(shoe, 13.6 * u, 14.6 * u, cx - 9, cx - 1)
    box(shoe, 13.6 * u, 14.6 * u, cx + 1, cx + 9)
    if rng.random() < 0.3:
        box(pick("neck"), 3.2 * u, 4.6 * u, cx - 3, cx + 3)
    if rng.random() < 0.5:
        side = -1 if rng.random() < 0.5 else 1
        x0 = cx + side * 13
        box(pick("bag"), 6.5 * u, 9 * u, min(x0, x0 + side * 8), max(x0, x0 + side * 8))

    # Colours from a fixed per-tag palette (same on every run), background a noisy grey wall.
    palette = np.random.default_rng(12345).integers(30, 226, (len(CCP_TAGS), 3))
    palette[tag["skin"]] = (224, 172, 140)
    palette[tag["hair"]] = (60, 40, 25)
    image = palette[gt].astype(np.float32)
    background = gt == 0
    image[background] = rng.integers(150, 200, 3)
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), gt


# Tags the synthetic people wear, by body part; several tags per seed class.
_SAMPLE_TAGS = {
    "hat": ("hat",),
    "top": ("t-shirt", "blouse", "sweater", "shirt"),
    "coat": ("jacket", "blazer", "coat"),
    "legs": ("jeans", "pants", "shorts", "skirt", "leggings"),
    "dress": ("dress",),
    "shoes": ("boots", "heels", "sneakers", "shoes"),
    "socks": ("socks", "stockings"),
    "bag": ("bag", "purse"),
    "neck": ("scarf", "tie"),
}
