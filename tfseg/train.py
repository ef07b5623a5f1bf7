"""The fit stage: a converted dataset in, a trained RUN_DIR out (see :mod:`tfseg.rundir`).

``run_fit(config)`` resolves a :class:`FitConfig`, checks it against the dataset's
``dataset.json`` (dimensionality, class count, sizes the model can take, batch vs replicas) before
anything trains, writes ``RUN_DIR/run.json``, builds and compiles the model inside the
tf.distribute strategy's scope under the chosen precision policy, and trains with Keras
``model.fit`` (which distributes the global batches over the replicas).

Resume: the Keras ``BackupAndRestore`` state in ``RUN_DIR/backup`` (kept after training) holds
the weights, the optimizer state and the number of finished epochs. Re-running the same command
after a crash continues from the last finished epoch; a larger ``epochs`` continues a finished
run; the same ``epochs`` on a finished run does nothing. ``history.csv`` is trimmed to the
finished epochs before training resumes, so it keeps exactly one row per epoch. Early stopping
and the plateau schedule pick up their patience counters where they were (replayed from
history.csv by :func:`replay_patience`), so a restart does not grant a fresh patience.

Command line::

    tfseg fit --data DATA_DIR --model unet --output RUN_DIR --image-size 256x256 --epochs 30
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any

from tfseg import bnstats, outputs, rundir, runtime
from tfseg.config import parse_size
from tfseg.errors import TfsegError
from tfseg.outputs import atomic_write_json, atomic_write_text
from tfseg.schema import DatasetInfo, load_dataset_info

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw", "sgd", "adadelta")
SCHEDULES = ("none", "cosine", "plateau")
BACKUP_DIR = "backup"
CHECKPOINT_DIR = "checkpoints"
BEST_CHECKPOINT = "best.keras"
LAST_CHECKPOINT = "last.keras"
LOGS_DIR = "logs"
# The largest training input (pixels or voxels per example): a typo such as 100000x100000 fails
# at once instead of running until the kernel kills it.
MAX_INPUT_PIXELS = 1 << 24
_TRAINING_METADATA = "training_metadata.json"  # written by keras.callbacks.BackupAndRestore
# Preference order when choosing the validation metric to monitor (substring of the metric name).
_MONITOR_PREFERENCE = ("mean_iou", "iou", "dice")
# run.json keys that must match for a run directory to be continued.
_IDENTITY_KEYS = ("model", "model_kwargs", "ndim", "channels", "num_classes", "image_size", "patch_size")


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Every setting of the fit stage (the ``fit:`` section of a config file).

    Attributes:
      data: converted dataset directory (has dataset.json).
      model: model name in :data:`tfseg.models.MODELS`.
      output: the run directory to write (RUN_DIR).
      model_kwargs: extra arguments of the model builder (depth, base_filters, ...).
      epochs: total number of epochs (a resumed run continues up to it).
      budget: a wall-time budget for the whole fit (``"20m"``, ``"1h"``, seconds): the first
        epochs are timed and the epoch count (and the cosine schedule's end) set so that training
        ends within it (:func:`tfseg.plan.make_budget_controller`); ``epochs`` is then ignored.
        The decision is kept in run.json (``budget``), and a resumed run keeps the same end.
      batch_size: global batch size, split evenly across the replicas.
      image_size: (H, W) training size for 2D data; defaults to the dataset's size when all its
        training images share one, else 256x256.
      patch_size: (D, H, W) training patch size for 3D data; default 64x64x64.
      loss: loss name for :func:`tfseg.losses.get_loss`; None picks ``bce_dice`` (binary),
        ``ce_dice`` (3D multi-class) or ``ce`` (2D multi-class).
      loss_kwargs: extra arguments of the loss.
      class_weights: None, ``"auto"`` (median-frequency weights from dataset.json pixel counts)
        or one weight per class.
      optimizer: adam | adamw | sgd | adadelta.
      learning_rate: initial learning rate.
      weight_decay: AdamW's decoupled weight decay.
      momentum: SGD momentum.
      schedule: none | cosine (to 0 over all epochs) | plateau (ReduceLROnPlateau).
      plateau_factor, plateau_patience, min_learning_rate: the plateau schedule's settings.
      precision: float32 | mixed_float16 | mixed_bfloat16 | auto (see :mod:`tfseg.runtime`).
      cpu_replicas: mirror over this many logical CPU devices (0: automatic strategy).
      jit_compile: XLA; True, False or ``"auto"`` (on for GPUs).
      steps_per_epoch: training steps per epoch; None for one pass over the training split.
      validation_split: the split to validate on; None/"" for none. A missing default ``val``
        split only disables validation, an explicitly named missing split is an error.
      validation_steps: validation steps; None for the whole split.
      augment: augmentation settings for :func:`tfseg.data.make_dataset`, or None.
      early_stopping: patience in epochs of the monitored metric; 0 disables.
      monitor: the metric that picks the best checkpoint (e.g. ``val_mean_iou``); ``"auto"``.
      num_classes: optional check against dataset.json.
      seed: random seed for shuffling, augmentation and weight initialization.
      deterministic: deterministic input order (slower).
      cache: cache decoded training examples in memory.
      tensorboard: write TensorBoard logs to RUN_DIR/logs.
      verbose: Keras verbosity (1 = progress bar, 2 = one line per epoch, 0 = silent).
    """

    data: str = ""
    model: str = ""
    output: str = ""
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    epochs: int = 10
    budget: Any = None
    batch_size: int = 8
    image_size: tuple | None = None
    patch_size: tuple | None = None
    loss: str | None = None
    loss_kwargs: dict = dataclasses.field(default_factory=dict)
    class_weights: Any = None
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "none"
    plateau_factor: float = 0.5
    plateau_patience: int = 3
    min_learning_rate: float = 1e-6
    precision: str = "auto"
    cpu_replicas: int = 0
    jit_compile: Any = "auto"
    steps_per_epoch: int | None = None
    validation_split: str | None = "val"
    validation_steps: int | None = None
    augment: dict | None = None
    early_stopping: int = 0
    monitor: str = "auto"
    num_classes: int | None = None
    seed: int | None = None
    deterministic: bool = False
    cache: bool = False
    tensorboard: bool = True
    verbose: int = 1

    @classmethod
    def from_dict(cls, config: dict) -> "FitConfig":
        """Builds a FitConfig from a flat mapping or one with a ``fit`` section.

        Raises:
          TfsegError: unknown keys, missing required keys or values of the wrong type.
        """
        if not isinstance(config, dict):
            raise TfsegError(f"fit config: expected a mapping, got {type(config).__name__}")
        section = config.get("fit") if isinstance(config.get("fit"), dict) else config
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - set(names))
        if unknown:
            raise TfsegError(
                f"fit config: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(names))})"
            )
        values = {k: _coerce(k, v, names[k].default) for k, v in section.items()}
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Checks values that need no dataset.

        Raises:
          TfsegError: the first invalid value, named by its key.
        """
        for key in ("data", "model", "output"):
            if not getattr(self, key):
                raise TfsegError(f"fit config: {key!r} is required (--{key})")
        if self.epochs < 1:
            raise TfsegError(f"fit config: epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise TfsegError(f"fit config: batch_size must be >= 1, got {self.batch_size}")
        if self.budget is not None:
            from tfseg.plan import parse_duration

            parse_duration(self.budget, option="fit config: budget")
        if self.optimizer not in OPTIMIZERS:
            raise TfsegError(f"fit config: optimizer {self.optimizer!r} not in {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise TfsegError(f"fit config: schedule {self.schedule!r} not in {', '.join(SCHEDULES)}")
        if self.precision not in runtime.PRECISIONS:
            raise TfsegError(
                f"fit config: precision {self.precision!r} not in {', '.join(runtime.PRECISIONS)}"
            )
        for key in sorted(_FLOAT_KEYS):
            value = getattr(self, key)
            if not math.isfinite(value):
                raise TfsegError(f"fit config: {key} must be a finite number, got {value}")
        for key, low, high, what in _RANGES:
            value = getattr(self, key)
            if value is not None and not (low(value) and high(value)):
                raise TfsegError(f"fit config: {key} must be {what}, got {value}")
        if self.cpu_replicas < 0:
            raise TfsegError(f"fit config: cpu_replicas must be >= 0, got {self.cpu_replicas}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise TfsegError(f"fit config: steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if self.jit_compile not in (True, False, "auto", None):
            raise TfsegError(f"fit config: jit_compile must be true, false or auto, got {self.jit_compile!r}")
        if self.augment is not None and not isinstance(self.augment, dict):
            raise TfsegError(f"fit config: augment must be a mapping, got {self.augment!r}")
        if not isinstance(self.model_kwargs, dict) or not isinstance(self.loss_kwargs, dict):
            raise TfsegError("fit config: model_kwargs and loss_kwargs must be mappings")

    def to_json(self) -> dict:
        """A JSON-ready dict (sizes as lists)."""
        d = dataclasses.asdict(self)
        for key in ("image_size", "patch_size"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d


_INT_KEYS = {
    "epochs", "batch_size", "plateau_patience", "cpu_replicas", "steps_per_epoch",
    "validation_steps", "early_stopping", "num_classes", "seed", "verbose",
}
_FLOAT_KEYS = {"learning_rate", "weight_decay", "momentum", "plateau_factor", "min_learning_rate"}
_BOOL_KEYS = {"deterministic", "cache", "tensorboard"}
_ANY = lambda v: True  # noqa: E731
# (key, lower check, upper check, wording) for numbers whose sign or range matters.
_RANGES = (
    ("learning_rate", lambda v: v > 0, _ANY, "> 0"),
    ("weight_decay", lambda v: v >= 0, _ANY, ">= 0"),
    ("momentum", lambda v: v >= 0, lambda v: v < 1, "in [0, 1)"),
    ("plateau_factor", lambda v: v > 0, lambda v: v < 1, "in (0, 1)"),
    ("min_learning_rate", lambda v: v >= 0, _ANY, ">= 0"),
    ("plateau_patience", lambda v: v >= 0, _ANY, ">= 0"),
    ("early_stopping", lambda v: v >= 0, _ANY, ">= 0 (0 turns it off)"),
    ("validation_steps", lambda v: v >= 1, _ANY, ">= 1"),
    ("verbose", lambda v: v >= 0, lambda v: v <= 2, "0, 1 or 2"),
    ("epochs", _ANY, lambda v: v <= 100_000, "<= 100000"),
    ("batch_size", _ANY, lambda v: v <= 65_536, "<= 65536"),
)


def _coerce(key: str, value, default):
    """Converts one config value to its field's type (YAML and --set give ints/strings)."""
    if value is None:
        if key in ("data", "model", "output") or key in _FLOAT_KEYS or key in _BOOL_KEYS or key in (
            "epochs", "batch_size", "plateau_patience", "early_stopping", "cpu_replicas", "verbose"
        ):
            return default
        return None
    try:
        if key in _INT_KEYS:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if key in _FLOAT_KEYS:
            return float(value)
        if key in _BOOL_KEYS:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if not isinstance(value, (bool, int)):
                raise ValueError
            return bool(value)
    except (TypeError, ValueError):
        raise TfsegError(f"fit config: {key} = {value!r} is not a valid {type(default).__name__}") from None
    if key == "image_size":
        return parse_size(value, 2)
    if key == "patch_size":
        return parse_size(value, 3)
    if key == "jit_compile" and isinstance(value, str):
        low = value.lower()
        return {"true": True, "false": False, "auto": "auto"}.get(low, value)
    if key in ("data", "model", "output", "optimizer", "schedule", "precision", "monitor"):
        return str(value).lower() if key in ("optimizer", "schedule", "precision") else str(value)
    if key == "validation_split":
        return str(value) if value != "" else None
    if key == "budget":
        return value if value != "" else None
    if key == "augment" and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise TfsegError(f"fit config: augment is not valid JSON ({e})") from None
    if key in ("model_kwargs", "loss_kwargs") and value is None:
        return {}
    return value


