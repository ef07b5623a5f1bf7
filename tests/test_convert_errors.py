"""`tfseg convert` misuse and bad data: one line, the right exit code, nothing published, nothing
left behind (issue 9 items 4 and 6). The CLI runs in subprocesses, as a user runs it."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tfseg import schema
from tfseg.errors import TfsegError


def tfseg(*args):
    return [sys.executable, "-c", "from tfseg.cli import main; main()", *args]


def run_all(commands, env=None, timeout=300):
    """Runs the commands concurrently; returns [(rc, stdout, stderr)] in order."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}) for c in commands]
    out = []
    for p in procs:
        o, e = p.communicate(timeout=timeout)
        out.append((p.returncode, o, e))
    return out


def tree_digest(root):
    h = hashlib.sha256()
    for d, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(d, f)
            h.update(os.path.relpath(p, root).encode() + b"\0" + open(p, "rb").read())
    return h.hexdigest()


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (6, 8), dtype=np.uint8)).save(root / "images" / f"c{i}.png")
        Image.fromarray(rng.integers(0, 2, (6, 8)).astype(np.uint8)).save(root / "masks" / f"c{i}.png")
    return str(root)


@pytest.mark.slow  # fast tier at about 3 minutes (issue 31): runs in CI's slow tier
def test_misuse_is_one_line_exit_2_before_any_work(raw, tmp_path):
    out = str(tmp_path / "out")
    base = ["convert", "--dataset", "folder", "--input", raw, "--output", out]
    cases = [
        (["--runner", "NoSuchRunner"], "error: --runner NoSuchRunner: unknown Beam runner; known: direct, dask, "
                                       "dataflow, flink, spark, prism, portable (any case), or a fully qualified "
                                       "PipelineRunner class"),
        (["--imagesize=32x32"], "error: unknown option '--imagesize=32x32': neither tfseg nor Beam's "
                                "PipelineOptions knows it (did you mean --image-size?)"),
        (["--split", "train=nan"], "error: --split: 'train=nan': fraction 'nan' of 'train' must be a finite "
                                   "number >= 0"),
        (["--split", "train=inf,val=1"], "error: --split: 'train=inf,val=1': fraction 'inf' of 'train' must be a "
                                         "finite number >= 0"),
        (["--split", "train=x"], "error: --split: 'train=x': fraction 'x' of 'train' is not a number"),
        (["--split", "../a=1"], "error: --split: '../a=1': split name '../a' must be letters, digits, '_' or '-'"),
        (["--image-size", "100000x100000"], "error: --image-size 100000x100000: 10000000000 pixels exceeds the "
                                            "limit of 67108864 (2**26, e.g. 8192x8192)"),
        (["--direct_num_workers=two"], "error: Beam option: argument --direct_num_workers: invalid int value: "
                                       "'two'"),
        (["--num-classes", "3", "--ignore-index", "1"], "error: --ignore-index 1: is a class id (--num-classes 3); "
                                                        "use a value of 3 or more (e.g. 255)"),
    ]
    # Dataflow without its required options: Beam's validator, in one line (or, without
    # apache-beam[gcp], the runner that cannot load).
    dataflow = ["--runner", "dataflow"]
    # The first two (the issue's own) and Dataflow in subprocesses, as a user runs them; the rest
    # through click's runner in this process (same code path, faster).
    results = run_all([tfseg(*base, *extra) for extra, _ in cases[:2]] + [tfseg(*base, *dataflow)])
    for (extra, expected), (rc, _, err) in zip(cases[:2], results):
        assert rc == 2, (extra, rc, err[-800:])
        assert error_lines(err) == [expected], (extra, err[-800:])
        assert "Traceback" not in err, extra
    from click.testing import CliRunner

    from tfseg.cli import cli

    for extra, expected in cases[2:]:
        res = CliRunner().invoke(cli, base + extra)
        assert res.exit_code == 2, (extra, res.output, res.exception)
        assert error_lines(res.output) == [expected], (extra, res.output)
    rc, _, err = results[-1]
    assert rc == 2 and "Traceback" not in err, err[-800:]
    (line,) = error_lines(err)
    assert (line.startswith("error: --runner DataflowRunner: Missing GCS path option: temp_location;")
            or line.startswith("error: --runner dataflow: cannot load")), line
    assert not os.path.exists(out)


def test_runner_short_names_are_accepted():
    from tfseg.convert.runners import check_beam_args, resolve_runner

    assert resolve_runner("direct") == "DirectRunner"
    assert resolve_runner("DIRECTRUNNER") == "DirectRunner"
    assert resolve_runner("FnApiRunner") == "FnApiRunner"
    assert check_beam_args(["--runner=direct", "--direct_num_workers=2"]) == [
        "--runner=DirectRunner", "--direct_num_workers=2"]
    with pytest.raises(TfsegError, match=r"^unknown option '--no_such_beam_flag'"):
        check_beam_args(["--no_such_beam_flag", "x"])


