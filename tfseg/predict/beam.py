"""`tfseg predict --runner`: batch inference as a Beam pipeline built on RunInference.

    Create(batches of inputs, cut like the local job's) | Read (-> encoded image bytes /
      z-scored volumes, keyed by the input; unreadable ones passed around as errors)
      | RunInference(KeyedModelHandler(handler).with_no_batching())   # apache_beam.ml.inference.base
      | WriteMasks (palette PNG / NIfTI, overlays)    # the same writer as the local predictor
      | GatherAll | WriteResults (one results file the launcher reads)

The graph runs on the DirectRunner and on Beam's DaskRunner (``--runner dask``): no
finish_bundle output (hence no BatchElements and no WriteToText, which the DaskRunner drops or
cannot run), one output per ParDo, one final transform that reads every branch.

The handler is Beam's TensorFlow model handler (``TFModelHandlerTensor`` of
``apache_beam.ml.inference.tensorflow_inference``) for an exported SavedModel, with two things
replaced: ``load_model`` (Beam's loads with ``tf.keras.models.load_model(hub.resolve(uri))``,
which Keras 3 cannot do for a SavedModel, so :class:`SavedModelHandler` uses
``tf.saved_model.load``) and the inference function, which calls the ``serving_default``
signature with the encoded images of a batch (any sizes) and crops each mask to its image. A
RUN_DIR or a TF Serving server (``--server``) goes through the same RunInference with
:class:`PredictorHandler`, a base ``ModelHandler`` around :func:`tfseg.predict.predictors.make_predictor`.
Both fall back to one input at a time when a batch fails, so a bad file fails alone, as in the
local predictor, and the masks are the same bytes the local predictor writes
(:mod:`tfseg.predict.writers`).

Beam's ``tensorflow_inference`` module imports ``tensorflow_hub`` at import time, only for the
``hub.resolve`` of its default loader, which tfseg replaces. tensorflow_hub requires tf-keras
(Keras 2), which tfseg does not install; when it is absent, a stand-in module whose ``resolve``
returns the path unchanged is registered before the import (:func:`_import_tf_handler`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import types
from typing import Any, Iterable, Sequence

import numpy as np

from tfseg import photos, volumes
from tfseg.io import fs
from tfseg.predict.base import NEEDS_3D
from tfseg.predict.inputs import resolve_model
from tfseg.predict.predictors import call_image_signature, call_volume_signature, make_predictor
from tfseg.predict.writers import write_image_outputs, write_volume_outputs

log = logging.getLogger(__name__)


def _import_tf_handler():
    """``TFModelHandlerTensor``, importable without tensorflow_hub (see the module doc)."""
    try:
        import tensorflow_hub  # noqa: F401
    except ImportError:
        if "tensorflow_hub" not in sys.modules:
            stub = types.ModuleType("tensorflow_hub")
            stub.__doc__ = "tfseg stand-in: Beam's tensorflow_inference only calls hub.resolve(path)"
            stub.resolve = lambda handle: handle
            sys.modules["tensorflow_hub"] = stub
    from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerTensor

    return TFModelHandlerTensor


TFModelHandlerTensor = _import_tf_handler()

from apache_beam.ml.inference.base import ModelHandler, PredictionResult  # noqa: E402


def _run_items(predict_images, predict_volume, batch: Sequence[tuple]) -> list[Any]:
    """One result per element of ``batch`` (("image", bytes) / ("volume", array) tuples): a
    mask, or ``{"error": message}``. Images go in one call; a failing call is retried one image
    at a time so only the bad image fails."""
    out: list[Any] = [None] * len(batch)
    images = [i for i, (kind, _) in enumerate(batch) if kind == "image"]
    if images:
        try:
            masks = predict_images([batch[i][1] for i in images])
            for i, m in zip(images, masks):
                out[i] = m
        except ValueError as e:
            if len(images) == 1:
                out[images[0]] = {"error": str(e)}
            else:
                for i in images:
                    out[i] = _run_items(predict_images, predict_volume, [batch[i]])[0]
    for i, (kind, value) in enumerate(batch):
        if kind == "volume":
            try:
                out[i] = predict_volume(value)
            except ValueError as e:
                out[i] = {"error": str(e)}
    return out


def saved_model_inference_fn(model, batch: Sequence[tuple], inference_args: dict, model_id: str | None = None
                             ) -> Iterable[PredictionResult]:
    """TFModelHandlerTensor's ``inference_fn`` for a tfseg export: ``serving_default`` on the
    encoded images of the batch (2D) or on each volume (3D)."""
    serve = model.signatures["serving_default"]
    results = _run_items(lambda datas: call_image_signature(serve, datas),
                         lambda volume: call_volume_signature(serve, volume), batch)
    return [PredictionResult(example, inference, model_id) for example, inference in zip(batch, results)]


class SavedModelHandler(TFModelHandlerTensor):
    """Beam's TensorFlow model handler on a tfseg export (loaded with tf.saved_model.load)."""

    def __init__(self, version_dir: str, *, max_batch_size: int = 8):
        super().__init__(version_dir, inference_fn=saved_model_inference_fn, min_batch_size=1,
                         max_batch_size=max_batch_size)

    def load_model(self):
        import tensorflow as tf

        return tf.saved_model.load(self._model_uri)

    def get_num_bytes(self, batch) -> int:
        return sum(len(v) if isinstance(v, bytes) else np.asarray(v).nbytes for _, v in batch)

    def get_metrics_namespace(self) -> str:
        return "tfseg_predict"


