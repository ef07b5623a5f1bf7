"""LiteRtPredictor: a LiteRT export (``tfseg export --format litert``) run by the LiteRT interpreter.

The model takes one uint8 image at its input size; :class:`~tfseg.predict.base.ModelSizePredictor`
resizes to it and back as evaluation does. The interpreter is ``ai_edge_litert.interpreter``
(TensorFlow's ``tf.lite.Interpreter`` is deprecated in its favour).
"""

from __future__ import annotations

import os

import numpy as np

from tfseg import runtime
from tfseg.errors import TfsegError
from tfseg.export import litert
from tfseg.io import fs
from tfseg.predict.base import ModelSizePredictor, check_model_classes


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
        # LiteRT announces its CPU delegate from C++ on fd 2 ("INFO: Created TensorFlow Lite XNNPACK ...").
        with runtime.filtered_stderr(lambda line: "Created TensorFlow Lite XNNPACK delegate" in line):
            # A remote model (gs://, ram://) is read whole: the interpreter maps local files only.
            source = ({"model_content": fs.read_bytes(model_path)} if fs.is_remote(model_path)
                      else {"model_path": model_path})
            interp = Interpreter(**source, num_threads=threads)
            interp.allocate_tensors()
        return interp
    except (ValueError, RuntimeError) as e:
        raise TfsegError(f"{model_path}: not a loadable LiteRT model ({str(e).strip().splitlines()[0]})") from None


class LiteRtPredictor(ModelSizePredictor):
    """Runs EXPORT_BASE/NAME/VERSION/model.tflite through the LiteRT interpreter.

    Args:
      version_dir: a LiteRT export version (model.tflite + assets.extra/tfseg.json).
      num_threads: interpreter threads; None = all cores.
    """

    def __init__(self, version_dir: str, num_threads: int | None = None):
        super().__init__(version_dir)
        self.path = os.path.join(version_dir, litert.MODEL_FILE)
        self._runner = interpreter(self.path, num_threads).get_signature_runner(litert.SIGNATURE)
        out = self._runner.get_output_details()["probabilities"]
        check_model_classes(out["shape"][-1], self.run, self.record, self.path)
        self._dequantize = None
        if np.dtype(out["dtype"]) != np.float32:
            scale, zero = out["quantization"]
            self._dequantize = (float(scale), int(zero))

    def model_probabilities(self, x: np.ndarray) -> np.ndarray:
        out = self._runner(**{litert.INPUT: np.ascontiguousarray(x[None], np.uint8)})["probabilities"][0]
        if self._dequantize is not None:
            scale, zero = self._dequantize
            out = (out.astype(np.float32) - zero) * scale
        return out.astype(np.float32, copy=False)
