"""The export stage itself: :func:`run_export` takes a completed RUN_DIR to a published
``EXPORT_BASE/NAME/VERSION`` (a TF Serving SavedModel, a LiteRT model or an ONNX model), with its README and
the ``models.config`` entry."""

from __future__ import annotations

import json
import logging
import os

from tfseg import rundir
from tfseg.errors import TfsegError
from tfseg.export.config import ExportConfig
from tfseg.export.graph import build_archive, model_precision, with_precision
from tfseg.export.readme import class_colors, colour_table, readme_text
from tfseg.export.versions import CONFIG_JSON, METADATA, check_one_format, list_versions, update_models_config
from tfseg.io import fs, locks, publish
from tfseg.io.fs import atomic_write_text

logger = logging.getLogger(__name__)


@locks.holding_locks
def run_export(*args, **kwargs) -> str:
    """Exports RUN_DIR's model as EXPORT_BASE/NAME/VERSION for TF Serving (or LiteRT, or ONNX).

    Args:
      *args, **kwargs: an :class:`~tfseg.export.config.ExportConfig` (or a mapping of its keys),
        or its fields themselves: ``run_export(run_dir, export_base, name, version=None,
        max_pixels=..., overwrite=False, precision="float32", tta=False, tile=False,
        format="savedmodel", quantize="none", calibration_records=None, calibration_data=None)``.

    Returns:
      The version directory written (the config goes into it, as assets.extra/export.json).

    Raises:
      TfsegError: a bad config value, bad run directory, bad name or version, or an existing
        version without ``overwrite``.
    """
    cfg = ExportConfig.from_call(args, kwargs)
    run_cfg, run = _read_run(cfg)
    from tfseg.inference import InferenceOptions

    options = InferenceOptions.make(run.ndim, tile=cfg.tile, flips=rundir.test_time_flips(cfg.run_dir, run, cfg.tta))
    model, model_dir, version, final = _claim_version(cfg)
    # The run's facts (rundir.RunInfo's keys, so RunInfo.from_json reads tfseg.json back);
    # "precision" is what the served graph computes in.
    meta = run.to_json()
    meta.update({"precision": cfg.precision, "trained_precision": model_precision(model),
                 "inference": options.to_json()})
    meta.update({"max_pixels": int(cfg.max_pixels), "run_dir": fs.normalize(cfg.run_dir), "name": cfg.name,
                 "version": version, "class_colors": class_colors(run_cfg)})
    if cfg.format == "litert":
        _write_litert(cfg, model, run, run_cfg, meta, model_dir, final)
        logger.info("exported %s version %s (LiteRT, %s) to %s", cfg.name, version, cfg.quantize, final)
        return final
    if cfg.format == "onnx":
        from tfseg.export import onnx

        meta = onnx.write_export(with_precision(model, "float32"), run, meta, final, overwrite=cfg.overwrite,
                                 config=cfg.to_json())
        atomic_write_text(os.path.join(model_dir, "README.md"), onnx.readme(cfg.name, meta, colour_table(run_cfg)))
        logger.info("exported %s version %s (ONNX) to %s", cfg.name, version, final)
        return final
    _write_savedmodel(cfg, build_archive(with_precision(model, cfg.precision), run, cfg.max_pixels, options),
                      meta, final)
    atomic_write_text(os.path.join(model_dir, "README.md"),
                      readme_text(cfg.name, cfg.export_base, run_cfg, cfg.max_pixels, meta))
    update_models_config(cfg.export_base, cfg.name)
    logger.info("exported %s version %s to %s", cfg.name, version, final)
    return final


