"""One command a stage: sample, convert, fit, plan, evaluate, export, predict. Each builds the stage's
config from its options and calls the stage's entry point; TensorFlow and Beam are imported inside
the commands, so ``tfseg --help`` answers at once."""

from __future__ import annotations

import os
import sys

import click

from tfseg import runtime
from tfseg.cli.app import cli
from tfseg.cli.show import metric_table
from tfseg.config import default_of
from tfseg.convert import LAYOUTS, samples
from tfseg.errors import TfsegError, safe
from tfseg.evaluate.config import EvaluateConfig
from tfseg.export.config import FORMATS, QUANTIZATIONS, ExportConfig
from tfseg.fit.config import OPTIMIZERS, SCHEDULES
from tfseg.plan.rules import FLIP_CHOICES
from tfseg.predict.config import PredictConfig


@cli.command()
@click.option("--dataset", "dataset", required=True, help=f"Layout: {', '.join(samples.SAMPLES)}.")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder to write the sample to.")
@click.option("--count", default=32, show_default=True, type=click.IntRange(min=1), help="Number of cases.")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed.")
def sample(dataset: str, output: str, count: int, seed: int) -> None:
    """Write a small synthetic dataset in a layout's original file formats."""
    from tfseg.pipeline import write_sample

    samples.writer(dataset)  # an unknown layout fails before anything is written
    write_sample(dataset, output, count=count, seed=seed)
    click.echo(safe(f"wrote {count} {dataset} sample cases to {output}"))


# The layouts' own convert options (tfseg.convert.LAYOUTS), shared by `convert` and `run --dataset`;
# each reaches the layout as layout_options[name] when given.
LAYOUT_OPTIONS = (
    click.option("--image-dir", default=None, help="folder, coco: images folder, relative to --input."),
    click.option("--mask-dir", default=None, help="folder: masks folder, relative to --input."),
    click.option("--mask-suffix", default=None, help="folder: mask stem = image stem + suffix (e.g. _mask)."),
    click.option("--num-classes", default=None, type=int,
        help="folder: classes including background (default: from the mask values found)."),
    click.option("--ignore-index", default=None, type=int, help="folder: label value to ignore (e.g. 255)."),
    click.option("--palette", default=None, type=click.Path(dir_okay=False),
        help='folder: JSON colour -> class id, or -> {"id": N, "name": "road"}.'),
    click.option("--class-names", default=None, type=click.Path(dir_okay=False),
        help="folder: class names, one per line or a JSON list (written to dataset.json)."),
    click.option("--mask-threshold", default=None, type=int,
        help="folder: binarize masks, value >= T is class 1 (for lossily saved masks)."),
    click.option("--label-set", default=None, help="ccp: 'seed' (14 classes, default) or 'full' (59)."),
    click.option("--annotations", default=None,
        help="coco: the COCO JSON file(s), comma-separated, relative to --input (default: found)."),
    click.option("--categories", default=None,
        help="coco: category names (or ids) to keep, comma-separated, in class order (default: all)."),
    click.option("--empty-images", default=None, type=click.Choice(["keep", "drop"]),
        help="coco: images without annotations kept as background (default) or dropped."),
    click.option("--labels", default=None,
        help="labelme: class order, a labels.txt (one a line) or a comma-separated list (default: sorted)."),
)


def layout_options(command):
    for option in reversed(LAYOUT_OPTIONS):
        command = option(command)
    return command


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--dataset", "dataset", required=True, help=f"Layout: {', '.join(LAYOUTS)}.")
@click.option("--input", "input_dir", required=True, help="The dataset's root, in its original layout.")
@click.option("--output", required=True, help="Output folder (shards + dataset.json), published atomically.")
@click.option("--split", default="train=0.8,val=0.1,test=0.1", show_default=True,
              help="Fractions for layouts without an official split (by stable hash of the case/group id).")
@click.option("--image-size", default=None,
              help="Resize 2D images to HxW (bilinear, antialiased, stored as PNG; masks nearest); "
                   "recorded in dataset.json for export and predict to reproduce; at most 2**26 pixels.")
@click.option("--num-shards", default=None, type=click.IntRange(min=1),
              help="Shards per split (default: ~150 MB each).")
@click.option("--compression", default="none", show_default=True,
              type=click.Choice(["none", "gzip"], case_sensitive=False))
