"""The predictor interface: what ``tfseg predict`` asks of a model, wherever the model runs.

An export run in-process, a fit run's Keras model, and a model on a TF Serving server (REST or
gRPC) all describe their model with the same attributes and predict through the same two methods,
so the job (:mod:`tfseg.predict.run`) and the Beam handlers (:mod:`tfseg.predict.beam`) never ask
which one they hold. :class:`ModelFacts` is the description alone, read without loading the model.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# The one answer to a volume given to a model that only takes images (a 2D model, a served model).
NEEDS_3D = "volumes need a 3D model (a local run or export directory)"


@dataclass(frozen=True)
class ModelFacts:
    """What reading a model's inputs and writing its masks need, without the model.

    Attributes:
      ndim: 2 (images) or 3 (volumes).
      channels: the input channels the model takes; None when unknown (a served model, which is
        sent each image's original bytes).
      class_names: the class names; None when unknown (a served model).
      colors: (K, 3) uint8 palette the masks and overlays are written with.
      ignore_index: the label id of unlabelled pixels, or None.
      preprocessing: the 3D preprocessing record applied to volumes as they are read
        (:func:`tfseg.volumes.read_volume`); ``{}`` where there is none.
    """

    ndim: int
    channels: int | None
    class_names: list[str] | None
    colors: np.ndarray
    ignore_index: int | None
    preprocessing: dict


class Predictor(abc.ABC):
    """A model that turns encoded images into masks, and (3D models) volumes into masks.

    Implementations set the attributes of :class:`ModelFacts` (``ndim``, ``channels``,
    ``class_names``, ``colors``, ``ignore_index``, ``preprocessing``) in their constructor.
    """

    ndim: int
    channels: int | None
    class_names: list[str] | None
    colors: np.ndarray
    ignore_index: int | None
    preprocessing: dict

    @abc.abstractmethod
    def predict_images(self, images: Sequence[bytes]) -> list[np.ndarray]:
        """(H, W) uint8 masks of class ids, one per encoded image (JPEG, PNG, GIF, BMP), each at
        its image's size.

        Raises:
          ValueError: an image the model rejects, or a 3D model (one bad image fails the call).
        """

    @abc.abstractmethod
    def predict_volume(self, volume: np.ndarray) -> np.ndarray:
        """The (D, H, W) uint8 mask of a (D, H, W, C) float32 volume read with ``preprocessing``.

        Raises:
          ValueError: a volume the model rejects, or a model that only takes images.
        """

    def mask(self, example: np.ndarray) -> np.ndarray:
        """The mask of one decoded example as ``tfseg convert`` stored it (what evaluate scores):
        an (H, W, C) image or a (D, H, W, C) volume, at its own size.

        Raises:
          ValueError: a model that is only reachable with encoded images (a served model).
        """
        raise ValueError(f"{type(self).__name__} takes encoded images only")


class RunPredictor(Predictor):
    """A model tfseg wrote (a fit run, an export version): its facts are held once, as the
    :class:`~tfseg.rundir.RunInfo` of its run.json / tfseg.json (as MONAI's inferers hold their
    settings), and the model file is checked against them when it is loaded."""

    run: "RunInfo"  # noqa: F821 - tfseg.rundir.RunInfo, set by the constructor

    @property
    def ndim(self) -> int:
        return self.run.ndim

    @property
    def channels(self) -> int:
        return self.run.channels

    @property
    def class_names(self) -> list[str]:
        return list(self.run.class_names)

    @property
    def ignore_index(self) -> int | None:
        return self.run.ignore_index

    @property
    def preprocessing(self) -> dict:
        return self.run.preprocessing

    @property
    def binary(self) -> bool:
        return self.run.binary


class ModelSizePredictor(RunPredictor):
    """An export that takes one uint8 image at the model's size (LiteRT, ONNX): the resize to it and
    back is done here, with the functions evaluation uses (:func:`tfseg.preprocess.uint8_model_input`,
    then :func:`tfseg.inference.resize_probs` and :func:`tfseg.inference.probs_to_mask`), so
    ``tfseg evaluate --model`` scores and ``tfseg predict --model`` writes what the file computes
    where it is deployed. A subclass loads its file in ``__init__`` after ``super().__init__`` and
    implements :meth:`model_probabilities`.

    Args:
      version_dir: the export version (its model file + assets.extra/tfseg.json).
    """

    def __init__(self, version_dir: str):
        from tfseg import rundir, visualize
        from tfseg.export.versions import METADATA, read_metadata

        self.meta = read_metadata(version_dir)
        self.record = os.path.join(version_dir, METADATA)
        self.run = rundir.RunInfo.from_json(self.meta, self.record)
        self.colors = visualize.dataset_colors({"num_classes": self.run.num_classes,
                                                "class_colors": self.meta.get("class_colors")})
        self.size = tuple(self.run.size)

    @abc.abstractmethod
    def model_probabilities(self, x: np.ndarray) -> np.ndarray:
        """(h, w, K) float32 probabilities of one (h, w, C) uint8 image at the model's size."""

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """(H, W, K) float32 probabilities of one (H, W, C) uint8 image at its own size."""
        from tfseg import inference, preprocess

        image = np.asarray(image)
        if image.ndim == 2:
            image = image[..., None]
        x = preprocess.uint8_model_input(image, self.size, self.preprocessing)
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


def check_model_classes(found: int | None, run, record: str, model_file: str) -> None:
    """Refuses a model file whose output channels are not what its record says: a 4-class
    model.tflite in a 5-class export, or a tfseg.json saying 3 classes for a 5-class model, would
    otherwise predict (and be scored) with class ids the record does not name.

    Raises:
      TfsegError: naming both files and both counts.
    """
    from tfseg.errors import TfsegError

    if found is None:  # not known from the graph's signature (a 3D export's volume signature)
        return
    expected = 1 if run.binary else run.num_classes
    if int(found) != expected:
        what = "1 channel (binary)" if run.binary else f"{run.num_classes} classes"
        raise TfsegError(f"{model_file}: the model outputs {found} channel(s), but {record} says {what}; the "
                         "model and its record do not belong together (re-export, or restore the file)")


def graph_error_line(message: str) -> str:
    """The informative line of a TensorFlow error (the assertion or the decoder's message), without
    a graph error's node lines or an eager error's ``{{function_node ...}}`` and ``[Op:...]`` wrapping."""
    import re

    skip = ("Graph execution error", "Detected at node", "<stack traces unavailable>")
    for line in message.splitlines():
        line = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", line.strip())
        line = re.sub(r"\s*\[Op:[^\]]*\].*$", "", line)
        if line and not line.startswith(skip) and not line.startswith("[["):
            return line.replace("assertion failed: ", "").split(" [Condition")[0]
    return message.strip().splitlines()[0] if message.strip() else "invalid input"
