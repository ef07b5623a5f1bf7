"""``tfseg run``: convert -> fit -> evaluate -> export for one pipeline, resumable stage by stage.

A pipeline is a YAML file (``pipelines/NAME.yaml``, installed as ``tfseg.pipelines``) with a
``dataset`` layout name and one section per stage. Each stage writes to a fixed place under the
work directory and is skipped when its complete output is already there, so re-running an
interrupted pipeline picks up where it stopped::

    WORKDIR/data/     convert   complete when dataset.json exists
    WORKDIR/run/      fit       complete when model.keras exists (an unfinished fit resumes)
    WORKDIR/eval/     evaluate  complete when metrics.json exists
    WORKDIR/export/   export    complete when export/NAME/ holds a version

Without a pipeline file (``tfseg run --dataset LAYOUT ...``, :func:`auto_pipeline`) a ``plan``
stage runs between convert and fit: it fingerprints the converted data and writes
``WORKDIR/plan.yaml`` (:mod:`tfseg.plan`), whose ``fit`` and ``evaluate`` sections the later stages
use (``--set`` overrides still apply on top); re-running reads the existing plan.yaml.
"""

from __future__ import annotations

import copy
import importlib.resources
import logging
import os
from typing import Callable, Iterable

from tfseg import config as config_lib
from tfseg.errors import TfsegError
from tfseg.io import fs, locks, publish

log = logging.getLogger(__name__)

STAGES = ("convert", "fit", "evaluate", "export")
_CONVERT_KEYS = {"split", "image_size", "num_shards", "compression", "strict"}


def pipeline_names() -> list[str]:
    """Names of the pipelines shipped with tfseg."""
    files = importlib.resources.files("tfseg.pipelines")
    return sorted(p.name[: -len(".yaml")] for p in files.iterdir() if p.name.endswith(".yaml"))


def load_pipeline(name_or_path: str, overrides: Iterable[str] = ()) -> dict:
    """Loads a shipped pipeline by name, or a YAML file by path, and applies ``--set`` overrides.

    Raises:
      TfsegError: unknown name, unreadable file, or a file without ``dataset``.
    """
    if fs.isfile(name_or_path):
        cfg = config_lib.load_config(name_or_path)
        source = name_or_path if fs.is_remote(name_or_path) else os.path.abspath(name_or_path)
    else:
        if name_or_path not in pipeline_names():
            raise TfsegError(
                f"{name_or_path}: neither a pipeline file nor a shipped pipeline "
                f"({', '.join(pipeline_names())})"
            )
        resource = importlib.resources.files("tfseg.pipelines") / f"{name_or_path}.yaml"
        with importlib.resources.as_file(resource) as path:
            cfg = config_lib.load_config(str(path))
        source = f"tfseg.pipelines/{name_or_path}.yaml"
    cfg = config_lib.apply_overrides(cfg, overrides)
    if not cfg.get("dataset"):
        raise TfsegError(f"{source}: a pipeline needs a `dataset:` layout name")
    cfg["source"] = source
    return cfg


def auto_pipeline(layout: str, *, budget: str = "1h", split: str | None = None,
                  layout_options: dict | None = None, overrides: Iterable[str] = ()) -> dict:
    """A pipeline without a file: convert LAYOUT with its options, then plan, fit, evaluate and
    export with the automatic recipe for ``budget`` of training (see the module docstring).

    Raises:
      TfsegError: a budget that is not a duration.
    """
    from tfseg.config import parse_duration
    from tfseg.convert import get_layout_class

    try:
        get_layout_class(layout)
    except Exception as e:  # noqa: BLE001 - the registry's own message names the choices
        raise TfsegError(f"--dataset {layout}: {e}") from None
    parse_duration(budget)
    convert = {k: v for k, v in (layout_options or {}).items() if v is not None}
    if split:
        convert["split"] = split
    return {"dataset": layout, "convert": convert, "plan": {"budget": budget}, "export": {"name": layout},
            "auto_overrides": list(overrides), "source": f"automatic plan for --dataset {layout}"}


def _plan_stage(cfg: dict, paths: dict) -> None:
    """Writes WORKDIR/plan.yaml (once) and takes its fit/evaluate sections into ``cfg``."""
    from tfseg.plan import run_plan

    section = cfg.get("plan") or {}
    if not fs.isfile(paths["plan"]):
        doc = run_plan(paths["data"], budget=str(section.get("budget", "1h")), output=paths["plan"],
                       flips=str(section.get("flips", "auto")))
        log.info("plan (%s):\n%s", paths["plan"], doc["table"])
    doc = config_lib.load_config(paths["plan"])
    planned = {"fit": doc.get("fit") or {}, "evaluate": doc.get("evaluate") or {}}
    planned = config_lib.apply_overrides(planned, cfg.get("auto_overrides") or [])
    cfg["fit"], cfg["evaluate"] = planned["fit"], planned["evaluate"]


