"""`tfseg convert` from gs:// to gs:// against a local GCS emulator (issue 10 item 3).

The emulator (the ``gcp-storage-emulator`` package) runs on a free loopback port for this module
and is stopped at its end. Beam's GCS filesystem honours ``STORAGE_EMULATOR_HOST``; TF's own
gs:// client does not, so these tests fail if any convert path (listing, reading, shards,
rejected.jsonl, dataset.json, the ownership record, publishing) bypasses Beam's FileSystems.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import gcs_client, gcs_emulator, gcs_objects, gcs_upload_tree

from tfseg.convert import samples

pytest.importorskip("gcp_storage_emulator")
pytest.importorskip("google.cloud.storage")

BUCKET = "tfseg-test"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A GCS emulator on 127.0.0.1 with bucket ``tfseg-test``; yields its address."""
    with gcs_emulator(tmp_path_factory.mktemp("gcs"), BUCKET) as host:
        yield host


def _client():
    return gcs_client()


def _upload_tree(local: str, prefix: str) -> None:
    gcs_upload_tree(local, BUCKET, prefix)


def _objects(prefix: str) -> dict[str, bytes]:
    """{name relative to prefix: bytes} of every object under gs://BUCKET/prefix/."""
    return gcs_objects(BUCKET, prefix)


def _local_files(folder: str) -> dict[str, bytes]:
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


def _no_staging_left() -> bool:
    return not [b.name for b in _client().list_blobs(BUCKET) if "/.tfseg-staging-" in "/" + b.name]


@pytest.fixture(scope="module")
def carvana(gcs, tmp_path_factory):
    """12 Carvana-layout cases, local and uploaded to gs://BUCKET/raw; and their local conversion."""
    from tfseg.convert.pipeline import run_convert

    raw = str(tmp_path_factory.mktemp("carvana") / "raw")
    samples.write("carvana", raw, 12, seed=3, image_size=(24, 32))
    _upload_tree(raw, "raw")
    local_out = str(tmp_path_factory.mktemp("carvana") / "local")
    run_convert("carvana", raw, local_out, num_shards=2)
    return raw, local_out


@pytest.mark.slow  # fast tier at about 3 minutes (issue 31): runs in CI's slow tier
def test_cli_convert_gs_to_gs_matches_local(gcs, carvana):
    raw, local_out = carvana
    env = {**os.environ, "STORAGE_EMULATOR_HOST": gcs, "TF_CPP_MIN_LOG_LEVEL": "3"}
    cmd = [sys.executable, "-c", "from tfseg.cli import main; main()", "convert", "--dataset", "carvana",
           "--input", f"gs://{BUCKET}/raw", "--output", f"gs://{BUCKET}/data", "--num-shards", "2"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"-> gs://{BUCKET}/data" in res.stdout

    remote = _objects("data")
    local = _local_files(local_out)
    shards = sorted(f for f in local if ".tfrecord" in f)
    assert len(shards) == 2 * len(json.loads(local["dataset.json"])["splits"]) >= 2  # 2 shards a split
    assert sorted(f for f in remote if ".tfrecord" in f) == shards
    for f in shards:
        assert remote[f] == local[f], f  # byte-identical to the local conversion
    # Nothing else than the output's files; no spill or staging folder left in the bucket.
    assert set(remote) == set(local) == set(shards) | {"dataset.json", "convert.json", "rejected.jsonl",
                                                            ".tfseg-output.json"}
    assert json.loads(remote[".tfseg-output.json"])["stage"] == "convert"
    info_remote, info_local = json.loads(remote["dataset.json"]), json.loads(local["dataset.json"])
    assert info_remote["splits"] == info_local["splits"]
    assert info_remote["class_pixel_counts"] == info_local["class_pixel_counts"]
    assert info_remote["conversion_args"]["input"] == f"gs://{BUCKET}/raw"
    assert sum(v["count"] for v in info_remote["splits"].values()) == 12
    assert remote["rejected.jsonl"] == b""
    assert _no_staging_left()

    # A second run is refused without --overwrite, in one line, before any work.
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: --output gs://{BUCKET}/data: a complete `tfseg convert` output already exists; "
        "pass --overwrite to replace it")
    assert _objects("data") == remote


def test_overwrite_replaces_and_failure_keeps_older_output(gcs, carvana, tmp_path):
    from tfseg.convert.pipeline import NothingConverted, run_convert

    raw, local_out = carvana
    run_convert("carvana", f"gs://{BUCKET}/raw", f"gs://{BUCKET}/ow", num_shards=2)
    first = _objects("ow")
    # --overwrite on a different sample: the old files go, the new ones come.
    run_convert("carvana", f"gs://{BUCKET}/raw", f"gs://{BUCKET}/ow", num_shards=1, overwrite=True)
    second = _objects("ow")
    splits = json.loads(second["dataset.json"])["splits"]
    assert sorted(f for f in second if ".tfrecord" in f) == [f"{s}-00000-of-00001.tfrecord" for s in sorted(splits)]
    assert json.loads(second["dataset.json"])["conversion_args"]["num_shards"] == 1
    assert first.keys() != second.keys()

    # Every case broken: nothing converted, the job fails and the older output stays as it was.
    bucket = _client().bucket(BUCKET)
    for name in sorted(os.listdir(os.path.join(raw, "train")))[:3]:
        bucket.blob(f"broken/train/{name}").upload_from_string(b"not a jpeg")
        stem = name[:-4]
        bucket.blob(f"broken/train_masks/{stem}_mask.gif").upload_from_filename(
            os.path.join(raw, "train_masks", f"{stem}_mask.gif"))
    with pytest.raises(NothingConverted, match="all 3 rejected"):
        run_convert("carvana", f"gs://{BUCKET}/broken", f"gs://{BUCKET}/ow", overwrite=True)
    assert _objects("ow") == second
    assert _no_staging_left()