@click.option("--strict", is_flag=True, help="Fail (nothing written) if any case is rejected.")
@click.option("--overwrite", is_flag=True, help="Replace an existing complete output.")
@layout_options
@click.pass_context
def convert(ctx, dataset, input_dir, output, split, image_size, num_shards, compression, strict, overwrite,
            **layout_options) -> None:
    """Convert a dataset from its original layout into sharded TFRecords + dataset.json (Apache Beam).

    Extra arguments go to Beam's PipelineOptions, e.g. --direct_num_workers=2 or
    --runner=DataflowRunner ... (short names: --runner dask, direct, dataflow, flink, spark).
    An option neither tfseg nor Beam knows is an error. Exit 1 when every case was rejected.
    """
    from tfseg.config import parse_size
    from tfseg.convert.config import ConvertConfig
    from tfseg.convert.pipeline import NothingConverted, run_convert
    from tfseg.convert.runners import check_beam_args

    takes_value = False
    for arg in ctx.args:
        if arg.startswith("-"):
            takes_value = "=" not in arg
        elif takes_value:
            takes_value = False
        else:
            raise TfsegError(f"unexpected argument {arg!r} (Beam options look like --name=value)")
    check_beam_args(ctx.args, [o for p in ctx.command.params for o in p.opts if o.startswith("--")])
    try:
        image_size = parse_size(image_size)
    except TfsegError as e:
        raise TfsegError(f"--image-size: {e}") from None
    cfg = ConvertConfig.from_dict(dict(
        layout_name=dataset, input_dir=input_dir, output_dir=output,
        layout_options={k: v for k, v in layout_options.items() if v is not None}, split=split,
        image_size=image_size, num_shards=num_shards, compression="" if compression.lower() == "none" else compression,
        strict=strict, overwrite=overwrite, beam_args=list(ctx.args),
    ))
    try:
        summary = run_convert(cfg, progress_stream=sys.stderr)
    except NothingConverted as e:  # a data failure, not a misuse: exit 1
        click.echo(f"error: {safe(e)}", err=True)
        sys.exit(1)
    counts = ", ".join(f"{s} {n}" for s, n in summary["splits"].items())
    click.echo(safe(f"converted {dataset}: {counts}; rejected {summary['rejected']}"
               f"{' (see rejected.jsonl)' if summary['rejected'] else ''} -> {summary['output']} "
               f"({summary['seconds']:.1f} s)"))

# --- fit commands (owned by the fit stage) ---


@cli.command("fit")
@click.option("--data", "data", help="Converted dataset directory (has dataset.json).")
@click.option("--model", help="unet | improved_unet | mobilenetv2_unet | dense_unet.")
@click.option("--output", help="Run directory (RUN_DIR); re-running resumes it.")
@click.option("--epochs", type=int, help="Total epochs (larger than a finished run's: continue).")
@click.option("--budget", help="Wall time for the whole fit (20m, 1h, 90s): sets the epochs and the cosine's end.")
@click.option("--batch-size", type=int, help="Global batch size (divisible by the replicas).")
@click.option("--image-size", help="2D training size HxW.")
@click.option("--patch-size", help="3D training patch DxHxW.")
@click.option("--loss", help="bce | dice | bce_dice | ce | focal | tversky | ce_dice.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS))
@click.option("--learning-rate", type=float)
@click.option("--schedule", type=click.Choice(SCHEDULES))
@click.option(
    "--precision", type=click.Choice(runtime.PRECISIONS)
)
@click.option("--cpu-replicas", type=int, help="Mirror over N logical CPU devices.")
@click.option("--peer-timeout", type=float,
              help="Multi-worker (TF_CONFIG): seconds to wait for the other workers (default 300).")
@click.option("--jit-compile/--no-jit-compile", default=None, help="XLA (default: on for GPUs).")
@click.option("--steps-per-epoch", type=int)
@click.option("--validation-split", help="Split to validate on (default val; '' for none).")
@click.option("--augment", help='Augmentation as JSON, e.g. \'{"hflip": 0.5}\'.')
@click.option("--early-stopping", type=int, help="Patience in epochs (0: off).")
@click.option("--config", "config_file", type=click.Path(), help="YAML/JSON with a fit: section.")
@click.option("--set", "overrides", multiple=True, help="KEY=VALUE override (repeatable), applied last.")
def fit_cmd(config_file, overrides, **options):
    """Train a model on a converted dataset into RUN_DIR (resumable)."""
    from tfseg.fit import build_config, run_fit

    cfg = build_config(config_file, options, overrides)
    run_dir = run_fit(cfg)
    from tfseg.rundir import load_run_config

    info = load_run_config(run_dir)
    click.echo(
        f"fit: {run_dir} ({info.get('model')}, {info.get('completed_epochs')} epochs, "
        f"{info.get('precision')}, {info.get('replicas')} replica(s))"
    )


@cli.command("plan")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False), help="A converted dataset.")
@click.option("--budget", default="30m", show_default=True, help="Training wall time the plan is for (20m, 1h, ...).")
@click.option("--output", default=None, type=click.Path(),
              help="Write the plan here (YAML: fit: and evaluate: sections, the reasons, the fingerprint).")