def _read_run(cfg: ExportConfig) -> tuple[dict, rundir.RunInfo]:
    """The run's run.json and facts, checked against the format's options."""
    from tfseg.export import litert

    run_cfg = rundir.load_run_config(cfg.run_dir)
    run = rundir.RunInfo.from_json(run_cfg, os.path.join(cfg.run_dir, rundir.RUN_JSON))
    if cfg.format == "litert":
        litert.check_exportable(run, quantize=cfg.quantize, tile=cfg.tile, tta=cfg.tta, precision=cfg.precision)
    elif cfg.format == "onnx":
        from tfseg.export import onnx

        onnx.check_exportable(run, quantize=cfg.quantize, tile=cfg.tile, tta=cfg.tta, precision=cfg.precision)
    if cfg.format != "litert" and (cfg.quantize != "none" or cfg.calibration_records or cfg.calibration_data):
        raise TfsegError("--quantize/--calibration-records/--calibration-data: for --format litert only")
    return run_cfg, run


def _claim_version(cfg: ExportConfig) -> tuple[object, str, int, str]:
    """Claims EXPORT_BASE, loads the model, locks NAME and allocates the version.

    Returns:
      (the Keras model, EXPORT_BASE/NAME, the version number, EXPORT_BASE/NAME/VERSION).
    """

    # EXPORT_BASE collects every export (NAME/VERSION/ + models.config): it must be new, empty,
    # or an earlier `tfseg export` output; it never overlaps the run it exports.
    publish.claim(cfg.export_base, "export", complete_marker=None, overwrite=True, inputs=[("--run", cfg.run_dir)],
                  lock=False)
    model = rundir.load_model(cfg.run_dir)  # a broken model fails before EXPORT_BASE is created
    publish.claim_container(cfg.export_base, "export", inputs=[("--run", cfg.run_dir)])
    model_dir = os.path.join(cfg.export_base, cfg.name)
    # One writer per model name: a version number is allocated and published under this lock,
    # so two exports never hand out (or replace) the same version.
    locks.acquire_lock(model_dir, "export", option="--name")
    version = cfg.version
    if version is None:
        existing = list_versions(model_dir)
        version = (existing[-1] + 1) if existing else 1
    if int(version) < 1:
        raise TfsegError(f"--version {version}: must be a positive integer")
    check_one_format(model_dir, cfg.format)
    final = os.path.join(model_dir, str(int(version)))
    if fs.exists(final) and not cfg.overwrite:
        raise TfsegError(f"{final}: version {version} already exists; pass --overwrite or another --version")
    return model, model_dir, int(version), final


def _write_savedmodel(cfg: ExportConfig, archive, meta: dict, final: str) -> None:
    """Publishes VERSION: the SavedModel, tfseg.json and export.json."""
    # TF Serving watches NAME/ and would load a half-written version: write beside it (a
    # dot-prefixed, non-numeric name it ignores) and rename.
    with publish.publish_dir(final, "export", complete_marker="saved_model.pb", overwrite=cfg.overwrite,
                             option="--version") as tmp:
        archive.write_out(tmp, verbose=False)
        os.makedirs(os.path.join(tmp, "assets.extra"), exist_ok=True)
        with open(os.path.join(tmp, METADATA), "w") as f:
            json.dump(meta, f, indent=2)
        fs.atomic_write_json(os.path.join(tmp, CONFIG_JSON), cfg.to_json())


def _write_litert(cfg: ExportConfig, model, run: rundir.RunInfo, run_cfg: dict, meta: dict, model_dir: str,
                  final: str) -> None:
    """Publishes VERSION as a LiteRT model (:func:`tfseg.export.litert.write_export`) and NAME/README.md."""
    from tfseg.export import litert

    meta = litert.write_export(
        with_precision(model, "float32"), run, meta, final, overwrite=cfg.overwrite, quantize=cfg.quantize,
        calibration_records=cfg.calibration_records or litert.DEFAULT_CALIBRATION_RECORDS,
        calibration_data=cfg.calibration_data or run_cfg.get("data_dir"), config=cfg.to_json())
    atomic_write_text(os.path.join(model_dir, "README.md"), litert.readme(cfg.name, meta, colour_table(run_cfg)))
