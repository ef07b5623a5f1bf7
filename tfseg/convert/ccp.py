"""Clothing Co-Parsing (CCP, Yang, Luo and Lin, CVPR 2014) in its original layout.

Input layout (github.com/bearpaw/clothing-co-parsing)::

    ROOT/photos/NNNN.jpg                      RGB JPEG, 550 px wide, 801-873 px high
    ROOT/annotations/pixel-level/NNNN.mat     MATLAB 5 file, key ``groundtruth``: uint8 (H, W)
    ROOT/label_list.mat                       1x59 cell array of tag names

Pixel value ``v`` of a ``groundtruth`` means tag ``label_list[v]`` (``0`` = ``null``, the
background). Only photos with a pixel-level annotation become cases (upstream has 1004 of them;
the other 1094 photos carry image-level tags only). An annotation whose photo is missing is
listed anyway, so the job rejects it by name in rejected.jsonl.

Label sets (layout option ``label_set``):

* ``"seed"`` (default): the seed experiment's 14 classes, :data:`SEED_CLASSES`, through
  :data:`TAG_TO_CLASS`. The judgment calls, checked against the pixel annotations of images
  0001-0804 where the name alone is ambiguous:

  - trousers: jeans, pants, shorts, leggings (every garment worn on the legs, split at the
    crotch). Stockings go to socks with socks, so legwear never counts as trousers.
  - shoes: boots, clogs, flats, heels, loafers, pumps, sandals, shoes, sneakers, wedges.
  - accessories: the ``accessories`` tag itself plus everything carried or worn as jewellery:
    bag, belt, bracelet, earrings, glasses, gloves, necklace, purse, ring, sunglasses, watch,
    wallet.
  - coat: outer layers worn over another top: blazer, cape, cardigan, coat, jacket, and suit
    (in CCP ``suit`` marks the upper body, rows 19-55 % of the height on average, and comes with
    separate ``pants`` in most images, so it is the suit jacket).
  - shirt: the torso garment itself: blouse, bodysuit, hoodie, jumper, shirt, sweater,
    sweatshirt, t-shirt, top, and two calls made from the data:
    ``vest`` (48 images; the only upper garment in 22 of them and under a coat in 12, so it is
    a sleeveless top far more often than an outer layer) and ``jumper`` (upper body only, worn
    with pants or jeans: the British pullover, not the American pinafore dress).
    ``tights`` also goes to shirt: in CCP 6 of its 7 annotated images put it on the torso
    (rows 16-43 % of the height, under a blazer or suit), so the annotators used it for tight
    tops, not legwear.
  - dress: dress and romper (one-piece garments covering torso and legs).
  - underwear: bra, intimate, panties, swimwear (the same body coverage as a bikini).
  - socks: socks, stockings.
  - scarf/tie: scarf, tie.
  - hair, skin, hat: themselves; ``null`` is background.

* ``"full"``: all 59 tags as classes, ids unchanged (class 0 named ``background``).

Official split (layout option ``official_split``, default True): the seed's 704 train / 100 val,
defined by the numeric id of the file name: 1-704 train, 705-804 val, 805 and above test (so
upstream's 1004 annotations give 704 / 100 / 200, and a subset keeps each id's split). With
``official_split=False`` the job splits by a stable hash of the id instead.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from tfseg.convert.base import BadCase, Case, Layout, LayoutInfo, Loaded2D, read_image
from tfseg.errors import TfsegError

log = logging.getLogger(__name__)

# label_list.mat, in order: value v in a groundtruth means CCP_TAGS[v].
CCP_TAGS = (
    "null", "accessories", "bag", "belt", "blazer", "blouse", "bodysuit", "boots", "bra",
    "bracelet", "cape", "cardigan", "clogs", "coat", "dress", "earrings", "flats", "glasses",
    "gloves", "hair", "hat", "heels", "hoodie", "intimate", "jacket", "jeans", "jumper",
    "leggings", "loafers", "necklace", "panties", "pants", "pumps", "purse", "ring", "romper",
    "sandals", "scarf", "shirt", "shoes", "shorts", "skin", "skirt", "sneakers", "socks",
    "stockings", "suit", "sunglasses", "sweater", "sweatshirt", "swimwear", "t-shirt", "tie",
    "tights", "top", "vest", "wallet", "watch", "wedges",
)

SEED_CLASSES = (
    "background", "hair", "skin", "accessories", "hat", "coat", "shirt", "trousers", "dress",
    "skirt", "underwear", "socks", "scarf/tie", "shoes",
)

# CCP tag -> seed class name; the module docstring explains the calls.
TAG_TO_CLASS = {
    "null": "background",
    "hair": "hair",
    "skin": "skin",
    "accessories": "accessories", "bag": "accessories", "belt": "accessories",
    "bracelet": "accessories", "earrings": "accessories", "glasses": "accessories",
    "gloves": "accessories", "necklace": "accessories", "purse": "accessories",
    "ring": "accessories", "sunglasses": "accessories", "watch": "accessories",
    "wallet": "accessories",
    "hat": "hat",
    "blazer": "coat", "cape": "coat", "cardigan": "coat", "coat": "coat", "jacket": "coat",
    "suit": "coat",
    "blouse": "shirt", "bodysuit": "shirt", "hoodie": "shirt", "jumper": "shirt",
    "shirt": "shirt", "sweater": "shirt", "sweatshirt": "shirt", "t-shirt": "shirt",
    "top": "shirt", "vest": "shirt", "tights": "shirt",
    "jeans": "trousers", "leggings": "trousers", "pants": "trousers", "shorts": "trousers",
    "dress": "dress", "romper": "dress",
    "skirt": "skirt",
    "bra": "underwear", "intimate": "underwear", "panties": "underwear",
    "swimwear": "underwear",
    "socks": "socks", "stockings": "socks",
    "scarf": "scarf/tie", "tie": "scarf/tie",
    "boots": "shoes", "clogs": "shoes", "flats": "shoes", "heels": "shoes", "loafers": "shoes",
    "pumps": "shoes", "sandals": "shoes", "shoes": "shoes", "sneakers": "shoes",
    "wedges": "shoes",
}

LABEL_SETS = ("seed", "full")
# Upper bounds (inclusive) of the numeric ids of the seed's official split.
_TRAIN_LAST_ID = 704
_VAL_LAST_ID = 804

_PHOTOS = "photos"
_ANNOTATIONS = os.path.join("annotations", "pixel-level")
_LABEL_LIST = "label_list.mat"


def seed_table() -> dict[int, int]:
    """The 59 -> 14 mapping as ``{tag value: seed class id}``."""
    return {v: SEED_CLASSES.index(TAG_TO_CLASS[tag]) for v, tag in enumerate(CCP_TAGS)}


def official_split(case_id: str) -> str | None:
    """The seed's split of a CCP id (``"0001"`` -> ``"train"``), or None for a non-numeric id."""
    if not case_id.isdigit():
        return None
    n = int(case_id)
    if n <= _TRAIN_LAST_ID:
        return "train"
    return "val" if n <= _VAL_LAST_ID else "test"


