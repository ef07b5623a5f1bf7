"""Fault injection across every stage: bad inputs and misuses, one table.

Each case runs one `tfseg` command and asserts:

- the exit code (2 for a user error, 1 for a data failure such as a conversion that converted
  nothing, non-zero for predict with nothing predicted);
- exactly one line on stderr starting with ``error:``, matching the case's pattern (which names
  the culprit: the file, option or value), and no traceback anywhere in the output;
- no published output: the command's output path holds no completion marker;
- every folder that existed before the command is byte-for-byte unchanged (the inputs, the
  foreign folders, the earlier outputs), except the one the case declares as its own unfinished
  output (a fit that stops on divergence or a corrupt shard keeps its resumable run directory).

The default tier runs the table in-process through click's CliRunner (TensorFlow imported once);
the ``slow`` tier runs the same table as real subprocesses, the way users run them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from typing import Callable

import numpy as np
import pytest

FIT = ["--model", "unet", "--epochs", "1", "--batch-size", "4", "--image-size", "32x32",
       "--set", "model_kwargs.base_filters=4", "--set", "model_kwargs.depth=2", "--set", "verbose=0",
       "--set", "tensorboard=false"]


@dataclasses.dataclass
class Case:
    name: str
    argv: Callable[[dict], list[str]]   # the command, from the fixture's paths
    code: int                           # expected exit code
    pattern: str                        # must appear in the single error line
    output: str | None = None           # fixture key of the path that must not be published
    marker: str | None = None           # the completion marker that must be absent under it
    unfinished_ok: bool = False         # the output may remain as a resumable unfinished folder
    prepare: Callable[[dict], None] | None = None


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _corrupt_shard(p: dict, split: str, key: str) -> None:
    """A copy of the dataset whose ``split`` shard is cut in half, at p[key]."""
    if os.path.isdir(p[key]):
        return
    shutil.copytree(p["data"], p[key])
    info = json.load(open(os.path.join(p[key], "dataset.json")))
    shard = os.path.join(p[key], info["splits"][split]["files"][0])
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2])


def _edited_copy(p: dict, src: str, dst: str, json_file: str, change) -> None:
    """p[dst]: a copy of p[src] whose JSON file ``json_file`` (relative; a ``*`` component matches
    the one version folder) went through ``change(doc)`` (made once per module)."""
    if os.path.isdir(p[dst]):
        return
    shutil.copytree(p[src], p[dst])
    parts = [next(v for v in os.listdir(os.path.join(p[dst], *json_file.split("/")[:i])) if v.isdigit())
             if part == "*" else part for i, part in enumerate(json_file.split("/"))]
    path = os.path.join(p[dst], *parts)
    doc = json.load(open(path))
    change(doc)
    json.dump(doc, open(path, "w"))


def _bad_types(p: dict) -> None:
    _edited_copy(p, "data", "bad_types", "dataset.json", lambda d: d.update(num_classes="two"))


def _junk_raw(p: dict) -> None:
    """A Carvana layout whose every photo is junk: nothing converts."""
    if os.path.isdir(p["junk_raw"]):
        return
    shutil.copytree(p["raw"], p["junk_raw"])
    for name in os.listdir(os.path.join(p["junk_raw"], "train")):
        _write(os.path.join(p["junk_raw"], "train", name), b"not a jpeg at all")


def _unpredictable(p: dict) -> None:
    d = p["bad_inputs"]
    if os.path.isdir(d):
        return
    os.makedirs(os.path.join(d, "folder.png"))
    os.symlink(os.path.join(d, "missing.jpg"), os.path.join(d, "dangling.jpg"))
    _write(os.path.join(d, "broken.png"), b"\x89PNG\r\n\x1a\n broken")


def _only_links(p: dict) -> None:
    d = p["only_links"]
    if os.path.isdir(d):
        return
    os.makedirs(os.path.join(d, "x.png"))
    os.symlink(os.path.join(d, "nothing.jpg"), os.path.join(d, "y.jpg"))


def _fewer_classes(p: dict) -> None:
    """The VOC sample's dataset.json edited to 3 classes; its records hold labels up to 20."""
    def three(d):
        d.update(num_classes=3, class_names=d["class_names"][:3],
                 class_colors=(d.get("class_colors") or [])[:3] or None,
                 class_pixel_counts={s: c[:3] for s, c in d["class_pixel_counts"].items()})

    _edited_copy(p, "voc_data", "voc_3", "dataset.json", three)


