"""The evaluate stage: score a fit run on a converted split, at the records' resolution.

    tfseg evaluate --run RUN_DIR --data DATASET_DIR --split test --output EVAL_DIR [--tile] [--tta]

Predictions are made by :mod:`tfseg.inference` at the model's training size and brought back to
each record's size (resized, or tiled with ``--tile``; 3D volumes always by sliding window)
before they are compared with its mask, so the scores do not depend on the training resolution.
That is the original resolution unless ``convert --image-size`` resized the dataset: the masks
exist only at the converted size then, and the served graph reproduces that resize on
originals (:mod:`tfseg.preprocess`).

Two definitions of the per-class scores are reported, side by side and named:

  - **dataset-level**: one confusion matrix summed over every pixel of the split, then IoU,
    precision, recall and Dice per class (Pascal VOC's and TF Model Garden's definition). Big
    images and big objects weigh more.
  - **per-image mean**: the seeds' definition. For each class, the metric of every image whose
    truth contains the class, summed and divided by the number of such images. Every image
    weighs the same; false positives on images without the class are not counted.

Mean IoU is the mean over classes (NaN classes skipped) in both definitions. Binary tasks also
get foreground Dice and IoU and ISIC's thresholded Jaccard (per-image Jaccard below 0.65 counts
as 0). 3D tasks with ``regions`` (BraTS WT/TC/ET) get per-case region Dice and HD95 in mm from
the voxel spacing; see :func:`tfseg.scoring.hausdorff_distance` for the empty-mask conventions.
Pixels whose truth is the ignore index are left out of every score.

Output (published atomically; metrics.json is written last and marks completion)::

    EVAL_DIR/metrics.json           every number, plus the confusion matrix
    EVAL_DIR/evaluate.json          the settings it ran with (EvaluateConfig)
    EVAL_DIR/report.md              the tables, linking the pictures
    EVAL_DIR/samples.png            image | truth | prediction for N examples
    EVAL_DIR/confusion_matrix.png   row-normalized
    EVAL_DIR/history.png            loss/val_loss and the main metric from RUN_DIR/history.csv
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Callable, Iterable

import numpy as np

from tfseg import rundir, schema
from tfseg.errors import TfsegError
from tfseg.evaluate import report
from tfseg.evaluate.config import CONFIG_JSON, EvaluateConfig
from tfseg.evaluate.scorer import SegmentationScorer
from tfseg.io import fs, locks, publish

log = logging.getLogger(__name__)

METRICS_JSON = "metrics.json"
REPORT_MD = "report.md"
SAMPLES_PNG = "samples.png"
CONFUSION_PNG = "confusion_matrix.png"
HISTORY_PNG = "history.png"

# Sample pictures are downsampled to this many pixels on the long side, so keeping N samples of
# 3000x2000 ISIC photos in memory costs little.
_SAMPLE_MAX_SIDE = 384


def _thumbnail(a: np.ndarray) -> np.ndarray:
    step = max(1, math.ceil(max(a.shape[:2]) / _SAMPLE_MAX_SIDE))
    return np.ascontiguousarray(a[::step, ::step])


def _as_numpy(example: dict) -> dict:
    return {k: (v.numpy() if hasattr(v, "numpy") else np.asarray(v)) for k, v in example.items()}


def _iter_examples(data_dir: str, split: str) -> Iterable[dict]:
    import tensorflow as tf

    from tfseg import data

    examples = data.read_examples(data_dir, split)
    if hasattr(examples, "as_numpy_iterator"):
        examples = examples.as_numpy_iterator()
    try:
        for ex in examples:
            yield _as_numpy(ex)
    except (tf.errors.DataLossError, tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as e:
        from tfseg.data.input import data_error

        raise data_error(e, data_dir, (split,)) from None


def _decode_id(v) -> str:
    v = np.asarray(v)
    v = v.item() if v.size == 1 else v
    return v.decode() if isinstance(v, bytes) else str(v)


def _training_health(run_dir: str | None) -> dict | None:
    """fit's training- vs inference-mode check from RUN_DIR/run.json (None when unavailable)."""
    try:
        return rundir.load_run_config(run_dir).get("health") if run_dir else None
    except TfsegError:
        return None


