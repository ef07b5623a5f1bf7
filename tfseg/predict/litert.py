"""LiteRtPredictor: a LiteRT export (``tfseg export --format litert``) run by the LiteRT interpreter.

The model takes one uint8 image at its input size; the resize to it and back is done here, with
the functions evaluation uses (:func:`tfseg.export.litert.model_input`, then
:func:`tfseg.inference.resize_probs` and :func:`tfseg.inference.probs_to_mask`), so
``tfseg evaluate --model`` scores and ``tfseg predict --model`` writes what the file computes on
a device. The interpreter is ``ai_edge_litert.interpreter`` (TensorFlow's ``tf.lite.Interpreter``
is deprecated in its favour).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from tfseg import rundir
from tfseg.errors import TfsegError
from tfseg.export import litert
from tfseg.predict.base import NEEDS_3D, RunPredictor, check_model_classes, graph_error_line


def interpreter(model_path: str, num_threads: int | None = None):
    """A LiteRT interpreter of ``model_path`` (``num_threads`` None = all cores).

    Raises:
      TfsegError: ai-edge-litert is not installed, or the file is no LiteRT model.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise TfsegError("LiteRT exports need the LiteRT runtime: pip install ai-edge-litert") from None
    threads = int(num_threads) if num_threads else (os.cpu_count() or 1)
    try:
        return Interpreter(model_path=model_path, num_threads=threads)
    except (ValueError, RuntimeError) as e:
        raise TfsegError(f"{model_path}: not a loadable LiteRT model ({str(e).strip().splitlines()[0]})") from None


class LiteRtPredictor(RunPredictor):
    """Runs EXPORT_BASE/NAME/VERSION/model.tflite through the LiteRT interpreter.

    Args:
      version_dir: a LiteRT export version (model.tflite + assets.extra/tfseg.json).
      num_threads: interpreter threads; None = all cores.
    """

    def __init__(self, version_dir: str, num_threads: int | None = None):
        from tfseg import visualize
        from tfseg.export.versions import METADATA, read_metadata

        self.meta = read_metadata(version_dir)
        record = os.path.join(version_dir, METADATA)
        self.run = rundir.RunInfo.from_json(self.meta, record)
        self.colors = visualize.dataset_colors({"num_classes": self.run.num_classes,
                                                "class_colors": self.meta.get("class_colors")})
        self.size = tuple(self.run.size)
        self.path = os.path.join(version_dir, litert.MODEL_FILE)
        self._runner = interpreter(self.path, num_threads).get_signature_runner(litert.SIGNATURE)
        out = self._runner.get_output_details()["probabilities"]
        check_model_classes(out["shape"][-1], self.run, record, self.path)
        self._dequantize = None
        if np.dtype(out["dtype"]) != np.float32:
            scale, zero = out["quantization"]
            self._dequantize = (float(scale), int(zero))

    def model_probabilities(self, x: np.ndarray) -> np.ndarray:
        """(h, w, K) float32 probabilities of one (h, w, C) uint8 image at the model's size."""
        out = self._runner(**{litert.INPUT: np.ascontiguousarray(x[None], np.uint8)})["probabilities"][0]
        if self._dequantize is not None:
            scale, zero = self._dequantize
            out = (out.astype(np.float32) - zero) * scale
        return out.astype(np.float32, copy=False)

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """(H, W, K) float32 probabilities of one (H, W, C) uint8 image at its own size."""
        from tfseg import inference

        image = np.asarray(image)
        if image.ndim == 2:
            image = image[..., None]
        x = litert.model_input(image, self.size, self.preprocessing)
        return inference.resize_probs(self.model_probabilities(x), image.shape[:2])

    def mask(self, image: np.ndarray) -> np.ndarray:
        """(H, W) uint8 class ids of one decoded (H, W, C) image (evaluate's predictor call)."""
        from tfseg import inference

        return inference.probs_to_mask(self.probabilities(image), self.binary)

    def predict_images(self, images: Sequence[bytes]) -> list[np.ndarray]:
        import tensorflow as tf

        from tfseg import preprocess

        out = []
        for data in images:
            # The SavedModel export's decoder, run eagerly: same pixels and the same input checks.
            try:
                arr = preprocess.decode_image(tf.constant(data), self.channels,
                                              int(self.meta.get("max_pixels") or preprocess.DEFAULT_MAX_PIXELS)).numpy()
            except tf.errors.InvalidArgumentError as e:
                raise ValueError(graph_error_line(e.message)) from None
            out.append(self.mask(arr))
        return out

    def predict_volume(self, volume: np.ndarray) -> np.ndarray:
        raise ValueError(NEEDS_3D)
