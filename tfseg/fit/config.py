"""The fit stage's settings: :class:`FitConfig`, how config files, options and ``--set`` merge
into it (:func:`build_config`), and how each value is coerced and checked before any dataset is
read.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from tfseg import runtime
from tfseg.config import StageConfig, parse_duration, parse_size, setting
from tfseg.errors import TfsegError

OPTIMIZERS = ("adam", "adamw", "sgd", "adadelta")
SCHEDULES = ("none", "cosine", "plateau")


def _lower(value):
    return value.lower() if isinstance(value, str) else value


def _blank_is_none(value):
    return None if value == "" else value


def _jit_compile(value):
    return {"true": True, "false": False, "auto": "auto"}.get(value.lower(), value) if isinstance(value, str) else value


def _json_mapping(value):
    """``augment`` given as JSON text (an environment variable, a shell)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise TfsegError(f"not valid JSON ({e})") from None


@dataclasses.dataclass(frozen=True)
class FitConfig(StageConfig):
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
      deterministic: deterministic input order and TensorFlow ops (``enable_op_determinism``): the
        same seed gives the same weights in another process (slower).
      cache: cache decoded training examples in memory.
      tensorboard: write TensorBoard logs to RUN_DIR/logs.
      verbose: Keras verbosity (1 = progress bar on a terminal, one line per epoch otherwise;
        2 = one line per epoch; 0 = silent).
    """

    WHAT = "fit config"

    data: str = ""
    model: str = ""
    output: str = ""
    model_kwargs: dict = setting(default_factory=dict)
    epochs: int = setting(10, at_least=1, at_most=100_000)
    budget: Any = setting(None, parse=_blank_is_none)
    batch_size: int = setting(8, at_least=1, at_most=65_536)
    image_size: tuple | None = setting(None, parse=lambda v: parse_size(v, 2))
    patch_size: tuple | None = setting(None, parse=lambda v: parse_size(v, 3))
    loss: str | None = None
    loss_kwargs: dict = setting(default_factory=dict)
    class_weights: Any = None
    optimizer: str = setting("adam", choices=OPTIMIZERS, parse=_lower)
    learning_rate: float = setting(1e-3, above=0)
    weight_decay: float = setting(1e-4, at_least=0)
    momentum: float = setting(0.9, at_least=0, below=1)
    schedule: str = setting("none", choices=SCHEDULES, parse=_lower)
    ema: float = setting(0.0, at_least=0, below=1, note="0 turns it off")
    plateau_factor: float = setting(0.5, above=0, below=1)
    plateau_patience: int = setting(3, at_least=0)
    min_learning_rate: float = setting(1e-6, at_least=0)
    precision: str = setting("auto", choices=runtime.PRECISIONS, parse=_lower)
    cpu_replicas: int = setting(0, at_least=0)
    jit_compile: Any = setting("auto", choices=(True, False, "auto"), parse=_jit_compile)
    steps_per_epoch: int | None = setting(None, at_least=1)
    validation_split: str | None = setting("val", parse=_blank_is_none)
    validation_steps: int | None = setting(None, at_least=1)
    augment: dict | None = setting(None, parse=_json_mapping)
    early_stopping: int = setting(0, at_least=0, note="0 turns it off")
    monitor: str = "auto"
    num_classes: int | None = None
    seed: int | None = None
    peer_timeout: float = setting(300.0, above=0, note="seconds")
    deterministic: bool = False
    cache: bool = False
    tensorboard: bool = True
    verbose: int = setting(1, at_least=0, at_most=2)

    @classmethod
    def from_dict(cls, config: dict) -> "FitConfig":
        """Builds a FitConfig from a flat mapping or one with a ``fit`` section.

        Raises:
          TfsegError: unknown keys, missing required keys, values of the wrong type or out of range.
        """
        if isinstance(config, dict) and isinstance(config.get("fit"), dict):
            config = config["fit"]
        return super().from_dict(config)

    def validate(self) -> None:
        """Checks what the fields' own checks cannot: the required paths and the budget's duration
        (the augmentation settings are checked against the dataset's dimensionality when its input
        pipeline is built, :func:`tfseg.data.augment.parse_augment`).

        Raises:
          TfsegError: the first invalid value, named by its key.
        """
        for key in ("data", "model", "output"):
            if not getattr(self, key):
                raise TfsegError(f"fit config: {key!r} is required (--{key})")
        if self.budget is not None:
            parse_duration(self.budget, option="fit config: budget")


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
