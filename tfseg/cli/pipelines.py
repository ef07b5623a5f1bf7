"""``tfseg run`` and ``tfseg demo``: the stages chained for a pipeline, or planned for a dataset."""

from __future__ import annotations

import click

from tfseg.cli.app import cli
from tfseg.cli.show import echo_stage, echo_summary
from tfseg.cli.stages import layout_options
from tfseg.errors import TfsegError, safe
from tfseg.io import fs
from tfseg.pipeline import STAGES


@cli.command("run")
@click.argument("pipeline", required=False)
@click.option("--input", "input_dir", default=None, type=click.Path(),
              help="Raw dataset in its original layout [required, except with --compile].")
@click.option("--workdir", default=None, type=click.Path(),
              help="Where every stage writes; re-running resumes [required, except with --compile].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a pipeline key, e.g. fit.epochs=5.")
@click.option("--stage", "stages", multiple=True, type=click.Choice(STAGES),
              help="Run only these stages (default: all, in order).")
@click.option("--dataset", "layout", default=None,
              help="Without PIPELINE: the raw layout (as convert --dataset); the recipe is planned automatically.")
@click.option("--budget", default=None, help="Without PIPELINE: training wall time for the plan and fit [default: 1h].")
@click.option("--split", default=None, help="Without PIPELINE: convert's --split.")
@click.option("--compile", "compile_to", type=click.Choice(["kfp"]), default=None,
              help="Write the pipeline for an orchestrator instead of running it: kfp = a Kubeflow Pipelines v2 "
                   "YAML (Vertex AI Pipelines too) to --output.")
@click.option("--output", "compile_output", default=None, type=click.Path(dir_okay=False),
              help="--compile: the pipeline YAML to write.")
@click.option("--image", default=None, help="--compile: the container image with tfseg installed (README: Dockerfile).")
@click.option("--accelerator", default=None, metavar="TYPE[:COUNT]",
              help="--compile: accelerators for the fit task, e.g. NVIDIA_TESLA_T4:1.")
@layout_options
def run_cmd(pipeline, input_dir, workdir, overrides, stages, layout, budget, split, compile_to, compile_output,
            image, accelerator, **layout_options):
    """Run PIPELINE (a shipped name like `carvana`, or a YAML file): convert -> fit -> evaluate -> export.

    Without PIPELINE, --dataset LAYOUT (and the layout's convert options) runs
    convert -> plan -> fit -> evaluate -> export with the automatic recipe (`tfseg plan`) for --budget.

    With --compile kfp, writes the same pipeline as a Kubeflow Pipelines YAML (one component per
    stage, in --image) instead; --input and --workdir become its parameters' defaults.
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
        cfg = load_pipeline(pipeline, () if compile_to else overrides)
    else:
        # The plan's recipe is overridden after planning: the --set items stay in the pipeline.
        cfg = auto_pipeline(layout, budget=budget or "1h", split=split, layout_options=layout_options,
                            overrides=overrides)
    if compile_to:
        from tfseg.kfp_pipeline import compile_pipeline

        if not compile_output or not image:
            raise TfsegError("--compile kfp needs --output FILE.yaml and --image IMAGE (a container with tfseg)")
        if stages or workdir:
            raise TfsegError("--stage/--workdir: a compiled pipeline runs every stage; its `workdir` parameter "
                             "is set when the run is submitted")
        compile_pipeline(cfg, compile_output, image=image, input_dir=input_dir,
                         overrides=list(overrides) if pipeline else [], accelerator=accelerator)
        click.echo(safe(f"{compile_output}: Kubeflow Pipelines v2 pipeline for {cfg['source']} (convert -> fit -> "
                        f"evaluate -> export) in {image}"))
        return
    if image or accelerator or compile_output:
        raise TfsegError("--output/--image/--accelerator: only with --compile kfp")
    if not input_dir or not workdir:
        raise TfsegError("tfseg run needs --input DIR and --workdir DIR")
    if not fs.isdir(input_dir):
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
