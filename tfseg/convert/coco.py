"""COCO-format JSON (instances or panoptic) -> semantic masks.

Most annotation tools export COCO (CVAT, Label Studio, Roboflow, ...). Recognised layouts:

- COCO itself: ``annotations/instances_{train,val}2017.json`` + ``train2017/``, ``val2017/``;
- CVAT: ``annotations/instances_default.json`` + ``images/``;
- Roboflow: ``{train,valid,test}/_annotations.coco.json`` beside the images;
- any other ``*.json`` holding ``images``, ``annotations`` and ``categories`` (``--annotations``
  names the file(s) when the search is ambiguous; ``--image-dir`` the folder ``file_name`` is
  relative to when it is not found by itself).

JSON files found: ``instances_*.json`` when there are any, else ``panoptic_*.json``, else every
other ``*.json`` (at most three folders deep) that is a COCO file. Each file's images folder is
the first of ``ROOT/<name>`` (``instances_val2017`` -> ``val2017``), ``ROOT/images/<name>``, the
JSON's own folder, ``ROOT/images``, ``ROOT`` that holds its images. When the files name at least
two of train/val/test (``instances_train2017``, ``valid/_annotations.coco.json``), those are the
splits; otherwise cases split by hash (``--split``).

Rules (instances), the same as COCO-Stuff's and most converters':

- classes: ``background`` (0), then the categories in the order of their COCO ids (1..K), names
  from the JSON; ``--categories a,b,c`` picks and orders a subset (1..n); annotations of the other
  categories are left out (their pixels are background unless a picked object covers them). A
  category no annotation uses keeps its class (with no pixels);
- polygons and RLE (compressed or not) are decoded by ``pycocotools``, the format's reference
  library, at the size the JSON gives the image;
- overlaps: the smaller object on top (objects painted in decreasing pixel area; equal areas in
  increasing annotation id, so the later annotation wins);
- ``iscrowd`` regions are the ignore index (255) wherever no non-crowd object covers them;
- a polygon part with fewer than 3 points has no area and is dropped (pycocotools alone would
  take a 2-point part for a bounding box); a polygon with an odd number of coordinates, an RLE of another
  size than its image, an unknown ``category_id`` reject the case, naming the annotation;
- images without annotations (of the picked categories): kept as all-background by default
  (``--empty-images drop`` leaves them out);
- an image whose file is not the size the JSON says rejects the case (the annotations would not
  fit it); an image listed twice with the same file and id is one case; a file listed under two
  ids (or an id listed with two files) rejects the case, naming both.

Panoptic (``panoptic_*.json`` whose annotations carry ``segments_info``, PNGs in the folder of
the JSON's name): the same code with the PNG's segments instead of rasterized objects. Classes
are the categories in id order (0..K-1), no background (COCO panoptic labels every pixel);
unlabelled (id 0) and crowd segments are 255. With ``--categories`` (or a single category)
class 0 is ``background`` (every other category) and the picked ones follow.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re

import numpy as np

from tfseg.convert.base import BACKGROUND_LABELS, BadCase, Case, Layout, LayoutInfo, Loaded2D, outside_input, read_image
from tfseg.errors import TfsegError
from tfseg.schema import IGNORE_INDEX

log = logging.getLogger(__name__)

EMPTY_IMAGES = ("keep", "drop")


def official_split(name: str) -> str | None:
    """``instances_val2017`` / ``valid`` / ``Training`` -> ``val`` / ``val`` / ``train``; None
    when the name says nothing."""
    for token in re.split(r"[^a-z]+", name.lower()):
        if token in ("train", "training", "trainval"):
            return "train"
        if token in ("val", "valid", "validation", "minival", "dev"):
            return "val"
        if token in ("test", "testing", "testdev"):
            return "test"
    return None


@dataclasses.dataclass(frozen=True)
class CocoCase(Case):
    """A case carrying its image's annotations (compact JSON), so a Beam worker needs nothing but
    the case: no worker re-reads a many-MB annotation file.

    Attributes:
      payload: ``{"json", "image_id", "height", "width", "anns": [[class, iscrowd, segmentation,
        ann_id]]}`` (instances) or ``{..., "segments": {segment id: class}}`` (panoptic).
      error: a reason found while listing (an image listed twice); the case is rejected with it.
    """

    payload: str = ""
    error: str = ""


def _load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise TfsegError(f"{path}: cannot read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TfsegError(f"{path}: not valid JSON ({getattr(e, 'msg', e)})") from None
    if not is_coco(doc):
        raise TfsegError(f"{path}: not a COCO file (needs lists 'images', 'annotations' and 'categories')")
    return doc


def is_coco(doc) -> bool:
    return isinstance(doc, dict) and all(isinstance(doc.get(k), list) for k in ("images", "annotations", "categories"))


def _is_panoptic(doc: dict) -> bool:
    return any(isinstance(a, dict) and "segments_info" in a for a in doc["annotations"][:50])


def _distinct(names: list[str], ids: list[int], taken: tuple[str, ...] = ("background",)) -> list[str]:
    """Two categories of one name (rare, but tools allow it), or one named like a class tfseg adds
    (``taken``), stay apart by their id."""
    return [n if names.count(n) == 1 and n not in taken else f"{n} (id {i})" for n, i in zip(names, ids)]


def _short_stem(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    return re.sub(r"^(instances|panoptic)_", "", stem)


def find_annotation_files(root: str, max_depth: int = 3) -> list[str]:
    """The COCO JSON files under ``root`` (module docstring for the order of preference)."""
    found = []
    base_depth = root.rstrip(os.sep).count(os.sep)
    for d, subdirs, files in os.walk(root):
        subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
        if d.count(os.sep) - base_depth >= max_depth:
            subdirs[:] = []
        found += [os.path.join(d, f) for f in sorted(files) if f.lower().endswith(".json")]
    for prefix in ("instances_", "panoptic_"):
        chosen = [p for p in found if os.path.basename(p).startswith(prefix)]
        if chosen:
            return chosen
    skip = ("captions_", "person_keypoints_", "image_info_")
    out = []
    for p in found:
        if os.path.basename(p).startswith(skip):
            continue
        try:
            with open(p, encoding="utf-8") as f:
                head = f.read(1 << 16)
        except (OSError, UnicodeDecodeError):
            continue
        if '"images"' in head or '"categories"' in head or '"annotations"' in head:
            out.append(p)
    return out


class CocoLayout(Layout):
    """COCO-format JSON + images (module docstring).

    Args:
      annotations: the JSON file(s), comma-separated, relative to the input or absolute
        (default: found under the input).
      categories: comma-separated category names (or ids) to keep, in class order.
      empty_images: ``keep`` (all background, the default) or ``drop``.
      image_dir: the folder ``file_name`` is relative to, relative to the input (default: found).
    """

    name = "coco"

    def __init__(self, annotations: str | None = None, categories: str | None = None,
                 empty_images: str = "keep", image_dir: str | None = None):
        if empty_images not in EMPTY_IMAGES:
            raise TfsegError(f"--empty-images {empty_images!r}: choose keep or drop")
        self.annotations = annotations
        self.categories = [c.strip() for c in categories.split(",") if c.strip()] if categories else None
        if categories is not None and not self.categories:
            raise TfsegError("--categories: no category named")
        self.empty_images = empty_images
        self.image_dir = image_dir
        self.panoptic = False
        self.class_names: tuple[str, ...] | None = None
        self.mapping: dict = {}
        self._all_categories: set = set()

    # ---------------------------------------------------------------------------- listing

    def info(self) -> LayoutInfo:
        if self.class_names is None:
            raise RuntimeError("CocoLayout.info() before list_cases(): the categories are not known yet")
        kind = "panoptic" if self.panoptic else "instances"
        return LayoutInfo(name=self.name, ndim=2, channels=3, class_names=self.class_names,
                          ignore_index=IGNORE_INDEX, label_mapping=dict(self.mapping),
                          label_convention=f"coco {kind}: see label_mapping['rules']")

    def _annotation_files(self, root: str) -> list[str]:
        if self.annotations:
            paths = [p.strip() for p in self.annotations.split(",") if p.strip()]
            paths = [p if os.path.isabs(p) else os.path.join(root, p) for p in paths]
            for p in paths:
                if not os.path.isfile(p):
                    raise TfsegError(f"{p}: --annotations file not found")
            return paths
        paths = find_annotation_files(root)
        if not paths:
            raise TfsegError(f"{root}: no COCO annotation file (*.json with images, annotations and categories); "
                             "pass --annotations FILE")
        return paths

    def list_cases(self, root: str) -> list[Case]:
        files = self._annotation_files(root)
        docs = [(p, _load_json(p)) for p in files]
        if not self.annotations:  # found by search: a copy of a file (top level and annotations/) is read once
            docs = self._without_copies(root, docs)
            files = [p for p, _ in docs]
        kinds = {_is_panoptic(d) for _, d in docs}
        if len(kinds) > 1:
            raise TfsegError(f"{root}: both instances and panoptic files found ({', '.join(files)}); "
                             "pick one kind with --annotations")
        self.panoptic = kinds.pop()
        cat_names = self._categories(docs)
        self._all_categories = set(cat_names)
        table, self.class_names = self._class_table(cat_names)
        splits = {p: official_split(_short_stem(p)) or official_split(os.path.basename(os.path.dirname(p)))
                  for p in files}
        use_official = len({s for s in splits.values() if s}) >= 2
        stats = {"images": 0, "empty_kept": 0, "empty_dropped": 0, "degenerate_polygons": 0,
                 "annotations_of_other_categories": 0, "annotations_without_image": 0}
        used_classes: set[int] = set()
        cases = []
        for path, doc in docs:
            cases += self._cases_of(root, path, doc, table, splits[path] if use_official else None, stats,
                                    used_classes)
        ids = [c.case_id for c in cases]
        if len(set(ids)) != len(ids):  # the same file name in two JSON files: prefix the JSON's path
            label = {p: os.path.splitext(os.path.relpath(p, root))[0].replace(os.sep, "/") for p in files}
            cases = [dataclasses.replace(c, case_id=f"{label[c.paths['annotation']]}/{c.case_id}") for c in cases]
        synthetic_background = 0 not in table.values()  # class 0 is no category: background
        unused = [n for i, n in enumerate(self.class_names)
                  if i not in used_classes and not (i == 0 and synthetic_background)]
        if unused:
            log.info("coco: %d categor%s without any annotation keep their class (no pixels): %s", len(unused),
                     "y" if len(unused) == 1 else "ies", ", ".join(unused[:10]) + (", ..." if len(unused) > 10 else ""))
        if stats["degenerate_polygons"]:
            log.warning("coco: %d polygon part(s) with fewer than 3 points dropped (no area)",
                        stats["degenerate_polygons"])
        if stats["empty_dropped"]:
            log.info("coco: %d image(s) without annotations dropped (--empty-images drop)", stats["empty_dropped"])
        self.mapping = {
            "source": "coco",
            "kind": "panoptic" if self.panoptic else "instances",
            "annotation_files": [os.path.relpath(p, root) if p.startswith(root) else p for p in files],
            "table": {str(k): v for k, v in sorted(table.items())},
            "category_names": {str(k): cat_names[k] for k in sorted(cat_names)},
            "rules": _RULES_PANOPTIC if self.panoptic else _RULES_INSTANCES,
            "empty_images": self.empty_images,
            "counts": stats,
            "categories_without_annotations": unused,
        }
        return cases

    def _categories(self, docs) -> dict[int, str]:
        names: dict[int, str] = {}
        for path, doc in docs:
            for c in doc["categories"]:
                if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
                    raise TfsegError(f"{path}: category {c!r} needs an integer 'id' and a 'name'")
                if names.setdefault(c["id"], c["name"]) != c["name"]:
                    raise TfsegError(f"{path}: category id {c['id']} is {c['name']!r} here and "
                                     f"{names[c['id']]!r} in another file")
        if not names:
            raise TfsegError(f"{docs[0][0]}: no categories")
        return names

    def _class_table(self, cat_names: dict[int, str]) -> tuple[dict[int, int], tuple[str, ...]]:
        """{COCO category id: class id} and the class names."""
        order = sorted(cat_names)
        if self.categories:
            by_name = {}
            for cid in order:
                by_name.setdefault(cat_names[cid], cid)
            picked = []
            for token in self.categories:
                if token in by_name:
                    picked.append(by_name[token])
                elif token.isdigit() and int(token) in cat_names:
                    picked.append(int(token))
                else:
                    shown = ", ".join(cat_names[c] for c in order[:20]) + (", ..." if len(order) > 20 else "")
                    raise TfsegError(f"--categories: {token!r} is not a category of the dataset ({shown})")
            if len(set(picked)) != len(picked):
                raise TfsegError(f"--categories names a category twice: {','.join(self.categories)}")
            order, first = picked, 1
        else:
            # Panoptic labels every pixel with a category: no background class, unless there is a
            # single category (a segmentation needs two classes).
            first = 0 if self.panoptic and len(order) > 1 else 1
            if first == 1 and order and order[0] == 0 and cat_names[0].lower() in BACKGROUND_LABELS:
                # labelme2coco declares the background as category 0: it is class 0, not a class of its own.
                log.info("coco: category 0 %r is the background: class 0", cat_names[0])
                return {0: 0, **{c: i + 1 for i, c in enumerate(order[1:])}}, ("background",) + tuple(
                    _distinct([cat_names[c] for c in order[1:]], order[1:]))
        names = ([] if first == 0 else ["background"]) + _distinct([cat_names[c] for c in order], order,
                                                                   () if first == 0 else ("background",))
        if len(names) > 255:
            raise TfsegError(f"{len(names)} classes: tfseg's masks hold at most 255 classes (255 is ignore); "
                             "pick fewer with --categories")
        return {c: i + first for i, c in enumerate(order)}, tuple(names)

    def _without_copies(self, root: str, docs: list) -> list:
        """``docs`` without byte-identical copies of an annotation file that name the same images
        (the same content in another folder whose images resolve elsewhere, like Roboflow's
        train/ and valid/, is not a copy); counted in ``duplicate_annotation_files``."""
        import hashlib

        def resolved_images(path, doc) -> tuple:
            images = [im for im in doc.get("images") or [] if isinstance(im, dict)]
            base = self._image_base(root, path, images)
            return tuple(os.path.realpath(_resolve(base, str(im.get("file_name", ""))) or "") for im in images)

        digests = {}
        for path, _ in docs:
            with open(path, "rb") as f:
                digests[path] = hashlib.sha256(f.read()).hexdigest()
        shared = {d for d, n in collections.Counter(digests.values()).items() if n > 1}
        seen: dict[tuple, str] = {}
        kept, copies = [], []
        for path, doc in docs:
            digest = digests[path]
            key = (digest, resolved_images(path, doc) if digest in shared else ())  # only copies are resolved
            if key in seen:
                copies.append((path, seen[key]))
                continue
            seen[key] = path
            kept.append((path, doc))
        self.duplicate_annotation_files = len(copies)
        if copies:
            log.warning("coco: %d annotation file(s) are byte-identical copies of another naming the same images, "
                        "left out (e.g. %s = %s)", len(copies), copies[0][0], copies[0][1])
        return kept

    def _image_base(self, root: str, path: str, images: list[dict]) -> str:
        if self.image_dir:
            base = self.image_dir if os.path.isabs(self.image_dir) else os.path.join(root, self.image_dir)
            if not os.path.isdir(base):
                raise TfsegError(f"{base}: --image-dir folder not found")
            return base
        stem = _short_stem(path)
        here = os.path.dirname(path)
        candidates = [os.path.join(root, stem), os.path.join(root, "images", stem), here, os.path.join(root, "images"),
                      root, os.path.join(here, "images"), os.path.join(os.path.dirname(here), stem),
                      os.path.join(os.path.dirname(here), "images")]
        if self.panoptic:
            candidates = [c for c in candidates if os.path.basename(c) != f"panoptic_{stem}"]
        names = [str(im.get("file_name", "")) for im in images[:50]]
        best, best_n = None, 0
        for c in dict.fromkeys(candidates):
            if not os.path.isdir(c):
                continue
            n = sum(_resolve(c, n) is not None for n in names)
            if n > best_n:
                best, best_n = c, n
        if best is None:
            raise TfsegError(f"{path}: none of its images found beside it (tried {', '.join(candidates[:5])}); "
                             "pass --image-dir")
        return best

    def _panoptic_dir(self, root: str, path: str) -> str:
        stem = os.path.splitext(os.path.basename(path))[0]
        here = os.path.dirname(path)
        for c in (os.path.join(here, stem), os.path.join(root, stem), os.path.join(root, "annotations", stem)):
            if os.path.isdir(c):
                return c
        raise TfsegError(f"{path}: panoptic PNG folder {stem}/ not found beside it")

    def _cases_of(self, root, path, doc, table, split, stats, used_classes) -> list[Case]:
        images = [im for im in doc["images"] if isinstance(im, dict)]
        base = self._image_base(root, path, images)
        png_dir = self._panoptic_dir(root, path) if self.panoptic else None
        # The same entry twice is one image; a file under two ids, or an id with two files, rejects
        # the case (the annotations cannot be attributed), naming both.
        entries: dict[tuple, dict] = {}
        for im in images:
            iid, fn = im.get("id"), im.get("file_name")
            if not isinstance(fn, str) or iid is None:
                raise TfsegError(f"{path}: image entry {str(im)[:80]} needs an 'id' and a 'file_name'")
            entries.setdefault((iid, fn), im)
        files_of: dict = {}
        ids_of: dict[str, list] = {}
        for iid, fn in entries:
            files_of.setdefault(iid, []).append(fn)
            ids_of.setdefault(fn, []).append(iid)
        conflicts: dict[str, str] = {}
        for fn, iids in ids_of.items():
            if len(iids) > 1:
                conflicts[fn] = f"{fn} listed twice, as image ids {', '.join(map(str, iids))}"
            elif len(files_of[iids[0]]) > 1:
                conflicts[fn] = f"image id {iids[0]} listed twice, as {' and '.join(files_of[iids[0]])}"
        known_ids = set(files_of)
        anns: dict = {}
        for a in doc["annotations"]:
            if not isinstance(a, dict):
                continue
            if a.get("image_id") not in known_ids:
                stats["annotations_without_image"] += 1
                continue
            anns.setdefault(a["image_id"], []).append(a)
        if stats["annotations_without_image"]:
            log.warning("%s: %d annotation(s) name an image id not in 'images'; left out", path,
                        stats["annotations_without_image"])
        cases = []
        for fn, iids in ids_of.items():
            iid = iids[0]
            im = entries[(iid, fn)]
            error = conflicts.get(fn, "")
            if self.panoptic:
                payload = self._panoptic_payload(anns.get(iid, []), table, png_dir, used_classes)
                if payload is None:
                    error = error or f"image id {iid} has no panoptic annotation"
                    payload = {"segments": {}, "png": ""}
                empty = False
            else:
                payload = self._instance_payload(anns.get(iid, []), table, stats, used_classes)
                empty = not payload["anns"]
            if empty and not error:
                if self.empty_images == "drop":
                    stats["empty_dropped"] += 1
                    continue
                stats["empty_kept"] += 1
            payload.update(json=path, image_id=iid, height=im.get("height"), width=im.get("width"))
            image = _resolve(base, im["file_name"]) or os.path.join(base, im["file_name"])
            if not error and outside_input(image, root) and not outside_input(base, root):
                error = (f"file_name {im['file_name']!r} resolves outside --input ({root}); tfseg reads only "
                         "inside its input")
            files = [("image", image), ("annotation", path)]
            if self.panoptic and payload.get("png"):
                files.append(("mask", payload["png"]))
            rel = os.path.splitext(im["file_name"].replace("\\", "/").lstrip("./"))[0]
            stats["images"] += 1
            cases.append(CocoCase(case_id=rel, files=tuple(files), group=rel, split=split,
                                  payload=json.dumps(payload, separators=(",", ":")), error=error))
        return cases

    def _instance_payload(self, anns, table, stats, used_classes) -> dict:
        out = []
        for a in anns:
            cat = a.get("category_id")
            if cat not in table:
                if cat in self._all_categories:
                    stats["annotations_of_other_categories"] += 1
                    continue
                out.append([-1, 0, None, a.get("id"), cat])  # rejected by load_case, naming it
                continue
            segm = a.get("segmentation")
            if isinstance(segm, list):
                parts = [p for p in segm if not (isinstance(p, list) and len(p) < 6)]
                stats["degenerate_polygons"] += len(segm) - len(parts)
                if not parts:
                    continue
                segm = parts
            elif segm is None:
                continue
            used_classes.add(table[cat])
            out.append([table[cat], int(bool(a.get("iscrowd", 0))), segm, a.get("id")])
        return {"anns": out}

    def _panoptic_payload(self, anns, table, png_dir, used_classes) -> dict | None:
        if not anns:
            return None
        a = anns[0]
        segments = {}
        for s in a.get("segments_info") or []:
            cat = s.get("category_id")
            if s.get("iscrowd"):
                cls = IGNORE_INDEX
            elif cat in table:
                cls = table[cat]
                used_classes.add(cls)
            elif self.categories and cat in self._all_categories:
                cls = 0  # another category: background
            else:
                cls = -1  # unknown category id: load_case rejects the case naming it
            segments[str(s.get("id"))] = [cls, cat]
        return {"segments": segments, "png": os.path.join(png_dir, str(a.get("file_name", "")))}

    # ---------------------------------------------------------------------------- loading

    def load_case(self, case: Case) -> Loaded2D:
        paths = case.paths
        json_path = paths["annotation"]
        if case.error:
            raise BadCase(json_path, case.error)
        p = json.loads(case.payload)
        image = paths["image"]
        if not os.path.isfile(image):
            raise BadCase(image, f"listed in {os.path.basename(json_path)} (image id {p['image_id']}) but missing")
        loaded = read_image(image, 3)
        height, width = loaded.shape[:2]
        h, w = p.get("height"), p.get("width")
        if self.panoptic:
            loaded.mask = panoptic_mask(paths.get("mask") or p.get("png") or "", p["segments"], json_path)
            return loaded
        if (h, w) != (height, width):
            if not (isinstance(h, int) and isinstance(w, int)):
                raise BadCase(json_path, f"image id {p['image_id']} has no integer height and width")
            raise BadCase(image, f"image is {width}x{height} but {os.path.basename(json_path)} lists image id "
                                 f"{p['image_id']} as {w}x{h}: its annotations do not fit the file")
        loaded.mask = rasterize(p["anns"], h, w, json_path)
        return loaded


_RULES_INSTANCES = (
    "class 0 background, categories in COCO id order (or --categories order); polygons and RLE decoded "
    "by pycocotools; the smaller object on top (painted by decreasing pixel area, ties by annotation id); "
    "iscrowd regions 255 (ignore) unless a non-crowd object covers them; polygon parts under 3 points dropped"
)
_RULES_PANOPTIC = (
    "categories in COCO id order (no background; with --categories class 0 is every other category); "
    "segment ids R + 256 G + 65536 B; id 0 (unlabelled) and iscrowd segments 255 (ignore)"
)


def _resolve(base: str, file_name: str) -> str | None:
    """The image file ``file_name`` names under ``base`` (also by its base name, for tools that
    record a path from the annotator's machine), or None."""
    p = os.path.join(base, file_name)
    if os.path.isfile(p):
        return p
    p = os.path.join(base, os.path.basename(file_name.replace("\\", "/")))
    return p if os.path.isfile(p) else None


def clip_polygon(points: np.ndarray, w: int, h: int) -> tuple[np.ndarray, int]:
    """``(clipped, outside)``: an (N, 2) x/y polygon clipped (Sutherland-Hodgman) to the box one
    pixel around a ``w`` x ``h`` image, and how many of its points lay outside that box.

    The part inside the image is unchanged, so pycocotools rasterizes the same pixels, but its
    cost is then bounded by the image: a coordinate of 1e12 would otherwise make it walk the edge
    pixel by pixel (22 GB before the kernel killed convert).
    """
    lo, hi = np.array([-1.0, -1.0]), np.array([w + 1.0, h + 1.0])
    outside = int(np.sum(np.any((points < lo) | (points > hi), axis=1)))
    if not outside:
        return points, 0
    poly = [tuple(p) for p in points]
    for axis, bound, keep_above in ((0, lo[0], True), (0, hi[0], False), (1, lo[1], True), (1, hi[1], False)):
        inside = (lambda p: p[axis] >= bound) if keep_above else (lambda p: p[axis] <= bound)
        out = []
        for i, cur in enumerate(poly):
            prev = poly[i - 1]
            if inside(cur) != inside(prev):  # the edge crosses the bound: add the crossing point
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                cross = [prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1])]
                cross[axis] = bound
                out.append(tuple(cross))
            if inside(cur):
                out.append(cur)
        poly = out
        if not poly:
            break
    return np.asarray(poly, np.float64).reshape(-1, 2), outside


