"""The fit stage's output directory (RUN_DIR): the contract read by evaluate, export and predict.

    RUN_DIR/
      run.json               the resolved fit config plus the dataset facts a model needs
                             (ndim, channels, num_classes, class_names, ignore_index, regions,
                             image_size or patch_size, binary); written before training starts
      model.keras            the final model (best by validation metric when there is one);
                             its presence means the fit is complete
      checkpoints/best.keras the best epoch (model.keras is a hard link to it on a local disk);
                             checkpoints/last.keras only for an EMA run without validation
      backup/                the last epoch's weights and optimizer state (resume, continue);
                             while training, also the epoch before (tfseg.fit.backup)
      history.csv            one row per finished epoch
      logs/                  TensorBoard

Model contract (every tfseg model): input float32 images in the source value range (2D: 0..255
RGB/gray, 3D: the z-scored volume from conversion), normalization inside the model; output
float32 probabilities, (B, H, W, 1) sigmoid for binary tasks or (B, H, W, K) softmax
(3D: (B, D, H, W, ...)).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os

from tfseg import preprocess, volumes
from tfseg.errors import TfsegError

logger = logging.getLogger(__name__)

RUN_JSON = "run.json"
MODEL_FILE = "model.keras"
HISTORY_CSV = "history.csv"


# How the model's input is normalized (RunInfo.normalization), by spatial rank: 2D models take
# 0..255 pixels and rescale inside; 3D models take the volume as conversion z-scored it (per
# channel, over the nonzero voxels, :func:`tfseg.volumes.zscore_nonzero`).
NORMALIZATION = {2: "pixels_0_255_in_model", 3: volumes.NORMALIZATION}
HEADS = ("sigmoid", "softmax")



def size_key(ndim: int) -> str:
    """The config and run.json key of the model's input size: ``image_size`` (2D), ``patch_size`` (3D)."""
    return "image_size" if ndim == 2 else "patch_size"

