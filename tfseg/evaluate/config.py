"""The evaluate stage's settings: :class:`EvaluateConfig`, checked from its annotations
(:func:`tfseg.config.config_from_mapping`) and written beside the scores as ``evaluate.json``."""

from __future__ import annotations

import dataclasses

from tfseg.config import StageConfig
from tfseg.errors import TfsegError

CONFIG_JSON = "evaluate.json"


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(StageConfig):
    """Every setting of ``tfseg evaluate`` (the fields keep :func:`run_evaluate`'s argument order).

    Attributes:
      run_dir: a completed `tfseg fit` output (run.json, model.keras, history.csv); None with
        ``export_dir``.
      data_dir: a converted dataset (dataset.json + shards).
      split: the split to score.
      output: the directory to publish (EVAL_DIR).
      num_samples: examples drawn in samples.png (the first N labelled ones, in record order).
      tile: 2D only: predict with overlapping tiles at the training size instead of resizing
        the whole image to it.
      tta: flip test-time augmentation over the flips the model was trained with
        (:func:`tfseg.rundir.training_flip_axes`); a model trained without flips is scored
        as is, with a warning.
      max_examples: score only the first N labelled examples (quick looks).
      overwrite: replace an existing complete EVAL_DIR.
      export_dir: score this export (EXPORTS/NAME for its highest version, or NAME/VERSION)
        instead of a run; ``tile``/``tta`` are the export's own then.
    """

    WHAT = "evaluate config"

    run_dir: str | None
    data_dir: str
    split: str = "test"
    output: str = "eval"
    num_samples: int = 8
    tile: bool = False
    tta: bool = False
    max_examples: int | None = None
    overwrite: bool = False
    export_dir: str | None = None

    def validate(self) -> None:
        """Raises: TfsegError: neither or both of a run and an export, or --tile/--tta with an export."""
        if (self.run_dir is None) == (self.export_dir is None):
            raise TfsegError("evaluate: give one of --run RUN_DIR or --model EXPORTS/NAME[/VERSION]")
        if self.export_dir is not None and (self.tile or self.tta):
            raise TfsegError(f"--model {self.export_dir}: --tile/--tta are the export's own (its graph runs them); "
                             "export with `tfseg export --tile/--tta` to score them")