def stage_paths(workdir: str, cfg: dict) -> dict[str, str]:
    export_name = (cfg.get("export") or {}).get("name") or cfg["dataset"]
    return {
        "plan": os.path.join(workdir, "plan.yaml"),
        "data": os.path.join(workdir, "data"),
        "run": os.path.join(workdir, "run"),
        "eval": os.path.join(workdir, "eval"),
        "export": os.path.join(workdir, "export"),
        "export_model": os.path.join(workdir, "export", export_name),
    }


def _stage_done(stage: str, paths: dict[str, str]) -> bool:
    """Whether a stage's complete output exists: each stage's own completion marker."""
    from tfseg import evaluate, export, rundir, schema

    if stage == "convert":
        return fs.isfile(os.path.join(paths["data"], schema.DATASET_JSON))
    if stage == "fit":
        return fs.isfile(os.path.join(paths["run"], rundir.MODEL_FILE))
    if stage == "evaluate":
        return fs.isfile(os.path.join(paths["eval"], evaluate.METRICS_JSON))
    if stage == "export":
        return export.find_version(paths["export_model"]) is not None
    raise ValueError(stage)


@locks.holding_locks
def run_pipeline(
    cfg: dict,
    input_dir: str,
    workdir: str,
    *,
    stages: Iterable[str] = STAGES,
    on_stage: Callable[[str, bool], None] | None = None,
) -> dict:
    """Runs the pipeline's stages in order, skipping those whose complete output exists.

    Args:
      cfg: a loaded pipeline (:func:`load_pipeline`).
      input_dir: the raw dataset in its original layout.
      workdir: where every stage writes (see the module docstring).
      stages: the stages to run, in pipeline order.
      on_stage: called as ``on_stage(stage, skipped)`` before each stage (the CLI prints it).

    Returns:
      A summary: the stage paths, the evaluation metrics and the export version directory.
    """
    workdir = workdir if fs.is_remote(workdir) else os.path.abspath(workdir)
    if not _inside_demo_workdir(input_dir, workdir):
        publish.claim_container(workdir, "run", inputs=[("--input", input_dir)], option="--workdir")
    else:
        publish.claim_container(workdir, "run", option="--workdir")
    locks.acquire_lock(workdir, "run", option="--workdir")  # one `tfseg run` per workdir
    summary = run_stages(cfg, input_dir, stage_paths(workdir, cfg), stages, on_stage=on_stage)
    summary["workdir"] = workdir
    return summary


def run_stages(cfg: dict, input_dir: str, paths: dict[str, str], stages: Iterable[str] = STAGES,
               on_stage: Callable[[str, bool], None] | None = None) -> dict:
    """Runs ``stages`` (in pipeline order) with the stage outputs at ``paths`` (:func:`stage_paths`'
    keys), skipping each whose complete output exists; the automatic plan first where ``cfg`` has
    one. :func:`run_pipeline` runs them in one work directory; a compiled KFP pipeline runs one
    stage per component, each with its artifacts' paths (:mod:`tfseg.kfp_pipeline`).

    Returns:
      A summary: the stage paths, the evaluation metrics and the export version directory.
    """
    wanted = [s for s in STAGES if s in set(stages)]
    summary: dict = {"paths": paths, "skipped": []}
    planned = False
    for stage in wanted:
        if stage != "convert" and "plan" in cfg and not planned:  # the automatic recipe, once
            if on_stage:
                on_stage("plan", fs.isfile(paths["plan"]))
            _plan_stage(cfg, paths)
            planned = True
        done = _stage_done(stage, paths)
        if on_stage:
            on_stage(stage, done)
        if done:
            log.info("%s: complete output exists, skipping", stage)
            summary["skipped"].append(stage)
            continue
        getattr(_Stages, stage)(cfg, input_dir, paths)
    if paths.get("eval") and _stage_done("evaluate", paths):
        import json

        from tfseg.evaluate import METRICS_JSON

        summary["metrics"] = json.loads(fs.read_text(os.path.join(paths["eval"], METRICS_JSON)))
        summary["report"] = os.path.join(paths["eval"], "report.md")
    from tfseg.export.versions import find_version

    found = find_version(paths["export_model"]) if paths.get("export") else None
    if found:
        summary["export"] = found[1]
    return summary


