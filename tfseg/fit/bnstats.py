"""Batch-norm population statistics that match the weights, and the end-of-fit health check.

The problem (issue 13): batch norm normalizes with batch statistics in training and with moving
averages (momentum 0.99) at inference. After a short run (90 steps) 40% of each moving average
is still its initial value (mean 0, variance 1) and the rest mixes statistics of weights long
gone, so the published model predicts nonsense while the training metrics look fine.

The mechanism: **precise batch norm** (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm",
sec. 3): after the training steps of every epoch, and *before* validation runs, every batch-norm
layer's moving statistics are recomputed for the current weights over ``K`` batches of training
images, augmented as in training, with the model in training mode so each layer sees the inputs
it sees in training:

    mean = average of the batch means;  variance = average of (batch variance + batch mean^2) - mean^2

(the law of total variance: the population variance, not the within-batch one). The batches are
the training pipeline's, augmentation included: the weights were learned normalized by the
statistics of augmented batches, and estimating them on unaugmented images instead (what tfseg
did until issue 21) shifted every layer's input. On the demo's cars (rotations up to 45 degrees,
so black corners in most training images) that cost 0.19 IoU: the same weights score car IoU
0.771 on the test photos with statistics of unaugmented training images and 0.956 with
statistics of augmented ones (BENCHMARKS.md). Why this and
not a momentum rule: a cumulative or step-tied momentum still averages statistics of *older*
weights, which is wrong exactly when training moves fast (short runs, fine-tuning); recomputing
is exact for the weights that get saved, costs K forward passes per epoch (K = 128 images'
worth, at most an epoch, 4..32 batches; forward passes only: about 6% of an epoch for
the ccp recipe, 16 of its 88 steps' worth of images), and needs no change to the
layers, so it serves Keras's BatchNormalization and :class:`tfseg.models.norm.FusedBatchNorm`
alike, 2D and 3D. Group/instance normalization (nnU-Net) avoids the problem but changes the
models; tfseg keeps batch norm where the seeds had it.

Where it runs: :class:`PreciseBatchNorm`'s ``on_test_begin`` (Keras calls it inside ``fit`` after
the epoch's training steps, before the validation pass; ``on_epoch_end`` comes only after
validation) and, for runs without validation, ``on_epoch_end`` (the callback is first in the
list, so ModelCheckpoint, the best checkpoint and BackupAndRestore save the new statistics). So
the validation metrics, the best checkpoint, ``last.keras``, the resume backup and the
published model all carry statistics estimated for their own weights.

Many replicas: the batches are distributed like training batches and each replica computes its
batch statistics; the per-step values are averaged over the replicas by the variables' MEAN
aggregation (FusedBatchNorm), so every replica and every worker ends with the same statistics.

Health check (:func:`health_check`): the published model's predictions on a few training batches
in training mode (batch statistics, dropout off) and in inference mode (its stored statistics);
a mean IoU difference over ``HEALTH_THRESHOLD`` is logged as a warning and recorded in run.json.
"""

from __future__ import annotations

import logging
import math
import time

import keras
import numpy as np

from tfseg import rundir

logger = logging.getLogger(__name__)

STATS_IMAGES = 128  # images (2D) or patches (3D) per re-estimation
MIN_BATCHES, MAX_BATCHES = 4, 32
HEALTH_BATCHES = 4
HEALTH_THRESHOLD = 0.1  # mean IoU difference between training-mode and inference-mode predictions


def num_batches(batch_size: int, steps_per_epoch: int | None = None, images: int = STATS_IMAGES) -> int:
    """Batches per re-estimation: ``images`` worth, at most an epoch's steps, clipped to
    [MIN_BATCHES, MAX_BATCHES]."""
    k = math.ceil(images / max(1, batch_size))
    if steps_per_epoch:
        k = min(k, int(steps_per_epoch))
    return int(min(MAX_BATCHES, max(MIN_BATCHES, k)))


