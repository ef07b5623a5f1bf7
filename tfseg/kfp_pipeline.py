"""``tfseg run PIPELINE --compile kfp``: a ``tfseg run`` pipeline as a Kubeflow Pipelines v2 pipeline
(the YAML that Kubeflow Pipelines and Vertex AI Pipelines run).

Each stage is a KFP lightweight Python component running in ``--image`` (a container with tfseg
installed) and calling :mod:`tfseg.pipeline`'s own stage (:func:`run_stage`), which calls the
stage's public entry point with its typed config::

    convert  -> data: Dataset                      (the converted records, dataset.json)
    fit      -> model: Model                       (RUN_DIR under run/, and plan.yaml for a planned pipeline)
    evaluate -> metrics: Metrics, report: Markdown, evaluation: Artifact (metrics.json, tables, pictures)
    export   -> exported: Model                    (EXPORT_BASE: NAME/VERSION SavedModel, models.config)

The metrics artifact holds the dataset-level and per-image mean IoU and each class's IoU
(``iou/NAME``), so the orchestrator's UI shows the per-class table; the Markdown artifact is the
evaluation's report.md.

Pipeline parameters, with ``tfseg run``'s defaults: ``input_dir`` (``--input``; required where it
was not given at compile time), ``overrides`` (``--set`` items), ``beam_args`` (convert's Beam
pipeline options, e.g. ``--runner=DataflowRunner ...``), ``workdir`` (``--workdir``: empty, the
stages write to their artifacts; a shared folder makes the stages write there as ``tfseg run``
does and skip what is complete), and ``pipeline_config``: the loaded pipeline (the YAML, or the
automatic plan's ``--dataset/--budget/--split`` and layout options) as JSON.

Re-running reuses finished stages through KFP's caching (on by default; a stage's cache key is its
inputs and parameters) and, with ``workdir``, through tfseg's own completion markers.

Resources per stage (:data:`RESOURCES`) are requests and limits on the task; ``--accelerator
TYPE[:COUNT]`` asks for accelerators on the fit task only.

No ``from __future__ import annotations`` here: KFP reads the components' annotations as types.
"""

import json
import os
import re

RESOURCES = {
    "convert": {"cpu": "4", "memory": "16G"},  # a Beam DirectRunner; --runner=DataflowRunner moves the work out
    "fit": {"cpu": "8", "memory": "32G"},
    "evaluate": {"cpu": "4", "memory": "16G"},
    "export": {"cpu": "2", "memory": "8G"},
}
PIPELINE_NAME_PREFIX = "tfseg-"


def run_stage(stage: str, pipeline_config: str, overrides: list, input_dir: str, workdir: str,
              inputs: dict, outputs: dict) -> dict:
    """One stage of a compiled pipeline, in its container: the same stage ``tfseg run`` runs.

    Args:
      stage: convert, fit, evaluate or export.
      pipeline_config: the pipeline (JSON); ``overrides`` (``KEY=VALUE``) are applied on top.
      input_dir: the raw dataset.
      workdir: "" to write to the artifacts, or a folder the stages share (``tfseg run``'s layout).
      inputs, outputs: artifact paths by name (``data``, ``model``, ``evaluation``, ``exported``).

    Returns:
      For evaluate: the metrics.json written.

    Raises:
      SystemExit: a stage's TfsegError, as its one line.
    """
    from tfseg import config as config_lib
    from tfseg.errors import TfsegError, safe

    try:
        return _run_stage(stage, config_lib.apply_overrides(json.loads(pipeline_config), list(overrides or [])),
                          input_dir, workdir, inputs, outputs)
    except TfsegError as e:
        # The task fails with the stage's one line (the orchestrator shows the task's log), no traceback.
        raise SystemExit(safe(f"error: tfseg {stage}: {e}")) from None


def _run_stage(stage: str, cfg: dict, input_dir: str, workdir: str, inputs: dict, outputs: dict) -> dict:
    from tfseg import pipeline
    from tfseg.io import fs

    if workdir:
        fs.makedirs(workdir)  # a shared folder: gs:// on Vertex AI

    if workdir:
        paths = pipeline.stage_paths(workdir, cfg)
    else:
        places = {**inputs, **outputs}
        model = places.get("model", "")
        export_name = (cfg.get("export") or {}).get("name") or cfg["dataset"]
        export_base = places.get("exported", "")
        paths = {"data": places.get("data", ""), "run": os.path.join(model, "run"),
                 "plan": os.path.join(model, "plan.yaml"), "eval": places.get("evaluation", ""),
                 "export": export_base, "export_model": os.path.join(export_base, export_name)}
    summary = pipeline.run_stages(cfg, input_dir, paths, [stage])
    return summary.get("metrics") or {}