class _Stages:
    """One static method per stage: translate the pipeline section into the stage's call."""

    @staticmethod
    def convert(cfg: dict, input_dir: str, paths: dict) -> None:
        from tfseg.convert.config import ConvertConfig
        from tfseg.convert.pipeline import run_convert

        section = dict(cfg.get("convert") or {})
        kwargs = {k: section.pop(k) for k in list(section) if k in _CONVERT_KEYS}
        if kwargs.get("image_size") is not None:
            kwargs["image_size"] = config_lib.parse_size(kwargs["image_size"])
        run_convert(ConvertConfig.from_dict(dict(
            layout_name=cfg["dataset"], input_dir=input_dir, output_dir=paths["data"], layout_options=section,
            beam_args=list(cfg.get("beam_args") or []), **kwargs,
        )))

    @staticmethod
    def fit(cfg: dict, input_dir: str, paths: dict) -> None:
        from tfseg.fit import run_fit

        fit_cfg = copy.deepcopy(cfg.get("fit") or {})
        fit_cfg.update(data=paths["data"], output=paths["run"])
        run_fit(fit_cfg)

    @staticmethod
    def evaluate(cfg: dict, input_dir: str, paths: dict) -> None:
        from tfseg.evaluate import EvaluateConfig, run_evaluate

        section = cfg.get("evaluate") or {}
        run_evaluate(EvaluateConfig.from_dict(dict(
            run_dir=paths["run"], data_dir=paths["data"], split=section.get("split", "test"), output=paths["eval"],
            num_samples=section.get("samples", 8), tile=section.get("tile", False), tta=section.get("tta", False),
        )))

    @staticmethod
    def export(cfg: dict, input_dir: str, paths: dict) -> None:
        from tfseg.export import ExportConfig, run_export

        section = cfg.get("export") or {}
        # The export serves what evaluate scored: its --tile/--tta unless export: says otherwise.
        scored = cfg.get("evaluate") or {}
        run_export(ExportConfig.from_dict(dict(
            run_dir=paths["run"], export_base=paths["export"], name=section.get("name") or cfg["dataset"],
            tile=section.get("tile", scored.get("tile", False)), tta=section.get("tta", scored.get("tta", False)),
            precision=section.get("precision", "float32"),
        )))


def demo_overrides(cfg: dict) -> list[str]:
    """The pipeline's ``demo.set`` entries as ``key=value`` overrides."""
    import yaml

    sets = (cfg.get("demo") or {}).get("set") or {}
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in sets.items()]


@locks.holding_locks
def run_demo(
    workdir: str,
    *,
    pipeline: str = "carvana",
    overrides: Iterable[str] = (),
    on_stage: Callable[[str, bool], None] | None = None,
) -> dict:
    """Generates sample data for ``pipeline`` and runs it end to end at the demo size.

    Everything lands under ``workdir`` (``raw/`` for the generated dataset, then the stage
    directories). Re-running resumes.
    """
    base = load_pipeline(pipeline)
    cfg = load_pipeline(pipeline, [*demo_overrides(base), *overrides])
    workdir = os.path.abspath(workdir)
    publish.claim_container(workdir, "run", option="--workdir")
    locks.acquire_lock(workdir, "run", option="--workdir")
    raw = os.path.join(workdir, DEMO_RAW)
    count = int((cfg.get("demo") or {}).get("sample_count", 32))
    if publish.owner(raw) != "sample":
        if on_stage:
            on_stage("sample", False)
        write_sample(cfg["dataset"], raw, count=count, seed=0)
    elif on_stage:
        on_stage("sample", True)
    return run_pipeline(cfg, raw, workdir, on_stage=on_stage)


DEMO_RAW = "raw"


def _inside_demo_workdir(input_dir: str, workdir: str) -> bool:
    """The demo's generated data, WORKDIR/raw written by `tfseg sample`, is the one input a
    workdir may hold."""
    return (fs.normalize(input_dir) == fs.normalize(os.path.join(workdir, DEMO_RAW))
            and publish.owner(input_dir) == "sample")


@locks.holding_locks
def write_sample(layout: str, output: str, *, count: int, seed: int) -> None:
    """`tfseg sample`: a layout's synthetic dataset, published as a whole or not at all."""
    from tfseg.convert import samples

    with publish.publish_dir(output, "sample", complete_marker=None) as tmp:
        samples.write(layout, tmp, count, seed)