def _export_says_3_classes(p: dict) -> None:
    """A copy of the (binary) export whose tfseg.json was edited to 3 classes."""
    _edited_copy(p, "export_model", "export_3", "*/assets.extra/tfseg.json",
                 lambda d: d.update(num_classes=3, class_names=["a", "b", "c"], binary=False, head="softmax",
                                    class_colors=None))


def _huge_run(p: dict) -> None:
    """A copy of the run whose run.json says 100000x100000 (ResourceExhaustedError before)."""
    _edited_copy(p, "run", "huge_run", "run.json", lambda d: d.update(image_size=[100000, 100000]))


def _link_to_data(p: dict) -> None:
    if not os.path.lexists(p["data_link"]):
        os.symlink(p["data"], p["data_link"])


def _nan_run(p: dict) -> None:
    """A finished run whose model.keras holds NaN weights (as a diverged run would)."""
    if os.path.isdir(p["nan_run"]):
        return
    shutil.copytree(p["run"], p["nan_run"])
    import keras

    import tfseg.models  # noqa: F401

    path = os.path.join(p["nan_run"], "model.keras")
    model = keras.saving.load_model(path, compile=False)
    w = model.trainable_weights[0]
    w.assign(np.full(w.shape, np.nan, np.float32))
    model.save(path)


