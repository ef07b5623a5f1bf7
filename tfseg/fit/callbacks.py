"""The Keras callbacks of a fit, in their order: the health guard (stops on the first non-finite
value, :class:`TrainingDiverged`), the history writer, checkpoints, the plateau schedule and early
stopping resumed with their patience, TensorBoard and prediction pictures, and the backup that
makes a run resumable. Each is a class here, importable and tested on its own.
"""

from __future__ import annotations

import math
import os

import keras

from tfseg import rundir
from tfseg.errors import TfsegError
from tfseg.fit.backup import AtomicCheckpoint, CrashSafeBackup
from tfseg.fit.config import FitConfig
from tfseg.fit.history import BACKUP_DIR, HistoryWriter, monitored_values, replay_patience
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
    values = monitored_values(rows, monitor)
    stop_state = replay_patience(values, mode, 0)  # (best so far, epochs since it)
    best = stop_state[0]

    ckpt = os.path.join(run_dir, CHECKPOINT_DIR)
    fs.makedirs(ckpt)
    # Order matters for a crash between callbacks: the CSV row goes first, the backup last, so
    # a backed-up epoch always has its row (extra rows are trimmed on resume).
    cbs = [
        HealthGuard(),
        HistoryWriter(os.path.join(run_dir, rundir.HISTORY_CSV), rows),
    ]
    if validation:
        cbs.append(
            AtomicCheckpoint(
                os.path.join(ckpt, BEST_CHECKPOINT),
                monitor=monitor,
                mode=mode,
                save_best_only=True,
                initial_value_threshold=best,
            )
        )
    if cfg.ema and not validation:
        # What such a run publishes: the averaged weights of its last epoch (swapped in before
        # this callback). Other runs keep their last epoch once, in the backup.
        cbs.append(AtomicCheckpoint(os.path.join(ckpt, LAST_CHECKPOINT)))
    if cfg.schedule == "plateau":
        cbs.append(
            ResumableReduceLROnPlateau(
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
            ResumableEarlyStopping(
                state=stop_state, monitor=monitor, mode=mode, patience=cfg.early_stopping
            )
        )
    if cfg.tensorboard:
        cbs.append(keras.callbacks.TensorBoard(os.path.join(run_dir, LOGS_DIR), write_graph=False))
        if validation:  # a picture of validation predictions about 4 times per run (tfseg.fit.tb_images)
            from tfseg.fit.tb_images import PredictionImages

            cbs.append(PredictionImages(cfg.data, cfg.validation_split, os.path.join(run_dir, LOGS_DIR),
                                        epochs=cfg.epochs))
    cbs.append(CrashSafeBackup(os.path.join(run_dir, BACKUP_DIR)))  # crash-safe BackupAndRestore
    return cbs


class _EMAState:
    """Whether the model holds the averaged weights now, and the raw ones it gave up for them."""

    def __init__(self):
        self.raw: list | None = None


class EMASwapIn(keras.callbacks.Callback):
    """Puts the optimizer's average of the weights into the model (``finalize_variable_values``,
    Keras's public way) when validation begins, or at the end of an epoch without validation,
    keeping the raw weights; see :func:`ema_callbacks`."""

    def __init__(self, state: _EMAState):
        super().__init__()
        self.state = state

    def _swap_in(self):
        if self.state.raw is None:
            variables = self.model.trainable_variables
            self.state.raw = [keras.ops.convert_to_numpy(v) for v in variables]
            self.model.optimizer.finalize_variable_values(variables)

    def on_test_begin(self, logs=None):
        self._swap_in()

    def on_epoch_end(self, epoch, logs=None):
        self._swap_in()


class EMASwapOut(keras.callbacks.Callback):
    """Gives the model its raw weights back at the end of the epoch (see :func:`ema_callbacks`)."""

    def __init__(self, state: _EMAState):
        super().__init__()
        self.state = state

    def on_epoch_end(self, epoch, logs=None):
        if self.state.raw is not None:
            for v, raw in zip(self.model.trainable_variables, self.state.raw):
                v.assign(raw)
            self.state.raw = None


def ema_callbacks() -> tuple[EMASwapIn, EMASwapOut]:
    """Two callbacks around tfseg's own for a fit whose optimizer keeps an EMA of the weights.

    The first (put before everything) swaps the average into the model when validation begins,
    or at the end of an epoch without validation, so the batch-norm statistics are re-estimated
    for it, validation scores it and the checkpoints hold it. The second (put just before the
    crash-safe backup) puts the raw weights back at the end of the epoch, so the backup and
    the next epoch's training continue from them. Keras's own ``SwapEMAWeights`` swaps back when
    validation ends, before the checkpoints are written.
    """
    state = _EMAState()
    return EMASwapIn(state), EMASwapOut(state)


class HealthGuard(keras.callbacks.Callback):
    """First in the list: stops training on the first non-finite value.

    It raises (instead of asking Keras to stop, as TerminateOnNaN does) so that no later
    callback runs for the broken epoch: no history row, checkpoint or backup ever records
    non-finite weights, and a re-run resumes from the last finite epoch.
    """

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


class _ResumesPatience:
    """Mixed into EarlyStopping / ReduceLROnPlateau: starts from the patience counter replayed
    from history.csv. Keras resets ``best`` and ``wait`` in ``on_train_begin``, so a resumed run
    would otherwise wait a whole new patience."""

    def __init__(self, *, state: tuple[float | None, int], **kwargs):
        super().__init__(**kwargs)
        self._resume_state = state

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.best, self.wait = self._resume_state  # Keras starts from (None, 0)


class ResumableEarlyStopping(_ResumesPatience, keras.callbacks.EarlyStopping):
    """``keras.callbacks.EarlyStopping`` that resumes its patience (:class:`_ResumesPatience`)."""


class ResumableReduceLROnPlateau(_ResumesPatience, keras.callbacks.ReduceLROnPlateau):
    """``keras.callbacks.ReduceLROnPlateau`` that resumes its patience (:class:`_ResumesPatience`)."""


class SetLearningRate(keras.callbacks.Callback):
    """Sets the optimizer's learning rate after the backup restored the old run's."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def on_train_begin(self, logs=None):
        self.model.optimizer.learning_rate.assign(self.value)
