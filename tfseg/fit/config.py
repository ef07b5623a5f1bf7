"""The fit stage's settings: :class:`FitConfig`, how config files, options and ``--set`` merge
into it (:func:`build_config`), and how each value is coerced and checked before any dataset is
read.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from tfseg import runtime
from tfseg.config import parse_duration, parse_size
from tfseg.errors import TfsegError

OPTIMIZERS = ("adam", "adamw", "sgd", "adadelta")
SCHEDULES = ("none", "cosine", "plateau")


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
        ends within it (:class:`tfseg.fit.budget.BudgetController`); ``epochs`` is then ignored.
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
      ema: momentum of an exponential moving average of the weights (Polyak averaging, updated
        every step; e.g. 0.99), which validation scores and the checkpoints and the published model
        hold; 0 turns it off.
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
      peer_timeout: multi-worker (TF_CONFIG): seconds to wait for the other workers at start-up
        and in each collective before exiting with a line naming those that did not answer.
      deterministic: deterministic input order (slower).
      cache: cache decoded training examples in memory.
      tensorboard: write TensorBoard logs to RUN_DIR/logs.
      verbose: Keras verbosity (1 = progress bar on a terminal, one line per epoch otherwise;
        2 = one line per epoch; 0 = silent).
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
    ema: float = 0.0
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
    peer_timeout: float = 300.0
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
_FLOAT_KEYS = {"ema", "peer_timeout", "learning_rate", "weight_decay", "momentum", "plateau_factor", "min_learning_rate"}
_BOOL_KEYS = {"deterministic", "cache", "tensorboard"}
_ANY = lambda v: True  # noqa: E731
# (key, lower check, upper check, wording) for numbers whose sign or range matters.
_RANGES = (
    ("learning_rate", lambda v: v > 0, _ANY, "> 0"),
    ("peer_timeout", lambda v: v > 0, _ANY, "> 0 seconds"),
    ("weight_decay", lambda v: v >= 0, _ANY, ">= 0"),
    ("momentum", lambda v: v >= 0, lambda v: v < 1, "in [0, 1)"),
    ("ema", lambda v: v >= 0, lambda v: v < 1, "in [0, 1) (0 turns it off)"),
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
