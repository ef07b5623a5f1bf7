"""The fit stage itself: :func:`run_fit` takes a config from settings to a trained, published
RUN_DIR (claim the folder, check the dataset, resume or continue, build and compile the model
under the strategy and precision, train, publish model.keras and run.json).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
import time

import tfseg
from tfseg import rundir, runtime
from tfseg.config import parse_duration
from tfseg.errors import TfsegError
from tfseg.fit import backup, bnstats
from tfseg.fit.callbacks import (
    BEST_CHECKPOINT,
    CHECKPOINT_DIR,
    LAST_CHECKPOINT,
    SetLearningRate,
    TrainingDiverged,
    ema_callbacks,
    make_callbacks,
)
from tfseg.fit.checks import FitPlan, check_against_dataset
from tfseg.fit.config import FitConfig
from tfseg.fit.history import BACKUP_DIR, backup_epoch, trim_history
from tfseg.fit.inputs import make_datasets, validation_plan
from tfseg.io import fs, locks, publish
from tfseg.io.fs import atomic_write_json
from tfseg.schema import load_dataset_info
from tfseg.watchdog import unreachable

logger = logging.getLogger(__name__)

# Preference order when choosing the validation metric to monitor (substring of the metric name).
_MONITOR_PREFERENCE = ("mean_iou", "iou", "dice")
# run.json keys that must match for a run directory to be continued.
_IDENTITY_KEYS = ("model", "model_kwargs", "ndim", "channels", "num_classes", "image_size", "patch_size")


@locks.holding_locks
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
    run = _resume(config)
    if run.nothing_to_do:
        return run.final_dir
    # The strategy comes first: logical CPUs and multi-worker collectives must be configured
    # before TensorFlow initializes.
    strategy, precision, jit = _runtime(run.cfg)
    old_policy = runtime.set_precision(precision)
    try:
        model, schedule, monitor, mode = _compile(run, strategy, jit)
        rows = _start_run_dir(run, strategy, precision, jit, monitor)
        train_ds, val_ds, validation_steps = _inputs(run, strategy)
        cbs, controller = _callbacks(run, model, schedule, monitor, mode, rows, val_ds is not None)
        logger.info(
            "fit %s on %s: %s, %d replica(s), global batch %d, %s, jit_compile=%s, epochs %d..%d",
            run.cfg.model, run.cfg.data, runtime.strategy_name(strategy), strategy.num_replicas_in_sync,
            run.cfg.batch_size, precision, jit, run.finished + 1, run.cfg.epochs,
        )
        _train(run, model, train_ds, val_ds, validation_steps, cbs + list(callbacks or []))
        completed = backup_epoch(run.run_dir)
        stopped_early = completed < ((controller.total if controller is not None else None) or run.cfg.epochs)
        if run.chief:
            _publish(run, model, use_best=val_ds is not None, completed=completed, stopped_early=stopped_early)
    finally:
        runtime.set_precision(old_policy)
    logger.info("%s: trained %d epoch(s)%s", run.final_dir, completed, " (stopped early)" if stopped_early else "")
    return run.final_dir


@dataclasses.dataclass
class _Run:
    """What a fit knows about its run directory before training (see :func:`_resume`)."""

    cfg: FitConfig
    plan: FitPlan
    started: float
    final_dir: str  # the RUN_DIR asked for
    run_dir: str  # where this process writes: RUN_DIR, or a worker's folder inside it
    chief: bool
    record: dict  # run.json as it will be written
    previous: dict | None  # run.json of an earlier fit into RUN_DIR
    finished: int  # epochs the backup holds
    planned_epochs: int  # cfg.epochs as given (a budget replaces cfg.epochs)
    budget_seconds: float | None = None
    budget_record: dict | None = None  # the epochs a budget decided before an interruption
    nothing_to_do: bool = False

    @property
    def multi_worker(self) -> bool:
        return runtime.tf_config() is not None

    @property
    def steps(self) -> int:
        # An endless training dataset with a fixed step count: epochs are known in advance (cosine
        # decay, progress bar) and workers of a multi-worker run agree on them.
        return self.cfg.steps_per_epoch or self.plan.train_steps

    def write_record(self) -> None:
        atomic_write_json(os.path.join(self.run_dir, rundir.RUN_JSON), self.record)


def _resume(config: dict) -> _Run:
    """Checks the config against the dataset, claims RUN_DIR and finds where an earlier fit into it
    stopped: the epochs its backup holds, the epochs a budget decided, or nothing left to do."""
    started = time.time()
    cfg = FitConfig.from_dict(config)
    plan = check_against_dataset(cfg, load_dataset_info(cfg.data))
    final_dir = fs.normalize(cfg.output)
    record = _run_record(cfg, plan)
    chief = runtime.is_chief()
    run_dir = final_dir
    if not chief:
        # Workers other than the chief train in lock-step but keep their files apart.
        task = (runtime.tf_config() or {}).get("task", {})
        run_dir = os.path.join(final_dir, f"{fs.INTERNAL_PREFIX}worker-{task.get('type', 'worker')}-"
                                          f"{task.get('index', 0)}")
    run_json = os.path.join(run_dir, rundir.RUN_JSON)
    previous = None
    # A new folder or an earlier fit (continued or resumed); never another stage's or a user's
    # folder, never the dataset. Other workers' folders (.tfseg-worker-*) may appear first.
    # Only the chief locks it: the workers of one multi-worker run share the folder.
    publish.claim(final_dir, "fit", complete_marker=None, overwrite=True, inputs=[("--data", cfg.data)],
                  lock=chief)
    if fs.isfile(run_json):
        previous = json.loads(fs.read_text(run_json))
        _check_same_run(final_dir, previous, record)
    if not chief and fs.isdir(os.path.join(final_dir, BACKUP_DIR)):
        # Every worker resumes from the chief's backup: the replicas hold the same weights, and
        # workers killed at different moments would otherwise restart at different epochs and
        # wait on each other's collectives forever.
        fs.rmtree(os.path.join(run_dir, BACKUP_DIR))
        fs.copy_tree(os.path.join(final_dir, BACKUP_DIR), os.path.join(run_dir, BACKUP_DIR))
    # A backup torn by a kill or a full disk falls back to the previous epoch's, or to a fresh start.
    backup.remove_torn_files(run_dir)
    run = _Run(cfg, plan, started, final_dir, run_dir, chief, record, previous,
               finished=backup.recover(run_dir, BACKUP_DIR), planned_epochs=cfg.epochs)
    if cfg.budget is not None:
        # The budget decides the epochs: resolved after the first timed epoch and kept in
        # run.json, so a resumed run ends where the interrupted one would have.
        run.budget_seconds = parse_duration(cfg.budget)
        old = (previous or {}).get("budget") or {}
        if old.get("epochs") and float(old.get("seconds", -1)) == run.budget_seconds:
            run.budget_record = dict(old)
        run.cfg = dataclasses.replace(cfg, epochs=int(old["epochs"]) if run.budget_record else 100_000)
    run.nothing_to_do = _already_done(run)
    return run


def _already_done(run: _Run) -> bool:
    """True when RUN_DIR holds a published model of at least the epochs asked for (run.json is
    completed first if a kill came between publishing model.keras and its last rewrite)."""
    model_path = os.path.join(run.run_dir, rundir.MODEL_FILE)
    previous, finished = run.previous, run.finished
    if run.chief and fs.isfile(model_path) and previous is not None:
        if "health" not in previous and previous.get("completed_epochs") != finished:
            previous.update(completed_epochs=finished, stopped_early=finished < run.cfg.epochs)
            atomic_write_json(os.path.join(run.run_dir, rundir.RUN_JSON), previous)
            logger.info("%s: run.json completed after an interruption (%d epochs)", run.final_dir, finished)
        done = int(previous.get("completed_epochs") or finished)
        if previous.get("stopped_early"):
            logger.info("%s: stopped early after %d epoch(s); nothing to do (use a new --output to retrain)",
                        run.final_dir, done)
            return True
        if run.cfg.epochs <= done:
            logger.info("%s: already trained for %d epoch(s); nothing to do (ask for more --epochs to continue)",
                        run.final_dir, done)
            return True
    if finished >= run.cfg.epochs and not fs.isfile(model_path):
        logger.info("%s: all %d epochs finished before an interruption; publishing the model", run.final_dir,
                    finished)
    return False


def _runtime(cfg: FitConfig):
    """(strategy, precision, jit_compile) for this machine and config."""
    strategy = runtime.make_strategy(cfg.cpu_replicas, cfg.peer_timeout)
    replicas = strategy.num_replicas_in_sync
    if cfg.batch_size % replicas:
        raise TfsegError(
            f"--batch-size {cfg.batch_size}: the global batch must be divisible by the {replicas} replicas"
        )
    gpus = runtime.num_gpus()
    return (strategy, runtime.resolve_precision(cfg.precision, num_gpus=gpus),
            runtime.resolve_jit_compile(cfg.jit_compile, num_gpus=gpus))


def _compile(run: _Run, strategy, jit):
    """The compiled model under ``strategy`` (in the precision policy set by the caller), its
    cosine schedule (None for other schedules), and the (monitor, mode) of its checkpoints."""
    import keras

    from tfseg.fit.budget import BudgetCosine
    from tfseg.losses import get_loss
    from tfseg.metrics import default_metrics
    from tfseg.models import build_model

    cfg, info = run.cfg, run.plan.info
    if cfg.seed is not None:
        keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        # The same seed then gives the same weights in another process: deterministic kernels
        # (TensorFlow raises where an op has none) beside the deterministic input order.
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    input_shape = tuple(run.plan.size) + (info.channels,)
    if info.ndim == 2 and (cfg.augment or {}).get("crop"):
        # Trained on crops, run at image_size: the model takes any size (its convolutions do).
        input_shape = (None, None, info.channels)
    with strategy.scope():
        try:
            model = build_model(cfg.model, input_shape=input_shape, num_classes=info.num_classes, **cfg.model_kwargs)
        except (ValueError, TypeError) as e:
            raise TfsegError(f"--model {cfg.model} on {info.ndim}D data {input_shape}: {e}") from None
        try:
            loss = get_loss(run.plan.loss, num_classes=info.num_classes, ignore_index=info.ignore_index,
                            class_weights=run.plan.class_weights, **cfg.loss_kwargs)
        except ValueError as e:
            raise TfsegError(f"--loss {run.plan.loss} on {cfg.data}: {e}") from None
        metrics = default_metrics(info.num_classes, info.ignore_index, regions=info.regions or None)
        # Under a budget the cosine's end is set once epochs are timed (tfseg.fit.budget).
        schedule = BudgetCosine(cfg.learning_rate, cfg.epochs * run.steps) if cfg.schedule == "cosine" else None
        model.compile(optimizer=_make_optimizer(cfg, schedule), loss=loss, metrics=metrics, jit_compile=jit)
    if run.multi_worker:
        runtime.patch_keras_multi_worker(model, strategy)
    monitor, mode = _choose_monitor(cfg, [m.name for m in metrics], run.plan.validation_split is not None)
    return model, schedule, monitor, mode


def _start_run_dir(run: _Run, strategy, precision: str, jit, monitor: str) -> list[dict]:
    """Everything is checked: marks RUN_DIR as the fit's, withdraws a model being continued,
    trims the history to the backed-up epochs and writes run.json. Returns the history rows."""
    if run.chief:
        publish.mark_owned(run.final_dir, "fit")
    fs.makedirs(run.run_dir)
    model_path = os.path.join(run.run_dir, rundir.MODEL_FILE)
    if fs.isfile(model_path):
        # Continuing a finished run: model.keras means "complete" until the new epochs finish.
        fs.remove(model_path)
    rows = trim_history(run.run_dir, run.finished)
    run.record.update(
        completed_epochs=run.finished, stopped_early=False, precision=precision, jit_compile=jit,
        strategy=runtime.strategy_name(strategy), replicas=strategy.num_replicas_in_sync, monitor=monitor,
        tfseg_version=tfseg.__version__, config=run.cfg.to_json(),
    )
    if run.budget_record:
        run.record.update(budget=run.budget_record)
    run.write_record()
    return rows


def _inputs(run: _Run, strategy):
    """(training dataset, validation dataset or None, validation steps per epoch)."""
    from tfseg.data import steps_per_epoch

    cfg, plan, replicas = run.cfg, run.plan, strategy.num_replicas_in_sync
    val_plan = (0, cfg.batch_size)
    if plan.validation_split:
        val_plan = validation_plan(int(plan.info.splits[plan.validation_split].get("count", 0)), cfg.batch_size,
                                   replicas)
    train_ds, val_ds = make_datasets(cfg, plan, cfg.batch_size, run.multi_worker, val_plan)
    validation_steps = cfg.validation_steps
    if val_ds is not None and validation_steps is None:
        # Known steps keep Keras from probing the end of the validation data each epoch.
        total, val_batch = val_plan
        validation_steps = max(1, -(-total // val_batch) if replicas > 1 else steps_per_epoch(
            cfg.data, plan.validation_split, batch_size=val_batch, training=False))
    return train_ds, val_ds, validation_steps


def _callbacks(run: _Run, model, schedule, monitor: str, mode: str, rows: list[dict], validation: bool):
    """tfseg's callbacks in the order they must run, and the budget controller (or None)."""
    from tfseg.fit.budget import BudgetController

    cfg = run.cfg
    cbs = make_callbacks(run.run_dir, dataclasses.replace(cfg, epochs=run.planned_epochs), monitor, mode, rows,
                         validation)
    # Batch-norm statistics re-estimated for the weights before each validation (tfseg.fit.bnstats).
    bn_callback = bnstats.make_callback(
        model, bnstats.stats_dataset(cfg, run.plan, multi_worker=run.multi_worker),
        bnstats.num_batches(cfg.batch_size, run.steps),
    )
    if bn_callback is not None:
        cbs.insert(0, bn_callback)
    if cfg.ema:
        # The average goes in before the statistics are re-estimated and validation runs, and
        # out again just before the backup, which keeps the raw weights to resume from.
        ema_in, ema_out = ema_callbacks()
        cbs.insert(0, ema_in)
        cbs.insert(len(cbs) - 1, ema_out)
    old_lr = ((run.previous or {}).get("config") or {}).get("learning_rate")
    if run.finished and old_lr is not None and old_lr != cfg.learning_rate and cfg.schedule != "cosine":
        # The backup brings back the old run's learning-rate variable; a user who lowers
        # --learning-rate (after a divergence, say) means the new one.
        logger.info("%s: resuming after epoch %d with learning rate %g (was %g)", run.final_dir, run.finished,
                    cfg.learning_rate, old_lr)
        cbs.append(SetLearningRate(cfg.learning_rate))
    if run.budget_seconds is None:
        return cbs, None

    def on_resolved(decision: dict) -> None:
        run.record.update(budget=decision)
        run.write_record()

    controller = BudgetController(
        budget_seconds=run.budget_seconds, started=run.started, steps_per_epoch=run.steps,
        first_epoch=run.finished, resolved=int(run.budget_record["epochs"]) if run.budget_record else None,
        schedule=schedule, on_resolved=on_resolved,
    )
    if run.budget_record:
        logger.info("budget %s: resuming towards the %d epochs decided at the start", cfg.budget,
                    run.budget_record["epochs"])
    else:
        logger.info("budget %s: the first epoch is timed to set the number of epochs", cfg.budget)
    return [controller] + cbs, controller


