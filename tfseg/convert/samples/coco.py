"""Sample data in the coco layout's original file formats (``tfseg sample``, the demo and the tests)."""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from tfseg.convert.coco import segmentation_rle

log = logging.getLogger(__name__)


def write(output: str, count: int, seed: int = 0, *, image_size: tuple[int, int] = (96, 128)) -> None:
    """Writes ``count`` images in COCO 2017's layout (``annotations/instances_{train,val}2017.json``,
    ``train2017/``, ``val2017/``; 1 in 5 to val): persons (ellipse polygons), cars (4-point
    polygons), dogs (triangles or compressed RLE), sometimes a crowd of persons (uncompressed
    RLE, ``iscrowd``), overlapping; every 7th image has no annotation; one polygon carries a
    2-point part; the category ``bottle`` has no annotation (COCO's own awkward cases)."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    h, w = image_size
    categories = [{"id": cid, "name": name, "supercategory": sup} for cid, name, sup in SAMPLE_CATEGORIES]
    colour = {1: (200, 60, 50), 3: (40, 70, 200), 18: (60, 170, 60)}
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    docs = {s: {"info": {"description": "tfseg sample in COCO format"}, "licenses": [], "images": [],
                "annotations": [], "categories": categories} for s in ("train2017", "val2017")}
    ann_id = 1
    for i in range(count):
        split = "val2017" if count > 1 and i % 5 == 4 else "train2017"
        img = np.broadcast_to(rng.uniform(90, 160, 3), (h, w, 3)).copy()
        img += 15 * np.sin(xx / rng.uniform(5, 12))[..., None]
        iid = i + 1
        anns = []
        for _ in range(0 if i % 7 == 6 else int(rng.integers(1, 4))):
            cat = int(rng.choice([1, 3, 18]))
            cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
            ry, rx = rng.uniform(0.1, 0.3) * h, rng.uniform(0.1, 0.3) * w
            if cat == 1:
                t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
                pts = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)
            elif cat == 3:
                pts = np.array([[cx - rx, cy - ry], [cx + rx, cy - ry], [cx + rx, cy + ry], [cx - rx, cy + ry]])
            else:
                pts = np.array([[cx, cy - ry], [cx + rx, cy + ry], [cx - rx, cy + ry]])
            poly = [round(float(v), 2) for v in np.clip(pts, 0, [w - 1, h - 1]).reshape(-1)]
            segm = [poly]
            if cat == 18 and rng.uniform() < 0.5:  # a compressed RLE object
                m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], h, w)))
                rle = mask_utils.encode(np.asfortranarray(m))
                segm = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
            elif ann_id == 2:
                segm = [poly, [round(cx, 2), round(cy, 2), round(cx + 3, 2), round(cy + 2, 2)]]  # 2 points
            anns.append({"id": ann_id, "image_id": iid, "category_id": cat, "segmentation": segm, "iscrowd": 0})
            ann_id += 1
        if i % 4 == 1:  # a crowd of small persons, uncompressed RLE
            crowd = np.zeros((h, w), bool)
            for _ in range(5):
                by, bx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
                crowd |= ((yy - by) / (0.06 * h)) ** 2 + ((xx - bx) / (0.04 * w)) ** 2 < 1
            anns.append({"id": ann_id, "image_id": iid, "category_id": 1, "iscrowd": 1,
                         "segmentation": {"size": [h, w], "counts": _rle_counts(crowd)}})
            ann_id += 1
        for a in anns:
            rle = segmentation_rle(a["segmentation"], h, w, a["id"], "sample")
            a["area"] = float(mask_utils.area(rle))
            a["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
        # The picture follows the label rules: crowd first, then objects from large to small.
        for a in sorted(anns, key=lambda a: (not a["iscrowd"], -a["area"], a["id"])):
            m = mask_utils.decode(segmentation_rle(a["segmentation"], h, w, a["id"], "sample")).astype(bool)
            img[m] = colour[a["category_id"]]
        img = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)
        file_name = f"{iid:012d}.jpg"
        os.makedirs(os.path.join(output, split), exist_ok=True)
        Image.fromarray(img).save(os.path.join(output, split, file_name), quality=92)
        docs[split]["images"].append({"id": iid, "file_name": file_name, "height": h, "width": w})
        docs[split]["annotations"] += anns
    os.makedirs(os.path.join(output, "annotations"), exist_ok=True)
    for split, doc in docs.items():
        if doc["images"]:
            with open(os.path.join(output, "annotations", f"instances_{split}.json"), "w") as f:
                json.dump(doc, f)
    log.info("wrote %d COCO-format samples to %s", count, output)


SAMPLE_CATEGORIES = ((1, "person", "person"), (3, "car", "vehicle"), (18, "dog", "animal"), (44, "bottle", "kitchen"))


def _rle_counts(mask: np.ndarray) -> list[int]:
    """An uncompressed COCO RLE of a boolean mask: run lengths in column-major order, zeros first."""
    flat = np.asarray(mask, bool).T.reshape(-1)
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat.size and flat[0] else runs