# --------------------------------------------------------------------------------------------
# Checks against the dataset (no TensorFlow).
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What the config resolves to for one dataset, decided before TensorFlow starts."""

    info: DatasetInfo
    size: tuple  # (H, W) or (D, H, W)
    loss: str
    class_weights: list | None
    validation_split: str | None
    train_steps: int  # batches in one pass over the training split


def _plan(cfg: FitConfig, info: DatasetInfo) -> _Plan:
    from tfseg import models

    where = os.path.join(cfg.data, "dataset.json")
    if cfg.model not in models.MODELS:
        raise TfsegError(f"--model {cfg.model!r}: unknown model (choose from {', '.join(sorted(models.MODELS))})")
    if cfg.num_classes is not None and cfg.num_classes != info.num_classes:
        raise TfsegError(
            f"{where}: the dataset has num_classes={info.num_classes}, the config asks for {cfg.num_classes}"
        )
    if info.ndim == 2:
        if cfg.patch_size is not None:
            raise TfsegError(f"{where}: 2D dataset, but a 3D --patch-size was given; use --image-size HxW")
        size = cfg.image_size or _default_image_size(info)
    elif info.ndim == 3:
        if cfg.image_size is not None:
            raise TfsegError(f"{where}: 3D dataset, but a 2D --image-size was given; use --patch-size DxHxW")
        size = cfg.patch_size or (64, 64, 64)
    else:
        raise TfsegError(f"{where}: ndim must be 2 or 3, got {info.ndim}")
    flag = "--image-size" if info.ndim == 2 else "--patch-size"
    if math.prod(size) > MAX_INPUT_PIXELS:
        raise TfsegError(f"{flag} {'x'.join(map(str, size))}: {math.prod(size):,} pixels per example, more than "
                         f"tfseg trains on ({MAX_INPUT_PIXELS:,}, e.g. 4096x4096 or 256x256x256)")
    try:
        models.check_input_shape(cfg.model, tuple(size) + (info.channels,), **cfg.model_kwargs)
    except (TypeError, ValueError) as e:
        raise TfsegError(f"{flag} {'x'.join(map(str, size))} on {where}: {e}") from None
    if "train" not in info.splits:
        raise TfsegError(f"{where}: no 'train' split (has {sorted(info.splits)})")
    validation_split = cfg.validation_split
    if validation_split and validation_split not in info.splits:
        if validation_split == "val":
            logger.info("%s: no 'val' split; training without validation", where)
            validation_split = None
        else:
            raise TfsegError(f"{where}: no split {validation_split!r} for validation (has {sorted(info.splits)})")
    from tfseg.data import steps_per_epoch

    train_steps = steps_per_epoch(cfg.data, "train", batch_size=cfg.batch_size, training=True)
    if train_steps < 1 and cfg.steps_per_epoch is None:
        raise TfsegError(
            f"{where}: the train split has {info.splits['train'].get('count', 0)} example(s), fewer than "
            f"one global batch of {cfg.batch_size}; lower --batch-size"
        )
    loss = cfg.loss or ("bce_dice" if info.binary else "ce_dice" if info.ndim == 3 else "ce")
    return _Plan(
        info=info,
        size=tuple(size),
        loss=loss,
        class_weights=_class_weights(cfg.class_weights, info, where),
        validation_split=validation_split,
        train_steps=train_steps,
    )


def _default_image_size(info: DatasetInfo) -> tuple[int, int]:
    summary = (info.size_summary or {}).get("train") or {}
    try:
        h, w = summary["height"], summary["width"]
        if h["min"] == h["max"] and w["min"] == w["max"]:
            return int(h["min"]), int(w["min"])
    except (KeyError, TypeError):
        pass
    logger.warning("training images differ in size; resizing to 256x256 (set --image-size)")
    return 256, 256


def _class_weights(spec, info: DatasetInfo, where: str) -> list | None:
    """None, an explicit list, or weights from the train pixel counts ("auto" = median frequency)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        from tfseg.losses import class_weights_from_counts

        counts = (info.class_pixel_counts or {}).get("train")
        if not counts or len(counts) != info.num_classes:
            raise TfsegError(f"{where}: class_weights={spec} needs class_pixel_counts for 'train'")
        try:
            return class_weights_from_counts(counts, "median_freq" if spec == "auto" else spec)
        except ValueError as e:
            raise TfsegError(f"class_weights {spec!r}: {e}") from None
    if isinstance(spec, (list, tuple)) and len(spec) == info.num_classes:
        return [float(x) for x in spec]
    raise TfsegError(f"class_weights {spec!r}: expected 'auto' or {info.num_classes} numbers")