def _train(run: _Run, model, train_ds, val_ds, validation_steps, cbs) -> None:
    """``model.fit`` up to ``cfg.epochs``, its failures turned into one-line errors."""
    import tensorflow as tf

    cfg = run.cfg
    try:
        model.fit(
            train_ds,
            initial_epoch=run.finished,  # what the crash-safe backup restores (tfseg.fit.backup)
            epochs=cfg.epochs,
            steps_per_epoch=run.steps,
            validation_data=val_ds,
            validation_steps=validation_steps,
            callbacks=cbs,
            verbose=_keras_verbosity(cfg.verbose),
            shuffle=False,  # the tf.data pipeline shuffles
        )
    except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError, tf.errors.CancelledError):
        if not run.multi_worker:
            raise
        down = unreachable(runtime.peers())
        raise TfsegError(
            f"{run.final_dir}: a collective found no answer within {cfg.peer_timeout:g} s (--peer-timeout)"
            + (f" from {', '.join(down)}" if down else "") + "; the same command on every worker resumes "
            "from the last finished epoch") from None
    except (tf.errors.DataLossError, tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as e:
        from tfseg.data.input import data_error

        raise data_error(e, cfg.data, ("train", run.plan.validation_split)) from None
    except TrainingDiverged as e:
        kept = backup_epoch(run.run_dir)
        resume = (f"a re-run resumes after epoch {kept}, the last finite one" if kept
                  else "no epoch finished, so a re-run starts over")
        raise TfsegError(
            f"{run.final_dir}: training diverged ({e}); nothing was published and {resume}; "
            "try a lower --learning-rate or --precision float32"
        ) from None


def _publish(run: _Run, model, *, use_best: bool, completed: int, stopped_early: bool) -> None:
    """model.keras (the run's completion marker), then run.json with the health check."""
    _publish_model(run.run_dir, model, use_best=use_best, use_last=bool(run.cfg.ema))
    run.record.update(health=bnstats.fit_health(run.run_dir, run.cfg, run.plan))
    run.record.update(completed_epochs=completed, stopped_early=stopped_early)
    run.write_record()
    backup.drop_previous(os.path.join(run.run_dir, BACKUP_DIR))


def _run_record(cfg: FitConfig, plan: FitPlan) -> dict:
    info = plan.info
    # The typed run facts (rundir.RunInfo); precision and monitor are added once resolved.
    flips = rundir.training_flip_axes({"ndim": info.ndim, "config": {"augment": cfg.augment or {}}})
    record = rundir.RunInfo.from_dataset(
        info, plan.size, model=cfg.model, model_kwargs=dict(cfg.model_kwargs), flip_axes=flips
    ).to_json()
    record.update(data_dir=fs.normalize(cfg.data), loss=plan.loss)
    return record


def _check_same_run(run_dir: str, old: dict, new: dict) -> None:
    for key in _IDENTITY_KEYS:
        if old.get(key) != new.get(key):
            raise TfsegError(
                f"{run_dir}: holds a run with {key}={old.get(key)!r}, this fit has {new.get(key)!r}; "
                "choose another --output"
            )


def _make_optimizer(cfg: FitConfig, schedule=None):
    """The optimizer of ``cfg``, at the learning-rate ``schedule`` if one is given."""
    import keras

    lr = schedule if schedule is not None else cfg.learning_rate
    # The average is updated in the training step; tfseg.fit.callbacks.ema_callbacks swaps it in.
    ema = {"use_ema": True, "ema_momentum": cfg.ema} if cfg.ema else {}
    if cfg.optimizer == "adam":
        return keras.optimizers.Adam(lr, **ema)
    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay, **ema)
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=cfg.momentum, **ema)
    return keras.optimizers.Adadelta(lr, **ema)


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


