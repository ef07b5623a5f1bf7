"""The export stage itself: :func:`run_export` takes a completed RUN_DIR to a published
``EXPORT_BASE/NAME/VERSION`` (a TF Serving SavedModel, or a LiteRT model), with its README and
the ``models.config`` entry."""

from __future__ import annotations

import json
import logging
import os
import re

from tfseg import outputs, rundir
from tfseg.errors import TfsegError
from tfseg.export.graph import DEFAULT_MAX_PIXELS, DEFAULT_PRECISION, PRECISIONS, build_archive, model_precision, with_precision
from tfseg.export.readme import class_colors, colour_table, readme_text
from tfseg.export.versions import METADATA, list_versions, update_models_config
from tfseg.outputs import atomic_write_text

logger = logging.getLogger(__name__)


@outputs.holding_locks
def run_export(
    run_dir: str,
    export_base: str,
    name: str,
    version: int | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    overwrite: bool = False,
    precision: str = DEFAULT_PRECISION,
    tta: bool = False,
    tile: bool = False,
    format: str = "savedmodel",
    quantize: str = "none",
    calibration_records: int | None = None,
    calibration_data: str | None = None,
) -> str:
    """Exports RUN_DIR's model as EXPORT_BASE/NAME/VERSION for TF Serving (or LiteRT).

    Args:
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
      format: ``savedmodel`` (TF Serving) or ``litert`` (VERSION/model.tflite, :mod:`tfseg.litert`;
        2D only, no tile/TTA/precision; not added to models.config).
      quantize, calibration_records, calibration_data: LiteRT only (:func:`tfseg.litert.write_export`).

    Returns:
      The version directory written.

    Raises:
      TfsegError: bad run directory, bad name or version, or an existing version without
        ``overwrite``.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name or ""):
        raise TfsegError(f"--name {name!r}: use letters, digits, '_', '.', '-' (it becomes a directory and URL part)")
    if precision not in PRECISIONS:
        raise TfsegError(f"--precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    cfg = rundir.load_run_config(run_dir)
    run = rundir.RunInfo.from_json(cfg, os.path.join(run_dir, rundir.RUN_JSON))
    from tfseg import litert
    from tfseg.inference import InferenceOptions

    if format not in litert.FORMATS:
        raise TfsegError(f"--format {format!r}: choose from {', '.join(litert.FORMATS)}")
    if format == "litert":
        litert.check_exportable(run, quantize=quantize, tile=tile, tta=tta, precision=precision)
    elif quantize != "none" or calibration_records or calibration_data:
        raise TfsegError("--quantize/--calibration-records/--calibration-data: for --format litert only")

    options = InferenceOptions.make(run.ndim, tile=tile, flips=rundir.test_time_flips(run_dir, run, tta))
    # EXPORT_BASE collects every export (NAME/VERSION/ + models.config): it must be new, empty,
    # or an earlier `tfseg export` output; it never overlaps the run it exports.
    outputs.claim(export_base, "export", complete_marker=None, overwrite=True, inputs=[("--run", run_dir)],
                  lock=False)
    model = rundir.load_model(run_dir)  # a broken model fails before EXPORT_BASE is created
    outputs.claim_container(export_base, "export", inputs=[("--run", run_dir)])
    model_dir = os.path.join(export_base, name)
    # One writer per model name: a version number is allocated and published under this lock,
    # so two exports never hand out (or replace) the same version.
    outputs.acquire_lock(model_dir, "export", option="--name")
    if version is None:
        existing = list_versions(model_dir)
        version = (existing[-1] + 1) if existing else 1
    if int(version) < 1:
        raise TfsegError(f"--version {version}: must be a positive integer")
    litert.check_one_format(model_dir, format)
    final = os.path.join(model_dir, str(int(version)))
    if outputs.exists(final) and not overwrite:
        raise TfsegError(f"{final}: version {version} already exists; pass --overwrite or another --version")

    trained_precision = model_precision(model)
    # The run's facts (rundir.RunInfo's keys, so RunInfo.from_json reads tfseg.json back);
    # "precision" is what the served graph computes in.
    meta = run.to_json()
    meta.update({"precision": precision, "trained_precision": trained_precision, "inference": options.to_json()})
    meta.update({"max_pixels": int(max_pixels), "run_dir": outputs.normalize(run_dir), "name": name,
                 "version": int(version), "class_colors": class_colors(cfg)})
    if format == "litert":
        meta = litert.write_export(
            with_precision(model, "float32"), run, meta, final, overwrite=overwrite, quantize=quantize,
            calibration_records=calibration_records or litert.DEFAULT_CALIBRATION_RECORDS,
            calibration_data=calibration_data or cfg.get("data_dir"))
        atomic_write_text(os.path.join(model_dir, "README.md"), litert.readme(name, meta, colour_table(cfg)))
        logger.info("exported %s version %s (LiteRT, %s) to %s", name, version, quantize, final)
        return final
    archive = build_archive(with_precision(model, precision), run, max_pixels, options)
    # TF Serving watches NAME/ and would load a half-written version: write beside it (a
    # dot-prefixed, non-numeric name it ignores) and rename.
    with outputs.publish_dir(final, "export", complete_marker="saved_model.pb", overwrite=overwrite,
                             option="--version") as tmp:
        archive.write_out(tmp, verbose=False)
        os.makedirs(os.path.join(tmp, "assets.extra"), exist_ok=True)
        with open(os.path.join(tmp, METADATA), "w") as f:
            json.dump(meta, f, indent=2)
    atomic_write_text(os.path.join(model_dir, "README.md"), readme_text(name, export_base, cfg, max_pixels, meta))
    update_models_config(export_base, name)
    logger.info("exported %s version %s to %s", name, version, final)
    return final