# --------------------------------------------------------------------------------------------
# RUN_DIR state: run.json, history.csv, backup.
# --------------------------------------------------------------------------------------------


def _run_record(cfg: FitConfig, plan: _Plan) -> dict:
    info = plan.info
    # The typed run facts (rundir.RunInfo); precision and monitor are added once resolved.
    flips = rundir.training_flip_axes({"ndim": info.ndim, "config": {"augment": cfg.augment or {}}})
    record = rundir.RunInfo.from_dataset(
        info, plan.size, model=cfg.model, model_kwargs=dict(cfg.model_kwargs), flip_axes=flips
    ).to_json()
    record.update(data_dir=outputs.normalize(cfg.data), loss=plan.loss)
    return record


def _check_same_run(run_dir: str, old: dict, new: dict) -> None:
    for key in _IDENTITY_KEYS:
        if old.get(key) != new.get(key):
            raise TfsegError(
                f"{run_dir}: holds a run with {key}={old.get(key)!r}, this fit has {new.get(key)!r}; "
                "choose another --output"
            )


def backup_epoch(run_dir: str) -> int:
    """The number of finished epochs recorded by BackupAndRestore in RUN_DIR (0 if none)."""
    path = os.path.join(run_dir, BACKUP_DIR, _TRAINING_METADATA)
    try:
        text = outputs.read_text(path).strip()
        # TF's ram:// filesystem does not truncate on rewrite, so Keras's rewrites pile up there:
        # the last JSON object is the current one.
        decoder, record, pos = json.JSONDecoder(), None, 0
        objects = 0
        while pos < len(text):
            record, pos = decoder.raw_decode(text, pos)
            objects += 1
        if objects > 1:  # leave one object, which Keras's own reader expects
            atomic_write_text(path, json.dumps(record))
        return int(record["epoch"])
    except Exception:  # noqa: BLE001 - absent or unreadable on any filesystem: no finished epoch
        return 0