def _publish_model(run_dir: str, model, use_best: bool, use_last: bool = False) -> None:
    """Writes RUN_DIR/model.keras, the run's completion marker, in one step (the best checkpoint
    when there is one, else the last one with ``use_last``: it holds the averaged weights of an
    EMA run): a rename on local disks, one object write on object stores. On a local disk the
    published model is a hard link to that checkpoint: one copy of the state on disk (a later
    checkpoint replaces the checkpoint's name, never the linked bytes)."""
    final = os.path.join(run_dir, rundir.MODEL_FILE)
    best = os.path.join(run_dir, CHECKPOINT_DIR, BEST_CHECKPOINT)
    if not (use_best and fs.isfile(best)) and use_last:
        use_best, best = True, os.path.join(run_dir, CHECKPOINT_DIR, LAST_CHECKPOINT)
    local_dir = None if fs.is_remote(run_dir) else run_dir
    if local_dir and use_best and fs.isfile(best):
        linked = os.path.join(local_dir, f"{fs.INTERNAL_PREFIX}tmp-{os.getpid()}-{rundir.MODEL_FILE}")
        if os.path.lexists(linked):
            os.unlink(linked)
        fs.link_or_copy(best, linked)
        os.replace(linked, final)
        return
    fd, tmp = tempfile.mkstemp(prefix=".tfseg-model.", suffix=".keras", dir=local_dir)
    os.close(fd)
    try:
        if use_best and fs.isfile(best):
            fs.copy_file(best, tmp)
        else:
            backup.inference_view(model).save(tmp)
        if local_dir:
            os.chmod(tmp, 0o666 & ~fs.umask())  # mkstemp makes 0600
            os.replace(tmp, final)
        else:
            fs.copy_file(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _keras_verbosity(verbose: int) -> int:
    """Keras's progress bar on a terminal; one line per epoch when stdout is a file or a pipe
    (the bar's redraws would fill logs and CI output with ANSI escapes)."""
    if verbose == 1 and not sys.stdout.isatty():
        return 2
    return verbose
