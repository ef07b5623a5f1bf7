"""The ``tfseg`` command line: thin click commands, each building a config and calling one stage.

TensorFlow and Beam are imported inside the commands, so ``tfseg --help`` answers at once.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from tfseg.errors import TfsegError


class _Group(click.Group):
    """Turns TfsegError (and a few well-known user errors) into one line and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TfsegError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


def _setup_logging(verbose: bool) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("apache_beam", "absl", "tensorflow", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="tfseg")
def cli(verbose: bool) -> None:
    """tfseg: semantic segmentation, 2D and 3D, from raw files to a TF Serving model.

    Stages: sample -> convert -> fit -> evaluate -> export -> predict; `tfseg run` chains them
    for a pipeline, `tfseg demo` runs the Carvana demo end to end on generated data.
    """
    _setup_logging(verbose)


# --- sample/convert commands (owned by the sample/convert stage) ---

# --- fit commands (owned by the fit stage) ---

# --- evaluate commands (owned by the evaluate stage) ---

# --- export/predict commands (owned by the export/predict stage) ---

# --- run/demo commands (owned by the run/demo stage) ---


def _echo_stage(stage: str, skipped: bool) -> None:
    click.secho(f"==> {stage}" + (" (complete output exists, skipped)" if skipped else ""), bold=True)


def _echo_summary(summary: dict) -> None:
    """The end of `tfseg run` / `tfseg demo`: headline metrics, where the report and the model are."""
    metrics = summary.get("metrics") or {}
    headline = metrics.get("headline") or {}
    if headline:
        click.echo("metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in headline.items()
                                           if isinstance(v, (int, float))))
    if summary.get("report"):
        click.echo(f"report:  {summary['report']}")
    if summary.get("export"):
        click.echo(f"export:  {summary['export']}  (serve it with tensorflow/serving; see its README.md)")


@cli.command("run")
@click.argument("pipeline")
@click.option("--input", "input_dir", required=True, type=click.Path(), help="Raw dataset in its original layout.")
@click.option("--workdir", required=True, type=click.Path(), help="Where every stage writes; re-running resumes.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a pipeline key, e.g. fit.epochs=5.")
@click.option("--stage", "stages", multiple=True, type=click.Choice(["convert", "fit", "evaluate", "export"]),
              help="Run only these stages (default: all, in order).")
def run_cmd(pipeline, input_dir, workdir, overrides, stages):
    """Run PIPELINE (a shipped name like `carvana`, or a YAML file): convert -> fit -> evaluate -> export."""
    from tfseg.pipeline import STAGES, load_pipeline, run_pipeline

    cfg = load_pipeline(pipeline, overrides)
    if not os.path.isdir(input_dir):
        raise TfsegError(f"{input_dir}: input directory not found")
    summary = run_pipeline(cfg, input_dir, workdir, stages=stages or STAGES, on_stage=_echo_stage)
    _echo_summary(summary)


@cli.command("demo")
@click.option("--workdir", default="tfseg-demo", show_default=True, type=click.Path(),
              help="Where the generated data and every stage's output go; re-running resumes.")
@click.option("--pipeline", default="carvana", show_default=True, help="Which pipeline to demo.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a pipeline key.")
def demo_cmd(workdir, pipeline, overrides):
    """Generate Carvana-layout sample data and run the carvana pipeline end to end on the CPU."""
    from tfseg.pipeline import run_demo

    summary = run_demo(workdir, pipeline=pipeline, overrides=overrides, on_stage=_echo_stage)
    _echo_summary(summary)


def main() -> None:
    cli(prog_name="tfseg")


if __name__ == "__main__":
    main()
