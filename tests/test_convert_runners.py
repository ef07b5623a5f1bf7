"""The convert job on distributed Beam engines (issue 10 item 4): Beam's DaskRunner against a
dask.distributed cluster (a scheduler and two worker processes on loopback, started here) and
the FnApiRunner in multi_processing mode write the DirectRunner's shards byte for byte (slow).

Fast: the pieces that make the shards the same whatever the runner (issue 24): batches of one
shard each in case-id order, fragments, and TFRecord framing without TensorFlow equal to TF's."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import dask_cluster as local_dask_cluster
from tfseg.convert.base import Case


def tfseg(*args):
    return [sys.executable, "-c", "from tfseg.cli import main; main()", *args]


def shard_bytes(out):
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out)) if ".tfrecord" in f}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """8 cases (one undecodable) with multi-class masks: rejections and statistics travel too."""
    root = tmp_path_factory.mktemp("raw")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(4)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(root / "images" / f"c{i}.png")
        m = rng.integers(0, 3, (12, 16)).astype(np.uint8)
        Image.fromarray(m).save(root / "masks" / f"c{i}.png")
    (root / "images" / "c7.png").write_bytes(b"broken")
    return str(root)


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """A dask scheduler and two worker processes on 127.0.0.1; yields the scheduler file."""
    pytest.importorskip("distributed")
    with local_dask_cluster(tmp_path_factory.mktemp("dask")) as f:
        yield f


def convert(raw, out, *extra):
    res = subprocess.run(tfseg("convert", "--dataset", "folder", "--input", raw, "--output", out,
                               "--split", "train=0.5,val=0.5", "--num-shards", "2", *extra),
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_dask_and_multiprocessing_write_the_direct_runners_shards(raw, dask_cluster, tmp_path):
    ref = str(tmp_path / "direct")
    convert(raw, ref)
    expected = shard_bytes(ref)
    assert len(expected) == 4
    with open(os.path.join(ref, "dataset.json")) as f:
        ref_info = json.load(f)
    with open(os.path.join(ref, "rejected.jsonl")) as f:
        ref_rejected = f.read()
    assert "c7.png" in ref_rejected

    runs = {
        "dask": ["--runner", "dask", f"--dask_scheduler_file={dask_cluster}"],
        "multi_processing": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    }
    for name, extra in runs.items():
        out = str(tmp_path / name)
        res = convert(raw, out, *extra)
        assert "Traceback" not in res.stderr, name
        got = shard_bytes(out)
        assert sorted(got) == sorted(expected), name
        for shard, data in expected.items():
            assert got[shard] == data, f"{name}: {shard} differs from the DirectRunner's"
        with open(os.path.join(out, "dataset.json")) as f:
            info = json.load(f)
        for key in ("splits", "class_pixel_counts", "size_summary", "num_classes", "class_names"):
            assert info[key] == ref_info[key], (name, key)
        with open(os.path.join(out, "rejected.jsonl")) as f:
            assert f.read() == ref_rejected, name
        assert not os.path.exists(os.path.join(out, "_records")), name


@pytest.mark.slow
def test_fully_qualified_dask_runner_name_is_accepted():
    pytest.importorskip("distributed")
    from tfseg.convert.runners import check_beam_args, resolve_runner

    qualified = "apache_beam.runners.dask.dask_runner.DaskRunner"
    assert resolve_runner("dask") == qualified
    assert resolve_runner("DaskRunner") == qualified
    assert resolve_runner(qualified) == qualified
    # DaskOptions become known once the runner's module is loaded.
    assert check_beam_args(["--runner", "Dask", "--dask_npartitions=3"]) == [
        "--runner", qualified, "--dask_npartitions=3"]
    assert check_beam_args(["--dask_npartitions=3"]) == ["--dask_npartitions=3"]


@pytest.mark.slow
def test_unreachable_scheduler_is_one_line(raw, tmp_path):
    out = str(tmp_path / "out")
    res = subprocess.run(tfseg("convert", "--dataset", "folder", "--input", raw, "--output", out, "--runner", "dask",
                               "--dask_client_address=tcp://127.0.0.1:9", "--dask_connection_timeout=2"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: the Beam job failed on DaskRunner: OSError: Timed out trying to connect to "
                     "tcp://127.0.0.1:9 after 2 s (nothing was published; -v shows the traceback)"], res.stderr[-1500:]
    assert not os.path.exists(out)


# ------------------------------------------------------------------ fast: the graph's pieces


def test_batches_are_one_shard_each_in_case_id_order():
    from tfseg.convert.transforms import batch_size, cut_batches

    rng = np.random.default_rng(0)
    keyed = [(str(rng.choice(["train", "val"])), int(rng.integers(0, 3)), Case(f"id{v:05d}", ()))
             for v in rng.permutation(100)]
    batches = cut_batches(keyed, 4)
    seen = []
    for (split, shard, index), cases in batches:
        assert 1 <= len(cases) <= 4
        assert {(s, h) for s, h, _ in cases} == {(split, shard)}
        seen += [c.case_id for _, _, c in cases]
    assert sorted(seen) == sorted(c.case_id for _, _, c in keyed) and len(seen) == 100
    for key in {(s, h) for s, h, _ in keyed}:
        mine = [(i, [c.case_id for _, _, c in cases]) for (s, h, i), cases in batches if (s, h) == key]
        assert [i for i, _ in mine] == list(range(len(mine)))  # indices 0, 1, ... in order
        ids = [cid for _, part in mine for cid in part]
        assert ids == sorted(c.case_id for s, h, c in keyed if (s, h) == key)  # the shard's order
    # Same batches from any order of the input (the launcher's listing order does not matter).
    assert cut_batches(list(reversed(keyed)), 4) == batches
    assert batch_size(600, 1) == 10 and batch_size(10, 2) == 4 and batch_size(100_000, 8) == 1563


def test_fragments_round_trip_and_truncation(tmp_path):
    from tfseg.convert.shards import fragment_path, open_write, read_frames, write_frame

    records = [b"", b"a", bytes(range(256)) * 300]
    path = fragment_path(str(tmp_path / "_records"), "train", 2, 7)
    assert path.endswith("/_records/train-00002/000007.frag")
    with open_write(path) as f:
        for r in records:
            write_frame(f, r)
    assert list(read_frames(path)) == records
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:-5])
    with pytest.raises(OSError, match="000007.frag: truncated record fragment"):
        list(read_frames(path))


def test_tfrecord_framing_equals_tensorflows_writer(tmp_path):
    import io

    import tensorflow as tf

    from tfseg.convert.shards import write_tfrecord

    rng = np.random.default_rng(1)
    records = [b"", b"x", rng.bytes(1000), rng.bytes(70_000), bytes(5)]
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as w:
        for r in records:
            w.write(r)
    buf = io.BytesIO()
    for r in records:
        write_tfrecord(buf, r)
    assert buf.getvalue() == (tmp_path / "tf.tfrecord").read_bytes()
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / "tf.tfrecord"))] == records


def test_dask_npartitions_sets_the_number_of_batches():
    pytest.importorskip("distributed")
    from tfseg.convert.runners import pipeline_options, requested_partitions
    from tfseg.convert.transforms import TARGET_BATCHES, batch_size

    assert requested_partitions(pipeline_options(["--runner", "dask", "--dask_npartitions=7"])) == 7
    assert requested_partitions(pipeline_options(["--runner", "dask"])) is None
    assert requested_partitions(pipeline_options([])) is None  # DirectRunner
    # 1000 cases, 1 thread: the default target cuts batches of 16, a target of 7 batches of 143.
    assert batch_size(1000, 1) == 16 and TARGET_BATCHES == 64 and batch_size(1000, 1, 7) == 143
