"""ADE20K scene parsing (the MIT SceneParsing benchmark, ``ADEChallengeData2016``): 150 classes.

Input layout (``ADEChallengeData2016.zip``)::

    ROOT/ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_NNNNNNNN.jpg
    ROOT/ADEChallengeData2016/annotations/{training,validation}/ADE_{train,val}_NNNNNNNN.png
    ROOT/ADEChallengeData2016/objectInfo150.txt          (Idx, Ratio, Train, Val, Name; tab-separated)
    ROOT/ADEChallengeData2016/sceneCategories.txt         (not read)

The input may be the folder holding ``ADEChallengeData2016`` or that folder itself. Annotation
value 0 ("other objects", unlabelled) becomes the ignore index 255 and value ``k`` (1..150) class
``k - 1``: the benchmark's own rule (its evaluation ignores 0), as in mmsegmentation's
``reduce_zero_label``. A value above 150 rejects the case, naming it.

Class names come from the dataset's object list, ``objectInfo150.txt`` (or ``objectInfo150.csv``
from the benchmark's repository) when it is there; otherwise from the built-in list,
:data:`OBJECT_NAMES` (the same 150 entries). Each class is named by the first synonym
(``"building, edifice"`` -> ``building``); the full entries are kept in dataset.json
(``label_mapping["source_names"]``), and ``label_mapping["names_from"]`` says which list was used.

The splits are the official ``training`` -> train and ``validation`` -> val. ``images/testing``
(the challenge's test release, no annotations) is left out.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re

import numpy as np

from tfseg import photos
from tfseg.convert.base import BadCase, Case, Layout, LayoutInfo, Loaded2D, read_image, read_label_image
from tfseg.errors import TfsegError
from tfseg.schema import IGNORE_INDEX

log = logging.getLogger(__name__)

NUM_CLASSES = 150
SPLITS = {"training": "train", "validation": "val"}
OBJECT_LISTS = ("objectInfo150.txt", "objectInfo150.csv")

# objectInfo150.txt's Name column, in its order (class k - 1 is annotation value k).
OBJECT_NAMES = (
    "wall", "building, edifice", "sky", "floor, flooring", "tree", "ceiling", "road, route", "bed",
    "windowpane, window", "grass", "cabinet", "sidewalk, pavement",
    "person, individual, someone, somebody, mortal, soul", "earth, ground", "door, double door", "table",
    "mountain, mount", "plant, flora, plant life", "curtain, drape, drapery, mantle, pall", "chair",
    "car, auto, automobile, machine, motorcar", "water", "painting, picture", "sofa, couch, lounge", "shelf",
    "house", "sea", "mirror", "rug, carpet, carpeting", "field", "armchair", "seat", "fence, fencing", "desk",
    "rock, stone", "wardrobe, closet, press", "lamp", "bathtub, bathing tub, bath, tub", "railing, rail",
    "cushion", "base, pedestal, stand", "box", "column, pillar", "signboard, sign",
    "chest of drawers, chest, bureau, dresser", "counter", "sand", "sink", "skyscraper",
    "fireplace, hearth, open fireplace", "refrigerator, icebox", "grandstand, covered stand", "path",
    "stairs, steps", "runway", "case, display case, showcase, vitrine",
    "pool table, billiard table, snooker table", "pillow", "screen door, screen", "stairway, staircase", "river",
    "bridge, span", "bookcase", "blind, screen", "coffee table, cocktail table",
    "toilet, can, commode, crapper, pot, potty, stool, throne", "flower", "book", "hill", "bench", "countertop",
    "stove, kitchen stove, range, kitchen range, cooking stove", "palm, palm tree", "kitchen island",
    "computer, computing machine, computing device, data processor, electronic computer, "
    "information processing system",
    "swivel chair", "boat", "bar", "arcade machine", "hovel, hut, hutch, shack, shanty",
    "bus, autobus, coach, charabanc, double-decker, jitney, motorbus, motorcoach, omnibus, passenger vehicle",
    "towel", "light, light source", "truck, motortruck", "tower", "chandelier, pendant, pendent",
    "awning, sunshade, sunblind", "streetlight, street lamp", "booth, cubicle, stall, kiosk",
    "television receiver, television, television set, tv, tv set, idiot box, boob tube, telly, goggle box",
    "airplane, aeroplane, plane", "dirt track", "apparel, wearing apparel, dress, clothes", "pole",
    "land, ground, soil", "bannister, banister, balustrade, balusters, handrail",
    "escalator, moving staircase, moving stairway", "ottoman, pouf, pouffe, puff, hassock", "bottle",
    "buffet, counter, sideboard", "poster, posting, placard, notice, bill, card", "stage", "van", "ship",
    "fountain", "conveyer belt, conveyor belt, conveyer, conveyor, transporter", "canopy",
    "washer, automatic washer, washing machine", "plaything, toy", "swimming pool, swimming bath, natatorium",
    "stool", "barrel, cask", "basket, handbasket", "waterfall, falls", "tent, collapsible shelter", "bag",
    "minibike, motorbike", "cradle", "oven", "ball", "food, solid food", "step, stair", "tank, storage tank",
    "trade name, brand name, brand, marque", "microwave, microwave oven", "pot, flowerpot",
    "animal, animate being, beast, brute, creature, fauna", "bicycle, bike, wheel, cycle", "lake",
    "dishwasher, dish washer, dishwashing machine", "screen, silver screen, projection screen", "blanket, cover",
    "sculpture", "hood, exhaust hood", "sconce", "vase", "traffic light, traffic signal, stoplight", "tray",
    "ashcan, trash can, garbage can, wastebin, ash bin, ash-bin, ashbin, dustbin, trash barrel, trash bin", "fan",
    "pier, wharf, wharfage, dock", "crt screen", "plate", "monitor, monitoring device",
    "bulletin board, notice board", "shower", "radiator", "glass, drinking glass", "clock", "flag",
)


def short_name(entry: str) -> str:
    """The first synonym of an object-list entry: ``"building, edifice"`` or ``"building;edifice"``
    -> ``building``."""
    return entry.replace(";", ",").split(",")[0].strip()


def _words(entry: str) -> tuple[str, ...]:
    return tuple(w for w in re.split(r"[;,\s]+", entry.strip().lower()) if w)


def _from_csv_name(entry: str) -> str:
    """objectInfo150.csv writes every separator as ``;``, between synonyms and between the words
    of one (``screen;door;screen`` is ``"screen door, screen"``): the entry of the .txt list with the
    same words, else the words joined by spaces (never cut at the first ``;``)."""
    by_words = {_words(n): n for n in OBJECT_NAMES}
    return by_words.get(_words(entry), " ".join(_words(entry)))


def read_object_list(path: str) -> list[str]:
    """The 150 Name entries of ``objectInfo150.txt`` (tab-separated) or ``objectInfo150.csv``
    (comma-separated, ``;`` inside names: :func:`_from_csv_name`), in Idx order.

    Raises:
      TfsegError: unreadable, no Name/Idx columns, or not exactly the indices 1..150.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise TfsegError(f"{path}: cannot read the object list ({e.strerror or e})") from None
    first = text.splitlines()[0] if text.strip() else ""
    tabs = "\t" in first
    rows = list(csv.reader(io.StringIO(text), delimiter="\t" if tabs else ","))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "name" not in header or "idx" not in header:
        raise TfsegError(f"{path}: expected the columns Idx and Name (objectInfo150 format), "
                         f"found {rows[0] if rows else []}")
    col_name, col_idx = header.index("name"), header.index("idx")
    names: dict[int, str] = {}
    for row in rows[1:]:
        if len(row) <= max(col_name, col_idx) or not row[col_idx].strip():
            continue
        try:
            names[int(row[col_idx])] = row[col_name].strip() if tabs else _from_csv_name(row[col_name])
        except ValueError:
            raise TfsegError(f"{path}: Idx {row[col_idx]!r} is not a number") from None
    if sorted(names) != list(range(1, NUM_CLASSES + 1)):
        raise TfsegError(f"{path}: expected objects 1..{NUM_CLASSES}, found {len(names)} entries")
    return [names[i] for i in range(1, NUM_CLASSES + 1)]