def _run_facts(run: rundir.RunInfo, info: schema.DatasetInfo, where: str, data_dir: str) -> dict:
    """Cross-checks the run's facts (``where``: its run.json or tfseg.json) against the dataset
    and gathers what evaluation needs."""
    ndim = run.ndim
    if ndim != info.ndim:
        raise TfsegError(f"{where}: a {ndim}D model cannot be scored on {data_dir} ({info.ndim}D)")
    num_classes = run.num_classes
    if num_classes != info.num_classes:
        raise TfsegError(
            f"{where}: model has {num_classes} classes, {data_dir}/dataset.json {info.num_classes}"
        )
    channels = run.channels
    if channels != info.channels:
        raise TfsegError(
            f"{where}: model takes {channels} channels, {data_dir}/dataset.json has {info.channels}"
        )
    class_names = list(info.class_names or run.class_names)
    if len(class_names) != num_classes:
        class_names = list(run.class_names)
    ignore_index = info.ignore_index if info.ignore_index is not None else run.ignore_index
    regions = info.regions or run.regions or {}
    return {
        "ndim": ndim,
        "num_classes": num_classes,
        "binary": run.binary,
        "size": run.size,
        "class_names": class_names,
        "ignore_index": ignore_index,
        "regions": regions if ndim == 3 else {},
        "model": run.model,
    }


def _export_version(model_dir: str) -> str:
    """EXPORTS/NAME/VERSION, or the highest version of EXPORTS/NAME."""
    from tfseg.export.versions import find_version

    found = find_version(model_dir)
    if not found:
        raise TfsegError(f"--model {model_dir}: not a `tfseg export` NAME or NAME/VERSION directory "
                         "(no saved_model.pb, model.tflite or model.onnx)")
    return found[1]


@locks.holding_locks
def run_evaluate(*args, progress: Callable[[int], None] | None = None, **kwargs) -> dict:
    """Scores a fit run, or the SavedModel exported from one, on a converted split and writes
    tables and pictures.

    A run's Keras model is scored in float32 (what ``tfseg export`` serves by default, whatever
    precision trained it). An export is scored through its serving signature, with the options
    it was exported with (``tfseg export --tile/--tta``, recorded in its tfseg.json): the
    numbers are the served model's.

    Args:
      *args, **kwargs: an :class:`~tfseg.evaluate.config.EvaluateConfig` (or a mapping of its
        keys), or its fields themselves: ``run_evaluate(run_dir, data_dir, split, output,
        num_samples=8, tile=False, tta=False, max_examples=None, overwrite=False, export_dir=None)``.
      progress: called with 1 after each example (the CLI's progress bar).

    Returns:
      The metrics dict written to metrics.json (the config goes beside it, in evaluate.json).

    Raises:
      TfsegError: a bad config value, the run, the dataset or the split is missing or they do
        not match, the split has no labelled examples, or a complete output exists and
        overwrite is False.
    """
    cfg = EvaluateConfig.from_call(args, kwargs)
    model = _model_source(cfg)
    info, facts = _check_data(cfg, model)
    output = fs.normalize(cfg.output)
    owned = dict(complete_marker=METRICS_JSON, overwrite=cfg.overwrite,
                 inputs=[model.option, ("--data", cfg.data_dir)])
    # Fail on a refused output before the (long) scoring, not after it.
    publish.claim(output, "evaluate", **owned)
    scorer, samples, unlabelled = _score(cfg, model, facts, progress)
    metrics = _metrics(cfg, model, facts, scorer, unlabelled)
    with publish.publish_dir(output, "evaluate", **owned) as tmp:
        metrics["pictures"] = _draw(tmp, samples, metrics, facts, info, model)
        fs.atomic_write_text(os.path.join(tmp, REPORT_MD), report.render_markdown(metrics))
        fs.atomic_write_json(os.path.join(tmp, CONFIG_JSON), cfg.to_json())
        fs.atomic_write_json(os.path.join(tmp, METRICS_JSON), metrics)
    log.info(
        "%s: mean IoU %.4f (dataset-level), %.4f (per-image mean) over %d images",
        output, metrics["dataset_level"]["mean_iou"] or float("nan"),
        metrics["per_image_mean"]["mean_iou"] or float("nan"), metrics["num_images"],
    )
    return metrics