@dataclasses.dataclass(frozen=True)
class RunInfo:
    """The typed facts of a fit run: what evaluate, export, predict and report need to know.

    Written by ``tfseg fit`` into run.json (its keys are run.json's, so older run.json files and
    an export's ``tfseg.json`` read back too: :meth:`from_json`); no other module derives them.

    Attributes:
      ndim: 2 or 3.
      channels: input channels.
      num_classes: K including background.
      head: ``"sigmoid"`` (binary: one foreground channel, thresholded at 0.5) or ``"softmax"``
        (K channels, arg-maxed).
      class_names: one name per class (``class_i`` when the run recorded none).
      class_colors: [R, G, B] per class when recorded, else None.
      ignore_index: truth value left out of every score, or None.
      regions: 3D named unions of class ids (BraTS WT/TC/ET), {} otherwise.
      modalities: 3D channel names in order.
      size: the model's input size, (H, W) or (D, H, W): image_size or patch_size.
      monitor: the validation quantity that chose the checkpoint (``val_mean_iou``), None when
        the run predates recording it.
      precision: the Keras dtype policy it trained under (``float32``, ``mixed_bfloat16``, ...).
      flip_axes: spatial axes the training augmentation flipped (what TTA may average).
      normalization: how inputs are normalized (:data:`NORMALIZATION`).
      model: the model name; model_kwargs its options.
      preprocessing: what conversion did to the source images before they became records
        (dataset.json's ``preprocessing``): 2D ``{"resize": {...}}`` after ``convert
        --image-size`` (:mod:`tfseg.preprocess`), 3D the volume record (:mod:`tfseg.volumes`);
        what the export graph and predict reproduce on originals. {} when nothing was recorded.
    """

    ndim: int
    channels: int
    num_classes: int
    head: str
    class_names: tuple
    size: tuple
    class_colors: tuple | None = None
    ignore_index: int | None = None
    regions: dict = dataclasses.field(default_factory=dict)
    modalities: tuple = ()
    monitor: str | None = None
    precision: str | None = None
    flip_axes: tuple = ()
    normalization: str = ""
    model: str | None = None
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    preprocessing: dict = dataclasses.field(default_factory=dict)

    @property
    def binary(self) -> bool:
        """One sigmoid channel (thresholded at 0.5) instead of a K-way softmax (arg-maxed)."""
        return self.head == "sigmoid"

    @property
    def size_key(self) -> str:
        return size_key(self.ndim)

    @classmethod
    def from_dataset(cls, info, size, **facts) -> "RunInfo":
        """The facts of a run about to train on ``info`` (a :class:`tfseg.schema.DatasetInfo`)."""
        from tfseg.visualize import dataset_colors
        ndim = int(info.ndim)
        return cls(
            ndim=ndim, channels=int(info.channels), num_classes=int(info.num_classes),
            head="sigmoid" if info.binary else "softmax", class_names=tuple(info.class_names),
            size=tuple(int(s) for s in size),
            # The dataset's colours however it defines them (class_colors, a palette, VOC's map):
            # recorded, so evaluate, export and predict need not find the dataset again.
            class_colors=_colors_or_none(dataset_colors(info).tolist(), info.num_classes),
            ignore_index=info.ignore_index, regions=dict(info.regions or {}),
            modalities=tuple(info.modalities or ()), normalization=NORMALIZATION.get(ndim, ""),
            preprocessing=dict(getattr(info, "preprocessing", None) or {}), **facts,
        )

    @classmethod
    def from_json(cls, d: dict, where: str = RUN_JSON) -> "RunInfo":
        """Reads run.json (any version tfseg wrote) or an export's tfseg.json.

        Raises:
          TfsegError: a key every run has (ndim, channels, num_classes, the size) is missing or bad.
        """
        try:
            ndim = int(d["ndim"])
            channels = int(d["channels"])
            k = int(d.get("num_classes") or len(d.get("class_names") or []))
        except (KeyError, TypeError, ValueError) as e:
            raise TfsegError(f"{where}: missing or bad {e.args[0] if isinstance(e, KeyError) else 'ndim/channels'}"
                             " (not a tfseg run record)") from None
        if ndim not in (2, 3):
            raise TfsegError(f"{where}: ndim must be 2 or 3, got {d['ndim']!r}")
        if k < 1:
            raise TfsegError(f"{where}: missing 'num_classes'")
        key = size_key(ndim)
        size = d.get(key)
        if not isinstance(size, (list, tuple)) or len(size) != ndim:
            raise TfsegError(f"{where}: missing or bad {key!r} ({size!r})")
        size = preprocess.check_size(size, f"{where}: {key}")
        preprocessing = dict(d.get("preprocessing") or {})
        preprocess.check_preprocessing(preprocessing, where)
        head = d.get("head")
        if head not in HEADS:
            # Older records: "binary" (or, before it, two classes) meant the sigmoid head.
            head = "sigmoid" if d.get("binary", k == 2) else "softmax"
        names = list(d.get("class_names") or [])
        if len(names) != k:
            names = [f"class_{i}" for i in range(k)]
        if "training_flip_axes" in d:
            flips = tuple(int(a) for a in d["training_flip_axes"])
        else:
            flips = training_flip_axes(d)
        return cls(
            ndim=ndim, channels=channels, num_classes=k, head=head, class_names=tuple(names),
            size=size, class_colors=_colors_or_none(d.get("class_colors"), k),
            ignore_index=d.get("ignore_index"), regions=dict(d.get("regions") or {}),
            modalities=tuple(d.get("modalities") or ()), monitor=d.get("monitor"), precision=d.get("precision"),
            flip_axes=flips, normalization=d.get("normalization") or NORMALIZATION[ndim],
            model=d.get("model"), model_kwargs=dict(d.get("model_kwargs") or {}),
            preprocessing=preprocessing,
        )

    def to_json(self) -> dict:
        """run.json's keys for these facts (``binary`` kept for readers of older versions)."""
        out = {
            "model": self.model, "model_kwargs": dict(self.model_kwargs), "ndim": self.ndim,
            "channels": self.channels, "num_classes": self.num_classes, "head": self.head,
            "binary": self.binary, "class_names": list(self.class_names), "ignore_index": self.ignore_index,
            "regions": dict(self.regions), "modalities": list(self.modalities), self.size_key: list(self.size),
            "training_flip_axes": list(self.flip_axes), "normalization": self.normalization,
            "preprocessing": dict(self.preprocessing),
        }
        if self.class_colors is not None:
            out["class_colors"] = [list(c) for c in self.class_colors]
        if self.monitor is not None:
            out["monitor"] = self.monitor
        if self.precision is not None:
            out["precision"] = self.precision
        return out

    def replace(self, **changes) -> "RunInfo":
        return dataclasses.replace(self, **changes)


def _colors_or_none(colors, k: int):
    """``colors`` as k (R, G, B) rows of 0..255, or None (with a warning) when they are not."""
    if colors is None:
        return None
    try:
        rows = tuple(tuple(int(v) for v in c) for c in colors)
        ok = len(rows) == k and all(len(r) == 3 and all(0 <= v <= 255 for v in r) for r in rows)
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        logger.warning("class_colors %s: expected %d [R, G, B] rows of 0..255; using the default colours",
                       str(colors)[:60], k)
        return None
    return rows


def load_run_info(run_dir: str) -> RunInfo:
    """RUN_DIR/run.json as :class:`RunInfo`."""
    return RunInfo.from_json(load_run_config(run_dir), os.path.join(run_dir, RUN_JSON))


