"""Any dataset as an images folder + a masks folder matched by file stem (the finger-vein seed's
layout, and users' own data).

Options (``tfseg convert --dataset folder ...``):

- ``--image-dir`` / ``--mask-dir``: folders relative to ``--input`` (default ``images``/``masks``;
  they may be the same folder when masks carry a suffix);
- ``--mask-suffix``: mask stem = image stem + suffix (e.g. ``_mask``; default none);
- ``--num-classes`` (default 2) and ``--ignore-index``;
- ``--palette FILE``: JSON ``{"R,G,B" or "#rrggbb": class id}`` for colour-coded RGB masks.

Masks: for binary tasks {0, 1}, or black/white 8-bit thresholded at 128 ({0, 255}, and masks
saved lossily); otherwise class-index PNGs (grayscale or palette indices), or RGB with
``--palette``. Images are RGB, or grayscale when the first image is (finger veins).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from tfseg.convert.base import (
    IMAGE_EXTENSIONS,
    BadCase,
    Case,
    Layout,
    LayoutInfo,
    Loaded2D,
    read_image,
    read_label_image,
)
from tfseg.errors import TfsegError

log = logging.getLogger(__name__)


def load_palette(path: str) -> dict[tuple[int, int, int], int]:
    """Reads ``--palette``: ``{"R,G,B" | "#rrggbb": class_id}`` -> {(r, g, b): id}.

    Raises:
      TfsegError: missing file, bad JSON or bad entries.
    """
    try:
        with open(path) as f:
            raw = json.load(f)
    except OSError as e:
        raise TfsegError(f"{path}: cannot read palette ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise TfsegError(f"{path}: palette is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(raw, dict) or not raw:
        raise TfsegError(f"{path}: palette must be a JSON object mapping colours to class ids")
    out = {}
    for key, value in raw.items():
        try:
            text = key.strip()
            if text.startswith("#") and len(text) == 7:
                rgb = tuple(int(text[i:i + 2], 16) for i in (1, 3, 5))
            else:
                rgb = tuple(int(x) for x in text.strip("()[] ").split(","))
            if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb) or not isinstance(value, int):
                raise ValueError
        except ValueError:
            raise TfsegError(f"{path}: palette entry {key!r}: {value!r} is not 'R,G,B' or '#rrggbb' -> int") from None
        out[rgb] = value
    return out


class FolderLayout(Layout):
    """Images + masks folders matched by stem.

    Args:
      image_dir: images folder, relative to the input.
      mask_dir: masks folder, relative to the input.
      mask_suffix: appended to the image stem to name its mask.
      num_classes: classes including background.
      ignore_index: label value to ignore, or None.
      palette: JSON file mapping RGB colours to class ids, for colour-coded masks.
    """

    name = "folder"

    def __init__(self, image_dir: str = "images", mask_dir: str = "masks", mask_suffix: str = "",
                 num_classes: int = 2, ignore_index: int | None = None, palette: str | None = None):
        if num_classes < 2 or num_classes > 256:
            raise TfsegError(f"--num-classes {num_classes}: must be between 2 and 256")
        if ignore_index is not None and not (0 <= ignore_index <= 255):
            raise TfsegError(f"--ignore-index {ignore_index}: must be between 0 and 255")
        self.image_dir = image_dir
        self.mask_dir = mask_dir
        self.mask_suffix = mask_suffix or ""
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.palette_file = palette
        self.palette = load_palette(palette) if palette else None
        if self.palette:
            bad = [v for v in self.palette.values() if not (0 <= v < num_classes or v == ignore_index)]
            if bad:
                raise TfsegError(f"{palette}: class id {bad[0]} outside 0..{num_classes - 1}")
        self.channels = 3

    def info(self) -> LayoutInfo:
        names = ("background", "foreground") if self.num_classes == 2 else tuple(
            ["background"] + [f"class_{i}" for i in range(1, self.num_classes)])
        mapping = {}
        if self.palette:
            mapping = {"palette": {",".join(map(str, k)): v for k, v in sorted(self.palette.items())}}
        return LayoutInfo(name=self.name, ndim=2, channels=self.channels, class_names=names,
                          ignore_index=self.ignore_index, label_mapping=mapping)

    def _mask_index(self, mask_dir: str) -> dict[str, str]:
        out = {}
        for f in sorted(os.listdir(mask_dir)):
            stem, ext = os.path.splitext(f)
            if ext.lower() not in IMAGE_EXTENSIONS or not stem.endswith(self.mask_suffix):
                continue
            key = stem[: len(stem) - len(self.mask_suffix)] if self.mask_suffix else stem
            out.setdefault(key, os.path.join(mask_dir, f))
        return out

    def list_cases(self, root: str) -> list[Case]:
        image_dir = os.path.join(root, self.image_dir)
        mask_dir = os.path.join(root, self.mask_dir)
        for flag, d in (("--image-dir", image_dir), ("--mask-dir", mask_dir)):
            if not os.path.isdir(d):
                raise TfsegError(f"{d}: {flag} folder not found")
        masks = self._mask_index(mask_dir)
        same = os.path.realpath(image_dir) == os.path.realpath(mask_dir)
        cases = []
        for f in sorted(os.listdir(image_dir)):
            stem, ext = os.path.splitext(f)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            if same and (not self.mask_suffix or stem.endswith(self.mask_suffix)):
                if not self.mask_suffix:
                    raise TfsegError(f"{image_dir}: images and masks share a folder; pass --mask-suffix")
                continue
            files = [("image", os.path.join(image_dir, f))]
            if stem in masks:
                files.append(("mask", masks[stem]))
            cases.append(Case(case_id=stem, files=tuple(files)))
        if not cases:
            raise TfsegError(f"{image_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.channels = _probe_channels(cases[0].main_path)
        return cases

    def load_case(self, case: Case) -> Loaded2D:
        paths = case.paths
        if "mask" not in paths:
            raise BadCase(paths["image"], f"no mask ({self.mask_dir}/{case.case_id}{self.mask_suffix}.* absent)")
        loaded = read_image(paths["image"], self.channels)
        loaded.mask = self.read_mask(paths["mask"])
        return loaded

    def read_mask(self, path: str) -> np.ndarray:
        """One mask file -> (H, W) uint8 class ids (range checked later by the pipeline)."""
        raw = read_label_image(path)
        if raw.ndim == 3:
            if self.palette:
                return _map_colours(raw, self.palette, path)
            if not (np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 0], raw[..., 2])):
                raise BadCase(path, "colour mask needs --palette (JSON colour -> class id)")
            raw = raw[..., 0]
        if self.num_classes == 2:
            allowed = [0, 1] + ([self.ignore_index] if self.ignore_index is not None else [])
            if not np.isin(raw, allowed).all():
                mask = (raw >= 128).astype(np.uint8)
                if self.ignore_index is not None:
                    mask[raw == self.ignore_index] = self.ignore_index
                return mask
        return raw

    @classmethod
    def make_sample(cls, output: str, count: int, seed: int = 0, *, image_size: tuple[int, int] = (64, 128)) -> None:
        """Writes ``count`` finger-vein-like grayscale images (a bright finger band crossed by
        dark branching veins) to ``images/`` and {0, 255} vein masks to ``masks/`` (same stems)."""
        from PIL import Image

        rng = np.random.default_rng(seed)
        h, w = image_size
        os.makedirs(os.path.join(output, "images"), exist_ok=True)
        os.makedirs(os.path.join(output, "masks"), exist_ok=True)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        for i in range(count):
            finger = np.exp(-(((yy - h / 2) / (0.38 * h)) ** 6))
            img = 40 + 150 * finger
            veins = np.zeros((h, w), bool)
            for _ in range(int(rng.integers(2, 5))):
                y0, amp = rng.uniform(0.3, 0.7) * h, rng.uniform(0.03, 0.12) * h
                freq, phase = rng.uniform(1, 3), rng.uniform(0, 6)
                centre = y0 + amp * np.sin(2 * np.pi * freq * xx[0] / w + phase)
                thick = rng.uniform(1.0, 2.0)
                x0, x1 = sorted(rng.uniform(0, w, 2))
                x1 = max(x1, x0 + w / 3)
                veins |= (np.abs(yy - centre[None, :]) < thick) & (xx >= x0) & (xx <= x1)
            veins &= finger > 0.5
            img = img - 45 * veins
            img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
            stem = f"vein_{i:04d}"
            Image.fromarray(img).save(os.path.join(output, "images", f"{stem}.png"))
            Image.fromarray(veins.astype(np.uint8) * 255).save(os.path.join(output, "masks", f"{stem}.png"))
        log.info("wrote %d folder-layout (finger vein) samples to %s", count, output)


def _probe_channels(path: str) -> int:
    from PIL import Image

    try:
        with Image.open(path) as img:
            gray = img.mode in ("L", "1", "I", "I;16") or (img.mode == "P" and not _is_colour_palette(img))
            return 1 if gray else 3
    except OSError:
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
