"""The fit stage's public names (``tfseg fit``); the code lives in :mod:`tfseg.fit`, one module a
job (config, checks, history, inputs, callbacks, run). The CLI, ``tfseg run``, the tools and the
tests import from here.
"""

from tfseg.fit.callbacks import (
    BEST_CHECKPOINT,
    CHECKPOINT_DIR,
    LAST_CHECKPOINT,
    LOGS_DIR,
    TrainingDiverged,
)
from tfseg.fit.checks import MAX_INPUT_PIXELS
from tfseg.fit.config import OPTIMIZERS, SCHEDULES, FitConfig, build_config, resolve_config
from tfseg.fit.history import BACKUP_DIR, backup_epoch, read_history, replay_patience, trim_history
from tfseg.fit.inputs import validation_plan
from tfseg.fit.run import run_fit

__all__ = [
    "BACKUP_DIR", "BEST_CHECKPOINT", "CHECKPOINT_DIR", "LAST_CHECKPOINT", "LOGS_DIR", "MAX_INPUT_PIXELS",
    "OPTIMIZERS", "SCHEDULES", "FitConfig", "TrainingDiverged", "backup_epoch", "build_config",
    "read_history", "replay_patience", "resolve_config", "run_fit", "trim_history", "validation_plan",
]
