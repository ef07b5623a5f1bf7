"""The local predictors, and which predictor a ``--model`` gets.

  SavedModelPredictor  an export's ``serving_default`` signature in-process (the graph TF Serving runs);
  LiteRtPredictor      a LiteRT export through the LiteRT interpreter (:mod:`tfseg.predict.litert`);
  OnnxPredictor        an ONNX export through ONNX Runtime (:mod:`tfseg.predict.onnx`);
  KerasPredictor       a fit run's Keras model through :mod:`tfseg.inference` (resize or tiled, flip TTA);
  make_predictor       the predictor for a ``--model`` (with ``server``: a TF Serving client,
                       :mod:`tfseg.predict.serving`);
  model_facts          a model's :class:`~tfseg.predict.base.ModelFacts` without loading it.

:func:`call_image_signature` and :func:`call_volume_signature` run an export's ``serving_default``;
the Beam job's SavedModel handler (:mod:`tfseg.predict.beam`) calls them too.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from tfseg import rundir
from tfseg.errors import TfsegError
from tfseg.predict.base import ModelFacts, Predictor, RunPredictor, check_model_classes, graph_error_line
from tfseg.predict.inputs import resolve_model


def call_image_signature(serve, images: Sequence[bytes]) -> list[np.ndarray]:
    """An export's ``serving_default`` on encoded images (any sizes): each mask cropped to its image.

    Raises:
      ValueError: an image the graph rejects (its message), or a 3D export.
    """
    import tensorflow as tf

    try:
        out = serve(image_bytes=tf.constant(list(images), dtype=tf.string))
    except tf.errors.InvalidArgumentError as e:
        raise ValueError(graph_error_line(e.message)) from None
    except TypeError:  # the signature has no image_bytes
        raise ValueError("this export is a 3D model; give it volumes") from None
    masks, hs, ws = out["mask"].numpy(), out["height"].numpy(), out["width"].numpy()
    return [masks[k, : hs[k], : ws[k]] for k in range(len(images))]


def call_volume_signature(serve, volume: np.ndarray) -> np.ndarray:
    """An export's ``serving_default`` on one (D, H, W, C) volume: its (D, H, W) mask.

    Raises:
      ValueError: a volume the graph rejects (its message), or a 2D export.
    """
    import tensorflow as tf

    try:
        return serve(volume=tf.constant(volume, tf.float32))["mask"].numpy()
    except TypeError:  # the signature has no volume
        raise ValueError("this export is a 2D model; give it images") from None
    except tf.errors.InvalidArgumentError as e:
        raise ValueError(graph_error_line(e.message)) from None


class SavedModelPredictor(RunPredictor):
    """Runs an export's signatures in-process (the same graph TF Serving runs)."""

    def __init__(self, version_dir: str):
        import tensorflow as tf

        from tfseg import visualize
        from tfseg.export.versions import METADATA, read_metadata

        self.meta = read_metadata(version_dir)
        record = os.path.join(version_dir, METADATA)
        self.run = rundir.RunInfo.from_json(self.meta, record)
        self.colors = visualize.dataset_colors({"num_classes": self.run.num_classes,
                                                "class_colors": self.meta.get("class_colors")})
        self._loaded = tf.saved_model.load(version_dir)
        self._serve = self._loaded.signatures["serving_default"]
        check_model_classes(self._serve.structured_outputs["probabilities"].shape[-1], self.run, record,
                            os.path.join(version_dir, "saved_model.pb"))

    def predict_images(self, images: Sequence[bytes]) -> list[np.ndarray]:
        if self.ndim != 2:
            raise ValueError("this export is a 3D model; give it volumes")
        return call_image_signature(self._serve, images)

    def predict_volume(self, volume: np.ndarray) -> np.ndarray:
        if self.ndim != 3:
            raise ValueError("this export is a 2D model; give it images")
        return call_volume_signature(self._serve, volume)

    def mask(self, example: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        if self.ndim == 3:
            return self.predict_volume(np.asarray(example, np.float32))
        # predict_images: serving_default's twin that takes decoded images (no decoder in between).
        out = self._loaded.signatures["predict_images"](images=tf.constant(np.asarray(example, np.uint8)[None]))
        h, w = int(out["height"][0]), int(out["width"][0])
        return out["mask"][0, :h, :w].numpy()


class KerasPredictor(RunPredictor):
    """Runs a fit run's Keras model through :mod:`tfseg.inference` (resize or tiled)."""

    def __init__(self, run_dir: str, *, tile: bool = False, tta: bool = False, overlap: float | None = None,
                 batch_size: int = 8):
        from tfseg import inference, visualize
        from tfseg.export.graph import with_precision

        self.cfg = rundir.load_run_config(run_dir)
        record = os.path.join(run_dir, rundir.RUN_JSON)
        self.run = rundir.RunInfo.from_json(self.cfg, record)
        # float32 whatever trained it, as evaluate scores it and export serves it by default.
        self.model = with_precision(rundir.load_model(run_dir), "float32")
        check_model_classes(self.model.output_shape[-1], self.run, record, os.path.join(run_dir, rundir.MODEL_FILE))
        self.colors = visualize.run_colors(self.cfg)
        self.options = inference.InferenceOptions.make(self.ndim, tile=tile,
                                                       flips=rundir.test_time_flips(run_dir, self.run, tta))
        if overlap is not None:
            self.options = dataclasses.replace(self.options, overlap=overlap)
        if self.ndim == 2:
            self.options = dataclasses.replace(self.options, batch_size=batch_size)

    def _probabilities(self, array: np.ndarray, preprocessing=None) -> np.ndarray:
        from tfseg import inference

        o = self.options
        if self.ndim == 2:
            return inference.predict_image(self.model, array, size=self.run.size, mode=o.mode, overlap=o.overlap,
                                           batch_size=o.batch_size, tta=o.tta_flip_axes, preprocessing=preprocessing)
        return inference.predict_volume(self.model, array, patch_size=self.run.size, overlap=o.overlap,
                                        batch_size=o.batch_size, tta=o.tta_flip_axes)

    def mask(self, example: np.ndarray) -> np.ndarray:
        from tfseg import inference

        return np.asarray(inference.probs_to_mask(self._probabilities(example), self.binary))

    def predict_images(self, images: Sequence[bytes]) -> list[np.ndarray]:
        import tensorflow as tf

        from tfseg import inference, preprocess

        if self.ndim != 2:
            raise ValueError("this run is a 3D model; give it volumes")
        out = []
        for data in images:
            # The export's decoder, run eagerly: same pixels and same input checks as serving.
            try:
                arr = preprocess.decode_image(tf.constant(data), self.channels, preprocess.DEFAULT_MAX_PIXELS).numpy()
            except tf.errors.InvalidArgumentError as e:
                raise ValueError(graph_error_line(e.message)) from None
            out.append(inference.probs_to_mask(self._probabilities(arr, self.preprocessing), self.binary))
        return out

    def predict_volume(self, volume: np.ndarray) -> np.ndarray:
        from tfseg import inference

        if self.ndim != 3:
            raise ValueError("this run is a 2D model; give it images")
        return inference.probs_to_mask(self._probabilities(volume), self.binary)


def make_predictor(model_path: str, *, server: str | None = None, grpc: bool = False, tile: bool = False,
                   tta: bool = False, overlap: float | None = None, batch_size: int = 8,
                   model_version: int | None = None) -> Predictor:
    """The predictor for ``model_path``: an export version or NAME directory, a RUN_DIR, or with
    ``server`` (``HOST:PORT``) the NAME of a served model (a path's last component is used).

    Raises:
      TfsegError: a path that is no model, or ``tile``/``tta`` for an export (its graph runs them).
    """
    if server:
        from tfseg.predict.serving import GrpcClient, RestClient

        cls = GrpcClient if grpc else RestClient
        return cls(server, os.path.basename(os.path.normpath(model_path)), version=model_version)
    kind, path = resolve_model(model_path)
    if kind != "run":
        if tile or tta:
            raise TfsegError(f"{model_path}: --tile/--tta are an export's own (its graph runs them); "
                             "export with `tfseg export --tile/--tta`, or predict from the run directory")
        if kind == "litert":
            from tfseg.predict.litert import LiteRtPredictor

            return LiteRtPredictor(path)
        if kind == "onnx":
            from tfseg.predict.onnx import OnnxPredictor

            return OnnxPredictor(path)
        return SavedModelPredictor(path)
    return KerasPredictor(path, tile=tile, tta=tta, overlap=overlap, batch_size=batch_size)


def model_facts(model_path: str, server: str | None = None) -> ModelFacts:
    """What reading a model's inputs and writing its masks need, from its tfseg.json / run.json
    without loading it (``server``: what a client knows of a served model)."""
    from tfseg import visualize

    if server:
        from tfseg.predict.serving import served_model_facts

        return served_model_facts()
    kind, path = resolve_model(model_path)
    if kind != "run":
        from tfseg.export.versions import METADATA, read_metadata

        meta = read_metadata(path)
        run = rundir.RunInfo.from_json(meta, os.path.join(path, METADATA))
        colors = visualize.dataset_colors({"num_classes": run.num_classes, "class_colors": meta.get("class_colors")})
    else:
        meta = rundir.load_run_config(path)
        run = rundir.RunInfo.from_json(meta, os.path.join(path, rundir.RUN_JSON))
        colors = visualize.run_colors(meta)
    return ModelFacts(class_names=list(run.class_names), colors=colors, ignore_index=run.ignore_index, ndim=run.ndim,
                      channels=run.channels, preprocessing=run.preprocessing)