def load_run_config(run_dir: str) -> dict:
    """Reads RUN_DIR/run.json.

    Raises:
      TfsegError: not a tfseg run directory.
    """
    from tfseg.io import fs

    path = os.path.join(run_dir, RUN_JSON)
    if not fs.isfile(path):
        raise TfsegError(f"{run_dir}: no {RUN_JSON}; is this a `tfseg fit` output directory?")
    try:
        return json.loads(fs.read_text(path))
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


def test_time_flips(run_dir: str, run, tta: bool) -> tuple[int, ...]:
    """The flips ``--tta`` averages for this run: its training flips, () without ``tta``.

    ``run`` is a :class:`RunInfo` (or run.json's dict). A run trained without flips gets () and a
    warning: there is nothing it was trained to see.
    """
    if not tta:
        return ()
    flips = tuple(run.flip_axes) if isinstance(run, RunInfo) else training_flip_axes(run)
    if not flips:
        logger.warning("%s: trained without flips, so --tta has no flips to average; predicting as is", run_dir)
    return flips


def load_model(run_dir: str, which: str = MODEL_FILE):
    """Loads the trained Keras model of a run (TensorFlow imported here).

    Raises:
      TfsegError: the run has no finished model.
    """
    from tfseg.io import fs

    path = os.path.join(run_dir, which)
    if not fs.isfile(path):
        raise TfsegError(f"{run_dir}: no {which}; the fit did not finish (re-run `tfseg fit` to resume)")
    import keras

    import tfseg.models  # noqa: F401  registers tfseg's custom layers and losses for deserialization

    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001 - zipfile, h5py, Keras's safe mode: one line each
        from tfseg.errors import first_line

        detail = first_line(e)
        if "lambda" in detail.lower() and "safe" in detail.lower():
            detail = "it holds a Lambda layer, whose Python code Keras's safe mode refuses to load"
        elif type(e).__name__ in ("BadZipFile", "FileNotFoundError", "EOFError") or "zip" in detail.lower():
            detail = "not a complete .keras file (truncated, or not a zip archive); re-run `tfseg fit` to publish it again"
        raise TfsegError(f"{path}: cannot load the model: {detail[:300]}") from None
    check_finite_weights(model, path)
    with contextlib.suppress(OSError):
        run_json = os.path.join(run_dir, RUN_JSON)
        from tfseg.io import fs

        if fs.isfile(run_json):
            check_model_facts(model, RunInfo.from_json(json.loads(fs.read_text(run_json)), run_json), path)
    return model


def check_model_facts(model, run: "RunInfo", where: str) -> None:
    """Refuses a model whose input or head disagrees with its run.json / tfseg.json facts.

    Raises:
      TfsegError: naming the fact, the recorded value and the model's.
    """
    inputs = tuple(model.inputs[0].shape) if model.inputs else None
    out = tuple(model.outputs[0].shape) if model.outputs else None
    if inputs is not None:
        if len(inputs) != run.ndim + 2:
            raise TfsegError(f"{where}: run.json says ndim {run.ndim}, the model takes {len(inputs) - 2}D inputs")
        if inputs[-1] is not None and int(inputs[-1]) != run.channels:
            raise TfsegError(f"{where}: run.json says {run.channels} channel(s), the model takes {inputs[-1]}")
        spatial = inputs[1:-1]
        if all(d is not None for d in spatial) and tuple(int(d) for d in spatial) != tuple(run.size):
            raise TfsegError(f"{where}: run.json's {run.size_key} is {'x'.join(map(str, run.size))}, the model takes "
                             f"{'x'.join(str(int(d)) for d in spatial)}")
    if run.binary and run.num_classes != 2:
        raise TfsegError(f"{where}: run.json says {run.num_classes} classes with a one-unit sigmoid head, which "
                         "separates 2")
    if out is not None and out[-1] is not None:
        units = 1 if run.binary else run.num_classes
        if int(out[-1]) != units:
            raise TfsegError(f"{where}: run.json says {run.num_classes} classes ({run.head} head of {units} unit(s)), "
                             f"the model's head has {out[-1]}")


def check_finite_weights(model, where: str) -> None:
    """Refuses a model with NaN or infinite weights (a diverged run must never be served).

    Raises:
      TfsegError: naming the file and the first non-finite weight.
    """
    bad = first_non_finite_weight(model)
    if bad is not None:
        raise TfsegError(f"{where}: weight {bad} holds NaN or infinite values; "
                         "the run diverged and cannot be evaluated or exported")


def first_non_finite_weight(model) -> str | None:
    """The path of the first weight holding NaN or infinity, or None (fit's health guard and
    the loaders share this)."""
    import keras
    import numpy as np

    for w in model.weights:
        if not np.all(np.isfinite(np.asarray(keras.ops.convert_to_numpy(w.value), np.float32))):
            return w.path
    return None