@click.option("--flips", default=FLIP_CHOICES[0], show_default=True, type=click.Choice(FLIP_CHOICES),
              help="Flips to train and test with: auto decides from the data's symmetry.")
@click.option("--sample", default=64, show_default=True, type=click.IntRange(1),
              help="Training records read for the fingerprint (3D: at most 8).")
def plan_cmd(data_dir, budget, output, flips, sample):
    """Fingerprint a converted dataset and choose a training recipe for it, with the reasons."""
    from tfseg.plan import run_plan

    doc = run_plan(data_dir, budget=budget, output=output, flips=flips, sample=sample)
    click.echo(doc["table"])
    if output:
        click.echo(safe(f"plan: {output}  (tfseg fit --config {output} --output RUN)"))


# --- evaluate commands (owned by the evaluate stage) ---


@cli.command()
@click.option("--run", "run_dir", default=None, type=click.Path(file_okay=False), help="A `tfseg fit` RUN_DIR.")
@click.option("--model", "export_dir", default=None, type=click.Path(file_okay=False),
              help="Or an export, EXPORTS/NAME[/VERSION]: scored through its serving signature.")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False), help="A converted dataset.")
@click.option("--split", default=default_of(EvaluateConfig, "split"), show_default=True, help="The split to score.")
@click.option("--output", required=True, type=click.Path(), help="Directory for metrics.json, report.md, PNGs.")
@click.option("--samples", default=default_of(EvaluateConfig, "num_samples"), show_default=True, type=click.IntRange(0),
              help="Examples in samples.png.")
@click.option("--tile", is_flag=True, help="2D: tile at the training size instead of resizing to it.")
@click.option("--tta", is_flag=True, help="Average over the flips the model was trained with.")
@click.option("--max-examples", type=click.IntRange(1), default=None, help="Score only the first N examples.")
@click.option("--overwrite", is_flag=True, help="Replace an existing complete output.")
def evaluate(run_dir, export_dir, data_dir, split, output, samples, tile, tta, max_examples, overwrite):
    """Score a fit run (--run) or its export (--model) on a split at the records' resolution."""
    from tfseg import schema
    from tfseg.evaluate import EvaluateConfig, run_evaluate
    from tfseg.progress import Progress

    info = schema.load_dataset_info(data_dir)
    total = info.splits.get(split, {}).get("count") or 0
    if max_examples:
        total = min(total, max_examples) if total else max_examples
    cfg = EvaluateConfig.from_dict(dict(
        run_dir=run_dir, data_dir=data_dir, split=split, output=output, num_samples=samples, tile=tile, tta=tta,
        max_examples=max_examples, overwrite=overwrite, export_dir=export_dir,
    ))
    with Progress(total, f"evaluating {split}", unit="images") as bar:
        m = run_evaluate(cfg, progress=bar.update)
    click.echo(metric_table(m))
    click.echo(safe(f"report:  {os.path.join(output, 'report.md')}"))


# --- export/predict commands (owned by the export/predict stage) ---


@cli.command("export")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="A `tfseg fit` RUN_DIR.")
@click.option("--output", "export_base", required=True, type=click.Path(file_okay=False),
              help="EXPORT_BASE: holds NAME/VERSION/ and models.config.")
@click.option("--name", required=True, help="The model name TF Serving serves it under.")
@click.option("--version", "version", type=click.IntRange(1), default=None,
              help="Version number (default: highest existing + 1).")
@click.option("--max-pixels", type=click.IntRange(1), default=None,
              help="Largest image (height x width) the 2D signatures accept [default: 40000000].")
@click.option("--overwrite", is_flag=True, help="Replace an existing VERSION directory.")
@click.option("--precision", type=click.Choice(runtime.POLICIES), default=default_of(ExportConfig, "precision"),
              show_default=True, help="What the served graph computes in, whatever trained the model.")
@click.option("--tta", is_flag=True, help="Average over the flips the model was trained with, in the graph.")
@click.option("--tile", is_flag=True, help="2D: tile the full-resolution image at the training size, in the graph.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=default_of(ExportConfig, "format"), show_default=True,
              help="litert: VERSION/model.tflite for phones and boards; onnx: VERSION/model.onnx for ONNX Runtime, "
                   "OpenVINO, Triton (both 2D; uint8 images at the model size in).")
