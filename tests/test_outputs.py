"""The output ownership rule (tfseg/io/publish.py): never touch what tfseg did not write."""

import json
import os

import pytest

from tfseg.errors import TfsegError
from tfseg.io import fs, publish


def _tree(root):
    """{relative path: bytes} of every file under root: a checksum of a folder."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def _publish(final, stage="evaluate", marker="done", files=("a",), **kw):
    with publish.publish_dir(str(final), stage, complete_marker=marker, **kw) as tmp:
        for f in files:
            fs.atomic_write_text(fs.join(tmp, f), "")
        if marker:
            fs.atomic_write_text(fs.join(tmp, marker), "")


def test_publish_new_folder_is_owned_and_complete(tmp_path):
    final = tmp_path / "out"
    _publish(final)
    assert sorted(os.listdir(final)) == [publish.OWNER_FILE, "a", "done"]
    assert publish.owner(str(final)) == "evaluate"
    assert [n for n in os.listdir(tmp_path)] == ["out"]  # no staging folder left


def test_complete_output_needs_overwrite_and_failure_keeps_old(tmp_path):
    final = tmp_path / "out"
    _publish(final, files=("old",))
    before = _tree(final)
    with pytest.raises(TfsegError, match="--overwrite"):
        _publish(final)
    with pytest.raises(RuntimeError, match="boom"):
        with publish.publish_dir(str(final), "evaluate", complete_marker="done", overwrite=True) as tmp:
            open(os.path.join(tmp, "partial"), "w").close()
            raise RuntimeError("boom")
    assert _tree(final) == before and os.listdir(tmp_path) == ["out"]
    _publish(final, files=("new",), overwrite=True)
    assert sorted(os.listdir(final)) == [publish.OWNER_FILE, "done", "new"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_folder_is_refused_even_with_overwrite(tmp_path, overwrite):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "thesis.txt").write_text("x")
    with pytest.raises(TfsegError, match="did not write") as e:
        _publish(keep, overwrite=overwrite)
    assert "\n" not in str(e.value)
    assert _tree(keep) == {"thesis.txt": b"x"} and os.listdir(tmp_path) == ["keep"]


def test_other_stage_output_is_refused(tmp_path):
    final = tmp_path / "out"
    _publish(final, stage="convert", marker="dataset.json")
    with pytest.raises(TfsegError, match="output of `tfseg convert`"):
        _publish(final, stage="evaluate", overwrite=True)


def test_empty_folder_is_taken(tmp_path):
    (tmp_path / "out").mkdir()
    _publish(tmp_path / "out")
    assert publish.owner(str(tmp_path / "out")) == "evaluate"


def test_unfinished_own_output_is_resumed_or_replaced(tmp_path):
    final = tmp_path / "out"
    publish.mark_owned(str(final), "evaluate")
    (final / "partial").write_text("x")
    assert publish.claim(str(final), "evaluate", complete_marker="done") == "unfinished"
    _publish(final)
    assert "partial" not in os.listdir(final)


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_output_overlapping_an_input_is_refused(tmp_path, where):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "x").write_text("x")
    out = {"same": data, "inside": data / "sub" / "new", "contains": tmp_path}[where]
    before = _tree(tmp_path)
    with pytest.raises(TfsegError, match="--data"):
        _publish(out, inputs=[("--data", str(data))])
    assert _tree(tmp_path) == before


def test_symlinked_input_is_seen_through(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(TfsegError, match="same folder"):
        publish.claim(str(tmp_path / "link"), "predict", complete_marker="s", inputs=[("--input", str(tmp_path / "real"))])


def test_output_under_a_file_and_unwritable_parent(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(TfsegError, match="is a file"):
        publish.claim(str(tmp_path / "f" / "out"), "evaluate", complete_marker="done")
    with pytest.raises(TfsegError, match="not a folder"):
        publish.claim(str(tmp_path / "f"), "evaluate", complete_marker="done")
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(TfsegError, match="permission"):
            publish.claim(str(ro / "out"), "evaluate", complete_marker="done")


def test_staging_of_a_killed_run_is_removed(tmp_path):
    final = tmp_path / "out"
    # A staging folder of a process that no longer exists (pid 2**22 + 1 is above pid_max's default).
    import socket

    stale = tmp_path / f"{publish.STAGING_PREFIX}out-{socket.gethostname()}-4194305-abcd1234"
    publish.mark_owned(str(stale), "evaluate")
    foreign = tmp_path / f"{publish.STAGING_PREFIX}out-{socket.gethostname()}-4194305-notours"
    foreign.mkdir()  # no ownership record: not ours, kept
    _publish(final)
    assert sorted(os.listdir(tmp_path)) == sorted([foreign.name, "out"])


def test_published_outputs_get_normal_permissions(tmp_path):
    with publish.publish_dir(str(tmp_path / "o"), "evaluate", complete_marker=None) as tmp:
        fs.atomic_write_text(os.path.join(tmp, "a.json"), "{}")
    mask = os.umask(0)
    os.umask(mask)
    assert (os.stat(tmp_path / "o").st_mode & 0o777) == 0o777 & ~mask
    assert (os.stat(tmp_path / "o" / "a.json").st_mode & 0o777) == 0o666 & ~mask


def test_ram_filesystem_publish():
    """Object-store publishing (copy, completion marker last) on TF's in-memory filesystem."""
    import tensorflow as tf

    final = "ram://outputs-test/out"
    _publish(final, files=("a",))
    assert publish.owner(final) == "evaluate"
    assert sorted(fs.listdir(final)) == sorted([publish.OWNER_FILE, "a", "done"])
    _publish(final, files=("b",), overwrite=True)
    assert sorted(fs.listdir(final)) == sorted([publish.OWNER_FILE, "b", "done"])
    assert [n for n in tf.io.gfile.listdir("ram://outputs-test") if n.rstrip("/").startswith(".tfseg")] == []
    with pytest.raises(TfsegError, match="--overwrite"):
        _publish(final)
    json.loads(fs.read_text(fs.join(final, publish.OWNER_FILE)))