def read_label_list(path: str) -> list[str]:
    """Tag names from a ``label_list.mat`` (a 1xN MATLAB cell array of strings).

    Raises:
      TfsegError: unreadable file or no ``label_list`` variable.
    """
    import scipy.io

    try:
        cells = scipy.io.loadmat(path)["label_list"]
    except Exception as e:  # scipy raises ValueError, OSError, TypeError, ... for bad files
        raise TfsegError(f"{path}: not a readable CCP label_list.mat ({type(e).__name__}: {e})") from None
    return [str(np.asarray(c).ravel()[0]) if np.asarray(c).size else "" for c in cells.ravel()]


class CcpLayout(Layout):
    """Clothing Co-Parsing: ``photos/*.jpg`` + ``annotations/pixel-level/*.mat``.

    Args:
      label_set: ``"seed"`` (14 classes, default) or ``"full"`` (59 tags).
      official_split: use the seed's id-based 704 / 100 split (see the module docstring);
        False leaves the split to the job's hash split.
    """

    name = "ccp"

    def __init__(self, label_set: str = "seed", official_split: bool = True):
        if label_set not in LABEL_SETS:
            raise TfsegError(f"ccp: unknown label set {label_set!r}; choose from {', '.join(LABEL_SETS)}")
        self.label_set = label_set
        self.official_split = bool(official_split)
        # 256 entries so any uint8 indexes it; 255 marks values outside label_list.
        table = seed_table() if label_set == "seed" else {v: v for v in range(len(CCP_TAGS))}
        self._lut = np.full(256, 255, np.uint8)
        for src, dst in table.items():
            self._lut[src] = dst

    def info(self) -> LayoutInfo:
        if self.label_set == "seed":
            class_names = SEED_CLASSES
            mapping = {
                "source": _LABEL_LIST,
                "source_names": list(CCP_TAGS),
                "table": seed_table(),
                "by_name": dict(TAG_TO_CLASS),
            }
        else:
            class_names = ("background",) + CCP_TAGS[1:]
            mapping = {
                "source": _LABEL_LIST,
                "source_names": list(CCP_TAGS),
                "table": {v: v for v in range(len(CCP_TAGS))},
            }
        return LayoutInfo(name=self.name, ndim=2, channels=3, class_names=class_names,
                          ignore_index=None, label_mapping=mapping)

    def list_cases(self, root: str) -> list[Case]:
        ann_dir = os.path.join(root, _ANNOTATIONS)
        label_list = os.path.join(root, _LABEL_LIST)
        if not os.path.isdir(ann_dir):
            raise TfsegError(f"{root}: not a CCP dataset (no {_ANNOTATIONS}/ folder)")
        if not os.path.isfile(label_list):
            raise TfsegError(f"{root}: not a CCP dataset (no {_LABEL_LIST})")
        names = read_label_list(label_list)
        if names != list(CCP_TAGS):
            raise TfsegError(
                f"{label_list}: expected CCP's {len(CCP_TAGS)} tags (null, accessories, bag, ...), "
                f"got {len(names)} ({', '.join(names[:3])}, ...)"
            )
        mats = sorted(f for f in os.listdir(ann_dir) if f.endswith(".mat") and not f.startswith("."))
        if not mats:
            raise TfsegError(f"{ann_dir}: no .mat annotations")
        photos_dir = os.path.join(root, _PHOTOS)
        cases = []
        for f in mats:
            case_id = f[: -len(".mat")]
            cases.append(Case(
                case_id=case_id,
                files=(("image", os.path.join(photos_dir, case_id + ".jpg")),
                       ("mask", os.path.join(ann_dir, f))),
                group=case_id,
                split=official_split(case_id) if self.official_split else None,
            ))
        photos = len(os.listdir(photos_dir)) if os.path.isdir(photos_dir) else 0
        log.info("ccp: %d annotated cases in %s (%d photos)", len(cases), root, photos)
        return cases

    def load_case(self, case: Case) -> Loaded2D:
        """Decodes the photo and maps its annotation to the layout's label set.

        Returns:
          Loaded2D with ``image`` (H, W, 3) uint8, ``mask`` (H, W) uint8 class ids and the
          photo's original JPEG bytes.

        Raises:
          BadCase: missing or undecodable photo, unreadable .mat or no ``groundtruth`` in it,
            tag values outside label_list, annotation size != photo size.
        """
        paths = case.paths
        image_path, mask_path = paths["image"], paths["mask"]
        if not os.path.isfile(image_path):
            raise BadCase(image_path, "missing photo for annotation " + os.path.basename(mask_path))
        loaded = read_image(image_path, 3, keep_pixels=True)  # as displayed (EXIF), original bytes where exact
        image = loaded.image
        groundtruth = _read_groundtruth(mask_path)
        if groundtruth.shape != image.shape[:2]:
            h, w = groundtruth.shape
            raise BadCase(mask_path, f"annotation {w}x{h} != photo {image.shape[1]}x{image.shape[0]}")
        if groundtruth.max(initial=0) >= len(CCP_TAGS):
            bad = sorted(int(v) for v in np.unique(groundtruth[groundtruth >= len(CCP_TAGS)]))
            raise BadCase(mask_path, f"tag values {bad} outside label_list (0..{len(CCP_TAGS) - 1})")
        return dataclasses.replace(loaded, mask=self._lut[groundtruth])