CASES = [
    # --- sample ---
    Case("sample into a foreign folder", lambda p: ["sample", "--dataset", "carvana", "--output", p["foreign"]],
         2, "did not write"),
    Case("sample of an unknown layout", lambda p: ["sample", "--dataset", "nosuch", "--output", p["new"]],
         2, "nosuch", output="new"),
    # --- convert ---
    Case("convert into a foreign folder", lambda p: ["convert", "--dataset", "carvana", "--input", p["raw"],
                                                     "--output", p["foreign"]], 2, "did not write"),
    Case("convert into a foreign folder with --overwrite",
         lambda p: ["convert", "--dataset", "carvana", "--input", p["raw"], "--output", p["foreign"], "--overwrite"],
         2, "did not write"),
    Case("convert onto its input", lambda p: ["convert", "--dataset", "carvana", "--input", p["raw"],
                                              "--output", p["raw"], "--overwrite"], 2, "same folder as --input"),
    Case("convert into a parent of its input", lambda p: ["convert", "--dataset", "carvana", "--input", p["raw"],
                                                          "--output", p["root"], "--overwrite"], 2, "contains --input"),
    Case("convert inside its input", lambda p: ["convert", "--dataset", "carvana", "--input", p["raw"],
                                                "--output", os.path.join(p["raw"], "out")], 2, "lies inside --input"),
    Case("convert under a file", lambda p: ["convert", "--dataset", "carvana", "--input", p["raw"],
                                            "--output", os.path.join(p["file"], "out")], 2, "is a file"),
    Case("convert onto a file", lambda p: ["convert", "--dataset", "carvana", "--input", p["raw"],
                                           "--output", p["file"]], 2, "not a folder"),
    Case("convert over a complete dataset", lambda p: ["convert", "--dataset", "carvana", "--input", p["raw"],
                                                       "--output", p["data"]], 2, "already exists"),
    Case("convert over an evaluation", lambda p: ["convert", "--dataset", "carvana", "--input", p["raw"],
                                                  "--output", p["eval"], "--overwrite"], 2, "tfseg evaluate"),
    Case("convert with an unknown runner", lambda p: ["convert", "--dataset", "carvana", "--input", p["raw"],
                                                      "--output", p["new"], "--runner", "NoSuchRunner"],
         2, "NoSuchRunner", output="new"),
    Case("convert with a misspelled flag", lambda p: ["convert", "--dataset", "carvana", "--input", p["raw"],
                                                      "--output", p["new"], "--imagesize=32x32"],
         2, "imagesize", output="new"),
    Case("convert with a NaN split", lambda p: ["convert", "--dataset", "carvana", "--input", p["raw"],
                                                "--output", p["new"], "--split", "train=nan"],
         2, "--split", output="new"),
    Case("convert to a huge image size", lambda p: ["convert", "--dataset", "carvana", "--input", p["raw"],
                                                    "--output", p["new"], "--image-size", "100000x100000"],
         2, "--image-size", output="new"),
    Case("convert a missing input", lambda p: ["convert", "--dataset", "carvana", "--input", p["missing"],
                                               "--output", p["new"]], 2, "missing", output="new"),
    Case("convert an unknown layout", lambda p: ["convert", "--dataset", "nosuch", "--input", p["raw"],
                                                 "--output", p["new"]], 2, "nosuch", output="new"),
    Case("convert from a filesystem Beam does not know", lambda p: ["convert", "--dataset", "carvana", "--input",
                                                                    "ram://tfseg-faults/raw", "--output", p["new"]],
         2, "Beam has no filesystem for ram://", output="new"),
    Case("convert into a bucket root", lambda p: ["convert", "--dataset", "carvana", "--input", p["raw"],
                                                  "--output", "gs://tfseg-faults-bucket"], 2, "bucket root"),
    Case("convert where every case is rejected, over a good dataset",
         lambda p: ["convert", "--dataset", "carvana", "--input", p["junk_raw"], "--output", p["data"],
                    "--overwrite"], 1, "no case", prepare=_junk_raw),
    # --- fit ---
    Case("fit into a foreign folder", lambda p: ["fit", "--data", p["data"], "--output", p["foreign"], *FIT],
         2, "did not write"),
    Case("fit onto its dataset", lambda p: ["fit", "--data", p["data"], "--output", p["data"], *FIT],
         2, "same folder as --data"),
    Case("fit inside its dataset", lambda p: ["fit", "--data", p["data"], "--output",
                                              os.path.join(p["data"], "run"), *FIT], 2, "lies inside --data"),
    Case("fit into an evaluation", lambda p: ["fit", "--data", p["data"], "--output", p["eval"], *FIT],
         2, "tfseg evaluate"),
    Case("fit with an unknown loss", lambda p: ["fit", "--data", p["data"], "--output", p["new"], *FIT,
                                                "--loss", "nosuch"], 2, "nosuch", output="new"),
    Case("fit with bce on a multi-class dataset", lambda p: ["fit", "--data", p["voc_data"], "--output", p["new"],
                                                              *FIT, "--loss", "bce"], 2, "binary", output="new"),
    Case("fit with an unknown loss option", lambda p: ["fit", "--data", p["data"], "--output", p["new"], *FIT,
                                                       "--set", "loss_kwargs.x=1"], 2, "'x'", output="new"),
    Case("fit with a NaN learning rate", lambda p: ["fit", "--data", p["data"], "--output", p["new"], *FIT,
                                                    "--learning-rate", "nan"], 2, "learning_rate", output="new"),
    Case("fit with negative early stopping", lambda p: ["fit", "--data", p["data"], "--output", p["new"], *FIT,
                                                        "--early-stopping", "-1"], 2, "early_stopping", output="new"),
    Case("fit at a huge image size", lambda p: ["fit", "--data", p["data"], "--output", p["new"], *FIT,
                                                "--image-size", "100000x100000"], 2, "--image-size", output="new"),
    Case("fit with an unknown model option", lambda p: ["fit", "--data", p["data"], "--output", p["new"], *FIT,
                                                        "--set", "model_kwargs.nosuch=1"], 2, "nosuch", output="new"),
    Case("fit an unknown model", lambda p: ["fit", "--data", p["data"], "--output", p["new"], *FIT,
                                            "--model", "nosuch"], 2, "nosuch", output="new"),
    Case("fit on a folder without dataset.json", lambda p: ["fit", "--data", p["raw"], "--output", p["new"], *FIT],
         2, "dataset.json", output="new"),
    Case("fit on a dataset.json with wrong types", lambda p: ["fit", "--data", p["bad_types"], "--output",
                                                              p["new"], *FIT], 2, "num_classes", output="new",
         prepare=_bad_types),
    Case("fit on a truncated shard", lambda p: ["fit", "--data", p["bad_train"], "--output", p["new"], *FIT],
         2, "train-", output="new", marker="model.keras", unfinished_ok=True,
         prepare=lambda p: _corrupt_shard(p, "train", "bad_train")),
    Case("fit on a dataset.json edited to fewer classes than its labels",
         lambda p: ["fit", "--data", p["voc_3"], "--output", p["new"], *FIT], 2, "says 3 classes, but the records hold "
         "labels outside 0..2 and 255", output="new", marker="model.keras", unfinished_ok=True,
         prepare=_fewer_classes),
    Case("fit that diverges", lambda p: ["fit", "--data", p["data"], "--output", p["new"], *FIT,
                                         "--optimizer", "sgd", "--learning-rate", "1e30", "--precision", "float32"],
         2, "diverged", output="new", marker="model.keras", unfinished_ok=True),
    Case("fit with batch size 0", lambda p: ["fit", "--data", p["data"], "--output", p["new"], *FIT,
                                             "--batch-size", "0"], 2, "batch_size", output="new"),
    # --- evaluate ---
    Case("evaluate onto its dataset", lambda p: ["evaluate", "--run", p["run"], "--data", p["data"], "--split",
                                                 "val", "--output", p["data"], "--overwrite"], 2, "--data"),
    Case("evaluate onto its run", lambda p: ["evaluate", "--run", p["run"], "--data", p["data"], "--split",
                                             "val", "--output", p["run"], "--overwrite"], 2, "--run"),
    Case("evaluate into a foreign folder", lambda p: ["evaluate", "--run", p["run"], "--data", p["data"],
                                                      "--split", "val", "--output", p["foreign"]], 2, "did not write"),
    Case("evaluate a folder that is no run", lambda p: ["evaluate", "--run", p["raw"], "--data", p["data"],
                                                        "--output", p["new"]], 2, "run.json", output="new"),
    Case("evaluate an unknown split", lambda p: ["evaluate", "--run", p["run"], "--data", p["data"], "--split",
                                                 "nosuch", "--output", p["new"]], 2, "nosuch", output="new"),
    Case("evaluate on a truncated shard", lambda p: ["evaluate", "--run", p["run"], "--data", p["bad_val"],
                                                     "--split", "val", "--output", p["new"]], 2, "val-",
         output="new", marker="metrics.json", prepare=lambda p: _corrupt_shard(p, "val", "bad_val")),
    Case("evaluate a model with NaN weights", lambda p: ["evaluate", "--run", p["nan_run"], "--data", p["data"],
                                                         "--split", "val", "--output", p["new"]], 2, "NaN",
         output="new", prepare=_nan_run),
    Case("evaluate an export with --tta", lambda p: ["evaluate", "--model", p["export_model"], "--data", p["data"],
                                                     "--split", "val", "--tta", "--output", p["new"]], 2,
         "--tile/--tta", output="new"),
    Case("evaluate with neither --run nor --model", lambda p: ["evaluate", "--data", p["data"], "--split", "val",
                                                               "--output", p["new"]], 2, "one of --run", output="new"),
    Case("evaluate an export onto itself", lambda p: ["evaluate", "--model", p["export_model"], "--data", p["data"],
                                                      "--split", "val", "--output", p["export_model"]], 2, "--model"),
    # --- export ---
    Case("export into its run", lambda p: ["export", "--run", p["run"], "--output", p["run"], "--name", "m"],
         2, "--run"),
    Case("export inside its run", lambda p: ["export", "--run", p["run"], "--output",
                                             os.path.join(p["run"], "exports"), "--name", "m"], 2, "lies inside --run"),
    Case("export into a foreign folder", lambda p: ["export", "--run", p["run"], "--output", p["foreign"],
                                                    "--name", "m"], 2, "did not write"),
    Case("export under a bad name", lambda p: ["export", "--run", p["run"], "--output", p["new"], "--name", "a/b"],
         2, "--name", output="new"),
    Case("export a model with NaN weights", lambda p: ["export", "--run", p["nan_run"], "--output", p["new"],
                                                       "--name", "m"], 2, "NaN", output="new", prepare=_nan_run),
    Case("export over an existing version", lambda p: ["export", "--run", p["run"], "--output", p["exports"],
                                                       "--name", "m", "--version", "1"], 2, "already exists"),
    # --- predict ---
    Case("predict onto its input", lambda p: ["predict", "--model", p["export_model"], "--input", p["photos"],
                                              "--output", p["photos"], "--overwrite"], 2, "same folder as --input"),
    Case("predict into a foreign folder", lambda p: ["predict", "--model", p["export_model"], "--input",
                                                     p["photos"], "--output", p["foreign"]], 2, "did not write"),
    Case("predict where nothing can be read", lambda p: ["predict", "--model", p["export_model"], "--input",
                                                         p["bad_inputs"], "--output", p["new"]], 2, "broken.png",
         output="new", marker="predict_summary.json", prepare=_unpredictable),
    Case("predict a folder of links and folders", lambda p: ["predict", "--model", p["export_model"], "--input",
                                                             p["only_links"], "--output", p["new"]], 2, "no images",
         output="new", prepare=_only_links),
    Case("predict with a folder that is no model", lambda p: ["predict", "--model", p["raw"], "--input",
                                                              p["photos"], "--output", p["new"]], 2, "raw",
         output="new"),
    Case("predict from a run into an export's name folder",
         lambda p: ["predict", "--model", p["run"], "--input", p["photos"], "--output",
                    os.path.join(p["export_model"], "7")], 2, "an output of `tfseg export`"),
    Case("predict with a tfseg.json that says more classes than the model has",
         lambda p: ["predict", "--model", p["export_3"], "--input", p["photos"], "--output", p["new"]], 2,
         "the model outputs 1 channel(s), but", output="new", prepare=_export_says_3_classes),
    Case("predict with a run.json whose size is huge",
         lambda p: ["predict", "--model", p["huge_run"], "--input", p["photos"], "--output", p["new"]], 2,
         "image_size: size 100000x100000 exceeds", output="new", prepare=_huge_run),
    Case("convert --overwrite onto a symlink to an earlier dataset",
         lambda p: ["convert", "--dataset", "carvana", "--input", p["raw"], "--output", p["data_link"], "--overwrite"],
         2, "is a symbolic link", prepare=_link_to_data),
    # --- run ---
    Case("run with the input inside the workdir", lambda p: ["run", "carvana", "--input", p["data"], "--workdir",
                                                             p["root"]], 2, "contains --input"),
    Case("run into a foreign workdir", lambda p: ["run", "carvana", "--input", p["raw"], "--workdir", p["foreign"]],
         2, "did not write"),
    Case("run an unknown pipeline", lambda p: ["run", "nosuch", "--input", p["raw"], "--workdir", p["new"]],
         2, "nosuch", output="new"),
    Case("run without a pipeline or --dataset", lambda p: ["run", "--input", p["raw"], "--workdir", p["new"]],
         2, "PIPELINE", output="new"),
    Case("run a pipeline with --budget", lambda p: ["run", "carvana", "--input", p["raw"], "--workdir", p["new"],
                                                    "--budget", "1h"], 2, "--budget", output="new"),
    Case("run --dataset of an unknown layout", lambda p: ["run", "--dataset", "nosuch", "--input", p["raw"],
                                                          "--workdir", p["new"]], 2, "nosuch", output="new"),
    Case("run --dataset with a budget that is no duration",
         lambda p: ["run", "--dataset", "carvana", "--input", p["raw"], "--workdir", p["new"], "--budget", "soon"],
         2, "--budget 'soon'", output="new"),
    # --- plan and budgets ---
    Case("fit with a budget that is no duration", lambda p: ["fit", "--data", p["data"], "--output", p["new"], *FIT,
                                                             "--budget", "soon"], 2, "budget", output="new"),
    Case("plan with a zero budget", lambda p: ["plan", "--data", p["data"], "--budget", "0m"], 2, "--budget '0m'"),
    Case("plan a folder without dataset.json", lambda p: ["plan", "--data", p["raw"]], 2, "dataset.json"),
    Case("plan written inside its dataset", lambda p: ["plan", "--data", p["data"], "--output",
                                                       os.path.join(p["data"], "plan.yaml")], 2, "inside --data"),
    Case("plan written onto a folder", lambda p: ["plan", "--data", p["data"], "--output", p["foreign"]],
         2, "is a folder"),
]