def _find_root(root: str) -> str | None:
    for c in (os.path.join(root, "ADEChallengeData2016"), root):
        if os.path.isdir(os.path.join(c, "images")) and os.path.isdir(os.path.join(c, "annotations")):
            return c
    return None


class Ade20kLayout(Layout):
    """ADEChallengeData2016 (no options); the official training/validation splits."""

    name = "ade20k"

    def __init__(self):
        self.source_names: tuple[str, ...] = OBJECT_NAMES
        self.names_from = "built-in list (tfseg.convert.ade20k.OBJECT_NAMES)"

    def info(self) -> LayoutInfo:
        names = tuple(short_name(n) for n in self.source_names)
        mapping = {"table": {"0": IGNORE_INDEX, **{str(k): k - 1 for k in range(1, NUM_CLASSES + 1)}},
                   "source_names": list(self.source_names), "names_from": self.names_from}
        return LayoutInfo(name=self.name, ndim=2, channels=3, class_names=names, ignore_index=IGNORE_INDEX,
                          label_mapping=mapping,
                          label_convention="ade20k: annotation 0 (other/unlabelled) -> 255 ignored, k -> k - 1")

    def list_cases(self, root: str) -> list[Case]:
        base = _find_root(root)
        if base is None:
            raise TfsegError(f"{root}: not an ADE20K layout (expected ADEChallengeData2016/images and /annotations)")
        for name in OBJECT_LISTS:
            path = os.path.join(base, name)
            if os.path.isfile(path):
                self.source_names = tuple(read_object_list(path))
                self.names_from = name
                break
        else:
            log.info("ade20k: no %s in %s; class names from tfseg's built-in list", OBJECT_LISTS[0], base)
        shorts = [short_name(n) for n in self.source_names]
        if len(set(shorts)) != len(shorts):
            dup = sorted({n for n in shorts if shorts.count(n) > 1})[0]
            raise TfsegError(f"{base}/{self.names_from}: two classes are named {dup!r}")
        cases = []
        for folder, split in SPLITS.items():
            img_dir = os.path.join(base, "images", folder)
            ann_dir = os.path.join(base, "annotations", folder)
            if not os.path.isdir(img_dir):
                continue
            for f in sorted(os.listdir(img_dir)):
                stem, ext = os.path.splitext(f)
                if ext.lower() not in photos.IMAGE_EXTENSIONS:
                    continue
                files = [("image", os.path.join(img_dir, f))]
                ann = os.path.join(ann_dir, stem + ".png")
                if os.path.isfile(ann):
                    files.append(("mask", ann))
                cases.append(Case(case_id=stem, files=tuple(files), split=split))
        if not cases:
            raise TfsegError(f"{base}/images: no images in training/ or validation/")
        return cases

    def load_case(self, case: Case) -> Loaded2D:
        paths = case.paths
        if "mask" not in paths:
            raise BadCase(paths["image"], f"no annotation ({case.case_id}.png absent)")
        loaded = read_image(paths["image"], 3)
        loaded.mask = reduce_zero_label(read_label_image(paths["mask"]), paths["mask"])
        return loaded


def reduce_zero_label(ann: np.ndarray, path: str) -> np.ndarray:
    """ADE20K annotation values (0 = unlabelled, 1..150) -> class ids (255, 0..149).

    Raises:
      BadCase: an RGB annotation or a value above 150.
    """
    if ann.ndim == 3:
        raise BadCase(path, "annotation is RGB; ADEChallengeData2016 annotations are one channel of values 0..150")
    if ann.size and int(ann.max()) > NUM_CLASSES:
        bad = sorted(int(v) for v in np.unique(ann[ann > NUM_CLASSES]))
        raise BadCase(path, f"annotation value(s) {', '.join(map(str, bad[:8]))} above {NUM_CLASSES}")
    lut = np.arange(256, dtype=np.int16) - 1
    lut[0] = IGNORE_INDEX
    return lut.astype(np.uint8)[ann]
