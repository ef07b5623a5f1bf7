"""The export folder: ``EXPORT_BASE/NAME/VERSION`` (TF Serving's layout), ``models.config`` and
the tfseg facts stored with each version (``VERSION/assets.extra/tfseg.json``); also read by
:mod:`tfseg.predict`, :mod:`tfseg.evaluate` and :mod:`tfseg.pipeline`.
"""

from __future__ import annotations

import json
import os
import re

from tfseg.errors import TfsegError
from tfseg.io import fs
from tfseg.io.fs import atomic_write_text

MODELS_CONFIG = "models.config"
METADATA = os.path.join("assets.extra", "tfseg.json")
# The export's settings (tfseg.export.config.ExportConfig), beside tfseg.json.
CONFIG_JSON = os.path.join("assets.extra", "export.json")
LITERT_MODEL = "model.tflite"  # what makes a version a LiteRT one (tfseg.export.litert writes it)


def list_versions(model_dir: str) -> list[int]:
    """Numbered version subdirectories holding a saved_model.pb (or a LiteRT model.tflite), ascending."""
    if not fs.isdir(model_dir):
        return []
    out = []
    for entry in fs.listdir(model_dir):
        if entry.isdigit() and any(fs.isfile(os.path.join(model_dir, entry, f))
                                   for f in ("saved_model.pb", "model.tflite")):
            out.append(int(entry))
    return sorted(out)


def is_litert_version(version_dir: str) -> bool:
    """Whether ``version_dir`` is a LiteRT export version (holds model.tflite)."""
    return fs.isfile(os.path.join(version_dir, LITERT_MODEL))


def find_version(model_path: str) -> tuple[str, str] | None:
    """``(kind, version_dir)`` for an export version or an export NAME folder (its highest
    version), kind ``"export"`` (a SavedModel) or ``"litert"`` (:mod:`tfseg.export.litert`); None for
    anything else."""
    if fs.isfile(os.path.join(model_path, "saved_model.pb")):
        return "export", model_path
    if is_litert_version(model_path):
        return "litert", model_path
    versions = list_versions(model_path)
    if not versions:
        return None
    path = os.path.join(model_path, str(versions[-1]))
    return ("litert" if is_litert_version(path) else "export"), path


def read_metadata(version_dir: str) -> dict:
    """The tfseg facts (ndim, channels, binary, sizes, class names) stored with an export."""
    path = os.path.join(version_dir, METADATA)
    if not fs.isfile(path):
        raise TfsegError(f"{version_dir}: no {METADATA}; not a tfseg export")
    try:
        meta = json.loads(fs.read_text(path))
    except ValueError as e:
        raise TfsegError(f"{path}: not valid JSON ({e}); re-run `tfseg export` for this version") from None
    if not isinstance(meta, dict):
        raise TfsegError(f"{path}: expected a JSON object; re-run `tfseg export` for this version")
    return meta


_CONFIG_ENTRY = re.compile(r"config\s*\{\s*name:\s*'([^']*)'.*?\}", re.S)


def update_models_config(export_base: str, name: str) -> None:
    """Adds (or keeps) NAME in EXPORT_BASE/models.config, keeping the other models' entries."""
    path = os.path.join(export_base, MODELS_CONFIG)
    names = []
    if fs.isfile(path):
        names = _CONFIG_ENTRY.findall(fs.read_text(path))
    if name not in names:
        names.append(name)
    entries = "".join(
        f"  config {{\n    name: '{n}'\n    base_path: '/models/{n}'\n    model_platform: 'tensorflow'\n  }}\n"
        for n in names
    )
    atomic_write_text(
        path,
        "# TF Serving --model_config_file, written by `tfseg export`; paths are inside the container\n"
        "# (mount EXPORT_BASE at /models).\n"
        f"model_config_list {{\n{entries}}}\n",
    )
