"""Sample data in the cityscapes layout's original file formats (``tfseg sample``, the demo and the tests)."""

from __future__ import annotations

import logging
import os

import numpy as np

from tfseg.convert.cityscapes import IMAGE_SUFFIX, LABEL_SUFFIX

log = logging.getLogger(__name__)


def write(output: str, count: int, seed: int = 0, *, image_size: tuple[int, int] = (64, 128)) -> None:
    """Writes ``count`` street-like frames (sky, buildings, road, sidewalk, cars, persons, poles,
    the ego vehicle's bonnet) in the Cityscapes layout over two cities per split (1 in 5 to
    val), with ``labelIds`` (8-bit), ``color`` (RGB) and ``instanceIds`` (16-bit) PNGs in the
    modes the benchmark ships them."""
    from cityscapesscripts.helpers.labels import name2label
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = image_size
    yy, xx = np.mgrid[0:h, 0:w]
    ids = {n: name2label[n].id for n in ("sky", "building", "road", "sidewalk", "car", "person", "pole",
                                         "vegetation", "ego vehicle", "out of roi", "static")}
    id_colour = {label.id: label.color for label in name2label.values() if label.id >= 0}
    for i in range(count):
        split = "val" if count > 1 and i % 5 == 4 else "train"
        city = ("frankfurt", "munster")[i % 2] if split == "val" else ("aachen", "bochum")[i % 2]
        lab = np.full((h, w), ids["sky"], np.uint8)
        horizon = int(h * rng.uniform(0.35, 0.5))
        for _ in range(int(rng.integers(2, 5))):  # buildings
            x0 = int(rng.integers(0, w - 8))
            top = int(rng.integers(2, horizon - 2))
            lab[top:horizon, x0:x0 + int(rng.integers(8, w // 3))] = ids["building"]
        lab[horizon:] = ids["road"]
        side = (yy >= horizon) & (xx < (yy - horizon) * 0.8)
        lab[side] = ids["sidewalk"]
        inst = lab.astype(np.int32).copy()
        for k in range(int(rng.integers(1, 4))):  # cars on the road
            cy = int(rng.integers(horizon + 2, h - 8))
            cx = int(rng.integers(w // 4, w - 12))
            sh, sw = int(rng.integers(4, 9)), int(rng.integers(10, 20))
            lab[cy:cy + sh, cx:cx + sw] = ids["car"]
            inst[cy:cy + sh, cx:cx + sw] = ids["car"] * 1000 + k
        py, px = int(rng.integers(horizon - 4, h - 14)), int(rng.integers(2, w // 4))
        lab[py:py + 12, px:px + 3] = ids["person"]
        inst[py:py + 12, px:px + 3] = ids["person"] * 1000
        lab[:horizon + 4, int(w * 0.7):int(w * 0.7) + 2] = ids["pole"]
        lab[: h // 10, : w // 8] = ids["vegetation"]
        lab[h - h // 8:] = ids["ego vehicle"]  # the bonnet, ignored
        lab[:, :1] = ids["out of roi"]
        lab[0, w // 2] = ids["static"]
        inst = np.where(inst >= 1000, inst, lab)
        palette = {v: np.array(id_colour[v], np.float32) for v in np.unique(lab).tolist()}
        img = np.zeros((h, w, 3), np.float32)
        for v, c in palette.items():
            img[lab == v] = c * 0.7 + 40
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        colour = np.zeros((h, w, 3), np.uint8)
        for v in palette:
            colour[lab == v] = id_colour[v]
        stem = f"{city}_{i:06d}_000019"
        img_dir = os.path.join(output, "leftImg8bit", split, city)
        gt_dir = os.path.join(output, "gtFine", split, city)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(gt_dir, exist_ok=True)
        Image.fromarray(img).save(os.path.join(img_dir, stem + IMAGE_SUFFIX))
        Image.fromarray(lab).save(os.path.join(gt_dir, stem + LABEL_SUFFIX))
        Image.fromarray(colour).save(os.path.join(gt_dir, stem + "_gtFine_color.png"))
        # As the benchmark ships them: labelIds 8-bit gray, instanceIds 16-bit gray (id * 1000 + k).
        Image.fromarray(inst.astype(np.uint16)).save(os.path.join(gt_dir, stem + "_gtFine_instanceIds.png"))
    log.info("wrote %d Cityscapes-layout samples to %s", count, output)
