"""The Keras callbacks of a fit, in their order: the health guard (stops on the first non-finite
value, :class:`TrainingDiverged`), the history writer, checkpoints, the plateau schedule and early
stopping resumed with their patience, TensorBoard and prediction pictures, and the backup that
makes a run resumable. TensorFlow is imported inside.
"""

from __future__ import annotations

import math
import os

from tfseg import rundir
from tfseg.errors import TfsegError
from tfseg.fit.backup import atomic_checkpoint, make_backup_callback
from tfseg.fit.config import FitConfig
from tfseg.fit.history import BACKUP_DIR, history_writer, monitored_values, replay_patience
from tfseg.io import fs

CHECKPOINT_DIR = "checkpoints"
BEST_CHECKPOINT = "best.keras"
LAST_CHECKPOINT = "last.keras"
LOGS_DIR = "logs"


class TrainingDiverged(TfsegError):
    """A non-finite loss, metric or weight: the epoch it happened in is not kept."""


def make_callbacks(run_dir: str, cfg: FitConfig, monitor: str, mode: str, rows: list[dict], validation: bool):
    """tfseg's callbacks for a fit into ``run_dir``, resuming after the history ``rows`` (trimmed to
    the finished epochs); ``validation``: checkpoint the best epoch of ``monitor`` (``mode``)."""
    import keras

    values = monitored_values(rows, monitor)
    stop_state = replay_patience(values, mode, 0)  # (best so far, epochs since it)
    best = stop_state[0]

    ckpt = os.path.join(run_dir, CHECKPOINT_DIR)
    fs.makedirs(ckpt)
    # Order matters for a crash between callbacks: the CSV row goes first, the backup last, so
    # a backed-up epoch always has its row (extra rows are trimmed on resume).
    cbs = [
        _health_guard(),
        history_writer(os.path.join(run_dir, rundir.HISTORY_CSV), rows),
    ]
    if validation:
        cbs.append(
            atomic_checkpoint(
                os.path.join(ckpt, BEST_CHECKPOINT),
                monitor=monitor,
                mode=mode,
                save_best_only=True,
                initial_value_threshold=best,
            )
        )
    cbs.append(atomic_checkpoint(os.path.join(ckpt, LAST_CHECKPOINT)))
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
        if validation:  # a picture of validation predictions about 4 times per run (tfseg.fit.tb_images)
            from tfseg.fit.tb_images import PredictionImages

            cbs.append(PredictionImages(cfg.data, cfg.validation_split, os.path.join(run_dir, LOGS_DIR),
                                        epochs=cfg.epochs))
    cbs.append(make_backup_callback(os.path.join(run_dir, BACKUP_DIR)))  # crash-safe BackupAndRestore
    return cbs


def ema_callbacks():
    """Two callbacks around tfseg's own for a fit whose optimizer keeps an EMA of the weights.

    The first (put before everything) swaps the average into the model when validation begins,
    or at the end of an epoch without validation, so the batch-norm statistics are re-estimated
    for it, validation scores it and the checkpoints hold it. The second (put just before the
    crash-safe backup) swaps the raw weights back at the end of the epoch, so the backup and
    the next epoch's training continue from them. Keras's own ``SwapEMAWeights`` swaps back when
    validation ends, before the checkpoints are written.
    """
    import keras

    swapper = keras.callbacks.SwapEMAWeights()
    state = {"in": False}

    class EMAIn(keras.callbacks.Callback):
        def set_model(self, model):
            super().set_model(model)
            swapper.set_model(model)

        def _swap_in(self):
            if not state["in"]:
                swapper._swap_variables()
                state["in"] = True

        def on_test_begin(self, logs=None):
            self._swap_in()

        def on_epoch_end(self, epoch, logs=None):
            self._swap_in()

    class EMAOut(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if state["in"]:
                swapper._swap_variables()
                state["in"] = False

    return EMAIn(), EMAOut()


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


def set_learning_rate(value: float):
    """A callback that sets the optimizer's learning rate after BackupAndRestore restored it."""
    import keras

    class SetLearningRate(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.model.optimizer.learning_rate.assign(value)

    return SetLearningRate()