@dataclasses.dataclass(frozen=True)
class _Model:
    """What is scored: a run's Keras model or an export, with its facts and options.

    Attributes:
      path: the run directory or the export's version folder.
      where: the file its facts come from (run.json or tfseg.json), for messages.
      run: its facts.
      options: the inference options it is scored with.
      option: ``(option, path)`` naming it in messages (``--run`` or ``--model``).
      history_run: the run whose history.csv is drawn (an export's source run), or None.
      precision: what the scored graph computes in.
    """

    path: str
    where: str
    run: rundir.RunInfo
    options: object
    option: tuple
    history_run: str | None
    precision: str


def _model_source(cfg: EvaluateConfig) -> _Model:
    """The run or export ``cfg`` names, read and checked."""
    from tfseg import inference

    if cfg.export_dir is not None:
        from tfseg.export.versions import METADATA, read_metadata

        path = _export_version(cfg.export_dir)
        meta = read_metadata(path)
        where = os.path.join(path, METADATA)
        run = rundir.RunInfo.from_json(meta, where)
        return _Model(path, where, run, inference.InferenceOptions.from_json(meta.get("inference"), run.ndim),
                      ("--model", cfg.export_dir), meta.get("run_dir"), meta.get("precision") or "float32")
    run = rundir.load_run_info(cfg.run_dir)
    flips = rundir.test_time_flips(cfg.run_dir, run, cfg.tta)
    return _Model(cfg.run_dir, os.path.join(cfg.run_dir, rundir.RUN_JSON), run,
                  inference.InferenceOptions.make(run.ndim, tile=cfg.tile, flips=flips),
                  ("--run", cfg.run_dir), cfg.run_dir, "float32")


def _check_data(cfg: EvaluateConfig, model: _Model) -> tuple[schema.DatasetInfo, dict]:
    """The dataset's facts, and the model's checked against them (:func:`_run_facts`)."""
    info = schema.load_dataset_info(cfg.data_dir)
    if cfg.split not in info.splits:
        raise TfsegError(
            f"{os.path.join(cfg.data_dir, schema.DATASET_JSON)}: no split {cfg.split!r}; "
            f"available: {', '.join(sorted(info.splits)) or 'none'}"
        )
    return info, _run_facts(model.run, info, model.where, cfg.data_dir)


def _score(cfg: EvaluateConfig, model: _Model, facts: dict, progress) -> tuple[SegmentationScorer, list, int]:
    """Predicts every labelled example of the split and scores it; keeps the first
    ``num_samples`` as thumbnails. Returns (scorer, samples, unlabelled examples skipped)."""
    # One path from any model to a mask (tfseg.predict): an export's serving graph, a LiteRT
    # interpreter, or a run's Keras model in float32 through tfseg.inference.
    from tfseg.predict import make_predictor

    predictor = make_predictor(model.path, tile=cfg.tile, tta=cfg.tta)
    log.info("evaluating %s on %s/%s (%s, tta flips over spatial axes %s)", model.path, cfg.data_dir, cfg.split,
             model.options.mode, model.options.tta_flip_axes)
    scorer = SegmentationScorer(
        facts["num_classes"], facts["class_names"], facts["ignore_index"], facts["regions"], binary=facts["binary"]
    )
    samples: list[dict] = []
    unlabelled = 0
    for ex in _iter_examples(cfg.data_dir, cfg.split):
        if cfg.max_examples is not None and len(scorer.cms) >= cfg.max_examples:
            break
        if not bool(np.asarray(ex.get("has_mask", True))):
            unlabelled += 1
        else:
            _score_one(ex, predictor, scorer, samples, cfg.num_samples, facts["ndim"])
        if progress is not None:
            progress(1)
    if not scorer.cms:
        raise TfsegError(
            f"{cfg.data_dir}: split {cfg.split!r} has no labelled examples to score "
            f"({unlabelled} unlabelled)"
        )
    return scorer, samples, unlabelled


