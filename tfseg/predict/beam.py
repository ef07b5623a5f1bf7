"""`tfseg predict --runner`: batch inference as a Beam pipeline built on RunInference.

    ReadInputs (path -> encoded image bytes / z-scored volume, keyed by the input)
      | RunInference(KeyedModelHandler(handler))      # apache_beam.ml.inference.base
      | WriteMasks (palette PNG / NIfTI, overlays)    # the same writer as the local predictor

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

import logging
import os
import sys
import types
from typing import Any, Iterable, Sequence

import numpy as np

from tfseg import outputs, volumes
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
        super().__init__(min_batch_size=1, max_batch_size=max_batch_size)
        self.model_path, self.predictor_kwargs = model_path, dict(predictor_kwargs)

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


def run_pipeline(model_path: str, items: Sequence[tuple[str, str, str]], output_dir: str, *, runner: str,
                 beam_args: Iterable[str], batch_size: int, predictor_kwargs: dict, facts,
                 overlay: bool = False) -> list[dict]:
    """Runs the RunInference pipeline over ``items`` ((path, kind, stem)); returns the result
    records the local predictor would return (same order as ``items``).

    Args:
      facts: :func:`tfseg.predict.predictors.model_facts`: the writer's names and colours, and the
        model's ``ndim``, ``channels`` and ``preprocessing`` (volumes are read with them).
    """
    import json

    import apache_beam as beam
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.options.pipeline_options import PipelineOptions

    server = predictor_kwargs.get("server")
    if server:
        handler = PredictorHandler(model_path, predictor_kwargs, max_batch_size=batch_size)
    else:
        kind, path = resolve_model(model_path)
        if kind == "export":
            handler = SavedModelHandler(path, max_batch_size=batch_size)
        else:
            handler = PredictorHandler(path, predictor_kwargs, max_batch_size=batch_size)

    def read(item):
        path, kind, stem = item
        try:
            if kind == "image":
                # Through tf.io.gfile, like the local job: gs://, s3:// and ram:// inputs too.
                return [((path, kind, stem), ("image", outputs.read_bytes(path)))]
            if facts.ndim != 3:
                raise ValueError(NEEDS_3D)
            volume, _ = volumes.read_volume(path, facts.channels, facts.preprocessing)
            return [((path, kind, stem), ("volume", volume))]
        except (OSError, ValueError) as e:
            return [((path, kind, stem), ("error", str(e)))]

    def write(keyed):
        (path, kind, stem), result = keyed
        if isinstance(result, dict):  # read error, passed around RunInference
            return json.dumps({"input": path, "error": result["error"]})
        mask = result.inference
        if isinstance(mask, dict):
            return json.dumps({"input": path, "error": mask["error"]})
        if kind == "image":
            record = write_image_outputs(facts, path, result.example[1], stem, np.asarray(mask), output_dir, overlay)
        else:
            import nibabel as nib

            record = write_volume_outputs(facts, path, result.example[1], nib.load(path), stem, np.asarray(mask),
                                          output_dir, overlay)
        return json.dumps(record)

    results_prefix = os.path.join(output_dir, ".beam-results")
    options = PipelineOptions(list(beam_args), runner=runner)
    with beam.Pipeline(options=options) as p:
        read_ = (p | "ListInputs" >> beam.Create([tuple(i) for i in items]) | "Read" >> beam.FlatMap(read))
        ok = read_ | "Readable" >> beam.Filter(lambda kv: kv[1][0] != "error")
        bad = read_ | "Unreadable" >> beam.Filter(lambda kv: kv[1][0] == "error") | "AsResult" >> beam.Map(
            lambda kv: (kv[0], {"error": kv[1][1]}))
        predicted = ok | "RunInference" >> RunInference(KeyedModelHandler(handler))
        _ = ((predicted, bad) | "All" >> beam.Flatten() | "WriteMasks" >> beam.Map(write)
             | "WriteResults" >> beam.io.WriteToText(results_prefix, file_name_suffix=".jsonl"))
    records = []
    for name in sorted(os.listdir(output_dir)):
        if name.startswith(".beam-results"):
            with open(os.path.join(output_dir, name)) as f:
                records.extend(json.loads(line) for line in f if line.strip())
            os.unlink(os.path.join(output_dir, name))
    order = {path: i for i, (path, _, _) in enumerate(items)}
    return sorted(records, key=lambda r: order.get(r["input"], len(order)))
