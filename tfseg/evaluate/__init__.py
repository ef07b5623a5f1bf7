"""The evaluate stage: a fit run (or an export of one) scored on a converted split.

One job a module:
  config   EvaluateConfig: the stage's settings, checked from their annotations (evaluate.json);
  scorer   SegmentationScorer: confusion matrices and metrics.json's tables, with their definitions;
  report   the pictures (samples, confusion matrix, history) and report.md's tables;
  run      run_evaluate: the stage from a run or an export to a published EVAL_DIR.

Command line::

    tfseg evaluate --run RUN_DIR --data DATASET_DIR --split test --output EVAL_DIR [--tile] [--tta]
"""

from tfseg.evaluate.config import CONFIG_JSON, EvaluateConfig  # noqa: F401
from tfseg.evaluate.run import (  # noqa: F401
    CONFUSION_PNG,
    HISTORY_PNG,
    METRICS_JSON,
    REPORT_MD,
    SAMPLES_PNG,
    run_evaluate,
)
from tfseg.evaluate.scorer import (  # noqa: F401
    BINARY_DEFINITION,
    DATASET_LEVEL_DEFINITION,
    ISIC_JACCARD_THRESHOLD,
    PER_IMAGE_DEFINITION,
    REGION_DEFINITION,
    SegmentationScorer,
)
