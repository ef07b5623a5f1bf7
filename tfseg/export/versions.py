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
LITERT_MODEL = "model.tflite"  # a LiteRT version's model (tfseg.export.litert writes it)
ONNX_MODEL = "model.onnx"  # an ONNX version's model (tfseg.export.onnx writes it)
# The file that makes a version directory one of each format (ExportConfig.format), written last.
VERSION_FILES = {"savedmodel": "saved_model.pb", "litert": LITERT_MODEL, "onnx": ONNX_MODEL}
FORMAT_NAMES = {"savedmodel": "SavedModel", "litert": "LiteRT", "onnx": "ONNX"}


def version_format(version_dir: str) -> str | None:
    """The format of an export version directory (a key of :data:`VERSION_FILES`), or None."""
    return next((fmt for fmt, marker in VERSION_FILES.items() if fs.isfile(os.path.join(version_dir, marker))), None)


def list_versions(model_dir: str) -> list[int]:
    """Numbered version subdirectories of any export format, ascending."""
    if not fs.isdir(model_dir):
        return []
    return sorted(int(e) for e in fs.listdir(model_dir) if e.isdigit() and version_format(os.path.join(model_dir, e)))


def find_version(model_path: str) -> tuple[str, str] | None:
    """``(format, version_dir)`` for an export version or an export NAME folder (its highest
    version), format ``"savedmodel"``, ``"litert"`` (:mod:`tfseg.export.litert`) or ``"onnx"``
    (:mod:`tfseg.export.onnx`); None for anything else."""
    fmt = version_format(model_path)
    if fmt:
        return fmt, model_path
    versions = list_versions(model_path)
    if not versions:
        return None
    path = os.path.join(model_path, str(versions[-1]))
    return version_format(path), path


def check_one_format(model_dir: str, fmt: str) -> None:
    """Refuses a version of one format beside versions of another under one NAME.

    TF Serving serves NAME's highest version and loads only SavedModels; and ``--model NAME``
    (evaluate, predict) takes the highest version, whatever its format.

    Raises:
      TfsegError: NAME holds versions of another format.
    """
    others = {}
    for v in list_versions(model_dir):
        other = version_format(os.path.join(model_dir, str(v)))
        if other != fmt:
            others.setdefault(other, []).append(str(v))
    if others:
        held = "; ".join(f"{FORMAT_NAMES[k]} versions {', '.join(v)}" for k, v in others.items())
        raise TfsegError(f"{model_dir}: holds {held}; give the {FORMAT_NAMES[fmt]} export its own --name "
                         "(--model NAME takes the highest version, and TF Serving serves it and loads SavedModels only)")


def publish_model_file(final: str, model_file: str, data: bytes, meta: dict, config: dict | None, *,
                       overwrite: bool) -> None:
    """Publishes a one-file export version (LiteRT, ONNX) through :func:`tfseg.io.publish.publish_dir`:
    tfseg.json and export.json first, the model file last (its presence marks the version complete)."""
    from tfseg.io import publish

    with publish.publish_dir(final, "export", complete_marker=model_file, overwrite=overwrite,
                             option="--version") as tmp:
        os.makedirs(os.path.join(tmp, os.path.dirname(METADATA)), exist_ok=True)
        with open(os.path.join(tmp, METADATA), "w") as f:
            json.dump(meta, f, indent=2)
        if config is not None:
            fs.atomic_write_json(os.path.join(tmp, CONFIG_JSON), config)
        with open(os.path.join(tmp, model_file), "wb") as f:
            f.write(data)


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
