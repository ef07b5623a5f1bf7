"""What ``tfseg predict`` is given: the input folder's images and volumes, and the ``--model``.

:func:`list_inputs` lists the images and NIfTI volumes directly in a folder; :func:`resolve_model`
says whether a ``--model`` path is an export (version or NAME folder) or a fit RUN_DIR.
"""

from __future__ import annotations

import logging
import os

from tfseg import rundir
from tfseg.errors import TfsegError
from tfseg.io import fs

logger = logging.getLogger(__name__)

# What predict reads as images: the photos TensorFlow's decoder takes (a turned photo is sent as PNG).
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
VOLUME_EXTS = (".nii.gz", ".nii")


def _stem_kind(name: str) -> tuple[str, str] | None:
    low = name.lower()
    for ext in VOLUME_EXTS:
        if low.endswith(ext):
            return name[: -len(ext)], "volume"
    for ext in IMAGE_EXTS:
        if low.endswith(ext):
            return name[: -len(ext)], "image"
    return None


def list_inputs(input_dir: str) -> list[tuple[str, str, str]]:
    """(path, kind, stem) of the images and volumes directly in ``input_dir``, sorted by name.

    Raises:
      TfsegError: missing directory, no inputs, or two inputs that would write the same mask.
    """
    if not fs.isdir(input_dir):
        raise TfsegError(f"{input_dir}: input directory not found")
    out, seen = [], {}
    for name in fs.listdir(input_dir):
        sk = _stem_kind(name)
        if sk is None or name.startswith("."):
            continue
        stem, kind = sk
        path = os.path.join(input_dir, name)
        if fs.is_remote(path):
            if fs.isdir(path):
                logger.warning("%s: skipped, a folder", path)
                continue
        elif not os.path.isfile(path) or not os.access(path, os.R_OK):
            # A dangling link, a folder named like an image, an unreadable file: skip, say so.
            why = "a dangling link" if os.path.islink(path) and not os.path.exists(path) else (
                "a folder" if os.path.isdir(path) else "not a readable file")
            logger.warning("%s: skipped, %s", path, why)
            continue
        if stem in seen:
            raise TfsegError(f"{input_dir}: {seen[stem]} and {name} would both write the mask {stem!r}")
        seen[stem] = name
        out.append((os.path.join(input_dir, name), kind, stem))
    if not out:
        raise TfsegError(f"{input_dir}: no images ({', '.join(IMAGE_EXTS)}) or volumes (.nii, .nii.gz)")
    return out


def resolve_model(model_path: str) -> tuple[str, str]:
    """Classifies ``model_path`` as ``(FORMAT, version_dir)`` for an export (FORMAT ``savedmodel``,
    ``litert`` or ``onnx``, :func:`tfseg.export.versions.find_version`) or ``("run", run_dir)``.

    Raises:
      TfsegError: none of an export version, an export NAME directory, or a finished run.
    """
    from tfseg.export.versions import find_version

    found = find_version(model_path)
    if found:
        return found
    if fs.isfile(os.path.join(model_path, rundir.RUN_JSON)):
        return "run", model_path
    raise TfsegError(
        f"{model_path}: not an export version (saved_model.pb, model.tflite or model.onnx), an export NAME directory or a run "
        "directory (run.json)"
    )
