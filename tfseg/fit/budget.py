"""Training to a wall-time budget (``tfseg fit --budget``): the learning-rate schedule whose end
is set while training runs, and the callback that times epochs and sets it. Durations are parsed
by :func:`tfseg.config.parse_duration`.
"""

from __future__ import annotations

import logging
import math
import time

import keras
import numpy as np

from tfseg.config import format_duration

logger = logging.getLogger(__name__)

REFINE_FRACTION = 0.1  # fit --budget times whole epochs over this much of the budget before fixing the end


@keras.saving.register_keras_serializable(package="tfseg")
class BudgetCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Cosine decay from ``initial_learning_rate`` to 0 at ``decay_steps``, an end that may move.

    The end is a variable that :meth:`end_at` sets, so a budgeted fit (whose epoch count is
    known only once epochs are timed) and a fixed one share the one definition; the training
    step reads the variable each step. Steps past the end keep the rate at 0.
    """

    def __init__(self, initial_learning_rate: float, decay_steps: int):
        super().__init__()
        self.initial_learning_rate = float(initial_learning_rate)
        self.decay_steps = keras.Variable(float(max(1, decay_steps)), trainable=False, name="decay_steps")

    def end_at(self, decay_steps: int) -> None:
        self.decay_steps.assign(float(max(1, decay_steps)))

    def __call__(self, step):
        frac = keras.ops.minimum(keras.ops.cast(step, "float32") / self.decay_steps, 1.0)
        return self.initial_learning_rate * 0.5 * (1.0 + keras.ops.cos(math.pi * frac))

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate,
                "decay_steps": int(keras.ops.convert_to_numpy(self.decay_steps))}


class BudgetController(keras.callbacks.Callback):
    """A Keras callback that fits training into a time budget (``tfseg fit --budget``).

    ``started`` is the ``time.time()`` at which the fit stage started. The first epoch this
    process runs gives a first estimate: its step time (the median gap between steps, leaving
    out the first two, which trace and warm up) and the time from its last step to the end of its
    validation. The following epochs give the final one: the mean cycle from one epoch's end to
    the next (steps, validation, the batch-norm re-estimate, checkpoints, backup), free of
    tracing, over at least one epoch and ``REFINE_FRACTION`` of the budget (short epochs have
    one-time costs to average out). Each sets the total epochs so that training ends within
    ``budget_seconds`` of ``started`` less a ``reserve`` fraction (publishing, health check); training stops there and, with a
    ``schedule``, its cosine ends at 0 at that epoch's last step. Once fixed, the end only moves
    earlier: when the last epochs ran slower than measured (another job took the cores) and the
    rest would overrun the budget by more than half an epoch, the total is cut to what still fits
    at the slower pace (``revised_after_epoch`` in the record). ``on_resolved(record)`` is called
    with each decision (fit writes it to run.json). A resumed run passes ``resolved``: the same
    end, nothing measured again.
    """

    def __init__(self, *, budget_seconds: float, started: float, steps_per_epoch: int, first_epoch: int,
                 resolved: int | None, schedule: "BudgetCosine | None", on_resolved, reserve: float = 0.05):
        super().__init__()
        self.budget_seconds, self.started, self.steps_per_epoch = budget_seconds, started, steps_per_epoch
        self.first_epoch, self.schedule, self.on_resolved, self.reserve = first_epoch, schedule, on_resolved, reserve
        self.total = resolved
        if self.schedule is not None and resolved is not None:
            self.schedule.end_at(resolved * self.steps_per_epoch)
        self._batch_ends: list[float] = []
        self._phase = 2 if resolved is not None else 0  # 0: time epoch 1, 1: time epoch 2, 2: fixed
        self._last_end = None
        self._window_start = None
        self._window_epochs = 0
        self._resumed = resolved is not None
        self._cycles: list[float] = []  # epoch-end to epoch-end, once the end is fixed
        self._record: dict = {}

    def on_train_batch_end(self, batch, logs=None):
        if self._phase == 0:
            self._batch_ends.append(time.time())

    def _left(self, now: float) -> float:
        return self.budget_seconds * (1.0 - self.reserve) - (now - self.started)

    def _decide(self, epoch: int, now: float, per_epoch: float, **facts) -> None:
        left = self._left(now)
        more = int(left // max(per_epoch, 1e-9)) if left > 0 else 0
        self.total = epoch + 1 + more
        if self.schedule is not None:
            self.schedule.end_at(self.total * self.steps_per_epoch)
        self._record.update(seconds=self.budget_seconds, epochs=int(self.total), **facts,
                            measured_after_epoch=int(epoch + 1), seconds_at_decision=round(now - self.started, 1),
                            final=self._phase == 2 or self.total <= epoch + 1)
        logger.info("budget %s: %.1f s per epoch, %.0f s left -> %d epochs in total%s",
                    format_duration(self.budget_seconds), per_epoch, left, self.total,
                    "" if self._record["final"] else " (an estimate; the next epochs refine it)")
        self.on_resolved(dict(self._record))

    def on_epoch_end(self, epoch, logs=None):
        now = time.time()
        if self._phase == 0:
            ends = self._batch_ends
            gaps = np.diff(ends[1:]) if len(ends) > 3 else np.diff(ends) if len(ends) > 1 else np.zeros(0)
            step = float(np.median(gaps)) if gaps.size else (now - self.started)
            overhead = max(0.0, now - ends[-1]) if ends else 0.0
            self._phase = 1
            self._decide(epoch, now, self.steps_per_epoch * step + overhead, step_seconds=round(step, 4),
                         epoch_overhead_seconds=round(overhead, 2))
            if self.total <= epoch + 1:
                self._phase = 2
        elif self._phase == 1:
            if self._window_start is None:
                self._window_start, self._window_epochs = self._last_end, 0
            self._window_epochs += 1
            span = now - self._window_start
            if span >= REFINE_FRACTION * self.budget_seconds or self.total <= epoch + 2:
                self._phase = 2
            cycle = span / self._window_epochs
            self._decide(epoch, now, cycle, epoch_seconds=round(cycle, 3))
        elif not self._resumed and self._last_end is not None:
            self._watch(epoch, now, now - self._last_end)
        self._last_end = now
        if self.total is not None and epoch + 1 >= self.total:
            self.model.stop_training = True

    def _watch(self, epoch: int, now: float, cycle: float) -> None:
        """Cut the fixed end short when the recent pace would overrun the budget."""
        self._cycles.append(cycle)
        pace = float(np.mean(self._cycles[-3:]))
        remaining = self.total - (epoch + 1)
        if remaining <= 0 or remaining * pace <= self._left(now) + 0.5 * pace:
            return
        self._record["revised_after_epoch"] = int(epoch + 1)
        self._decide(epoch, now, pace, epoch_seconds=round(pace, 3))