def _score_one(ex: dict, predictor, scorer: SegmentationScorer, samples: list, num_samples: int, ndim: int) -> None:
    """Scores one labelled example; adds its thumbnails while ``samples`` has room."""
    sid = _decode_id(ex.get("source_id", ""))
    image, truth = ex["image"], ex["mask"]
    if truth.ndim == image.ndim:
        truth = truth[..., 0]
    pred = predictor.mask(image)
    if pred.shape != truth.shape:
        raise RuntimeError(
            f"{sid}: inference returned a {pred.shape} mask for a {truth.shape} truth; "
            "predictions must come back at the original size"
        )
    spacing = ex.get("spacing")
    scorer.add(truth, pred, sid, None if spacing is None else np.asarray(spacing, np.float64))
    if len(samples) < num_samples:
        if ndim == 3:
            # The middle axial slice (axis 0 is depth), first modality.
            mid = image.shape[0] // 2
            image, truth, pred = image[mid, ..., :1], truth[mid], pred[mid]
        samples.append({
            "image": _thumbnail(image),
            "truth": _thumbnail(truth),
            "prediction": _thumbnail(pred),
            "title": sid,
        })


def _metrics(cfg: EvaluateConfig, model: _Model, facts: dict, scorer: SegmentationScorer, unlabelled: int) -> dict:
    """metrics.json's content (its ``pictures`` are added when they are drawn)."""
    return {
        "run_dir": fs.normalize(model.history_run) if model.history_run else None,
        **({"export_dir": fs.normalize(model.path)} if cfg.export_dir is not None else {}),
        "data_dir": fs.normalize(cfg.data_dir),
        "split": cfg.split,
        "model": facts["model"],
        "inference": {**model.options.to_json(), "size": list(facts["size"]), "precision": model.precision},
        "num_classes": facts["num_classes"],
        "ignore_index": facts["ignore_index"],
        "unlabelled_skipped": unlabelled,
        "training_health": _training_health(model.history_run),
        **scorer.result(),
    }


def _draw(tmp: str, samples: list, metrics: dict, facts: dict, info: schema.DatasetInfo, model: _Model) -> dict:
    """Draws samples.png, confusion_matrix.png and history.png into ``tmp``; returns
    metrics.json's ``pictures`` (name -> file)."""
    pictures = {}
    if samples:
        from tfseg.visualize import dataset_colors

        report.plot_samples(
            samples, facts["class_names"], os.path.join(tmp, SAMPLES_PNG),
            ignore_index=facts["ignore_index"], colors=dataset_colors(info),
        )
        pictures["samples"] = SAMPLES_PNG
    report.plot_confusion_matrix(
        np.asarray(metrics["confusion_matrix"]), facts["class_names"], os.path.join(tmp, CONFUSION_PNG)
    )
    pictures["confusion_matrix"] = CONFUSION_PNG
    if model.history_run and report.plot_history(
        os.path.join(model.history_run, rundir.HISTORY_CSV), os.path.join(tmp, HISTORY_PNG),
        monitor=model.run.monitor,
    ):
        pictures["history"] = HISTORY_PNG
    return pictures