def _checksum(root: str) -> dict[str, str]:
    out = {}
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files) + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
            path = os.path.join(d, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = "link:" + os.readlink(path)
            else:
                out[rel] = hashlib.sha256(open(path, "rb").read()).hexdigest()
        for name in dirs:
            out.setdefault(os.path.relpath(os.path.join(d, name), root) + "/", "dir")
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A workspace with every kind of folder a user has: raw data, a dataset, a run, an evaluation,
    an export, photos, a foreign folder with a thesis in it, a plain file."""
    from tfseg.convert.pipeline import run_convert
    from tfseg.evaluate import run_evaluate
    from tfseg.export import run_export
    from tfseg.fit import run_fit
    from tfseg.pipeline import write_sample

    root = str(tmp_path_factory.mktemp("world"))
    p = {k: os.path.join(root, k) for k in (
        "raw", "data", "run", "eval", "exports", "photos", "foreign", "file", "new", "missing", "voc_raw",
        "voc_data", "bad_train", "bad_val", "bad_types", "junk_raw", "bad_inputs", "only_links", "nan_run", "voc_3",
        "data_link", "export_3", "huge_run")}
    p["root"] = root
    write_sample("carvana", p["raw"], count=16, seed=0)
    run_convert("carvana", p["raw"], p["data"])
    write_sample("voc", p["voc_raw"], count=6, seed=0)
    run_convert("voc", p["voc_raw"], p["voc_data"])
    run_fit({"data": p["data"], "output": p["run"], "model": "unet", "epochs": 1, "batch_size": 4,
             "image_size": "32x32", "model_kwargs": {"base_filters": 4, "depth": 2}, "verbose": 0,
             "tensorboard": False})
    run_evaluate(p["run"], p["data"], "val", p["eval"], num_samples=0)
    run_export(p["run"], p["exports"], "m")
    p["export_model"] = os.path.join(p["exports"], "m")
    os.makedirs(p["photos"])
    for name in sorted(os.listdir(os.path.join(p["raw"], "train")))[:2]:
        shutil.copy(os.path.join(p["raw"], "train", name), p["photos"])
    os.makedirs(p["foreign"])
    _write(os.path.join(p["foreign"], "thesis.txt"), b"four years of work")
    _write(p["file"], b"a plain file")
    return p


def _run_inprocess(argv: list[str]) -> tuple[int, str]:
    from click.testing import CliRunner

    from tfseg.cli import cli

    result = CliRunner().invoke(cli, argv, catch_exceptions=True)
    text = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        text += "".join(traceback.format_exception(result.exception))
    return result.exit_code, text


def _run_subprocess(argv: list[str]) -> tuple[int, str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-m", "tfseg.cli", *argv], capture_output=True, text=True,
                          env=env, timeout=300)
    return proc.returncode, proc.stderr + proc.stdout


def _check(world: dict, case: Case, run) -> None:
    if case.prepare:
        case.prepare(world)
    out = world[case.output] if case.output else None
    if out:
        shutil.rmtree(out, ignore_errors=True)
    before = _checksum(world["root"])
    code, text = run(case.argv(world))

    assert "Traceback" not in text, f"{case.name}: a traceback\n{text}"
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"{case.name}: expected one error line, got\n{text}"
    assert case.pattern in errors[0], f"{case.name}: {errors[0]!r} does not name {case.pattern!r}"
    assert code == case.code, f"{case.name}: exit {code}, expected {case.code}: {errors[0]}"

    after = _checksum(world["root"])
    if out:
        rel = os.path.relpath(out, world["root"])
        mine = {k for k in after if k == rel + "/" or k.startswith(rel + "/")}
        if case.unfinished_ok:
            assert not os.path.exists(os.path.join(out, case.marker or "model.keras")), f"{case.name}: published"
        else:
            assert not mine, f"{case.name}: wrote {sorted(mine)[:5]}"
        after = {k: v for k, v in after.items() if k not in mine}
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"{case.name}: changed {changed[:8]}"
    if out and os.path.isdir(out):
        shutil.rmtree(out)


def test_the_table_covers_every_command_that_writes():
    """Every CLI command that writes an output (the registry, not a list here) has misuse cases;
    case names are unique (they are the test ids) and each names what its line must say."""
    from tfseg.cli import cli

    keys = ("raw", "data", "run", "eval", "exports", "photos", "foreign", "file", "new", "missing", "voc_data",
            "bad_train", "bad_val", "bad_types", "junk_raw", "bad_inputs", "only_links", "nan_run", "export_model",
            "root", "voc_3", "data_link", "export_3", "huge_run")
    commands = {c.argv({k: "x" for k in keys})[0] for c in CASES}
    read_only = {"env", "demo"}  # env writes nothing; demo writes its own sample data (test_pipelines)
    assert commands == set(cli.commands) - read_only
    assert len({c.name for c in CASES}) == len(CASES)
    assert all(c.pattern and c.code in (1, 2) for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault(world, case):
    _check(world, case, _run_inprocess)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault_in_a_subprocess(world, case):
    _check(world, case, _run_subprocess)


def test_served_graph_rejects_non_image_bytes_with_invalid_argument(world):
    """WebP and high bytes: InvalidArgument with a printable message, not UnicodeDecodeError."""
    import tensorflow as tf

    from tfseg.export import list_versions

    version = list_versions(world["export_model"])[-1]
    loaded = tf.saved_model.load(os.path.join(world["export_model"], str(version)))
    serve = loaded.signatures["serving_default"]
    for junk in (b"RIFF\x24\x00\x00\x00WEBPVP8 " + bytes(range(200, 256)), bytes([0xFF, 0xFE, 0x80, 0x81] * 8)):
        with pytest.raises(tf.errors.InvalidArgumentError) as e:
            serve(tf.constant([junk]))
        message = str(e.value)
        assert "not a JPEG, PNG, GIF or BMP image" in message
        message.encode("utf-8")  # printable by a client