def stats_dataset(cfg, plan, *, multi_worker: bool = False):
    """Endless training batches as training sees them (augmentation, cropping, 3D patch sampling,
    the global batch size), from their own shuffle and augmentation seeds."""
    from tfseg.data import make_dataset
    from tfseg.data.input import shard_across_workers

    # A small shuffle buffer: this second pipeline must not double fit's memory (3D patches are
    # megabytes each); the iterator lives across epochs, so each estimate sees new batches.
    ds = make_dataset(
        cfg.data, "train", batch_size=cfg.batch_size, training=True, augment=cfg.augment,
        seed=None if cfg.seed is None else cfg.seed + 1, repeat=-1, shuffle_buffer=max(8, 2 * cfg.batch_size),
        deterministic=cfg.deterministic, **{rundir.size_key(plan.info.ndim): plan.size},
    )
    return shard_across_workers(ds) if multi_worker else ds


class Estimator:
    """Recomputes a model's batch-norm moving statistics over training batches (see the module).

    Args:
      model: a Keras model (built).
      dataset: a ``tf.data.Dataset`` of ``(images, masks)`` or images, global batches, endless.
      batches: batches per estimate.
      strategy: the model's ``tf.distribute`` strategy (default: the model's own).
    """

    def __init__(self, model, dataset, batches: int, strategy=None):
        from tfseg.models.norm import batch_norm_layers

        self.model = model
        self.layers = batch_norm_layers(model)
        self.batches = int(batches)
        self.strategy = strategy or getattr(model, "distribute_strategy", None)
        self._dataset = dataset
        self._iterator = None
        self._probe = None

    def _make_probe(self):
        import tensorflow as tf

        model, layers, strategy = self.model, self.layers, self.strategy

        def replica_step(x):
            model(x, training=True)

        # Traced while every layer's momentum is 0: the moving statistics then become the
        # statistics of the batch just seen (averaged over replicas), which the probe returns.
        @tf.function
        def probe(x):
            strategy.run(replica_step, (x,))
            return [(layer.moving_mean.value, layer.moving_variance.value) for layer in layers]

        return probe

    def __call__(self) -> float:
        """Re-estimates every batch-norm layer's moving mean and variance; returns the seconds.

        The previous moving statistics are replaced (not blended); gamma and beta are untouched.
        """
        if not self.layers:
            return 0.0
        import tensorflow as tf

        start = time.perf_counter()
        if self._iterator is None:
            images = self._dataset.map(lambda x, *_: x)
            self._iterator = iter(self.strategy.experimental_distribute_dataset(images))
        momenta = [layer.momentum for layer in self.layers]
        sums = [np.zeros((2,) + tuple(layer.moving_mean.shape), np.float64) for layer in self.layers]
        try:
            for layer in self.layers:
                layer.momentum = 0.0
            with self.strategy.scope():
                if self._probe is None:
                    self._probe = self._make_probe()
                for _ in range(self.batches):
                    stats = self._probe(next(self._iterator))
                    for acc, (mean, var) in zip(sums, stats):
                        mean = mean.numpy().astype(np.float64)
                        acc[0] += mean
                        acc[1] += var.numpy().astype(np.float64) + mean**2
                for layer, acc in zip(self.layers, sums):
                    mean = acc[0] / self.batches
                    var = np.maximum(acc[1] / self.batches - mean**2, 0.0)
                    layer.moving_mean.assign(tf.constant(mean, tf.float32))
                    layer.moving_variance.assign(tf.constant(var, tf.float32))
        finally:
            for layer, momentum in zip(self.layers, momenta):
                layer.momentum = momentum
        return time.perf_counter() - start


class PreciseBatchNorm(keras.callbacks.Callback):
    """Re-estimates batch-norm statistics once per epoch, before validation (module doc), with an
    :class:`Estimator`."""

    def __init__(self, estimator: "Estimator"):
        super().__init__()
        self.estimator = estimator
        self._done_at = None  # optimizer step of the last estimate
        self.seconds = 0.0

    def _estimate(self):
        step = int(self.model.optimizer.iterations.numpy())
        if step == self._done_at or step == 0:
            return
        self.seconds += self.estimator()
        self._done_at = step

    def on_test_begin(self, logs=None):
        self._estimate()

    def on_epoch_end(self, epoch, logs=None):
        self._estimate()

    def on_train_end(self, logs=None):
        logger.info("batch-norm statistics of %d layers re-estimated over %d batches each epoch: %.1f s in all",
                    len(self.estimator.layers), self.estimator.batches, self.seconds)