def _read_groundtruth(path: str) -> np.ndarray:
    """The (H, W) uint8 ``groundtruth`` of a CCP annotation; BadCase if unreadable."""
    import scipy.io

    if not os.path.isfile(path):
        raise BadCase(path, "missing annotation")
    try:
        mat = scipy.io.loadmat(path, variable_names=["groundtruth"])
    except Exception as e:  # scipy raises ValueError, OSError, TypeError, zlib.error...
        raise BadCase(path, f"unreadable .mat ({type(e).__name__}: {e})") from None
    gt = mat.get("groundtruth")
    if gt is None:
        raise BadCase(path, "no 'groundtruth' variable in .mat")
    gt = np.asarray(gt)
    if gt.ndim != 2 or gt.size == 0:
        raise BadCase(path, f"groundtruth must be a 2D matrix, got shape {gt.shape}")
    if gt.dtype != np.uint8:
        if not np.issubdtype(gt.dtype, np.number) or np.any(gt != np.round(gt)) or gt.min() < 0:
            raise BadCase(path, f"groundtruth must hold non-negative integers, got {gt.dtype}")
        if gt.max() > 255:
            raise BadCase(path, f"tag value {int(gt.max())} outside label_list (0..{len(CCP_TAGS) - 1})")
        gt = gt.astype(np.uint8)
    return gt


