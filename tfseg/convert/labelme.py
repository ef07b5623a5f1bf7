"""LabelMe JSON annotations (github.com/wkentaro/labelme): a folder of images, each with a
``STEM.json`` of shapes, rasterized into class masks.

Input: any folder (searched recursively) of LabelMe JSON files (``shapes``, ``imagePath``,
``imageHeight``, ``imageWidth``, optionally ``imageData``); each file's image is ``imagePath``
relative to the JSON, else the image of the same stem beside it, else the base64 ``imageData``
the file embeds. Images without a JSON are not annotated and are left out (logged).

Shapes, painted in the file's order (a later shape on top, as LabelMe's own ``shapes_to_label``
and ``labelme2voc`` do), filled and outlined by PIL's ImageDraw:

- ``polygon``: 3 or more points; a polygon with fewer points has no area and is dropped (LabelMe
  refuses to export it);
- ``rectangle``: two opposite corners (more points: their bounding box);
- ``circle``: the centre and a point on the circle;
- ``mask``: a base64 PNG of the box between its two points;
- ``line``, ``linestrip``, ``point``: no area, left out (counted in the log).

Classes: ``--labels`` fixes their order, as a file (one label a line, LabelMe's ``labels.txt``
convention: ``__ignore__`` marks the label whose pixels are ignored (255), ``_background_`` is
class 0) or a comma-separated list; ``background`` is class 0 when the list does not name it.
A shape whose label is not in the list rejects the case, naming the label(s). Without
``--labels`` the classes are ``background`` and every label found, sorted by name.
``__ignore__`` shapes are 255 either way. Splits: by the top folder's name when the files sit
in at least two of train/val/test folders, else by hash (``--split``).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os

import numpy as np

from tfseg import photos
from tfseg.convert.base import BACKGROUND_LABELS, BadCase, Case, Layout, LayoutInfo, Loaded2D, outside_input, read_image
from tfseg.convert.coco import official_split
from tfseg.errors import TfsegError
from tfseg.schema import IGNORE_INDEX

log = logging.getLogger(__name__)

IGNORE_LABEL = "__ignore__"
NO_AREA_SHAPES = ("line", "linestrip", "point", "points")


def parse_labels(value: str) -> list[str]:
    """``--labels``: a file of one label a line (blank lines and ``#`` comments skipped) or a
    comma-separated list -> the class names in order (``__ignore__`` left out, ``_background_``
    / ``background`` first, added when missing).

    Raises:
      TfsegError: an unreadable file, a label named twice, or background not first.
    """
    if os.path.isfile(value):
        try:
            with open(value, encoding="utf-8") as f:
                raw = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        except (OSError, UnicodeDecodeError) as e:
            raise TfsegError(f"{value}: cannot read --labels ({getattr(e, 'strerror', None) or e})") from None
        where = value
    else:
        raw = [v.strip() for v in value.split(",") if v.strip()]
        where = "--labels"
    names = [n for n in raw if n != IGNORE_LABEL]
    if not names:
        raise TfsegError(f"{where}: no label")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TfsegError(f"{where}: label {dup[0]!r} given twice")
    bg = [i for i, n in enumerate(names) if n in BACKGROUND_LABELS]
    if len(bg) > 1 or (bg and bg[0] != 0):
        raise TfsegError(f"{where}: the background label must come first (it is class 0), and only once")
    if not bg:
        names = ["background", *names]
    names[0] = "background"
    return names


def _parse_json(path: str):
    """A JSON file's content, read as UTF-8 (what LabelMe writes) or, failing that, as Latin-1
    (what LabelMe's loader reads on a Windows machine's default encoding), saying so.

    Raises:
      BadCase: unreadable, or not JSON in either encoding.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise BadCase(path, f"cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
        log.warning("%s: not UTF-8; read as Latin-1", path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadCase(path, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def _read_json(path: str) -> dict:
    doc = _parse_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list):
        raise BadCase(path, "not a LabelMe file (no 'shapes' list)")
    return doc


def _labelme_files(root: str) -> list[str]:
    """Every ``*.json`` under ``root`` that is a LabelMe file, found by parsing it (a file with its
    keys sorted, or a large ``imageData`` first, is still one), plus those that cannot be parsed
    (their cases are rejected with the reason, never skipped); JSON files of other tools (a
    ``{...}`` without ``shapes``) are left out, counted in one line."""
    out, other = [], 0
    for d, subdirs, files in os.walk(root):
        subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
        for f in sorted(files):
            if not f.lower().endswith(".json"):
                continue
            p = os.path.join(d, f)
            try:
                doc = _parse_json(p)
            except BadCase:
                out.append(p)  # rejected by the job, with the reason
                continue
            if isinstance(doc, dict) and "shapes" in doc:
                out.append(p)
            else:
                other += 1
    if other:
        log.info("labelme: %d JSON file(s) without 'shapes' (not LabelMe annotations) left out", other)
    return out


class LabelmeLayout(Layout):
    """LabelMe JSON folders (module docstring).

    Args:
      labels: class order: a file (one label a line) or a comma-separated list.
    """

    name = "labelme"

    def __init__(self, labels: str | None = None):
        self.labels_option = labels
        self.class_names: tuple[str, ...] | None = tuple(parse_labels(labels)) if labels else None
        self.counts: dict = {}
        self.root = ""  # the --input folder, set by list_cases

    def info(self) -> LayoutInfo:
        if self.class_names is None:
            raise RuntimeError("LabelmeLayout.info() before list_cases(): the labels are not known yet")
        mapping = {"labels_from": "--labels" if self.labels_option else "the labels found, sorted",
                   "rules": "shapes painted in file order (later on top) by PIL ImageDraw, fill and outline; "
                            "polygons under 3 points, lines and points left out; __ignore__ -> 255",
                   "counts": dict(self.counts)}
        return LayoutInfo(name=self.name, ndim=2, channels=3, class_names=self.class_names,
                          ignore_index=IGNORE_INDEX, label_mapping=mapping)

    def list_cases(self, root: str) -> list[Case]:
        self.root = root  # load_case reads only inside it
        files = _labelme_files(root)
        if not files:
            raise TfsegError(f"{root}: no LabelMe JSON files (*.json with 'shapes')")
        found: set[str] = set()
        no_area = few_points = 0
        stems = set()
        images: dict[str, str] = {}  # for the shard sizes; load_case finds the image again
        for p in files:
            stems.add(os.path.splitext(p)[0])
            try:
                doc = _read_json(p)
            except BadCase:
                continue  # the worker rejects it with the reason
            image = _image_file(p, doc)
            if image and not outside_input(image, root):
                images[p] = image
                stems.add(os.path.splitext(image)[0])
            for s in doc["shapes"]:
                if not isinstance(s, dict):
                    continue
                kind = s.get("shape_type") or "polygon"
                if kind in NO_AREA_SHAPES:
                    no_area += 1
                    continue
                if kind == "polygon" and len(s.get("points") or []) < 3:
                    few_points += 1
                if isinstance(s.get("label"), str):
                    found.add(s["label"])
        found -= {IGNORE_LABEL, *BACKGROUND_LABELS}
        if self.class_names is None:
            self.class_names = ("background", *sorted(found))
        unknown = sorted(found - set(self.class_names))
        if unknown:
            log.warning("labelme: label(s) not in --labels reject their cases: %s", ", ".join(unknown[:10]))
        if len(self.class_names) > 255:
            raise TfsegError(f"{len(self.class_names)} labels: tfseg's masks hold at most 255 classes")
        unannotated = 0
        for d, subdirs, names in os.walk(root):
            subdirs[:] = [s for s in subdirs if not s.startswith(".")]
            unannotated += sum(photos.is_image_name(n)
                               and os.path.join(d, os.path.splitext(n)[0]) not in stems for n in names)
        if unannotated:
            log.info("labelme: %d image(s) without a JSON file left out", unannotated)
        if no_area or few_points:
            log.info("labelme: %d line/point shape(s) and %d polygon(s) under 3 points have no area; left out",
                     no_area, few_points)
        self.counts = {"json_files": len(files), "images_without_json": unannotated,
                       "shapes_without_area": no_area, "polygons_under_3_points": few_points}
        rels = [os.path.relpath(p, root) for p in files]
        tops = {r: official_split(r.split(os.sep)[0]) if os.sep in r else None for r in rels}
        use_official = len({s for s in tops.values() if s}) >= 2
        return [Case(case_id=os.path.splitext(r)[0].replace(os.sep, "/"),
                     files=(("annotation", p),) + ((("image", images[p]),) if p in images else ()),
                     split=tops[r] if use_official else None) for p, r in zip(files, rels)]

    def load_case(self, case: Case) -> Loaded2D:
        path = case.paths["annotation"]
        doc = _read_json(path)
        loaded = _load_image(path, doc, self.root)
        height, width = loaded.shape[:2]
        h, w = doc.get("imageHeight"), doc.get("imageWidth")
        if h is not None and w is not None and (h, w) != (height, width):
            raise BadCase(path, f"shapes drawn on a {w}x{h} image, but the image is {width}x{height}")
        table = {n: i for i, n in enumerate(self.class_names)}
        table.update({IGNORE_LABEL: IGNORE_INDEX, "_background_": 0, "background": 0})
        unknown = sorted({s.get("label") for s in doc["shapes"] if isinstance(s, dict)
                          and s.get("label") not in table and (s.get("shape_type") or "polygon") not in NO_AREA_SHAPES},
                         key=str)
        if unknown:
            raise BadCase(path, f"label(s) {', '.join(map(repr, unknown))} not in --labels "
                                f"({', '.join(self.class_names[:8])}{', ...' if len(self.class_names) > 8 else ''})")
        loaded.mask = shapes_to_mask(doc["shapes"], height, width, table, path)
        return loaded


def _image_file(json_path: str, doc: dict) -> str | None:
    """The image file of a LabelMe JSON: ``imagePath`` relative to it, else its own stem with an
    image extension; None when there is none (the image may be embedded)."""
    here = os.path.dirname(json_path)
    candidates = []
    if isinstance(doc.get("imagePath"), str) and doc["imagePath"]:
        rel = doc["imagePath"].replace("\\", "/")
        candidates += [os.path.join(here, rel), os.path.join(here, os.path.basename(rel))]
    stem = os.path.splitext(json_path)[0]
    candidates += [stem + ext for ext in photos.IMAGE_EXTENSIONS] + [stem + ext.upper() for ext in photos.IMAGE_EXTENSIONS]
    return next((c for c in candidates if os.path.isfile(c) and c != json_path), None)


def _load_image(json_path: str, doc: dict, root: str) -> Loaded2D:
    """The image a LabelMe JSON annotates, as LabelMe's own loader picks it: the embedded
    ``imageData`` when there is one, else the file ``imagePath`` names (inside ``root``, the
    ``--input`` folder); as displayed (EXIF)."""
    data = doc.get("imageData")
    if data:
        try:
            raw = base64.b64decode(data, validate=False)
        except (binascii.Error, ValueError) as e:
            raise BadCase(json_path, f"imageData is not base64 ({e})") from None
        return read_image(json_path, 3, data=raw)
    image = _image_file(json_path, doc)
    if image is None:
        raise BadCase(json_path, f"image {doc.get('imagePath')!r} not found and no imageData embedded")
    if outside_input(image, root):
        raise BadCase(json_path, f"imagePath {doc.get('imagePath')!r} resolves outside --input ({root}); tfseg "
                                 "reads only inside its input")
    return read_image(image, 3)


def _draw_shape(draw, shape: dict, value, path: str, canvas=None) -> bool:
    """Draws one shape with ``value`` (fill and outline); False for shapes without area."""
    kind = shape.get("shape_type") or "polygon"
    try:
        pts = [(float(x), float(y)) for x, y in shape.get("points") or []]
    except (TypeError, ValueError):
        raise BadCase(path, f"shape {shape.get('label')!r}: points are not [x, y] pairs") from None
    if kind in NO_AREA_SHAPES:
        return False
    if kind == "polygon":
        if len(pts) < 3:
            return False
        draw.polygon(pts, outline=value, fill=value)
    elif kind == "rectangle":
        if len(pts) < 2:
            raise BadCase(path, f"rectangle {shape.get('label')!r} has {len(pts)} point(s), needs 2")
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        draw.rectangle([min(xs), min(ys), max(xs), max(ys)], outline=value, fill=value)
    elif kind == "circle":
        if len(pts) != 2:
            raise BadCase(path, f"circle {shape.get('label')!r} has {len(pts)} point(s), needs 2 (centre, edge)")
        (cx, cy), (ex, ey) = pts
        r = float(np.hypot(ex - cx, ey - cy))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=value, fill=value)
    elif kind == "mask":
        if canvas is None:
            raise BadCase(path, f"mask shape {shape.get('label')!r} cannot be drawn here")
        _paste_mask(canvas, shape, pts, value, path)
    else:
        raise BadCase(path, f"shape {shape.get('label')!r}: unknown shape_type {kind!r}")
    return True


def _paste_mask(target, shape, pts, value, path):
    from PIL import Image

    try:
        m = np.asarray(Image.open(io.BytesIO(base64.b64decode(shape.get("mask") or "")))).astype(bool)
    except (binascii.Error, ValueError, OSError) as e:
        raise BadCase(path, f"mask shape {shape.get('label')!r}: undecodable mask ({e})") from None
    if m.ndim == 3:
        m = m.any(-1)
    x0, y0 = int(round(min(p[0] for p in pts))), int(round(min(p[1] for p in pts)))
    canvas = np.array(target)
    h, w = canvas.shape[:2]
    ys, xs = np.nonzero(m)
    ys, xs = ys + y0, xs + x0
    keep = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    canvas[ys[keep], xs[keep]] = value
    target.paste(Image.fromarray(canvas))


def shapes_to_mask(shapes: list, height: int, width: int, table: dict[str, int], path: str) -> np.ndarray:
    """LabelMe shapes -> (height, width) uint8 class ids, in file order (later on top).

    Args:
      table: label -> class id (the ignore label -> 255).
    """
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for s in shapes:
        if isinstance(s, dict) and s.get("label") in table:
            _draw_shape(draw, s, table[s["label"]], path, canvas)
    return np.asarray(canvas)