def _components(image: str):
    from kfp import dsl
    from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

    def convert(pipeline_config: str, overrides: list, input_dir: str, workdir: str, beam_args: list,
                data: Output[Dataset]):
        import json

        from tfseg.kfp_pipeline import run_stage

        cfg = json.loads(pipeline_config)
        cfg["beam_args"] = list(cfg.get("beam_args") or []) + list(beam_args)
        run_stage("convert", json.dumps(cfg), overrides, input_dir, workdir, {}, {"data": data.path})

    def fit(pipeline_config: str, overrides: list, input_dir: str, workdir: str, data: Input[Dataset],
            model: Output[Model]):
        from tfseg.kfp_pipeline import run_stage

        run_stage("fit", pipeline_config, overrides, input_dir, workdir, {"data": data.path}, {"model": model.path})

    def evaluate(pipeline_config: str, overrides: list, input_dir: str, workdir: str, data: Input[Dataset],
                 model: Input[Model], metrics: Output[Metrics], report: Output[Markdown],
                 evaluation: Output[Artifact]):
        import os

        from tfseg.io import fs
        from tfseg.kfp_pipeline import log_metrics, run_stage

        found = run_stage("evaluate", pipeline_config, overrides, input_dir, workdir,
                          {"data": data.path, "model": model.path}, {"evaluation": evaluation.path})
        log_metrics(found, metrics.log_metric)
        source = os.path.join(workdir, "eval", "report.md") if workdir else os.path.join(evaluation.path, "report.md")
        text = fs.read_text(source)
        with open(report.path, "w") as out:  # the artifact: a local file KFP uploads
            out.write(text)

    def export(pipeline_config: str, overrides: list, input_dir: str, workdir: str, model: Input[Model],
               exported: Output[Model]):
        from tfseg.kfp_pipeline import run_stage

        run_stage("export", pipeline_config, overrides, input_dir, workdir, {"model": model.path},
                  {"exported": exported.path})

    # The image holds tfseg[kfp] (README: Dockerfile): no pip install when a task starts.
    make = dsl.component(base_image=image, install_kfp_package=False)
    return make(convert), make(fit), make(evaluate), make(export)


def log_metrics(metrics: dict, log) -> None:
    """metrics.json's headline numbers into a KFP Metrics artifact: ``mean_iou``,
    ``per_image_mean_iou`` and ``iou/CLASS`` for each class present."""
    level = metrics.get("dataset_level") or {}
    if level.get("mean_iou") is not None:
        log("mean_iou", float(level["mean_iou"]))
    per_image = (metrics.get("per_image_mean") or {}).get("mean_iou")
    if per_image is not None:
        log("per_image_mean_iou", float(per_image))
    for name, value in ((level.get("per_class") or {}).get("iou") or {}).items():
        if value is not None:
            log(f"iou/{name}", float(value))


def build_pipeline(cfg: dict, *, image: str, input_dir: str | None = None, overrides=(), accelerator: str | None = None):
    """The KFP pipeline function for a loaded ``tfseg run`` pipeline (:func:`tfseg.pipeline.load_pipeline`
    or :func:`tfseg.pipeline.auto_pipeline`).

    Args:
      cfg: the pipeline; it becomes ``pipeline_config``'s default.
      image: the container image every component runs in.
      input_dir: ``input_dir``'s default (None: a required parameter).
      overrides: ``overrides``' default (``--set`` items given at compile time).
      accelerator: ``TYPE`` or ``TYPE:COUNT`` for the fit task (e.g. ``NVIDIA_TESLA_T4:1``).
    """
    from kfp import dsl

    convert_op, fit_op, evaluate_op, export_op = _components(image)
    source = cfg.get("source", "")
    stem = os.path.splitext(os.path.basename(source))[0] if source.endswith((".yaml", ".yml")) else cfg["dataset"]
    name = PIPELINE_NAME_PREFIX + (re.sub(r"[^a-z0-9]+", "-", str(stem).lower()).strip("-") or "pipeline")
    config_json = json.dumps({k: v for k, v in cfg.items() if k != "source"}, sort_keys=True)

    def tfseg_pipeline(input_dir: str, workdir: str = "", overrides: list = list(overrides),
                       beam_args: list = [], pipeline_config: str = config_json):
        common = dict(pipeline_config=pipeline_config, overrides=overrides, input_dir=input_dir, workdir=workdir)
        c = convert_op(beam_args=beam_args, **common)
        f = fit_op(data=c.outputs["data"], **common)
        e = evaluate_op(data=c.outputs["data"], model=f.outputs["model"], **common)
        x = export_op(model=f.outputs["model"], **common)
        x.after(e)  # tfseg run's order: the export serves what evaluate scored
        for stage, task in (("convert", c), ("fit", f), ("evaluate", e), ("export", x)):
            task.set_display_name(stage)
            task.set_cpu_request(RESOURCES[stage]["cpu"]).set_cpu_limit(RESOURCES[stage]["cpu"])
            task.set_memory_request(RESOURCES[stage]["memory"]).set_memory_limit(RESOURCES[stage]["memory"])
        if accelerator:
            kind, _, count = accelerator.partition(":")
            f.set_accelerator_type(kind).set_accelerator_limit(int(count or 1))

    if input_dir is not None:
        tfseg_pipeline.__defaults__ = (input_dir,) + tfseg_pipeline.__defaults__
    tfseg_pipeline.__name__ = name.replace("-", "_")
    return dsl.pipeline(name=name, description=f"tfseg run {source}: convert -> fit -> evaluate -> export")(
        tfseg_pipeline)


def compile_pipeline(cfg: dict, output: str, **kwargs) -> str:
    """Writes the compiled pipeline YAML to ``output`` (atomically); kwargs as :func:`build_pipeline`.

    Raises:
      TfsegError: kfp is not installed.
    """
    from tfseg.errors import TfsegError

    try:
        from kfp import compiler
    except ImportError:
        raise TfsegError("--compile kfp needs the Kubeflow Pipelines SDK: pip install 'tfseg[kfp]'") from None
    pipeline = build_pipeline(cfg, **kwargs)
    tmp = f"{output}.tmp-{os.getpid()}.yaml"
    try:
        compiler.Compiler().compile(pipeline, tmp)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return output
