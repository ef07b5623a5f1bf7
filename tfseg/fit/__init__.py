"""The fit stage: a converted dataset in, a trained RUN_DIR out (see :mod:`tfseg.rundir`).

``run_fit(config)`` resolves a :class:`~tfseg.fit.config.FitConfig`, checks it against the
dataset's ``dataset.json`` (dimensionality, class count, sizes the model can take, batch vs
replicas) before anything trains, writes ``RUN_DIR/run.json``, builds and compiles the model inside
the tf.distribute strategy's scope under the chosen precision policy, and trains with Keras
``model.fit`` (which distributes the global batches over the replicas).

Resume: the crash-safe backup (tfseg.fit.backup) in ``RUN_DIR/backup`` (kept after training) holds the
weights, the optimizer state and the number of finished epochs. Re-running the same command after
a crash continues from the last finished epoch; a larger ``epochs`` continues a finished run; the
same ``epochs`` on a finished run does nothing. ``history.csv`` is trimmed to the finished epochs
before training resumes, so it keeps exactly one row per epoch. Early stopping and the plateau
schedule pick up their patience counters where they were, so a restart does not grant a fresh
patience.

One job a module, in the order a fit runs them:
  config     FitConfig, and how files, options and --set merge and are checked;
  checks     the config against dataset.json, before TensorFlow starts (FitPlan);
  history    what finished epochs leave for a resume: history.csv, the backup's epoch, patience;
  inputs     the training and validation tf.data datasets;
  callbacks  the Keras callbacks: health guard, history, checkpoints, schedules, backup;
  run        run_fit: the stage from config to a published RUN_DIR.

Callers import the stage's public names from here (``from tfseg.fit import run_fit``). Command line::

    tfseg fit --data DATA_DIR --model unet --output RUN_DIR --image-size 256x256 --epochs 30
"""

import importlib

# The stage's public names and the module of each, imported when first used: ``tfseg.fit.config``
# (the settings, used by the CLI and the planner) stays free of TensorFlow and Keras.
_EXPORTS = {
    "BEST_CHECKPOINT": "callbacks", "CHECKPOINT_DIR": "callbacks", "LAST_CHECKPOINT": "callbacks",
    "LOGS_DIR": "callbacks", "TrainingDiverged": "callbacks", "MAX_INPUT_PIXELS": "checks",
    "OPTIMIZERS": "config", "SCHEDULES": "config", "FitConfig": "config", "build_config": "config",
    "BACKUP_DIR": "history", "backup_epoch": "history", "read_history": "history", "replay_patience": "history",
    "trim_history": "history", "validation_plan": "inputs", "run_fit": "run",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"tfseg.fit.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'tfseg.fit' has no attribute {name!r}")
