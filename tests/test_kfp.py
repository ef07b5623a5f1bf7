"""`tfseg run --compile kfp` (tfseg.kfp_pipeline): the compiled Kubeflow Pipelines YAML loads back
with kfp's own loader and has tfseg run's stages, parameters and artifact types; kfp's local
subprocess runner runs it end to end and gets what `tfseg run` gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tfseg.pipeline import load_pipeline, pipeline_names

kfp = pytest.importorskip("kfp")

ARTIFACT_TYPES = {
    "convert": {"data": "system.Dataset"},
    "fit": {"model": "system.Model"},
    "evaluate": {"metrics": "system.Metrics", "report": "system.Markdown", "evaluation": "system.Artifact"},
    "export": {"exported": "system.Model"},
}


def _compile(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "tfseg.cli", "run", *args], capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _check_graph(spec: dict, cfg: dict, overrides: list, input_dir: str | None) -> None:
    """The compiled pipeline against its tfseg pipeline: stages in order, parameters and defaults,
    artifact types, resources."""
    from tfseg.kfp_pipeline import RESOURCES

    tasks = spec["root"]["dag"]["tasks"]
    assert sorted(tasks) == ["convert", "evaluate", "export", "fit"]
    deps = {name: set(t.get("dependentTasks", [])) for name, t in tasks.items()}
    assert deps == {"convert": set(), "fit": {"convert"}, "evaluate": {"convert", "fit"}, "export": {"evaluate", "fit"}}
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert sorted(params) == ["beam_args", "input_dir", "overrides", "pipeline_config", "workdir"]
    assert json.loads(params["pipeline_config"]["defaultValue"]) == {k: v for k, v in cfg.items() if k != "source"}
    assert params["overrides"]["defaultValue"] == overrides and params["workdir"]["defaultValue"] == ""
    assert params["beam_args"]["defaultValue"] == []
    assert params["input_dir"].get("defaultValue") == input_dir and params["input_dir"].get("isOptional", False) == (
        input_dir is not None)
    for stage, outputs in ARTIFACT_TYPES.items():
        component = spec["components"][tasks[stage]["componentRef"]["name"]]
        got = {k: v["artifactType"]["schemaTitle"] for k, v in component["outputDefinitions"]["artifacts"].items()}
        assert got == outputs, stage
        executor = spec["deploymentSpec"]["executors"][component["executorLabel"]]["container"]
        assert executor["resources"]["resourceCpuLimit"] == RESOURCES[stage]["cpu"], stage
        assert executor["resources"]["resourceMemoryLimit"] == RESOURCES[stage]["memory"], stage
    # Every task passes the pipeline's parameters through.
    for stage, task in tasks.items():
        for name in ("pipeline_config", "overrides", "input_dir", "workdir"):
            assert task["inputs"]["parameters"][name] == {"componentInputParameter": name}, (stage, name)


@pytest.mark.parametrize("name", pipeline_names())
def test_every_shipped_pipeline_compiles_to_its_graph(name, tmp_path):
    from kfp import components

    from tfseg.kfp_pipeline import compile_pipeline

    cfg = load_pipeline(name)
    out = str(tmp_path / f"{name}.yaml")
    compile_pipeline(cfg, out, image="example.org/tfseg:1", overrides=["fit.epochs=2"])
    loaded = components.load_component_from_file(out)  # kfp's own loader takes it back
    assert loaded.name == f"tfseg-{name}".replace("_", "-")
    with open(out) as f:
        spec = yaml.safe_load(f)
    _check_graph(spec, cfg, ["fit.epochs=2"], None)
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"example.org/tfseg:1"}
    # The image holds tfseg[kfp]: a task installs nothing when it starts (no network needed).
    assert not any("pip install" in " ".join(e["container"].get("command", []) + e["container"].get("args", []))
                   for e in spec["deploymentSpec"]["executors"].values())
    assert not [p for p in os.listdir(tmp_path) if p != f"{name}.yaml"]  # no temporary file left


@pytest.mark.slow  # fast tier at about 3 minutes (issue 31): runs in CI's slow tier
def test_cli_compiles_a_planned_pipeline_with_an_accelerator(tmp_path):
    out = tmp_path / "coco.yaml"
    proc = _compile("--dataset", "coco", "--budget", "20m", "--split", "train=0.9,val=0.1", "--categories", "cat,dog",
                    "--set", "fit.batch_size=4", "--compile", "kfp", "--output", str(out), "--image", "tfseg:dev",
                    "--accelerator", "NVIDIA_TESLA_T4:2", "--input", "gs://bucket/coco")
    assert "Kubeflow Pipelines v2 pipeline for automatic plan for --dataset coco" in proc.stdout
    spec = yaml.safe_load(out.read_text())
    from tfseg.pipeline import auto_pipeline

    cfg = auto_pipeline("coco", budget="20m", split="train=0.9,val=0.1", layout_options={"categories": "cat,dog"},
                        overrides=["fit.batch_size=4"])
    _check_graph(spec, cfg, [], "gs://bucket/coco")
    fit = spec["deploymentSpec"]["executors"][spec["components"]["comp-fit"]["executorLabel"]]["container"]
    accelerator = fit["resources"]["accelerator"]
    assert (accelerator["resourceType"], accelerator["resourceCount"]) == ("NVIDIA_TESLA_T4", "2")
    # What only --compile takes, and what a compiled pipeline does not, in one line each.
    for args, message in ((["carvana", "--image", "x", "--input", "i", "--workdir", "w"], "only with --compile kfp"),
                          (["carvana", "--compile", "kfp", "--output", str(tmp_path / "c.yaml")], "needs --output"),
                          (["carvana", "--compile", "kfp", "--output", str(tmp_path / "c.yaml"), "--image", "x",
                            "--workdir", "w"], "--stage/--workdir")):
        proc = subprocess.run([sys.executable, "-m", "tfseg.cli", "run", *args], capture_output=True, text=True)
        assert proc.returncode != 0 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, args


def _run_local(pipeline_yaml: str, root: str, **arguments):
    """Runs a compiled pipeline with kfp's local subprocess runner in a child process (kfp.local
    keeps one session per process); returns (returncode, its output)."""
    script = (
        "import sys, json\n"
        "from kfp import local, components\n"
        "local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=sys.argv[2], enable_caching=True,\n"
        "           cache_root=sys.argv[2] + '/cache')\n"
        "components.load_component_from_file(sys.argv[1])(**json.loads(sys.argv[3]))\n"
    )
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run([sys.executable, "-c", script, pipeline_yaml, root, json.dumps(arguments)],
                          capture_output=True, text=True, env=env)
    return proc.returncode, proc.stdout + proc.stderr


def _task_outputs(root: str, task: str) -> dict:
    """{artifact name: (uri, metadata)} of a task's newest executor output under ``root``."""
    runs = sorted(d for d in os.listdir(root) if d.startswith("tfseg-"))
    with open(os.path.join(root, runs[-1], task, "executor_output.json")) as f:
        arts = json.load(f).get("artifacts", {})
    return {k: (v["artifacts"][0]["uri"], v["artifacts"][0].get("metadata", {})) for k, v in arts.items()}