def segmentation_rle(segm, h: int, w: int, ann_id, path: str):
    """One annotation's segmentation (polygons, uncompressed or compressed RLE) as a pycocotools
    RLE at (h, w), or None when nothing is left of it.

    Raises:
      BadCase: malformed polygons, an RLE of another size, an unknown kind.
    """
    from pycocotools import mask as mask_utils

    try:
        if isinstance(segm, list):
            polys, outside, total = [], 0, 0
            for part in segm:
                if not isinstance(part, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                         for v in part):
                    raise BadCase(path, f"annotation {ann_id}: polygon is not a list of numbers")
                if len(part) % 2:
                    raise BadCase(path, f"annotation {ann_id}: polygon has an odd number ({len(part)}) of coordinates")
                if len(part) >= 6:  # fewer than 3 points: no area (and pycocotools reads 4 numbers as a box)
                    points = np.asarray(part, np.float64).reshape(-1, 2)
                    if not np.all(np.isfinite(points)):
                        raise BadCase(path, f"annotation {ann_id}: polygon has a coordinate that is not a finite number")
                    clipped, n_out = clip_polygon(points, w, h)
                    outside, total = outside + n_out, total + len(points)
                    if len(clipped) >= 3:
                        polys.append(clipped.ravel().tolist())
            if outside:
                log.warning("%s: annotation %s: %d of %d polygon points lie outside the %dx%d image; the polygon was "
                            "clipped to it", path, ann_id, outside, total, w, h)
            if not polys:
                if not segm:
                    log.warning("%s: annotation %s has an empty segmentation: no area", path, ann_id)
                return None
            return mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
        if isinstance(segm, dict) and "counts" in segm and "size" in segm:
            size = [int(v) for v in segm["size"]]
            if size != [h, w]:
                raise BadCase(path, f"annotation {ann_id}: RLE of {size[1]}x{size[0]} for an image of {w}x{h}")
            if isinstance(segm["counts"], list):
                if sum(segm["counts"]) != h * w:
                    raise BadCase(path, f"annotation {ann_id}: RLE counts sum to {sum(segm['counts'])}, "
                                        f"not {w}x{h} = {h * w} pixels")
                return mask_utils.frPyObjects(segm, h, w)
            counts = segm["counts"]
            return {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    except BadCase:
        raise
    except (TypeError, ValueError, UnicodeEncodeError) as e:
        raise BadCase(path, f"annotation {ann_id}: undecodable segmentation ({e})") from None
    raise BadCase(path, f"annotation {ann_id}: segmentation is neither polygons nor RLE")


def rasterize(anns: list, h: int, w: int, path: str) -> np.ndarray:
    """Instance annotations -> (h, w) uint8 class ids by the rules of the module docstring.

    Args:
      anns: ``[class id, iscrowd, segmentation, annotation id]`` rows (class -1: an unknown
        category, the 5th item its id).
    """
    from pycocotools import mask as mask_utils

    out = np.zeros((h, w), np.uint8)
    crowd, objects = [], []
    for row in anns:
        cls, iscrowd, segm, ann_id = row[:4]
        if cls < 0:
            raise BadCase(path, f"annotation {ann_id}: category_id {row[4]} is not in the categories")
        rle = segmentation_rle(segm, h, w, ann_id, path)
        if rle is None:
            continue
        if iscrowd:
            crowd.append(rle)
        else:
            area = int(mask_utils.area(rle))
            objects.append((-area, ann_id if isinstance(ann_id, (int, float)) else 0, cls, rle))
    try:
        for rle in crowd:
            out[mask_utils.decode(rle).astype(bool)] = IGNORE_INDEX
        objects.sort(key=lambda o: (o[0], o[1]))
        for _, _, cls, rle in objects:
            out[mask_utils.decode(rle).astype(bool)] = cls
    except (TypeError, ValueError) as e:
        raise BadCase(path, f"undecodable RLE ({e})") from None
    return out


def panoptic_mask(png: str, segments: dict, json_path: str) -> np.ndarray:
    """A COCO panoptic PNG (segment id = R + 256 G + 65536 B) -> (H, W) uint8 class ids."""
    from tfseg.convert.base import read_label_image

    if not png or not os.path.isfile(png):
        raise BadCase(png or json_path, "panoptic PNG missing")
    rgb = read_label_image(png)
    if rgb.ndim != 3:
        raise BadCase(png, "panoptic PNG is not RGB")
    ids = rgb[..., 0].astype(np.int64) + 256 * rgb[..., 1].astype(np.int64) + 65536 * rgb[..., 2].astype(np.int64)
    uniq, inverse = np.unique(ids, return_inverse=True)
    lut = np.empty(len(uniq), np.uint8)
    for j, sid in enumerate(uniq.tolist()):
        if sid == 0:
            lut[j] = IGNORE_INDEX
            continue
        if str(sid) not in segments:
            raise BadCase(png, f"segment id {sid} is not in the segments_info of {os.path.basename(json_path)}")
        cls, cat = segments[str(sid)]
        if cls < 0:
            raise BadCase(json_path, f"segment {sid}: category_id {cat} is not in the categories")
        lut[j] = cls
    return lut[inverse.reshape(ids.shape)]