def read_history(run_dir: str) -> list[dict]:
    """The rows of RUN_DIR/history.csv as dicts (strings), [] when absent."""
    path = os.path.join(run_dir, rundir.HISTORY_CSV)
    if not outputs.isfile(path):
        return []
    return list(csv.DictReader(io.StringIO(outputs.read_text(path), newline="")))


def trim_history(run_dir: str, finished_epochs: int) -> list[dict]:
    """Keeps the last row of each epoch < ``finished_epochs`` in history.csv; returns the rows.

    A crash between the CSV row and the backup of an epoch (or an earlier resume) can leave rows
    for epochs that will run again; they go, so the file ends with one row per epoch.
    """
    path = os.path.join(run_dir, rundir.HISTORY_CSV)
    if not outputs.isfile(path):
        return []
    with io.StringIO(outputs.read_text(path), newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        by_epoch: dict[int, dict] = {}
        for row in reader:
            try:
                epoch = int(row.get("epoch", ""))
            except ValueError:
                continue
            if epoch < finished_epochs:
                by_epoch[epoch] = row
    rows = [by_epoch[e] for e in sorted(by_epoch)]
    if not rows:
        outputs.remove(path)
        return []
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())
    return rows


def _monitored_values(rows: list[dict], monitor: str) -> list[float | None]:
    """The monitored value of each history row, None where it is missing or not finite."""
    values = []
    for row in rows:
        try:
            v = float(row.get(monitor, "nan"))
        except ValueError:
            v = float("nan")
        values.append(v if math.isfinite(v) else None)
    return values


def replay_patience(values, mode: str, patience: int) -> tuple[float | None, int]:
    """(best, wait) of a patience counter after the epochs in ``values``, as Keras counts them.

    Keras's rule (``EarlyStopping``, ``ReduceLROnPlateau`` without cooldown, ``min_delta`` 0): an
    epoch that beats the best resets ``wait`` to 0, any other epoch adds 1 (None values,
    epochs without the metric, are skipped). ``patience`` > 0 is the plateau schedule, where
    reaching it reduced the learning rate (restored with the optimizer from the backup) and reset
    ``wait``; early stopping passes 0, since reaching its patience ended the run.
    """
    best, wait = None, 0
    for v in values:
        if v is None:
            continue
        if best is None or (v > best if mode == "max" else v < best):
            best, wait = v, 0
        else:
            wait += 1
            if patience and wait >= patience:
                wait = 0
    return best, wait


# --------------------------------------------------------------------------------------------
# Keras pieces (TensorFlow imported inside).
# --------------------------------------------------------------------------------------------


def _make_optimizer(cfg: FitConfig, decay_steps: int):
    import keras

    lr = cfg.learning_rate
    if cfg.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, decay_steps))
    if cfg.optimizer == "adam":
        return keras.optimizers.Adam(lr)
    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=cfg.momentum)
    return keras.optimizers.Adadelta(lr)


