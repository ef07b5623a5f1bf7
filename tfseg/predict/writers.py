"""What ``tfseg predict`` writes for one input, the same from the local job and the Beam job.

Images: ``STEM.png``, a palette PNG whose pixel values are the class ids, in the model's colours
(:mod:`tfseg.visualize`). Volumes: ``STEM.nii.gz``, a uint8 mask with the input's affine
(:func:`tfseg.volumes.write_mask`). With ``overlay``: ``overlays/STEM.jpg|png``, the input (3D: the
middle axial slice) with the mask blended over it and a legend of the classes present.

``facts`` is anything with ``class_names``, ``colors`` and ``ignore_index``: a
:class:`~tfseg.predict.base.Predictor` or its :class:`~tfseg.predict.base.ModelFacts`.
"""

from __future__ import annotations

import io
import logging
import os

import numpy as np

from tfseg import volumes

logger = logging.getLogger(__name__)

OVERLAY_DIR = "overlays"


def _legend_names(names: list[str] | None, colors: np.ndarray) -> list[str]:
    return list(names) if names else [f"class_{c}" for c in range(len(colors))]


def write_image_outputs(facts, path: str, data: bytes, stem: str, mask: np.ndarray, output_dir: str,
                        overlay: bool) -> dict:
    """Writes STEM.png (palette PNG of class ids) and, with ``overlay``, overlays/STEM.(jpg|png);
    returns the input's result record."""
    from PIL import Image

    from tfseg import visualize

    with open(os.path.join(output_dir, stem + ".png"), "wb") as f:
        f.write(visualize.encode_palette_png(mask, facts.colors, facts.ignore_index))
    record = {"input": path, "output": stem + ".png", "shape": list(mask.shape)}
    if overlay:
        try:
            with Image.open(io.BytesIO(data)) as im:
                rgb = np.asarray(im.convert("RGB"))
            picture = visualize.overlay_with_legend(rgb, mask, _legend_names(facts.class_names, facts.colors),
                                                    facts.colors, ignore_index=facts.ignore_index)
        except (OSError, ValueError) as e:  # the mask is written; only its picture is missing
            logger.warning("%s: no overlay (%s)", path, e)
            return record
        ext = ".jpg" if path.lower().endswith((".jpg", ".jpeg")) else ".png"
        rel = os.path.join(OVERLAY_DIR, stem + ext)
        os.makedirs(os.path.join(output_dir, OVERLAY_DIR), exist_ok=True)
        visualize.write_image(os.path.join(output_dir, rel), picture)
        record["overlay"] = rel
    return record


def write_volume_outputs(facts, path: str, volume: np.ndarray, like, stem: str, mask: np.ndarray,
                         output_dir: str, overlay: bool) -> dict:
    """Writes STEM.nii.gz (``mask`` with the affine of ``like``, the input's NIfTI image) and, with
    ``overlay``, overlays/STEM.png; returns the input's result record."""
    volumes.write_mask(os.path.join(output_dir, stem + ".nii.gz"), mask, like)
    record = {"input": path, "output": stem + ".nii.gz", "shape": list(mask.shape)}
    if overlay:
        record["overlay"] = _write_volume_overlay(facts, volume, mask, stem, output_dir)
    return record


def _write_volume_overlay(facts, volume: np.ndarray, mask: np.ndarray, stem: str, output_dir: str) -> str:
    """overlays/STEM.png: the middle axial slice (first channel) with the mask over it."""
    from tfseg import visualize

    mid = mask.shape[0] // 2
    picture = visualize.overlay_with_legend(volume[mid, ..., :1], mask[mid],
                                            _legend_names(facts.class_names, facts.colors), facts.colors,
                                            ignore_index=facts.ignore_index)
    rel = os.path.join(OVERLAY_DIR, stem + ".png")
    os.makedirs(os.path.join(output_dir, OVERLAY_DIR), exist_ok=True)
    visualize.write_image(os.path.join(output_dir, rel), picture)
    return rel
