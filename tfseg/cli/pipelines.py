"""``tfseg run`` and ``tfseg demo``: the stages chained for a pipeline, or planned for a dataset."""

from __future__ import annotations

import os

import click

from tfseg.cli.app import cli
from tfseg.cli.show import echo_stage, echo_summary
from tfseg.cli.stages import layout_options
from tfseg.errors import TfsegError
from tfseg.pipeline import STAGES


@cli.command("run")
@click.argument("pipeline", required=False)
@click.option("--input", "input_dir", required=True, type=click.Path(), help="Raw dataset in its original layout.")
@click.option("--workdir", required=True, type=click.Path(), help="Where every stage writes; re-running resumes.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a pipeline key, e.g. fit.epochs=5.")
@click.option("--stage", "stages", multiple=True, type=click.Choice(STAGES),
              help="Run only these stages (default: all, in order).")
@click.option("--dataset", "layout", default=None,
              help="Without PIPELINE: the raw layout (as convert --dataset); the recipe is planned automatically.")
@click.option("--budget", default=None, help="Without PIPELINE: training wall time for the plan and fit [default: 1h].")
@click.option("--split", default=None, help="Without PIPELINE: convert's --split.")
@layout_options
def run_cmd(pipeline, input_dir, workdir, overrides, stages, layout, budget, split, **layout_options):
    """Run PIPELINE (a shipped name like `carvana`, or a YAML file): convert -> fit -> evaluate -> export.

    Without PIPELINE, --dataset LAYOUT (and the layout's convert options) runs
    convert -> plan -> fit -> evaluate -> export with the automatic recipe (`tfseg plan`) for --budget.
    """
    from tfseg.pipeline import auto_pipeline, load_pipeline, run_pipeline

    given = sorted(f"--{k.replace('_', '-')}" for k, v in layout_options.items() if v is not None)
    if pipeline and layout:
        raise TfsegError(f"give PIPELINE ({pipeline}) or --dataset ({layout}), not both")
    if pipeline and (given or budget or split):
        raise TfsegError(f"{', '.join(given + ['--budget'] * bool(budget) + ['--split'] * bool(split))}: "
                         "only without PIPELINE (a pipeline file holds these; use --set)")
    if not pipeline and not layout:
        raise TfsegError("give a PIPELINE (e.g. carvana or a YAML file) or --dataset LAYOUT for an automatic plan")
    if pipeline:
        cfg = load_pipeline(pipeline, overrides)
    else:
        cfg = auto_pipeline(layout, budget=budget or "1h", split=split, layout_options=layout_options,
                            overrides=overrides)
    if not os.path.isdir(input_dir):
        raise TfsegError(f"{input_dir}: input directory not found")
    summary = run_pipeline(cfg, input_dir, workdir, stages=stages or STAGES, on_stage=echo_stage)
    echo_summary(summary)


@cli.command("demo")
@click.option("--workdir", default="tfseg-demo", show_default=True, type=click.Path(),
              help="Where the generated data and every stage's output go; re-running resumes.")
@click.option("--pipeline", default="carvana", show_default=True, help="Which pipeline to demo.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a pipeline key.")
def demo_cmd(workdir, pipeline, overrides):
    """Generate Carvana-layout sample data and run the carvana pipeline end to end on the CPU."""
    from tfseg.pipeline import run_demo

    summary = run_demo(workdir, pipeline=pipeline, overrides=overrides, on_stage=echo_stage)
    echo_summary(summary)