@click.option("--quantize", type=click.Choice(QUANTIZATIONS), default=default_of(ExportConfig, "quantize"),
              show_default=True,
              help="--format litert: float16 weights, or int8 calibrated on the run's training records.")
@click.option("--calibration-records", type=click.IntRange(1), default=None,
              help="--quantize int8: training records to calibrate on [default: 200].")
@click.option("--calibration-data", type=click.Path(file_okay=False), default=None,
              help="--quantize int8: dataset to calibrate on (its train split) [default: the run's data].")
def export_cmd(run_dir, export_base, name, version, max_pixels, overwrite, precision, tta, tile, fmt, quantize,
               calibration_records, calibration_data):
    """Export a fit run as a TF Serving SavedModel (decode, resize or tile, TTA, threshold in the graph),
    or with --format litert / onnx as a LiteRT or ONNX model."""
    from tfseg.export import ExportConfig, run_export

    cfg = ExportConfig.from_dict(dict(
        run_dir=run_dir, export_base=export_base, name=name, version=version, overwrite=overwrite,
        precision=precision, tta=tta, tile=tile, format=fmt, quantize=quantize,
        calibration_records=calibration_records, calibration_data=calibration_data,
        **({"max_pixels": max_pixels} if max_pixels else {}),
    ))
    path = run_export(cfg)
    if fmt != "savedmodel":
        what = f"LiteRT ({quantize})" if fmt == "litert" else "ONNX"
        click.echo(safe(f"{path}: exported {name} version {os.path.basename(path)} as {what}; how to call "
                   f"it: {os.path.join(export_base, name, 'README.md')}"))
        return
    click.echo(safe(f"{path}: exported {name} version {os.path.basename(path)}; serve it with the command in "
               f"{os.path.join(export_base, name, 'README.md')}"))


@cli.command("predict")
@click.option("--model", "model_path", required=True,
              help="Export version dir, export NAME dir (latest version) or RUN_DIR; with --server, the served NAME.")
@click.option("--input", "input_dir", required=True, type=click.Path(file_okay=False),
              help="Directory of images (.jpg .png .gif .bmp) and/or NIfTI volumes.")
@click.option("--output", "output_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for STEM.png / STEM.nii.gz masks.")
@click.option("--batch-size", default=default_of(PredictConfig, "batch_size"), show_default=True, type=click.IntRange(1),
              help="Inputs per model call.")
@click.option("--server", default=None, metavar="HOST:PORT", help="Use a running TF Serving server (REST).")
@click.option("--grpc", is_flag=True, help="With --server: use gRPC (needs tensorflow-serving-api).")
@click.option("--model-version", type=click.IntRange(1), default=None, help="With --server: the served version.")
@click.option("--runner", default=None,
              help="Run as a Beam pipeline on this runner (DirectRunner, dask, dataflow, ...).")
@click.option("--beam-arg", "beam_args", multiple=True,
              help="Extra Beam pipeline option (repeatable), e.g. --beam-arg=--dask_scheduler_file=F.")
@click.option("--tile", is_flag=True, help="RUN_DIR, 2D: tile at the training size instead of resizing.")
@click.option("--tta", is_flag=True, help="RUN_DIR: average over the flips the model was trained with.")
@click.option("--overlay", is_flag=True,
              help="Also write overlays/STEM.jpg|png: the input with the coloured mask and a class legend.")
@click.option("--overwrite", is_flag=True, help="Replace an existing complete output.")
def predict_cmd(model_path, input_dir, output_dir, batch_size, server, grpc, model_version, runner, beam_args,
                tile, tta, overlay, overwrite):
    """Write a mask (palette PNG of class ids, or NIfTI) for every image or volume in a directory."""
    import contextlib

    from tfseg.io import fs
    from tfseg.predict import list_inputs, run_predict
    from tfseg.progress import Progress

    # A Beam job lists remote inputs through Beam's FileSystems, as run_predict does.
    with fs.beam_filesystems() if runner else contextlib.nullcontext():
        total = len(list_inputs(input_dir))
    with Progress(total, "predicting", unit="inputs") as bar:
        s = run_predict(
            model_path, input_dir, output_dir, batch_size=batch_size, server=server, grpc=grpc,
            model_version=model_version, runner=runner, beam_args=beam_args, tile=tile, tta=tta,
            overlay=overlay, overwrite=overwrite, progress=bar.update,
        )
    click.echo(safe(f"{output_dir}: {s['written']} masks written, {len(s['failed'])} failed, {s['seconds']:.1f} s"
               + (" (+ overlays/)" if overlay and s["written"] else "")
               + (f" (see {os.path.join(output_dir, 'predict_summary.json')})" if s["failed"] else "")))
