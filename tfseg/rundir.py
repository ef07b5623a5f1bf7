"""The fit stage's output directory (RUN_DIR): the contract read by evaluate, export and predict.

    RUN_DIR/
      run.json               the resolved fit config plus the dataset facts a model needs
                             (ndim, channels, num_classes, class_names, ignore_index, regions,
                             image_size or patch_size, binary); written before training starts
      model.keras            the final model (best by validation metric when there is one);
                             its presence means the fit is complete
      checkpoints/best.keras, checkpoints/last.keras
      backup/                Keras BackupAndRestore state (resume after a crash)
      history.csv            one row per finished epoch
      logs/                  TensorBoard

Model contract (every tfseg model): input float32 images in the source value range (2D: 0..255
RGB/gray, 3D: the z-scored volume from conversion), normalization inside the model; output
float32 probabilities, (B, H, W, 1) sigmoid for binary tasks or (B, H, W, K) softmax
(3D: (B, D, H, W, ...)).
"""

from __future__ import annotations

import json
import logging
import os

from tfseg.errors import TfsegError

logger = logging.getLogger(__name__)

RUN_JSON = "run.json"
MODEL_FILE = "model.keras"
HISTORY_CSV = "history.csv"


def load_run_config(run_dir: str) -> dict:
    """Reads RUN_DIR/run.json.

    Raises:
      TfsegError: not a tfseg run directory.
    """
    from tfseg import outputs

    path = os.path.join(run_dir, RUN_JSON)
    if not outputs.isfile(path):
        raise TfsegError(f"{run_dir}: no {RUN_JSON}; is this a `tfseg fit` output directory?")
    try:
        return json.loads(outputs.read_text(path))
    except ValueError as e:
        raise TfsegError(f"{path}: not valid JSON ({e})") from None


def training_flip_axes(run_cfg: dict) -> tuple[int, ...]:
    """Spatial axes the run's training augmentation flipped (0 = H in 2D, D in 3D).

    2D: ``vflip`` -> 0, ``hflip`` -> 1; 3D: ``flip3d`` -> 0, 1, 2. Test-time augmentation
    averages over these flips only.
    """
    augment = (run_cfg.get("config") or {}).get("augment") or {}
    if int(run_cfg.get("ndim", 2)) == 3:
        return (0, 1, 2) if augment.get("flip3d") else ()
    return tuple(axis for axis, key in ((0, "vflip"), (1, "hflip")) if augment.get(key))


def test_time_flips(run_dir: str, run_cfg: dict, tta: bool) -> tuple[int, ...]:
    """The flips ``--tta`` averages for this run: its training flips, () without ``tta``.

    A run trained without flips gets () and a warning: there is nothing it was trained to see.
    """
    if not tta:
        return ()
    flips = training_flip_axes(run_cfg)
    if not flips:
        logger.warning("%s: trained without flips, so --tta has no flips to average; predicting as is", run_dir)
    return flips


def load_model(run_dir: str, which: str = MODEL_FILE):
    """Loads the trained Keras model of a run (TensorFlow imported here).

    Raises:
      TfsegError: the run has no finished model.
    """
    from tfseg import outputs

    path = os.path.join(run_dir, which)
    if not outputs.isfile(path):
        raise TfsegError(f"{run_dir}: no {which}; the fit did not finish (re-run `tfseg fit` to resume)")
    import keras

    import tfseg.models  # noqa: F401  registers tfseg's custom layers and losses for deserialization

    model = keras.saving.load_model(path, compile=False)
    check_finite_weights(model, path)
    return model


def check_finite_weights(model, where: str) -> None:
    """Refuses a model with NaN or infinite weights (a diverged run must never be served).

    Raises:
      TfsegError: naming the file and the first non-finite weight.
    """
    import keras
    import numpy as np

    for w in model.weights:
        if not np.all(np.isfinite(np.asarray(keras.ops.convert_to_numpy(w.value), np.float32))):
            raise TfsegError(f"{where}: weight {w.path} holds NaN or infinite values; "
                             "the run diverged and cannot be evaluated or exported")
