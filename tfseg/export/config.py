"""The export stage's settings: :class:`ExportConfig`, checked from its annotations
(:func:`tfseg.config.config_from_mapping`) and written into each version as
``assets.extra/export.json`` (:data:`tfseg.export.versions.CONFIG_JSON`)."""

from __future__ import annotations

import dataclasses
import re

from tfseg.config import StageConfig, setting
from tfseg.errors import TfsegError
from tfseg.export.graph import DEFAULT_MAX_PIXELS, DEFAULT_PRECISION, PRECISIONS

FORMATS = ("savedmodel", "litert", "onnx")
QUANTIZATIONS = ("none", "float16", "int8")  # LiteRT only


@dataclasses.dataclass(frozen=True)
class ExportConfig(StageConfig):
    """Every setting of ``tfseg export`` (the fields keep :func:`run_export`'s argument order).

    Attributes:
      run_dir: a completed `tfseg fit` run directory.
      export_base: the directory holding exported models (and models.config).
      name: the model name TF Serving serves it under.
      version: the version number; None = highest existing + 1 (1 for the first export).
      max_pixels: largest height x width a 2D signature accepts.
      overwrite: replace an existing VERSION directory.
      precision: the Keras dtype policy the served graph computes in: float32 (default, whatever
        trained the model: bfloat16 is slow on CPUs without native support, float16 on any
        CPU), or ``mixed_bfloat16`` / ``mixed_float16`` for servers that run them fast.
      tta: average over the flips the model was trained with, in the graph (as
        ``tfseg evaluate --tta`` scores it).
      tile: 2D: tile at the training size over the full-resolution image instead of resizing
        it (as ``tfseg evaluate --tile``); 3D volumes are always tiled.
      format: ``savedmodel`` (TF Serving), ``litert`` (VERSION/model.tflite, :mod:`tfseg.export.litert`)
        or ``onnx`` (VERSION/model.onnx, :mod:`tfseg.export.onnx`); the last two 2D only, with no
        tile/TTA/precision, and not added to models.config.
      quantize, calibration_records, calibration_data: LiteRT only (:func:`tfseg.export.litert.write_export`).
    """

    WHAT = "export config"

    run_dir: str
    export_base: str
    name: str
    version: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    overwrite: bool = False
    precision: str = setting(DEFAULT_PRECISION, choices=PRECISIONS)
    tta: bool = False
    tile: bool = False
    format: str = setting("savedmodel", choices=FORMATS)
    quantize: str = setting("none", choices=QUANTIZATIONS)
    calibration_records: int | None = None
    calibration_data: str | None = None

    def validate(self) -> None:
        """Raises: TfsegError: a name that cannot be a folder and URL part."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name or ""):
            raise TfsegError(f"--name {self.name!r}: use letters, digits, '_', '.', '-' (it becomes a directory and "
                             "URL part)")
