"""run_predict: the predict stage from an input folder to a published folder of masks.

The local job reads the inputs in batches, predicts them with one
:class:`~tfseg.predict.base.Predictor` and writes each result (:mod:`tfseg.predict.writers`); with
``runner`` the same job runs as a Beam pipeline (:mod:`tfseg.predict.beam`). A file that fails is
a record in ``predict_summary.json``; the rest are still written.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

from tfseg import photos
from tfseg import volumes as volume_io
from tfseg.errors import TfsegError, first_line
from tfseg.io import fs, locks, publish
from tfseg.predict.base import NEEDS_3D, Predictor
from tfseg.predict.config import CONFIG_JSON, PredictConfig
from tfseg.predict.inputs import list_inputs, resolve_model
from tfseg.predict.predictors import make_predictor, model_facts
from tfseg.predict.writers import write_image_outputs, write_volume_outputs

logger = logging.getLogger(__name__)

SUMMARY_JSON = "predict_summary.json"


def _predict_batch(predictor: Predictor, batch: Sequence[tuple[str, str, str]], output_dir: str,
                   overlay: bool = False) -> list[dict]:
    """Predicts and writes one batch of inputs; returns a result record per input."""
    results = []
    images, datas = [], []
    for item in batch:
        if item[1] != "image":
            continue
        try:  # as displayed (EXIF orientation): the masks line up with the photo a person sees
            datas.append(photos.as_displayed(fs.read_bytes(item[0]))[0])
            images.append(item)
        except OSError as e:  # deleted or unreadable since it was listed
            results.append({"input": item[0], "error": f"cannot read the file ({e.strerror or first_line(e)})"})
    volumes = [item for item in batch if item[1] == "volume"]
    if images:
        try:
            masks = predictor.predict_images(datas)
        except ValueError as e:
            masks = None
            if len(images) == 1:
                results.append({"input": images[0][0], "error": str(e)})
            else:
                # One bad image fails the whole batch in the graph; find it by going one by one.
                for item in images:
                    results.extend(_predict_batch(predictor, [item], output_dir, overlay))
        for (path, _, stem), data, mask in zip(images, datas, masks or []):
            results.append(write_image_outputs(predictor, path, data, stem, mask, output_dir, overlay))
    for path, _, stem in volumes:
        try:
            if predictor.ndim != 3:
                raise ValueError(NEEDS_3D)
            volume, img = volume_io.read_volume(path, predictor.channels, predictor.preprocessing)
            mask = predictor.predict_volume(volume)
            results.append(write_volume_outputs(predictor, path, volume, img, stem, mask, output_dir, overlay))
        except ValueError as e:
            results.append({"input": path, "error": str(e)})
    return results


def _beam_predict(model_path, items, output_dir, *, runner, beam_args, batch_size, predictor_kwargs,
                  overlay: bool = False) -> list[dict]:
    """The job as a Beam pipeline with RunInference (:mod:`tfseg.predict.beam`)."""
    from tfseg.predict import beam

    facts = model_facts(model_path, predictor_kwargs.get("server"))
    # Remote inputs and outputs through Beam's FileSystems in the workers too, where the
    # launcher uses them (run_predict enters beam_filesystems for a runner).
    beam_io = any(fs.uses_beam(item[0]) for item in items[:1]) or fs.uses_beam(output_dir)
    return beam.run_pipeline(model_path, items, output_dir, runner=runner, beam_args=beam_args,
                             batch_size=batch_size, predictor_kwargs=predictor_kwargs, facts=facts, overlay=overlay,
                             beam_io=beam_io)


@locks.holding_locks
def run_predict(*args, progress: Callable[[int], None] | None = None, **kwargs) -> dict:
    """Writes a mask for every image and volume in ``input_dir`` to ``output_dir``.

    Args:
      *args, **kwargs: a :class:`~tfseg.predict.config.PredictConfig` (or a mapping of its keys),
        or its fields themselves: ``run_predict(model_path, input_dir, output_dir, batch_size=8,
        server=None, grpc=False, model_version=None, runner=None, beam_args=(), tile=False,
        tta=False, overlap=None, overwrite=False, overlay=False)``; written beside the masks as
        ``predict.json``.
      progress: called with the number of inputs finished after each batch.

    Returns:
      Summary dict: ``written``, ``failed`` (list of {input, error}), ``output``, ``seconds``,
      ``model``; also written as ``predict_summary.json``.

    Raises:
      TfsegError: a bad setting (named), no readable input, an output tfseg may not write.
    """
    cfg = PredictConfig.from_call(args, kwargs)
    if cfg.runner:
        # A Beam job (DaskRunner, Dataflow, ...) reads and writes gs://, s3://, hdfs:// through
        # Beam's FileSystems, on the launcher (listing, ownership, publishing) and in its
        # workers, like convert: they honour the runner's credentials and STORAGE_EMULATOR_HOST,
        # where TF's gs:// client may not. A remote output is staged on the same store.
        with fs.beam_filesystems():
            return _run_predict(cfg, progress)
    return _run_predict(cfg, progress)


def _run_predict(cfg: PredictConfig, progress) -> dict:
    model_path, input_dir, output_dir, server = cfg.model_path, cfg.input_dir, cfg.output_dir, cfg.server
    batch_size, runner, overlay = cfg.batch_size, cfg.runner, cfg.overlay
    items = list_inputs(input_dir)
    start = time.time()
    predictor_kwargs = dict(server=server, grpc=cfg.grpc, tile=cfg.tile, tta=cfg.tta, overlap=cfg.overlap,
                            batch_size=batch_size, model_version=cfg.model_version)
    owned = dict(complete_marker=SUMMARY_JSON, overwrite=cfg.overwrite,
                 inputs=[("--input", input_dir)] + ([] if server else [("--model", model_path)]))
    publish.claim(output_dir, "predict", **owned)
    with publish.publish_dir(output_dir, "predict", **owned) as tmp:
        if runner:
            if not server:
                resolve_model(model_path)  # fail on a bad path before starting the pipeline
            results = _beam_predict(model_path, items, tmp, runner=runner, beam_args=cfg.beam_args,
                                    batch_size=batch_size, predictor_kwargs=predictor_kwargs, overlay=overlay)
            if progress:
                progress(len(items))
        else:
            predictor = make_predictor(model_path, **predictor_kwargs)
            results = []
            for i in range(0, len(items), batch_size):
                batch = items[i : i + batch_size]
                results.extend(_predict_batch(predictor, batch, tmp, overlay))
                if progress:
                    progress(len(batch))
        failed = [r for r in results if "error" in r]
        for r in failed:
            logger.warning("%s: %s", r["input"], r["error"])
        summary = {
            "model": model_path if server else fs.normalize(model_path),
            "server": server,
            "input": fs.normalize(input_dir),
            "output": fs.normalize(output_dir),
            "written": len(results) - len(failed),
            "failed": failed,
            "seconds": round(time.time() - start, 3),
        }
        if not summary["written"]:
            raise TfsegError(f"{input_dir}: none of the {len(results)} inputs could be predicted; "
                             f"first: {failed[0]['input']}: {failed[0]['error']}")
        fs.atomic_write_json(fs.join(tmp, CONFIG_JSON), cfg.to_json())
        fs.atomic_write_json(fs.join(tmp, SUMMARY_JSON), summary)  # the completion marker, last
    return summary
