"""Beam jobs on a dask.distributed cluster (a scheduler and two worker processes on loopback,
started here; issue 24): `tfseg predict --runner dask` writes what the local predictor writes,
and convert and predict read and write gs:// through the DaskRunner's workers against a GCS
emulator (the workers get STORAGE_EMULATOR_HOST; TF's gs:// client ignores it, so any path that
bypasses Beam's FileSystems fails here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import dask_cluster as local_dask_cluster
from helpers import gcs_client, gcs_emulator, gcs_objects, gcs_upload_tree, make_run
from PIL import Image

from tfseg.convert import samples

pytest.importorskip("distributed")

pytestmark = pytest.mark.slow

BUCKET = "tfseg-dask"


def tfseg(*args):
    return [sys.executable, "-c", "from tfseg.cli import main; main()", *args]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A GCS emulator on 127.0.0.1 with bucket BUCKET (None when the emulator is not installed)."""
    try:
        import gcp_storage_emulator  # noqa: F401
        import google.cloud.storage  # noqa: F401
    except ImportError:
        yield None
        return
    with gcs_emulator(tmp_path_factory.mktemp("gcs"), BUCKET) as host:
        yield host


def _client():
    return gcs_client()


def _objects(prefix: str) -> dict[str, bytes]:
    return gcs_objects(BUCKET, prefix)


def _upload_tree(local: str, prefix: str) -> None:
    gcs_upload_tree(local, BUCKET, prefix)


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory, gcs):
    """A dask scheduler and two worker processes (1 thread each) on 127.0.0.1, with the
    emulator's address in their environment; yields the scheduler file."""
    with local_dask_cluster(tmp_path_factory.mktemp("dask"), {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}) as f:
        yield f


@pytest.fixture(scope="module")
def model_and_images(tmp_path_factory):
    """An export of a tiny 3-class model, and 7 images of mixed sizes (one grayscale) + one broken."""
    from tfseg import export

    root = tmp_path_factory.mktemp("predict")
    run, _ = make_run(root / "run", num_classes=3)
    export.run_export(run, str(root / "models"), "tiny")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(7)
    for i in range(7):
        shape = (20 + 3 * i, 30 - 2 * i) + (() if i == 3 else (3,))
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(images / f"im{i}.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return str(root / "models" / "tiny"), str(images)


def predict(model, inp, out, *extra, env=None):
    res = subprocess.run(tfseg("predict", "--model", model, "--input", inp, "--output", out, "--batch-size", "3",
                               "--overlay", *extra), capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    return res


def files(folder):
    """{relative path: bytes} of what predict wrote (the summary, its settings and the ownership
    record apart: they name the runner and the paths)."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), folder)
            if not n.startswith(".") and n not in ("predict_summary.json", "predict.json"):
                out[rel] = open(os.path.join(root, n), "rb").read()
    return out


def test_predict_on_dask_writes_what_the_local_predictor_writes(model_and_images, dask_cluster, tmp_path):
    model, images = model_and_images
    local, dask = str(tmp_path / "local"), str(tmp_path / "dask")
    predict(model, images, local)
    predict(model, images, dask, "--runner", "dask", f"--beam-arg=--dask_scheduler_file={dask_cluster}")
    want, got = files(local), files(dask)
    assert len([f for f in want if f.endswith(".png") and "/" not in f]) == 7  # 7 masks, broken.jpg failed
    assert sorted(got) == sorted(want)
    for rel, data in want.items():
        assert got[rel] == data, f"{rel} differs from the local predictor's"
    s_local = json.load(open(os.path.join(local, "predict_summary.json")))
    s_dask = json.load(open(os.path.join(dask, "predict_summary.json")))
    assert s_dask["written"] == s_local["written"] == 7
    assert [os.path.basename(f["input"]) for f in s_dask["failed"]] == ["broken.jpg"]
    assert s_dask["failed"] == s_local["failed"]
    assert not [n for n in os.listdir(dask) if n.startswith(".beam-results")]


def test_predict_on_dask_gs_to_gs(model_and_images, dask_cluster, gcs, tmp_path):
    if gcs is None:
        pytest.skip("gcp-storage-emulator / google-cloud-storage not installed")
    model, images = model_and_images
    _upload_tree(images, "images")
    local = str(tmp_path / "local")
    predict(model, images, local)
    predict(model, f"gs://{BUCKET}/images", f"gs://{BUCKET}/masks", "--runner", "dask",
            f"--beam-arg=--dask_scheduler_file={dask_cluster}", env={"STORAGE_EMULATOR_HOST": gcs})
    remote = _objects("masks")
    want = files(local)
    assert {k for k in remote if not k.startswith(".") and k not in ("predict_summary.json", "predict.json")} == set(want)
    for rel, data in want.items():
        assert remote[rel] == data, rel
    summary = json.loads(remote["predict_summary.json"])
    assert summary["written"] == 7 and summary["input"] == f"gs://{BUCKET}/images"
    assert [f["input"] for f in summary["failed"]] == [f"gs://{BUCKET}/images/broken.jpg"]
    assert not [b.name for b in _client().list_blobs(BUCKET) if ".tfseg-staging-" in b.name or ".beam-results"
                in b.name]


def test_convert_on_dask_gs_to_gs(dask_cluster, gcs, tmp_path):
    if gcs is None:
        pytest.skip("gcp-storage-emulator / google-cloud-storage not installed")

    raw = str(tmp_path / "raw")
    samples.write("carvana", raw, 12, seed=3, image_size=(24, 32))
    with open(os.path.join(raw, "train", sorted(os.listdir(os.path.join(raw, "train")))[5]), "wb") as f:
        f.write(b"not a jpeg")
    _upload_tree(raw, "raw")
    local = str(tmp_path / "local")
    common = ["convert", "--dataset", "carvana", "--num-shards", "2"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "STORAGE_EMULATOR_HOST": gcs}
    res = subprocess.run(tfseg(*common, "--input", raw, "--output", local), capture_output=True, text=True,
                         timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run(tfseg(*common, "--input", f"gs://{BUCKET}/raw", "--output", f"gs://{BUCKET}/data",
                               "--runner", "dask", f"--dask_scheduler_file={dask_cluster}"),
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    remote = _objects("data")
    want = {f: open(os.path.join(local, f), "rb").read() for f in os.listdir(local)}
    shards = sorted(f for f in want if ".tfrecord" in f)
    assert len(shards) >= 2 and sorted(f for f in remote if ".tfrecord" in f) == shards
    for f in shards:
        assert remote[f] == want[f], f  # byte-identical to the local conversion
    assert set(remote) == set(want)  # no _records/ fragments or scratch files left
    info, info_local = json.loads(remote["dataset.json"]), json.loads(want["dataset.json"])
    for key in ("splits", "class_pixel_counts", "size_summary"):
        assert info[key] == info_local[key], key
    rejected = [json.loads(line) for line in remote["rejected.jsonl"].decode().splitlines()]
    assert len(rejected) == 1 and rejected[0]["file"].startswith(f"gs://{BUCKET}/raw/train/")
    assert not [b.name for b in _client().list_blobs(BUCKET) if ".tfseg-staging-" in b.name]
