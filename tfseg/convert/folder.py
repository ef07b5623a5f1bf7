"""Any dataset as an images folder + a masks folder matched by file stem (the finger-vein seed's
layout, and users' own data).

Options (``tfseg convert --dataset folder ...``):

- ``--image-dir`` / ``--mask-dir``: folders relative to ``--input`` (default ``images``/``masks``;
  they may be the same folder when masks carry a suffix);
- ``--mask-suffix``: mask stem = image stem + suffix (e.g. ``_mask``; default none);
- ``--num-classes`` and ``--ignore-index``;
- ``--palette FILE``: JSON ``{"R,G,B" or "#rrggbb": class id}`` (or ``{"id": N, "name": "road"}``)
  for colour-coded RGB masks;
- ``--class-names FILE``: one name per line, or a JSON list; written to dataset.json;
- ``--mask-threshold T``: binarize masks (value >= T is class 1), for masks saved lossily.

Labels are never changed silently:

- without ``--num-classes`` the launcher reads every mask and takes the number of classes from
  the values found: masks holding only {0, 255} are black/white binary masks (2 classes, 255 ->
  1); values 0..K-1 with none missing give K classes; anything else (gaps, a void value) fails
  naming the values, so the user says what they are (``--num-classes``, ``--ignore-index``).
  With ``--palette`` the classes are the palette's ids; with ``--class-names``, one per name.
- a mask is binarized only when it is a {0, 255} image of a 2-class dataset (and 255 is not the
  ignore index), or when ``--mask-threshold`` asks for it;
- any other value at or above the number of classes that is not the ignore index rejects the
  case, naming the value (rejected.jsonl).

Images are RGB, or grayscale when the first image is (finger veins); 16-bit and float images are
converted by :func:`tfseg.convert.base.pixels_to_uint8`. Class names: ``--class-names``, or the
palette's names; otherwise ``background``/``foreground`` for 2 classes (a binary mask's 0 is
background) and ``class_0`` ... ``class_{K-1}`` for more.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time

import numpy as np

from tfseg import photos
from tfseg.convert.base import (
    BadCase,
    Case,
    Layout,
    LayoutInfo,
    Loaded2D,
    read_image,
    read_label_image,
)
from tfseg.errors import TfsegError, first_line
from tfseg.io import fs

log = logging.getLogger(__name__)


def _read_option_file(path: str, what: str) -> str:
    """The text of an option's file (``--palette``, ``--class-names``), local or remote (gs://, as
    ``--input`` may be); any failure is one line naming the file."""
    try:
        return fs.read_text(path)
    except (OSError, UnicodeDecodeError) as e:
        raise TfsegError(f"{path}: cannot read {what} ({getattr(e, 'strerror', None) or e})") from None
    except Exception as e:  # noqa: BLE001 - tf.errors.* from a remote filesystem
        raise TfsegError(f"{path}: cannot read {what} ({first_line(e)})") from None


def _read_palette(path: str) -> tuple[dict[tuple[int, int, int], int], dict[int, str]]:
    """``--palette`` -> ({(r, g, b): class id}, {class id: name} for entries that name one)."""
    text = _read_option_file(path, "palette")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise TfsegError(f"{path}: palette is not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(raw, dict) or not raw:
        raise TfsegError(f"{path}: palette must be a JSON object mapping colours to class ids")
    out, names = {}, {}
    for key, value in raw.items():
        name = None
        if isinstance(value, dict):
            name = value.get("name")
            value = value.get("id", value.get("class_id"))
            if name is not None and (not isinstance(name, str) or not name.strip()):
                raise TfsegError(f"{path}: palette entry {key!r}: name must be a non-empty string")
        try:
            text = key.strip()
            if text.startswith("#") and len(text) == 7:
                rgb = tuple(int(text[i:i + 2], 16) for i in (1, 3, 5))
            else:
                rgb = tuple(int(x) for x in text.strip("()[] ").split(","))
            if (len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb) or not isinstance(value, int)
                    or isinstance(value, bool) or not 0 <= value <= 255):
                raise ValueError
        except ValueError:
            raise TfsegError(f"{path}: palette entry {key!r}: {value!r} is not 'R,G,B' or '#rrggbb' -> "
                             "class id 0..255 (or {\"id\": N, \"name\": ...})") from None
        out[rgb] = value
        if name is not None:
            if names.get(value, name) != name:
                raise TfsegError(f"{path}: class id {value} has two names, {names[value]!r} and {name!r}")
            names[value] = name.strip()
    return out, names


def load_class_names(path: str) -> list[str]:
    """Reads ``--class-names``: a JSON list of strings, or one name per line (blank lines at the
    ends ignored).

    Raises:
      TfsegError: unreadable file, bad JSON, empty or duplicate names.
    """
    text = _read_option_file(path, "--class-names")
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as e:
            raise TfsegError(f"{path}: --class-names is not a valid JSON list ({e.msg}, line {e.lineno})") from None
        if not all(isinstance(n, str) for n in names):
            raise TfsegError(f"{path}: --class-names JSON must be a list of strings")
    else:
        names = text.strip().splitlines()
    names = [n.strip() for n in names]
    if len(names) < 2:
        raise TfsegError(f"{path}: --class-names needs at least 2 names (one per class), found {len(names)}")
    for i, n in enumerate(names):
        if not n:
            raise TfsegError(f"{path}: --class-names: name of class {i} is empty")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TfsegError(f"{path}: --class-names: {dup[0]!r} names two classes")
    return names


class FolderLayout(Layout):
    """Images + masks folders matched by stem.

    Args:
      image_dir: images folder, relative to the input.
      mask_dir: masks folder, relative to the input.
      mask_suffix: appended to the image stem to name its mask.
      num_classes: classes including background; default from the mask values (module doc).
      ignore_index: label value to ignore, or None.
      palette: JSON file mapping RGB colours to class ids, for colour-coded masks.
      class_names: file with one class name per line, or a JSON list.
      mask_threshold: binarize every mask at this value (value >= threshold is class 1).
    """

    name = "folder"
    remote_input = True  # lists and reads through base's helpers; --palette/--class-names through tfseg.io.fs

    def __init__(self, image_dir: str = "images", mask_dir: str = "masks", mask_suffix: str = "",
                 num_classes: int | None = None, ignore_index: int | None = None, palette: str | None = None,
                 class_names: str | None = None, mask_threshold: int | None = None):
        if num_classes is not None and not 2 <= num_classes <= 256:
            raise TfsegError(f"--num-classes {num_classes}: must be between 2 and 256")
        if ignore_index is not None and not (0 <= ignore_index <= 255):
            raise TfsegError(f"--ignore-index {ignore_index}: must be between 0 and 255")
        if ignore_index is not None and num_classes is not None and ignore_index < num_classes:
            raise TfsegError(f"--ignore-index {ignore_index}: is a class id (--num-classes {num_classes}); "
                             f"use a value of {num_classes} or more (e.g. 255)")
        if mask_threshold is not None:
            if not 1 <= mask_threshold <= 255:
                raise TfsegError(f"--mask-threshold {mask_threshold}: must be between 1 and 255")
            if num_classes not in (None, 2):
                raise TfsegError(f"--mask-threshold makes 2 classes; --num-classes is {num_classes}")
            if palette:
                raise TfsegError("--mask-threshold and --palette exclude each other")
            num_classes = 2
        self.image_dir = image_dir
        self.mask_dir = mask_dir
        self.mask_suffix = mask_suffix or ""
        self.ignore_index = ignore_index
        self.mask_threshold = mask_threshold
        self.palette_file = palette
        self.palette, palette_names = _read_palette(palette) if palette else (None, {})
        self.class_names_file = class_names
        names = load_class_names(class_names) if class_names else None
        if names is not None and num_classes is not None and len(names) != num_classes:
            raise TfsegError(f"{class_names}: {len(names)} class names for --num-classes {num_classes}")
        if num_classes is None and names is not None:
            num_classes = len(names)
        if self.palette:
            ids = sorted({v for v in self.palette.values() if v != ignore_index})
            if num_classes is None:
                num_classes = max(2, (ids[-1] + 1) if ids else 2)
            bad = [v for v in ids if v >= num_classes]
            if bad:
                raise TfsegError(f"{palette}: class id {bad[0]} outside 0..{num_classes - 1}")
            if ignore_index is not None and ignore_index < num_classes:
                raise TfsegError(f"--ignore-index {ignore_index}: is a class id ({num_classes} classes)")
            if names is None and palette_names:
                names = [palette_names.get(i, f"class_{i}") for i in range(num_classes)]
        self.num_classes = num_classes  # None until list_cases reads the masks
        self.class_names = tuple(names) if names else None
        self.inferred = None  # what list_cases found, for the log and dataset.json
        self.channels = 3

    def info(self) -> LayoutInfo:
        if self.num_classes is None:
            raise RuntimeError("FolderLayout.info() before list_cases(): the number of classes is not known yet")
        k = self.num_classes
        if self.class_names:
            names = self.class_names
        elif k == 2:
            names = ("background", "foreground")  # a binary mask: 0 is background
        else:
            names = tuple(f"class_{i}" for i in range(k))
        mapping = {}
        if self.palette:
            mapping = {"palette": {",".join(map(str, c)): v for c, v in sorted(self.palette.items())}}
        if self.mask_threshold is not None:
            mapping["mask_threshold"] = self.mask_threshold
        if self.inferred:
            mapping["num_classes_from_values"] = self.inferred
        return LayoutInfo(name=self.name, ndim=2, channels=self.channels, class_names=names,
                          ignore_index=self.ignore_index, label_mapping=mapping)

    def _mask_index(self, mask_dir: str) -> dict[str, str]:
        out = {}
        for f in fs.listdir(mask_dir):
            stem, ext = os.path.splitext(f)
            if ext.lower() not in photos.IMAGE_EXTENSIONS or not stem.endswith(self.mask_suffix):
                continue
            key = stem[: len(stem) - len(self.mask_suffix)] if self.mask_suffix else stem
            out.setdefault(key, fs.join(mask_dir, f))
        return out

    def list_cases(self, root: str) -> list[Case]:
        image_dir = fs.join(root, self.image_dir)
        mask_dir = fs.join(root, self.mask_dir)
        for flag, d in (("--image-dir", image_dir), ("--mask-dir", mask_dir)):
            if not fs.isdir(d):
                raise TfsegError(f"{d}: {flag} folder not found")
        masks = self._mask_index(mask_dir)
        if fs.is_remote(root):
            same = image_dir.rstrip("/") == mask_dir.rstrip("/")
        else:
            same = os.path.realpath(image_dir) == os.path.realpath(mask_dir)
        cases = []
        for f in fs.listdir(image_dir):
            stem, ext = os.path.splitext(f)
            if ext.lower() not in photos.IMAGE_EXTENSIONS:
                continue
            if same and (not self.mask_suffix or stem.endswith(self.mask_suffix)):
                if not self.mask_suffix:
                    raise TfsegError(f"{image_dir}: images and masks share a folder; pass --mask-suffix")
                continue
            files = [("image", fs.join(image_dir, f))]
            if stem in masks:
                files.append(("mask", masks[stem]))
            cases.append(Case(case_id=stem, files=tuple(files)))
        if not cases:
            raise TfsegError(f"{image_dir}: no images ({', '.join(photos.IMAGE_EXTENSIONS)})")
        self.channels = _probe_channels(cases[0].main_path)
        if self.num_classes is None:
            self.num_classes = self._classes_from_values([c.paths["mask"] for c in cases if "mask" in c.paths],
                                                         mask_dir)
        return cases

    def _classes_from_values(self, mask_paths: list[str], mask_dir: str) -> int:
        """Reads every mask (on the launcher, a few threads) and derives the number of classes.

        Raises:
          TfsegError: no readable mask, or values that do not say how many classes there are.
        """
        from concurrent.futures import ThreadPoolExecutor

        def values(path):
            try:
                raw = read_label_image(path)
            except BadCase:
                return None  # the worker rejects it with the reason
            if raw.ndim == 3:
                if not (np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 0], raw[..., 2])):
                    return None  # colour mask without --palette: rejected by the worker
                raw = raw[..., 0]
            return np.bincount(raw.reshape(-1), minlength=256) > 0

        t0 = time.time()
        seen = np.zeros(256, bool)
        read = 0
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            for v in pool.map(values, mask_paths):
                if v is not None:
                    seen |= v
                    read += 1
        found = [int(v) for v in np.flatnonzero(seen)]
        vals = [v for v in found if v != self.ignore_index]
        shown = ", ".join(map(str, found[:12])) + (", ..." if len(found) > 12 else "")
        if not vals:
            raise TfsegError(f"{mask_dir}: no readable mask to take the number of classes from; pass --num-classes")
        if 255 in vals and set(vals) <= {0, 255}:
            k, rule = 2, "black/white masks {0, 255}: 255 -> class 1"
        elif vals == list(range(vals[-1] + 1)):
            k, rule = max(2, vals[-1] + 1), f"class ids 0..{vals[-1]}"
        else:
            raise TfsegError(
                f"{mask_dir}: masks hold the values {{{shown}}}, which are not class ids 0..K-1 nor black/white "
                "{0, 255}; pass --num-classes N (and --ignore-index V for a value that marks pixels to ignore)")
        self.inferred = {"values": found, "masks_read": read}
        log.info("folder: %d classes from the values found in %d masks (%s; %.1f s); pass --num-classes to set it",
                 k, read, rule, time.time() - t0)
        return k

    def load_case(self, case: Case) -> Loaded2D:
        paths = case.paths
        if "mask" not in paths:
            raise BadCase(paths["image"], f"no mask ({self.mask_dir}/{case.case_id}{self.mask_suffix}.* absent)")
        loaded = read_image(paths["image"], self.channels)
        loaded.mask = self.read_mask(paths["mask"])
        return loaded

    def read_mask(self, path: str) -> np.ndarray:
        """One mask file -> (H, W) uint8 class ids (range checked later by the pipeline, which
        rejects the case naming any value >= num_classes that is not the ignore index)."""
        raw = read_label_image(path)
        if raw.ndim == 3:
            if self.palette:
                return _map_colours(raw, self.palette, path)
            if not (np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 0], raw[..., 2])):
                raise BadCase(path, "colour mask needs --palette (JSON colour -> class id)")
            raw = raw[..., 0]
        if self.mask_threshold is not None:
            mask = (raw >= self.mask_threshold).astype(np.uint8)
            if self.ignore_index is not None:
                mask[raw == self.ignore_index] = self.ignore_index
            return mask
        if self.num_classes == 2 and self.ignore_index != 255 and raw.size and raw.max() == 255:
            # A black/white image: binarized only when it holds exactly {0, 255}.
            white = raw == 255
            if np.count_nonzero(white) + np.count_nonzero(raw == 0) == raw.size:
                return white.astype(np.uint8)
        return raw


def _probe_channels(path: str) -> int:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(fs.read_bytes(path))) as img:
            gray = (img.mode in ("L", "LA", "1", "I", "F") or img.mode.startswith("I;16")
                    or (img.mode in ("P", "PA") and not _is_colour_palette(img)))
            return 1 if gray else 3
    except (OSError, Image.DecompressionBombError):
        return 3  # unreadable first image: the worker rejects it; assume RGB for the rest


def _is_colour_palette(img) -> bool:
    pal = np.frombuffer(bytes(img.getpalette() or b""), np.uint8)
    pal = pal[: len(pal) // 3 * 3].reshape(-1, 3)
    return bool(len(pal)) and not (np.all(pal[:, 0] == pal[:, 1]) and np.all(pal[:, 1] == pal[:, 2]))


def _map_colours(rgb: np.ndarray, palette: dict[tuple[int, int, int], int], path: str) -> np.ndarray:
    px = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    uniq, inverse = np.unique(px, return_inverse=True)
    lut = np.zeros(len(uniq), np.uint8)
    for j, u in enumerate(uniq.tolist()):
        colour = (u >> 16, (u >> 8) & 255, u & 255)
        if colour not in palette:
            raise BadCase(path, f"colour {colour} is not in --palette")
        lut[j] = palette[colour]
    return lut[inverse.reshape(px.shape)]