@pytest.mark.slow  # two pipeline runs (kfp.local and tfseg run) of the carvana sample, then a re-run
def test_local_runner_gets_what_tfseg_run_gets_and_reuses_finished_stages(tmp_path):
    raw = str(tmp_path / "raw")
    subprocess.run([sys.executable, "-m", "tfseg.cli", "sample", "--dataset", "carvana", "--output", raw,
                    "--count", "16"], check=True, capture_output=True)
    sets = ["fit.epochs=2", "fit.image_size=32x48", "fit.batch_size=4", "fit.seed=3", "fit.deterministic=true",
            "fit.model_kwargs={depth: 2, base_filters: 4, batch_norm: true}", "evaluate.samples=2"]
    args = [a for s in sets for a in ("--set", s)]
    pipeline_yaml = str(tmp_path / "carvana.yaml")
    _compile("carvana", "--compile", "kfp", "--output", pipeline_yaml, "--image", "tfseg:test", "--input", raw, *args)
    root = str(tmp_path / "kfp")
    code, log = _run_local(pipeline_yaml, root)
    assert code == 0, log[-4000:]
    _compile("carvana", "--input", raw, "--workdir", str(tmp_path / "work"), *args)
    with open(tmp_path / "work" / "eval" / "metrics.json") as f:
        expected = json.load(f)
    metrics_uri, logged = _task_outputs(root, "evaluate")["metrics"]
    assert logged["mean_iou"] == pytest.approx(expected["dataset_level"]["mean_iou"], abs=1e-6)
    assert logged["per_image_mean_iou"] == pytest.approx(expected["per_image_mean"]["mean_iou"], abs=1e-6)
    for name, value in expected["dataset_level"]["per_class"]["iou"].items():
        assert logged[f"iou/{name}"] == pytest.approx(value, abs=1e-6), name
    report_uri, _ = _task_outputs(root, "evaluate")["report"]
    with open(report_uri) as f, open(tmp_path / "work" / "eval" / "report.md") as g:
        tables = [[line for line in h.read().splitlines() if line.startswith("|")] for h in (f, g)]
        assert tables[0] and tables[0] == tables[1]  # the same per-class tables
    exported, _ = _task_outputs(root, "export")["exported"]
    for base in (exported, str(tmp_path / "work" / "export")):
        meta = json.load(open(os.path.join(base, "carvana", "1", "assets.extra", "tfseg.json")))
        assert meta["class_names"] == ["background", "car"] and meta["image_size"] == [32, 48]
    # Re-running the same pipeline: KFP's local cache answers the finished stages.
    code, log = _run_local(pipeline_yaml, root)
    assert code == 0, log[-4000:]
    executed = [s for s in ("convert", "fit", "evaluate", "export") if f"Executing task \x1b[96m'{s}'" in log
                or f"Executing task '{s}'" in log]
    assert "convert" not in executed and "fit" not in executed, executed
    # A stage failing in the middle fails the pipeline with the stage's one line.
    code, log = _run_local(pipeline_yaml, str(tmp_path / "kfp-bad"), overrides=sets + ["fit.model=nope"])
    assert code != 0
    assert "error: tfseg fit: --model 'nope': unknown model" in log
    assert "Traceback" not in log.split("error: tfseg fit:")[0].rsplit("Executing task", 1)[-1]
