"""Sample data in the labelme layout's original file formats (``tfseg sample``, the demo and the tests)."""

from __future__ import annotations

import base64
import io
import json
import logging
import os

import numpy as np

from tfseg.convert.labelme import IGNORE_LABEL, _draw_shape

log = logging.getLogger(__name__)


def write(output: str, count: int, seed: int = 0, *, image_size: tuple[int, int] = (96, 128)) -> None:
    """Writes ``count`` images with LabelMe 5 JSON files beside them (``cat`` polygons,
    ``box`` rectangles, ``ball`` circles, sometimes overlapping, an ``__ignore__`` polygon, a
    line shape; one file embeds its image as ``imageData`` with no image file), plus
    ``labels.txt`` in LabelMe's convention."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    h, w = image_size
    os.makedirs(output, exist_ok=True)
    colour = {"cat": (210, 140, 60), "box": (60, 90, 200), "ball": (60, 190, 90), IGNORE_LABEL: (240, 240, 240)}
    for i in range(count):
        img = Image.fromarray(np.broadcast_to(rng.uniform(70, 150, 3), (h, w, 3)).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        shapes = []
        for _ in range(int(rng.integers(1, 4))):
            kind = ("polygon", "rectangle", "circle")[int(rng.integers(0, 3))]
            cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
            r = rng.uniform(0.1, 0.25) * min(h, w)
            if kind == "polygon":
                t = np.sort(rng.uniform(0, 2 * np.pi, 6))
                pts = [[float(cx + r * np.cos(a)), float(cy + r * np.sin(a))] for a in t]
                label = "cat"
            elif kind == "rectangle":
                pts = [[float(cx - r), float(cy - r * 0.6)], [float(cx + r), float(cy + r * 0.6)]]
                label = "box"
            else:
                pts = [[float(cx), float(cy)], [float(cx + r * 0.6), float(cy)]]
                label = "ball"
            shapes.append({"label": label, "points": [[round(x, 2), round(y, 2)] for x, y in pts],
                           "group_id": None, "description": "", "shape_type": kind, "flags": {}})
        if i % 4 == 3:
            shapes.append({"label": IGNORE_LABEL, "points": [[2.0, 2.0], [20.0, 2.0], [10.0, 12.0]],
                           "group_id": None, "description": "", "shape_type": "polygon", "flags": {}})
        if i % 5 == 2:
            shapes.append({"label": "cat", "points": [[5.0, float(h - 5)], [40.0, float(h - 8)]], "group_id": None,
                           "description": "", "shape_type": "line", "flags": {}})
        for s in shapes:
            _draw_shape(draw, s, colour[s["label"]] if s["label"] in colour else (0, 0, 0), "sample")
        arr = np.clip(np.asarray(img, np.float32) + rng.normal(0, 5, (h, w, 3)), 0, 255).astype(np.uint8)
        stem = f"img_{i:04d}"
        doc = {"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": f"{stem}.jpg", "imageData": None,
               "imageHeight": h, "imageWidth": w}
        if i == 1:  # embedded image, no file
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            doc["imageData"] = base64.b64encode(buf.getvalue()).decode("ascii")
            doc["imagePath"] = f"{stem}.png"
        else:
            Image.fromarray(arr).save(os.path.join(output, f"{stem}.jpg"), quality=92)
        with open(os.path.join(output, f"{stem}.json"), "w") as f:
            json.dump(doc, f, indent=2)
    with open(os.path.join(output, "labels.txt"), "w") as f:
        f.write(f"{IGNORE_LABEL}\n_background_\ncat\nbox\nball\n")
    log.info("wrote %d LabelMe samples to %s", count, output)
