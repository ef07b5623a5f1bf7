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

from tfseg import bnstats, outputs, rundir, runtime
from tfseg.errors import TfsegError
from tfseg.fit import backup
from tfseg.fit.callbacks import (
    BEST_CHECKPOINT, CHECKPOINT_DIR, LAST_CHECKPOINT, TrainingDiverged, ema_callbacks, make_callbacks,
    set_learning_rate,
)
from tfseg.fit.checks import FitPlan, check_against_dataset
from tfseg.fit.config import FitConfig
from tfseg.fit.history import BACKUP_DIR, backup_epoch, trim_history
from tfseg.fit.inputs import make_datasets, validation_plan
from tfseg.outputs import atomic_write_json
from tfseg.watchdog import unreachable
from tfseg.schema import load_dataset_info

logger = logging.getLogger(__name__)

# Preference order when choosing the validation metric to monitor (substring of the metric name).
_MONITOR_PREFERENCE = ("mean_iou", "iou", "dice")
# run.json keys that must match for a run directory to be continued.
_IDENTITY_KEYS = ("model", "model_kwargs", "ndim", "channels", "num_classes", "image_size", "patch_size")


@outputs.holding_locks
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
    plan = check_against_dataset(cfg, info)
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
    # Only the chief locks it: the workers of one multi-worker run share the folder.
    outputs.claim(final_dir, "fit", complete_marker=None, overwrite=True, inputs=[("--data", cfg.data)],
                  lock=chief)
    if outputs.isfile(run_json):
        previous = json.loads(outputs.read_text(run_json))
        _check_same_run(final_dir, previous, record)
    if not chief and outputs.isdir(os.path.join(final_dir, BACKUP_DIR)):
        # Every worker resumes from the chief's backup: the replicas hold the same weights, and
        # workers killed at different moments would otherwise restart at different epochs and
        # wait on each other's collectives forever.
        outputs.rmtree(os.path.join(run_dir, BACKUP_DIR))
        outputs.copy_tree(os.path.join(final_dir, BACKUP_DIR), os.path.join(run_dir, BACKUP_DIR))
    # A backup torn by a kill or a full disk falls back to the previous epoch's, or to a fresh start.
    backup.remove_torn_files(run_dir)
    finished = backup.recover(run_dir, BACKUP_DIR)
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
        if "health" not in previous and previous.get("completed_epochs") != finished:
            # Killed between publishing model.keras and run.json's last rewrite: the backup knows.
            previous.update(completed_epochs=finished, stopped_early=finished < cfg.epochs)
            atomic_write_json(run_json, previous)
            logger.info("%s: run.json completed after an interruption (%d epochs)", final_dir, finished)
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
    strategy = runtime.make_strategy(cfg.cpu_replicas, cfg.peer_timeout)
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
        if info.ndim == 2 and (cfg.augment or {}).get("crop"):
            # Trained on crops, run at image_size: the model takes any size (its convolutions do).
            input_shape = (None, None, info.channels)
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
        train_ds, val_ds = make_datasets(cfg, plan, cfg.batch_size, multi_worker, val_plan)
        cbs = make_callbacks(
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
        if cfg.ema:
            # The average goes in before the statistics are re-estimated and validation runs, and
            # out again just before the backup, which keeps the raw weights to resume from.
            ema_in, ema_out = ema_callbacks()
            cbs.insert(0, ema_in)
            cbs.insert(len(cbs) - 1, ema_out)
        old_lr = ((previous or {}).get("config") or {}).get("learning_rate")
        if finished and old_lr is not None and old_lr != cfg.learning_rate and cfg.schedule != "cosine":
            # BackupAndRestore brings back the old run's learning-rate variable; a user who
            # lowers --learning-rate (after a divergence, say) means the new one.
            logger.info("%s: resuming after epoch %d with learning rate %g (was %g)", final_dir, finished,
                        cfg.learning_rate, old_lr)
            cbs.append(set_learning_rate(cfg.learning_rate))
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
                verbose=_keras_verbosity(cfg.verbose),
                shuffle=False,  # the tf.data pipeline shuffles
            )
        except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError, tf.errors.CancelledError):
            if not multi_worker:
                raise
            down = unreachable(runtime.peers())
            raise TfsegError(
                f"{final_dir}: a collective found no answer within {cfg.peer_timeout:g} s (--peer-timeout)"
                + (f" from {', '.join(down)}" if down else "") + "; the same command on every worker resumes "
                "from the last finished epoch") from None
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
            _publish_model(run_dir, model, use_best=val_ds is not None, use_last=bool(cfg.ema))
            record.update(health=bnstats.fit_health(run_dir, cfg, plan))
            record.update(completed_epochs=completed, stopped_early=stopped_early)
            atomic_write_json(os.path.join(run_dir, rundir.RUN_JSON), record)
    finally:
        runtime.set_precision(old_policy)
    logger.info("%s: trained %d epoch(s)%s", final_dir, completed, " (stopped early)" if stopped_early else "")
    return final_dir


def _run_record(cfg: FitConfig, plan: FitPlan) -> dict:
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


def _make_optimizer(cfg: FitConfig, decay_steps: int):
    import keras

    lr = cfg.learning_rate
    if cfg.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, decay_steps))
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
    EMA run): a rename on local disks, one object write on object stores."""
    final = os.path.join(run_dir, rundir.MODEL_FILE)
    best = os.path.join(run_dir, CHECKPOINT_DIR, BEST_CHECKPOINT)
    if not (use_best and outputs.isfile(best)) and use_last:
        use_best, best = True, os.path.join(run_dir, CHECKPOINT_DIR, LAST_CHECKPOINT)
    local_dir = None if outputs.is_remote(run_dir) else run_dir
    fd, tmp = tempfile.mkstemp(prefix=".tfseg-model.", suffix=".keras", dir=local_dir)
    os.close(fd)
    try:
        if use_best and outputs.isfile(best):
            outputs.copy_file(best, tmp)
        else:
            model.save(tmp)
        if local_dir:
            os.chmod(tmp, 0o666 & ~outputs._umask())  # mkstemp makes 0600
            os.replace(tmp, final)
        else:
            outputs.copy_file(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _version() -> str:
    import tfseg

    return tfseg.__version__


def _keras_verbosity(verbose: int) -> int:
    """Keras's progress bar on a terminal; one line per epoch when stdout is a file or a pipe
    (the bar's redraws would fill logs and CI output with ANSI escapes)."""
    if verbose == 1 and not sys.stdout.isatty():
        return 2
    return verbose