class PredictorHandler(ModelHandler):
    """RunInference for a RUN_DIR (Keras, tiled / TTA) or a TF Serving server: one
    :func:`tfseg.predict.predictors.make_predictor` per worker."""

    def __init__(self, model_path: str, predictor_kwargs: dict, *, max_batch_size: int = 8):
        super().__init__()
        self.model_path, self.predictor_kwargs = model_path, dict(predictor_kwargs)
        self.max_batch_size = max_batch_size

    def batch_elements_kwargs(self):  # the ModelHandler hook every Beam release since 2.40 reads
        return {"min_batch_size": 1, "max_batch_size": self.max_batch_size}

    def load_model(self):
        return make_predictor(self.model_path, **self.predictor_kwargs)

    def run_inference(self, batch, model, inference_args=None) -> Iterable[PredictionResult]:
        def predict_volume(volume):
            if model.ndim != 3:
                raise ValueError(NEEDS_3D)
            return model.predict_volume(volume)

        results = _run_items(model.predict_images, predict_volume, batch)
        return [PredictionResult(example, inference, self.model_path) for example, inference in zip(batch, results)]

    def get_num_bytes(self, batch) -> int:
        return sum(len(v) if isinstance(v, bytes) else np.asarray(v).nbytes for _, v in batch)

    def get_metrics_namespace(self) -> str:
        return "tfseg_predict"


def _read_batch(items: Sequence[tuple[str, str, str]], facts, beam_io: bool) -> list[tuple]:
    """A batch of inputs -> ``("ok", [((path, kind, stem), (kind, data)), ...])`` for the readable
    ones (one element: the batch RunInference gets) and ``("error", ((path, kind, stem),
    {"error": message}))`` for each unreadable one. One output tagged by value: the DaskRunner
    merges a multi-output ParDo's outputs into one bag."""
    ok, out = [], []
    for path, kind, stem in items:
        key = (path, kind, stem)
        try:
            if kind == "image":
                # Through tf.io.gfile, like the local job (gs://, s3://, ram://), or Beam's
                # FileSystems where the launcher uses them (beam_io: gs:// with the runner's
                # credentials or an emulator).
                ok.append((key, ("image", photos.as_displayed(_read_input(path, beam_io))[0])))
                continue
            if facts.ndim != 3:
                raise ValueError(NEEDS_3D)
            with _local_input(path, beam_io) as local:
                volume, _ = volumes.read_volume(local, facts.channels, facts.preprocessing)
            ok.append((key, ("volume", volume)))
        except (OSError, ValueError) as e:
            out.append(("error", (key, {"error": str(e)})))
    return ([("ok", ok)] if ok else []) + out


def _read_input(path: str, beam_io: bool) -> bytes:
    if beam_io and fs.is_remote(path):
        from tfseg.convert.shards import open_read

        with open_read(path) as f:
            return f.read()
    return fs.read_bytes(path)


def _local_input(path: str, beam_io: bool):
    """``path``, or a local copy of it read through Beam's filesystems (for nibabel)."""
    return fs.local_copy(path, read=lambda p: _read_input(p, beam_io))


def _write_result(keyed, facts, output_dir: str, overlay: bool, beam_io: bool) -> str:
    """(key, PredictionResult | {"error"}) -> the input's result record (JSON), its files written
    under ``output_dir`` (remote with beam_io: written to a local folder, then uploaded through
    Beam's FileSystems)."""
    import json

    (path, kind, stem), result = keyed
    if isinstance(result, dict):  # read error, passed around RunInference
        return json.dumps({"input": path, "error": result["error"]})
    mask = result.inference
    if isinstance(mask, dict):
        return json.dumps({"input": path, "error": mask["error"]})
    remote = beam_io and fs.is_remote(output_dir)
    with contextlib.ExitStack() as stack:
        target = stack.enter_context(tempfile.TemporaryDirectory(prefix="tfseg-predict-")) if remote else output_dir
        if kind == "image":
            record = write_image_outputs(facts, path, result.example[1], stem, np.asarray(mask), target, overlay)
        else:
            import nibabel as nib

            local = stack.enter_context(_local_input(path, beam_io))
            record = write_volume_outputs(facts, path, result.example[1], nib.load(local), stem, np.asarray(mask),
                                          target, overlay)
        if remote:
            from tfseg.convert.shards import upload

            for rel in [record["output"]] + ([record["overlay"]] if record.get("overlay") else []):
                upload(os.path.join(target, rel), fs.join(output_dir, *rel.split(os.sep)))
    return json.dumps(record)