def test_foreign_and_bad_remote_paths_are_refused(gcs, carvana):
    from tfseg.convert.pipeline import run_convert
    from tfseg.errors import TfsegError

    _client().bucket(BUCKET).blob("foreign/notes.txt").upload_from_string(b"someone's file")
    with pytest.raises(TfsegError, match=r"--output gs://tfseg-test/foreign: is a folder tfseg did not write"):
        run_convert("carvana", f"gs://{BUCKET}/raw", f"gs://{BUCKET}/foreign")
    assert _objects("foreign") == {"notes.txt": b"someone's file"}

    with pytest.raises(TfsegError, match="lies inside --input"):
        run_convert("carvana", f"gs://{BUCKET}/raw", f"gs://{BUCKET}/raw/out")
    with pytest.raises(TfsegError, match="bucket root"):
        run_convert("carvana", f"gs://{BUCKET}/raw", f"gs://{BUCKET}")
    with pytest.raises(TfsegError, match="input folder not found"):
        run_convert("carvana", f"gs://{BUCKET}/absent", f"gs://{BUCKET}/x")
    with pytest.raises(TfsegError, match="the isic layout reads local input only"):
        run_convert("isic", f"gs://{BUCKET}/raw", f"gs://{BUCKET}/x")
    with pytest.raises(TfsegError, match=r"--output ram://x/y: Beam has no filesystem for ram://"):
        run_convert("carvana", f"gs://{BUCKET}/raw", "ram://x/y")
    assert "x" not in {b.name.split("/")[0] for b in _client().list_blobs(BUCKET)}


def test_folder_layout_from_gs_matches_local(gcs, tmp_path):
    from tfseg.convert.pipeline import run_convert

    raw = str(tmp_path / "veins")
    samples.write("folder", raw, 6, seed=1, image_size=(16, 24))
    _upload_tree(raw, "veins")
    local_out = str(tmp_path / "local")
    run_convert("folder", raw, local_out, num_shards=1, split="train=1")
    run_convert("folder", f"gs://{BUCKET}/veins", str(tmp_path / "from_gs"), num_shards=1, split="train=1")
    local, from_gs = _local_files(local_out), _local_files(str(tmp_path / "from_gs"))
    assert local["train-00000-of-00001.tfrecord"] == from_gs["train-00000-of-00001.tfrecord"]
    info = json.loads(from_gs["dataset.json"])
    assert info["channels"] == 1 and info["num_classes"] == 2  # probed and inferred from gs:// files
    assert info["label_mapping"]["num_classes_from_values"]["masks_read"] == 6


def test_staging_of_a_killed_run_is_removed(gcs, carvana):
    import socket as _socket

    from tfseg.convert.pipeline import run_convert

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id no longer alive
    bucket = _client().bucket(BUCKET)
    stale = f".tfseg-staging-killed-{_socket.gethostname()}-{dead.pid}-0123abcd"
    bucket.blob(f"{stale}/.tfseg-output.json").upload_from_string(b'{"stage": "convert"}')
    bucket.blob(f"{stale}/train-00000-of-00001.tfrecord").upload_from_string(b"partial")
    # Not ours (no ownership record), or another host's: left alone.
    bucket.blob(f".tfseg-staging-killed-otherhost-{dead.pid}-0/x").upload_from_string(b"x")
    run_convert("carvana", f"gs://{BUCKET}/raw", f"gs://{BUCKET}/killed", num_shards=1)
    names = {b.name for b in _client().list_blobs(BUCKET)}
    assert not [n for n in names if n.startswith(stale)]
    assert f".tfseg-staging-killed-otherhost-{dead.pid}-0/x" in names
    assert "killed/dataset.json" in names
    bucket.blob(f".tfseg-staging-killed-otherhost-{dead.pid}-0/x").delete()


@pytest.mark.slow
def test_multi_processing_workers_write_to_gs(gcs, carvana):
    """Worker processes (FnApiRunner multi_processing) read and write gs:// through Beam's
    FileSystems too: the same shards as the local conversion."""
    from tfseg.convert.pipeline import run_convert

    raw, local_out = carvana
    run_convert("carvana", f"gs://{BUCKET}/raw", f"gs://{BUCKET}/mp", num_shards=2,
                beam_args=["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    remote, local = _objects("mp"), _local_files(local_out)
    shards = sorted(f for f in local if ".tfrecord" in f)
    assert shards and all(remote[f] == local[f] for f in shards)
    assert _no_staging_left()
