"""The fit config checked against the dataset (dataset.json) before TensorFlow starts, and what
it settles for that dataset (:class:`FitPlan`: training size, loss, class weights, validation
split, batches per pass). Bad input is reported here, before anything trains.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

from tfseg.errors import TfsegError
from tfseg.fit.config import FitConfig
from tfseg.preprocess import MAX_INPUT_PIXELS
from tfseg.schema import DatasetInfo

logger = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class FitPlan:
    """What the config resolves to for one dataset, decided before TensorFlow starts."""

    info: DatasetInfo
    size: tuple  # (H, W) or (D, H, W)
    loss: str
    class_weights: list | None
    validation_split: str | None
    train_steps: int  # batches in one pass over the training split


def check_against_dataset(cfg: FitConfig, info: DatasetInfo) -> FitPlan:
    """What ``cfg`` settles for the dataset ``info`` (read from ``cfg.data``).

    Raises:
      TfsegError: an unknown model, a class count, dimensionality or size the dataset or model
        cannot take, a missing split, or fewer training examples than one batch.
    """
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
    return FitPlan(
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