class _WriteResults:
    """[record JSON, ...] -> the results file (``.beam-results.jsonl`` in the output folder)."""

    def __init__(self, path: str, beam_io: bool):
        self.path, self.beam_io = path, beam_io

    def __call__(self, lines: list[str]) -> str:
        text = "".join(line + "\n" for line in lines).encode("utf-8")
        if self.beam_io and fs.is_remote(self.path):
            from tfseg.convert.shards import write_bytes

            write_bytes(self.path, text)
        else:
            with open(self.path, "wb") as f:
                f.write(text)
        return self.path


RESULTS_FILE = ".beam-results.jsonl"


def run_pipeline(model_path: str, items: Sequence[tuple[str, str, str]], output_dir: str, *, runner: str,
                 beam_args: Iterable[str], batch_size: int, predictor_kwargs: dict, facts,
                 overlay: bool = False, beam_io: bool = False) -> list[dict]:
    """Runs the RunInference pipeline over ``items`` ((path, kind, stem)); returns the result
    records the local predictor would return (same order as ``items``).

    The inputs are cut into batches of ``batch_size`` on the launcher, the same batches as the
    local job's, and RunInference runs without its own batching (``with_no_batching``): Beam's
    BatchElements emits each bundle's last batch from finish_bundle, which the DaskRunner drops,
    and the same batches give the model the same calls as the local predictor on every runner.

    Args:
      runner: a runner name :func:`tfseg.convert.runners.resolve_runner` knows (``DirectRunner``,
        ``dask``, ``dataflow``, ...).
      facts: :func:`tfseg.predict.predictors.model_facts`: the writer's names and colours, and the
        model's ``ndim``, ``channels`` and ``preprocessing`` (volumes are read with them).
      beam_io: read remote inputs and write remote outputs through Beam's FileSystems (the
        launcher runs in :func:`tfseg.io.fs.beam_filesystems`).

    Raises:
      TfsegError: an unknown runner or Beam option, or the job failed on the runner (one line).
    """
    import json

    import apache_beam as beam
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

    from tfseg.convert.checks import one_line
    from tfseg.convert.runners import dask_partitions, pipeline_options, runner_name
    from tfseg.convert.transforms import GatherAll
    from tfseg.errors import TfsegError

    server = predictor_kwargs.get("server")
    if server:
        handler = PredictorHandler(model_path, predictor_kwargs, max_batch_size=batch_size)
    else:
        kind, path = resolve_model(model_path)
        if kind == "savedmodel":
            handler = SavedModelHandler(path, max_batch_size=batch_size)
        else:
            handler = PredictorHandler(path, predictor_kwargs, max_batch_size=batch_size)

    batches = [[tuple(i) for i in items[k:k + batch_size]] for k in range(0, len(items), batch_size)]
    results_path = fs.join(output_dir, RESULTS_FILE) if fs.is_remote(output_dir) else os.path.join(
        output_dir, RESULTS_FILE)
    options = pipeline_options(["--runner", runner, *beam_args])
    dask_partitions(options, len(batches))
    p = beam.Pipeline(options=options)
    read_ = (p | "ListInputs" >> beam.Create(batches)
             | "Read" >> beam.FlatMap(_read_batch, facts, beam_io))
    ok = read_ | "Readable" >> beam.FlatMap(lambda kv: [kv[1]] if kv[0] == "ok" else [])
    bad = read_ | "Unreadable" >> beam.FlatMap(lambda kv: [kv[1]] if kv[0] == "error" else [])
    predicted = ok | "RunInference" >> RunInference(KeyedModelHandler(handler).with_no_batching())
    _ = ((predicted, bad) | "All" >> beam.Flatten()
         | "WriteMasks" >> beam.Map(_write_result, facts, output_dir, overlay, beam_io)
         | "Gather" >> GatherAll()
         | "WriteResults" >> beam.Map(_WriteResults(results_path, beam_io)))
    try:
        result = p.run()
        state = result.wait_until_finish()
    except Exception as e:  # noqa: BLE001 - the runner's own errors (a cluster unreachable, ...)
        log.debug("the Beam job failed", exc_info=True)
        raise TfsegError(f"the Beam job failed on {runner_name(options)}: {one_line(e)} "
                         "(nothing was published; -v shows the traceback)") from None
    finally:
        client = getattr(locals().get("result"), "client", None)  # the DaskRunner's dask.distributed Client
        if client is not None and hasattr(client, "close"):
            client.close()
    if state is not None and str(state).split(".")[-1] not in ("DONE", "UNKNOWN"):
        raise TfsegError(f"the Beam job ended {state} on {runner_name(options)}; nothing was published")
    records = []
    if fs.exists(results_path):
        text = fs.read_text(results_path) if fs.is_remote(results_path) else open(results_path).read()
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        fs.remove(results_path)
    order = {path: i for i, (path, _, _) in enumerate(items)}
    return sorted(records, key=lambda r: order.get(r["input"], len(order)))