def make_callback(model, dataset, batches: int) -> PreciseBatchNorm | None:
    """The callback that re-estimates the statistics before validation and at epoch end; None
    when ``model`` has no batch norm."""
    estimator = Estimator(model, dataset, batches)
    return PreciseBatchNorm(estimator) if estimator.layers else None


# --------------------------------------------------------------------------------------------
# Health check.
# --------------------------------------------------------------------------------------------


def _classes(probs: np.ndarray) -> np.ndarray:
    if probs.shape[-1] == 1:
        return (probs[..., 0] > 0.5).astype(np.int64)
    return probs.argmax(-1).astype(np.int64)


def health_check(model, dataset, *, num_classes: int, ignore_index=None, batches: int = HEALTH_BATCHES,
                 threshold: float = HEALTH_THRESHOLD) -> dict:
    """Compares training-mode and inference-mode predictions of ``model`` on training batches.

    Training mode normalizes with each batch's statistics (dropout is switched off for the
    check); inference mode with the stored ones. Both are scored against the masks.

    Returns:
      A run.json-ready dict: ``train_mode_mean_iou``, ``inference_mode_mean_iou``,
      ``difference`` (train - inference), ``agreement`` (fraction of pixels/voxels where the two
      predict the same class), ``batches``, ``threshold``, ``ok`` (difference <= threshold).
      The model's weights and moving statistics are unchanged.
    """
    from tfseg.models.norm import all_layers, batch_norm_layers

    bn = batch_norm_layers(model)
    saved = [(layer.moving_mean.numpy(), layer.moving_variance.numpy()) for layer in bn]
    dropouts = [layer for layer in all_layers(model) if hasattr(layer, "rate") and "Dropout" in type(layer).__name__]
    rates = [layer.rate for layer in dropouts]
    labels, train_pred, infer_pred = [], [], []
    try:
        for layer in dropouts:
            layer.rate = 0.0
        for images, masks in dataset.take(batches):
            labels.append(masks.numpy()[..., 0].astype(np.int64).ravel())
            train_pred.append(_classes(model(images, training=True).numpy()).ravel())
            infer_pred.append(_classes(model(images, training=False).numpy()).ravel())
    finally:
        for layer, rate in zip(dropouts, rates):
            layer.rate = rate
        for layer, (mean, var) in zip(bn, saved):
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(var)
    from tfseg import scoring

    label, tp, ip = (np.concatenate(a) for a in (labels, train_pred, infer_pred))
    train_iou, infer_iou = (scoring.mean_iou(scoring.confusion_matrix(label, p, num_classes, ignore_index))
                            for p in (tp, ip))
    keep = scoring.scored_pixels(label, num_classes, ignore_index)
    difference = train_iou - infer_iou  # NaN when no pixel counts: nothing to judge the model on
    value = lambda v: None if np.isnan(v) else round(float(v), 4)  # noqa: E731
    return {
        "train_mode_mean_iou": value(train_iou),
        "inference_mode_mean_iou": value(infer_iou),
        "difference": value(difference),
        "agreement": value(float((tp[keep] == ip[keep]).mean()) if keep.any() else float("nan")),
        "batches": len(labels),
        "threshold": threshold,
        "batch_norm_layers": len(bn),
        "ok": bool(np.isnan(difference) or abs(difference) <= threshold),
    }


def fit_health(run_dir: str, cfg, plan) -> dict:
    """The health check of the model fit published in ``run_dir`` (loaded from model.keras, as
    evaluate and predict will load it); logs one line, a warning when it fails."""
    model = rundir.load_model(run_dir)
    ds = stats_dataset(cfg, plan)
    health = health_check(model, ds, num_classes=plan.info.num_classes, ignore_index=plan.info.ignore_index)
    if health["difference"] is None:
        logger.info("health: the %d training batches looked at hold no scored pixel", health["batches"])
        return health
    line = (
        f"health: on {health['batches']} training batches the published model scores mean IoU "
        f"{health['inference_mode_mean_iou']:.3f} in inference mode vs {health['train_mode_mean_iou']:.3f} "
        f"in training mode (batch statistics), {100 * health['agreement']:.1f}% of pixels agree"
    )
    if health["ok"]:
        logger.info("%s", line)
    else:
        logger.warning(
            "%s: apart by more than %.2f; the normalization statistics do not fit the weights "
            "(too few or too small batches?)", line, health["threshold"],
        )
    return health