def test_nothing_converted_exits_1_and_keeps_the_older_output(raw, tmp_path, monkeypatch):
    import tempfile

    from tfseg.convert.pipeline import run_convert

    out = str(tmp_path / "out")
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    run_convert("folder", raw, out, split="train=1")
    assert os.listdir(tmpdir) == []  # no beam-temp*, tmp* or requirements-cache folders left
    before = tree_digest(out)

    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    (bad / "masks").mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((6, 8), np.uint8)).save(bad / "images" / f"b{i}.png")
        Image.fromarray(np.full((6, 8), 5, np.uint8)).save(bad / "masks" / f"b{i}.png")
    (bad / "images" / "junk.png").write_bytes(b"not a png at all")
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(bad / "masks" / "junk.png")
    (rc, _, err), = run_all([tfseg("convert", "--dataset", "folder", "--input", str(bad), "--output", out,
                                   "--num-classes", "2", "--overwrite")], env={"TMPDIR": str(tmpdir)})
    assert rc == 1, err[-1500:]
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"error: {bad}: no case converted, all 4 rejected, nothing was published: ")
    assert "b0.png: label values [5] outside 0..1 (and 2 alike)" in lines[0]
    assert "junk.png: not a decodable image (cannot identify image file)" in lines[0]
    assert " at 0x" not in err  # no object reprs in reasons
    assert tree_digest(out) == before
    assert sorted(os.listdir(tmp_path)) == ["bad", "out", "tmpdir"]  # no staging folder left
    assert os.listdir(tmpdir) == []


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


def test_dataset_json_with_wrong_types_is_one_line_naming_file_and_key(tmp_path):
    good = {"name": "t", "ndim": 2, "channels": 3, "num_classes": 2, "class_names": ["bg", "fg"],
            "splits": {"train": {"count": 1, "files": ["train-00000-of-00001.tfrecord"]}}}
    path = str(tmp_path / "dataset.json")
    write_json(path, good)
    assert schema.load_dataset_info(str(tmp_path)).num_classes == 2
    cases = [
        ({"num_classes": "2"}, f"{path}: key 'num_classes' must be an integer from 1 to 256, got '2'"),
        ({"ndim": 4}, f"{path}: key 'ndim' must be 2 or 3, got 4"),
        ({"class_names": "bg,fg"}, f"{path}: key 'class_names' must be a list of strings, got 'bg,fg'"),
        ({"class_names": ["bg"]}, f"{path}: key 'class_names' must be 2 names (num_classes), got ['bg']"),
        ({"ignore_index": True}, f"{path}: key 'ignore_index' must be an integer 0..255 or null, got True"),
        ({"splits": {"train": {"count": 1, "files": "x.tfrecord"}}},
         f"{path}: key 'splits.train' must be an object {{\"count\": int >= 0, \"files\": [str, ...]}}, "
         "got {'count': 1, 'files': 'x.tfrecord'}"),
        ({"splits": {"train": {"count": 1, "files": ["../../x.tfrecord"]}}},
         f"{path}: key 'splits.train.files' must be file names relative to dataset.json, inside its folder, "
         "got '../../x.tfrecord'"),
        ({"compression": "zip"}, f"{path}: key 'compression' must be \"\" or \"GZIP\", got 'zip'"),
    ]
    for change, message in cases:
        write_json(path, {**good, **change})
        with pytest.raises(TfsegError) as e:
            schema.load_dataset_info(str(tmp_path))
        assert str(e.value) == message
    write_json(path, {k: v for k, v in good.items() if k != "channels"})
    with pytest.raises(TfsegError, match=r"key 'channels' must be a positive integer \(missing\)$"):
        schema.load_dataset_info(str(tmp_path))
    write_json(path, [1, 2])
    with pytest.raises(TfsegError, match="expected a JSON object, got list"):
        schema.load_dataset_info(str(tmp_path))
    with open(path, "w") as f:
        f.write('{"name": ')
    with pytest.raises(TfsegError, match=r"not a valid tfseg dataset.json \(Expecting value, line 1\)"):
        schema.load_dataset_info(str(tmp_path))


def test_an_option_a_layout_without_its_own_init_does_not_take_is_one_line():
    """voc and isic define no __init__ (object's takes *args, **kwargs): the option is still named."""
    from tfseg.convert.pipeline import make_layout
    from tfseg.errors import TfsegError

    for name in ("voc", "isic"):
        with pytest.raises(TfsegError, match=f"--categories does not apply to --dataset {name}"):
            make_layout(name, {"categories": "person"})