def _choose_monitor(cfg: FitConfig, metric_names: list[str], has_validation: bool) -> tuple[str, str]:
    """Returns (monitor, mode) for checkpoints and early stopping."""
    if cfg.monitor != "auto":
        return cfg.monitor, "min" if "loss" in cfg.monitor else "max"
    prefix = "val_" if has_validation else ""
    for want in _MONITOR_PREFERENCE:
        for name in metric_names:
            if want in name:
                return prefix + name, "max"
    return prefix + "loss", "min"


def validation_plan(count: int, global_batch: int, replicas: int) -> tuple[int, int]:
    """(examples per validation pass, validation batch) for a split of ``count`` examples.

    On one replica: every example once, in global batches. On several, every batch must be a
    multiple of the replicas: Keras averages the first validation batch over the replicas to
    build the model (unequal shares fail), and a replica handed an empty share of the last batch
    fails inside the convolution kernels. The pass is therefore rounded up to a multiple of the
    replicas by cycling from the first example (at most replicas - 1 examples counted twice).
    """
    if replicas <= 1:
        return count, global_batch
    total = max(replicas, -(-count // replicas) * replicas)
    return total, min(global_batch, total)


def _make_datasets(cfg: FitConfig, plan: _Plan, global_batch: int, multi_worker: bool,
                   val_plan: tuple[int, int] = (0, 0)):
    import tensorflow as tf

    from tfseg.data import make_dataset

    size_key = "image_size" if plan.info.ndim == 2 else "patch_size"
    common = {size_key: plan.size}
    train = make_dataset(
        cfg.data,
        "train",
        batch_size=global_batch,
        training=True,
        augment=cfg.augment,
        seed=cfg.seed,
        deterministic=cfg.deterministic,
        cache=cfg.cache,
        repeat=-1,
        **common,
    )
    val = None
    if plan.validation_split:
        # Repeated after batching, with validation_steps = one pass: Keras keeps one validation
        # iterator for the whole fit, and a finite one ran dry at the third epoch on several
        # replicas (StopIteration from input_lib). Each epoch now validates on exactly one pass.
        count = int(plan.info.splits[plan.validation_split].get("count", 0))
        total, val_batch = val_plan
        if total != count:  # several replicas: a pass rounded up to a multiple of them (see validation_plan)
            val = make_dataset(cfg.data, plan.validation_split, batch_size=1, training=False, **common)
            val = val.unbatch().repeat().take(total).batch(val_batch).repeat()
        else:
            val = make_dataset(
                cfg.data, plan.validation_split, batch_size=val_batch, training=False, **common
            ).repeat()
    if multi_worker:
        # Few shard files per split: every worker reads all files and keeps its share of batches.
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        train = train.with_options(options)
        val = val.with_options(options) if val is not None else None
    return train, val


def _resumable(callback_cls):
    """``callback_cls`` (EarlyStopping or ReduceLROnPlateau) that resumes its patience counter.

    Keras resets ``best`` and ``wait`` in ``on_train_begin``, so a resumed run would otherwise
    wait a whole new patience; these start from the state replayed from history.csv.
    """

    class Resumable(callback_cls):
        def __init__(self, *, state: tuple[float | None, int], **kwargs):
            super().__init__(**kwargs)
            self._resume_state = state

        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            self.best, self.wait = self._resume_state  # Keras starts from (None, 0)

    Resumable.__name__ = f"Resumable{callback_cls.__name__}"
    return Resumable


class TrainingDiverged(TfsegError):
    """A non-finite loss, metric or weight: the epoch it happened in is not kept."""


def _health_guard():
    """A callback, first in the list, that stops training on the first non-finite value.

    It raises (instead of asking Keras to stop, as TerminateOnNaN does) so that no later
    callback runs for the broken epoch: no history row, checkpoint or backup ever records
    non-finite weights, and a re-run resumes from the last finite epoch.
    """
    import keras

    class HealthGuard(keras.callbacks.Callback):
        epoch = 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(float(loss)):
                raise TrainingDiverged(f"loss {float(loss)} at step {batch + 1} of epoch {self.epoch + 1}")

        def on_epoch_end(self, epoch, logs=None):
            for key, value in (logs or {}).items():
                if key.endswith("loss") and not math.isfinite(float(value)):
                    raise TrainingDiverged(f"{key} {float(value)} at the end of epoch {epoch + 1}")
            bad = rundir.first_non_finite_weight(self.model)
            if bad is not None:
                raise TrainingDiverged(f"non-finite weights in {bad} after epoch {epoch + 1}")

    return HealthGuard()


def _history_writer(path: str, rows: list[dict]):
    """Keras's CSVLogger, rewritten for any filesystem: ``epoch`` then the logs' keys, sorted.

    Object stores cannot append, so the whole file is rewritten after each epoch (a few
    hundred bytes per epoch); the rows of earlier epochs come from :func:`trim_history`.
    """
    import keras

    class HistoryWriter(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.rows = [dict(r) for r in rows]

        def on_epoch_end(self, epoch, logs=None):
            row = {"epoch": str(epoch)}
            for k, v in sorted((logs or {}).items()):
                try:
                    row[k] = repr(float(v))
                except (TypeError, ValueError):
                    row[k] = str(v)
            self.rows.append(row)
            fields = ["epoch"] + sorted({k for r in self.rows for k in r} - {"epoch"})
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n", restval="")
            writer.writeheader()
            writer.writerows(self.rows)
            atomic_write_text(path, out.getvalue())

    return HistoryWriter()


def _set_learning_rate(value: float):
    """A callback that sets the optimizer's learning rate after BackupAndRestore restored it."""
    import keras

    class SetLearningRate(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.model.optimizer.learning_rate.assign(value)

    return SetLearningRate()


def _callbacks(run_dir: str, cfg: FitConfig, monitor: str, mode: str, rows: list[dict], validation: bool):
    import keras

    values = _monitored_values(rows, monitor)
    stop_state = replay_patience(values, mode, 0)  # (best so far, epochs since it)
    best = stop_state[0]

    ckpt = os.path.join(run_dir, CHECKPOINT_DIR)
    outputs.makedirs(ckpt)
    # Order matters for a crash between callbacks: the CSV row goes first, the backup last, so
    # a backed-up epoch always has its row (extra rows are trimmed on resume).
    cbs = [
        _health_guard(),
        _history_writer(os.path.join(run_dir, rundir.HISTORY_CSV), rows),
    ]
    if validation:
        cbs.append(
            keras.callbacks.ModelCheckpoint(
                os.path.join(ckpt, BEST_CHECKPOINT),
                monitor=monitor,
                mode=mode,
                save_best_only=True,
                initial_value_threshold=best,
            )
        )
    cbs.append(keras.callbacks.ModelCheckpoint(os.path.join(ckpt, LAST_CHECKPOINT)))
    if cfg.schedule == "plateau":
        cbs.append(
            _resumable(keras.callbacks.ReduceLROnPlateau)(
                state=replay_patience(values, mode, cfg.plateau_patience),
                monitor=monitor,
                mode=mode,
                factor=cfg.plateau_factor,
                patience=cfg.plateau_patience,
                min_lr=cfg.min_learning_rate,
            )
        )
    if cfg.early_stopping:
        cbs.append(
            _resumable(keras.callbacks.EarlyStopping)(
                state=stop_state, monitor=monitor, mode=mode, patience=cfg.early_stopping
            )
        )
    if cfg.tensorboard:
        cbs.append(keras.callbacks.TensorBoard(os.path.join(run_dir, LOGS_DIR), write_graph=False))
        if validation:  # a picture of validation predictions about 4 times per run (tfseg.tb_images)
            from tfseg.tb_images import PredictionImages

            cbs.append(PredictionImages(cfg.data, cfg.validation_split, os.path.join(run_dir, LOGS_DIR),
                                        epochs=cfg.epochs))
    cbs.append(
        keras.callbacks.BackupAndRestore(os.path.join(run_dir, BACKUP_DIR), delete_checkpoint=False)
    )
    return cbs


def _publish_model(run_dir: str, model, use_best: bool) -> None:
    """Writes RUN_DIR/model.keras, the run's completion marker, in one step (the best checkpoint
    when there is one): a rename on local disks, one object write on object stores."""
    final = os.path.join(run_dir, rundir.MODEL_FILE)
    best = os.path.join(run_dir, CHECKPOINT_DIR, BEST_CHECKPOINT)
    local_dir = None if outputs.is_remote(run_dir) else run_dir
    fd, tmp = tempfile.mkstemp(prefix=".tfseg-model.", suffix=".keras", dir=local_dir)
    os.close(fd)
    try:
        if use_best and outputs.isfile(best):
            outputs.copy_file(best, tmp)
        else:
            model.save(tmp)
        if local_dir:
            os.replace(tmp, final)
        else:
            outputs.copy_file(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------------------------
# The stage.
# --------------------------------------------------------------------------------------------


def build_config(config_file: str | None = None, options: dict | None = None, overrides=()) -> dict:
    """Merges a config file's ``fit`` section (or flat file), command-line options and ``--set``.

    Precedence, lowest first: the file, the options that are not None, then the ``key=value``
    overrides (dotted keys for nested values, e.g. ``model_kwargs.depth=3``; a leading ``fit.``
    is accepted).

    Raises:
      TfsegError: unreadable file or a malformed override.
    """
    from tfseg.config import apply_overrides, load_config

    config: dict = {}
    if config_file:
        doc = load_config(config_file)
        config = dict(doc["fit"]) if isinstance(doc.get("fit"), dict) else dict(doc)
    config.update({k: v for k, v in (options or {}).items() if v is not None})
    items = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if key.strip().startswith("fit."):
            key = key.strip()[len("fit."):]
        items.append(f"{key}{sep}{value}")
    return apply_overrides(config, items)


def resolve_config(config: dict) -> FitConfig:
    """Public alias of :meth:`FitConfig.from_dict`."""
    return FitConfig.from_dict(config)


def run_fit(config: dict, *, callbacks: list | None = None) -> str:
    """Trains a model on a converted dataset; resumable.

    Args:
      config: FitConfig keys, flat or under ``fit``.
      callbacks: extra Keras callbacks, run after tfseg's own.

    Returns:
      The absolute run directory (``config["output"]``).

    Raises:
      TfsegError: bad config or dataset (reported before training starts), a run directory
        of another model, or a diverged run (NaN loss).
    """
    started = time.time()
    cfg = FitConfig.from_dict(config)
    info = load_dataset_info(cfg.data)
    plan = _plan(cfg, info)
    final_dir = outputs.normalize(cfg.output)
    record = _run_record(cfg, plan)

    chief = runtime.is_chief()
    run_dir = final_dir
    if not chief:
        # Workers other than the chief train in lock-step but keep their files apart.
        task = (runtime.tf_config() or {}).get("task", {})
        run_dir = os.path.join(final_dir, f"{outputs.INTERNAL_PREFIX}worker-{task.get('type', 'worker')}-"
                                          f"{task.get('index', 0)}")

    run_json = os.path.join(run_dir, rundir.RUN_JSON)
    previous = None
    # A new folder or an earlier fit (continued or resumed); never another stage's or a user's
    # folder, never the dataset. Other workers' folders (.tfseg-worker-*) may appear first.
    outputs.claim(final_dir, "fit", complete_marker=None, overwrite=True, inputs=[("--data", cfg.data)])
    if outputs.isfile(run_json):
        previous = json.loads(outputs.read_text(run_json))
        _check_same_run(final_dir, previous, record)
    if not chief and outputs.isdir(os.path.join(final_dir, BACKUP_DIR)):
        # Every worker resumes from the chief's backup: the replicas hold the same weights, and
        # workers killed at different moments would otherwise restart at different epochs and
        # wait on each other's collectives forever.
        outputs.rmtree(os.path.join(run_dir, BACKUP_DIR))
        outputs.copy_tree(os.path.join(final_dir, BACKUP_DIR), os.path.join(run_dir, BACKUP_DIR))
    finished = backup_epoch(run_dir)
    budget_seconds, budget_record, planned_epochs = None, None, cfg.epochs
    if cfg.budget is not None:
        # The budget decides the epochs: resolved after the first timed epoch and kept in
        # run.json, so a resumed run ends where the interrupted one would have.
        from tfseg.plan import parse_duration

        budget_seconds = parse_duration(cfg.budget)
        old = (previous or {}).get("budget") or {}
        if old.get("epochs") and float(old.get("seconds", -1)) == budget_seconds:
            budget_record = dict(old)
        cfg = dataclasses.replace(cfg, epochs=int(budget_record["epochs"]) if budget_record else 100_000)
    model_path = os.path.join(run_dir, rundir.MODEL_FILE)
    if chief and outputs.isfile(model_path) and previous is not None:
        done = int(previous.get("completed_epochs") or finished)
        if previous.get("stopped_early"):
            logger.info("%s: stopped early after %d epoch(s); nothing to do (use a new --output to retrain)",
                        final_dir, done)
            return final_dir
        if cfg.epochs <= done:
            logger.info("%s: already trained for %d epoch(s); nothing to do (ask for more --epochs to continue)",
                        final_dir, done)
            return final_dir
    if finished >= cfg.epochs and not outputs.isfile(model_path):
        logger.info("%s: all %d epochs finished before an interruption; publishing the model", final_dir, finished)

    # The strategy comes first: logical CPUs and multi-worker collectives must be configured
    # before TensorFlow initializes.
    strategy = runtime.make_strategy(cfg.cpu_replicas)
    replicas = strategy.num_replicas_in_sync
    if cfg.batch_size % replicas:
        raise TfsegError(
            f"--batch-size {cfg.batch_size}: the global batch must be divisible by the {replicas} replicas"
        )
    gpus = runtime.num_gpus()
    precision = runtime.resolve_precision(cfg.precision, num_gpus=gpus)
    jit = runtime.resolve_jit_compile(cfg.jit_compile, num_gpus=gpus)
    multi_worker = runtime.tf_config() is not None

    # An endless training dataset with a fixed step count: epochs are known in advance (cosine
    # decay, progress bar) and workers of a multi-worker run agree on them.
    steps = cfg.steps_per_epoch or plan.train_steps
    decay_steps = cfg.epochs * steps

    import keras
    import tensorflow as tf

    from tfseg.data import steps_per_epoch
    from tfseg.losses import get_loss
    from tfseg.metrics import default_metrics
    from tfseg.models import build_model

    if cfg.seed is not None:
        keras.utils.set_random_seed(cfg.seed)
    old_policy = runtime.set_precision(precision)
    try:
        input_shape = tuple(plan.size) + (info.channels,)
        with strategy.scope():
            try:
                model = build_model(
                    cfg.model, input_shape=input_shape, num_classes=info.num_classes, **cfg.model_kwargs
                )
            except (ValueError, TypeError) as e:
                raise TfsegError(f"--model {cfg.model} on {info.ndim}D data {input_shape}: {e}") from None
            try:
                loss = get_loss(
                    plan.loss,
                    num_classes=info.num_classes,
                    ignore_index=info.ignore_index,
                    class_weights=plan.class_weights,
                    **cfg.loss_kwargs,
                )
            except ValueError as e:
                raise TfsegError(f"--loss {plan.loss} on {cfg.data}: {e}") from None
            metrics = default_metrics(info.num_classes, info.ignore_index, regions=info.regions or None)
            budget_cosine = budget_seconds is not None and cfg.schedule == "cosine"
            model.compile(
                # Under a budget the cosine's end is known after the first epoch: the budget
                # controller sets the learning rate each step instead of a fixed schedule.
                optimizer=_make_optimizer(dataclasses.replace(cfg, schedule="none") if budget_cosine else cfg,
                                          decay_steps),
                loss=loss,
                metrics=metrics,
                jit_compile=jit,
            )
        monitor, mode = _choose_monitor(cfg, [m.name for m in metrics], plan.validation_split is not None)
        # Everything checked: from here on the run directory changes.
        if chief:
            outputs.mark_owned(final_dir, "fit")
        outputs.makedirs(run_dir)
        if outputs.isfile(model_path):
            # Continuing a finished run: model.keras means "complete" until the new epochs finish.
            outputs.remove(model_path)
        rows = trim_history(run_dir, finished)
        record.update(
            completed_epochs=finished,
            stopped_early=False,
            precision=precision,
            jit_compile=jit,
            strategy=runtime.strategy_name(strategy),
            replicas=replicas,
            monitor=monitor,
            tfseg_version=_version(),
            config=cfg.to_json(),
        )
        if budget_record:
            record.update(budget=budget_record)
        atomic_write_json(os.path.join(run_dir, rundir.RUN_JSON), record)

        if multi_worker:
            runtime.patch_keras_multi_worker(model, strategy)
        val_plan = (0, cfg.batch_size)
        if plan.validation_split:
            val_plan = validation_plan(
                int(plan.info.splits[plan.validation_split].get("count", 0)), cfg.batch_size, replicas)
        train_ds, val_ds = _make_datasets(cfg, plan, cfg.batch_size, multi_worker, val_plan)
        cbs = _callbacks(
            run_dir, cfg if budget_seconds is None else dataclasses.replace(cfg, epochs=planned_epochs),
            monitor, mode, rows, val_ds is not None
        )
        # Batch-norm statistics re-estimated for the weights before each validation (tfseg.bnstats).
        bn_callback = bnstats.make_callback(
            model, bnstats.stats_dataset(cfg, plan, multi_worker=multi_worker),
            bnstats.num_batches(cfg.batch_size, steps),
        )
        if bn_callback is not None:
            cbs.insert(0, bn_callback)
        old_lr = ((previous or {}).get("config") or {}).get("learning_rate")
        if finished and old_lr is not None and old_lr != cfg.learning_rate and cfg.schedule != "cosine":
            # BackupAndRestore brings back the old run's learning-rate variable; a user who
            # lowers --learning-rate (after a divergence, say) means the new one.
            logger.info("%s: resuming after epoch %d with learning rate %g (was %g)", final_dir, finished,
                        cfg.learning_rate, old_lr)
            cbs.append(_set_learning_rate(cfg.learning_rate))
        budget_controller = None
        if budget_seconds is not None:
            from tfseg.plan import make_budget_controller

            def on_resolved(decision: dict) -> None:
                record.update(budget=decision)
                atomic_write_json(os.path.join(run_dir, rundir.RUN_JSON), record)

            budget_controller = make_budget_controller(
                budget_seconds=budget_seconds, started=started, steps_per_epoch=steps, first_epoch=finished,
                resolved=int(budget_record["epochs"]) if budget_record else None,
                base_lr=cfg.learning_rate if budget_cosine else None, on_resolved=on_resolved,
            )
            cbs.insert(0, budget_controller)
            if budget_record:
                logger.info("budget %s: resuming towards the %d epochs decided at the start", cfg.budget,
                            budget_record["epochs"])
            else:
                logger.info("budget %s: the first epoch is timed to set the number of epochs", cfg.budget)
        cbs += list(callbacks or [])
        validation_steps = cfg.validation_steps
        if val_ds is not None and validation_steps is None:
            # Known steps keep Keras from probing the end of the validation data each epoch.
            total, val_batch = val_plan
            validation_steps = max(1, -(-total // val_batch) if replicas > 1 else steps_per_epoch(
                cfg.data, plan.validation_split, batch_size=val_batch, training=False
            ))
        logger.info(
            "fit %s on %s: %s, %d replica(s), global batch %d, %s, jit_compile=%s, epochs %d..%d",
            cfg.model, cfg.data, runtime.strategy_name(strategy), replicas, cfg.batch_size, precision, jit,
            finished + 1, cfg.epochs,
        )
        try:
            model.fit(
                train_ds,
                epochs=cfg.epochs,
                steps_per_epoch=steps,
                validation_data=val_ds,
                validation_steps=validation_steps,
                callbacks=cbs,
                verbose=cfg.verbose,
                shuffle=False,  # the tf.data pipeline shuffles
            )
        except (tf.errors.DataLossError, tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as e:
            from tfseg.data.input import find_bad_shard

            raise find_bad_shard(cfg.data, ("train", plan.validation_split)) or e from None
        except TrainingDiverged as e:
            kept = backup_epoch(run_dir)
            resume = (f"a re-run resumes after epoch {kept}, the last finite one" if kept
                      else "no epoch finished, so a re-run starts over")
            raise TfsegError(
                f"{final_dir}: training diverged ({e}); nothing was published and {resume}; "
                "try a lower --learning-rate or --precision float32"
            ) from None
        completed = backup_epoch(run_dir)
        target = budget_controller.total if budget_controller is not None and budget_controller.total else cfg.epochs
        stopped_early = completed < target
        if chief:
            _publish_model(run_dir, model, use_best=val_ds is not None)
            record.update(health=bnstats.fit_health(run_dir, cfg, plan))
            record.update(completed_epochs=completed, stopped_early=stopped_early)
            atomic_write_json(os.path.join(run_dir, rundir.RUN_JSON), record)
    finally:
        runtime.set_precision(old_policy)
    logger.info("%s: trained %d epoch(s)%s", final_dir, completed, " (stopped early)" if stopped_early else "")
    return final_dir


def _version() -> str:
    import tfseg

    return tfseg.__version__
