"""OnnxPredictor: an ONNX export (``tfseg export --format onnx``) run by ONNX Runtime on the CPU.

The model takes uint8 images at its input size; :class:`~tfseg.predict.base.ModelSizePredictor`
resizes to it and back as evaluation does, so ``tfseg evaluate --model`` scores what ONNX Runtime
computes.
"""

from __future__ import annotations

import os

import numpy as np

from tfseg.errors import TfsegError, first_line
from tfseg.export import onnx as onnx_export
from tfseg.io import fs
from tfseg.predict.base import ModelSizePredictor, check_model_classes


def session(model_path: str, num_threads: int | None = None):
    """An ONNX Runtime CPU session of ``model_path`` (``num_threads`` None = all cores).

    Raises:
      TfsegError: onnxruntime is not installed, or the file is no loadable ONNX model.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise TfsegError("ONNX exports need ONNX Runtime: pip install 'tfseg[onnx]'") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(num_threads) if num_threads else (os.cpu_count() or 1)
    options.log_severity_level = 3  # errors only: its graph-optimizer notes are not the user's concern
    try:
        # A remote model (gs://, ram://) is passed as bytes: ONNX Runtime opens local files only.
        source = fs.read_bytes(model_path) if fs.is_remote(model_path) else model_path
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001  onnxruntime raises its own Fail/InvalidGraph/... types
        raise TfsegError(f"{model_path}: not a loadable ONNX model ({first_line(e)})") from None


class OnnxPredictor(ModelSizePredictor):
    """Runs EXPORT_BASE/NAME/VERSION/model.onnx through ONNX Runtime.

    Args:
      version_dir: an ONNX export version (model.onnx + assets.extra/tfseg.json).
      num_threads: intra-op threads; None = all cores.
    """

    def __init__(self, version_dir: str, num_threads: int | None = None):
        super().__init__(version_dir)
        self.path = os.path.join(version_dir, onnx_export.MODEL_FILE)
        self._session = session(self.path, num_threads)
        outputs = {o.name: o for o in self._session.get_outputs()}
        inputs = [i.name for i in self._session.get_inputs()]
        if "probabilities" not in outputs or inputs != [onnx_export.INPUT]:
            raise TfsegError(f"{self.path}: not a tfseg ONNX export (inputs {inputs}, outputs {sorted(outputs)})")
        k = outputs["probabilities"].shape[-1]
        check_model_classes(k if isinstance(k, int) else None, self.run, self.record, self.path)

    def model_probabilities(self, x: np.ndarray) -> np.ndarray:
        (out,) = self._session.run(["probabilities"], {onnx_export.INPUT: np.ascontiguousarray(x[None], np.uint8)})
        return out[0].astype(np.float32, copy=False)
