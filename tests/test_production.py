"""Production conditions (issue 19): what a deployment meets besides bad input.

A retried step running beside the first attempt, a kill -9 at the wrong moment, a full disk, a
worker that never comes up, a user dropping a file into an output while a stage runs. Each case
asserts what the user sees (the exit code, exactly one ``error:`` line naming the culprit, no
traceback) and what is left on disk (nothing outside the command's own output changed, no half
published output, no stale lock or staging folder once the same command has run again).

The default tier works in-process or with tiny subprocesses that do not import TensorFlow: the
lock itself (refused, taken over from a dead holder, re-entrant), ``publish_dir``'s re-check,
``backup.recover`` on torn files, escaped control characters, the signal handlers.

The ``slow`` tier runs real ``tfseg`` commands as a user does: two writers started together on one
output for each stage; a kill -9 at named steps (``TFSEG_TEST_PAUSE_AT``, a test-only hook that
makes the process wait at that step) followed by the same command; a full disk on a small tmpfs
(root only: skipped with the reason elsewhere); SIGTERM during a fit; ``TF_CONFIG`` naming a peer
that never answers; a user's file appearing in the output folder while convert runs.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import free_ports, history_rows

from tfseg import errors
from tfseg.errors import TfsegError
from tfseg.io import fs, locks, publish

HOST = socket.gethostname()
FIT = ["--model", "unet", "--epochs", "1", "--batch-size", "4", "--image-size", "32x32",
       "--set", "model_kwargs.base_filters=4", "--set", "model_kwargs.depth=2", "--set", "verbose=0",
       "--set", "tensorboard=false"]
PAUSE_ENV = ("TFSEG_TEST_PAUSE_AT", "TFSEG_TEST_PAUSE_FILE")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PAUSE_ENV and k != "TF_CONFIG"}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", **extra)
    return env


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def _one_error(text: str, *parts: str) -> str:
    """The single ``error:`` line of ``text``, which must name every one of ``parts``."""
    assert "Traceback" not in text, text
    errors = _errors(text)
    assert len(errors) == 1, f"expected one error line, got:\n{text}"
    for part in parts:
        assert part in errors[0], f"{errors[0]!r} does not name {part!r}"
    return errors[0]


def _lock_file(path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path)), locks.LOCK_PREFIX + os.path.basename(path))


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    pid = int(proc.stdout)
    assert not fs.pid_alive(pid)
    return pid


def _write_lock(path: str, **holder) -> str:
    lock = _lock_file(path)
    record = {"stage": "fit", "host": HOST, "pid": 0, "proc_start": "1", "time": 1.7e9}
    record.update(holder)
    with open(lock, "w") as f:
        json.dump(record, f)
    return lock


# A process that holds the lock of argv[1] (stage argv[2]) until its stdin closes.
_HOLD = """
import sys
from tfseg import errors
from tfseg.io import fs, locks, publish
locks.acquire_lock(sys.argv[1], sys.argv[2])
print("ready", flush=True)
sys.stdin.read()
"""


def _hold_lock(path: str, stage: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, path, stage], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "ready", proc.stderr.read()
    return proc


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0, proc.stderr.read()


def _cli(argv: list[str], *, timeout: float = 600, env: dict | None = None) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "tfseg.cli", *argv], capture_output=True, text=True,
                          env=env or _env(), timeout=timeout)
    return proc.returncode, proc.stderr + proc.stdout


# ============================================================================================
# Default tier
# ============================================================================================


def test_a_live_holder_refuses_a_second_writer_in_process_and_on_the_cli(tmp_path):
    out = str(tmp_path / "samples")
    holder = _hold_lock(out, "convert")
    try:
        with pytest.raises(TfsegError) as e:
            locks.acquire_lock(out, "fit")
        message = str(e.value)
        assert f"--output {out}: another `tfseg convert` (pid {holder.pid} on {HOST}, started " in message
        assert "wait for it to finish or choose another --output" in message
        assert getattr(e.value, "exit_code", 2) == 2
        with pytest.raises(TfsegError, match=f"pid {holder.pid}"):
            publish.claim(out, "convert", complete_marker="dataset.json")
        assert not os.path.exists(out)
        assert _lock_file(out) not in locks._HELD

        code, text = _cli(["sample", "--dataset", "carvana", "--output", out, "--count", "2"])
        _one_error(text, f"--output {out}: another `tfseg convert` (pid {holder.pid} on {HOST}", "is writing it")
        assert code == 2
        assert not os.path.exists(out)
    finally:
        _release(holder)
    assert not os.path.exists(_lock_file(out))  # released at the holder's exit
    code, text = _cli(["sample", "--dataset", "carvana", "--output", out, "--count", "2"])
    assert code == 0, text
    assert os.listdir(out) and not os.path.exists(_lock_file(out))


def test_a_dead_holders_lock_is_taken_over_with_a_line(tmp_path, caplog):
    out = str(tmp_path / "data")
    dead = _dead_pid()
    lock = _write_lock(out, pid=dead, stage="fit")
    with caplog.at_level(logging.WARNING, logger="tfseg.io.locks"):
        locks.acquire_lock(out, "convert")
    try:
        taken = [r.getMessage() for r in caplog.records if "taking over the lock" in r.getMessage()]
        assert len(taken) == 1 and f"`tfseg fit` (pid {dead} on {HOST}" in taken[0], taken
        holder = json.load(open(lock))
        assert (holder["pid"], holder["stage"], holder["host"]) == (os.getpid(), "convert", HOST)
        assert not [n for n in os.listdir(tmp_path) if ".stale-" in n]
    finally:
        locks.release_lock(out)
    assert not os.path.exists(lock)

    # A pid that runs again, but is another process (its start time differs): taken over too.
    _write_lock(out, pid=os.getppid(), proc_start="0")
    locks.acquire_lock(out, "convert")
    assert json.load(open(lock))["pid"] == os.getpid()
    locks.release_lock(out)

    # On a local disk the kernel's lock (flock), not the file, says who runs: a record naming
    # another host with no process holding the file is a dead writer's too.
    _write_lock(out, host="elsewhere.example", pid=4242)
    locks.acquire_lock(out, "convert")
    assert json.load(open(lock))["pid"] == os.getpid()
    locks.release_lock(out)


def test_the_cli_takes_over_a_dead_lock_with_one_escaped_warning_line(tmp_path):
    out = str(tmp_path / "s\nerror: injected")
    dead = _dead_pid()
    lock = _write_lock(out, pid=dead, stage="sample")
    proc = subprocess.run([sys.executable, "-m", "tfseg.cli", "sample", "--dataset", "carvana", "--output", out,
                           "--count", "2"], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert not _errors(proc.stderr), proc.stderr
    taken = [line for line in lines if "taking over the lock" in line]
    assert len(taken) == 1 and "s\\nerror: injected" in taken[0] and f"(pid {dead} on {HOST}" in taken[0], lines
    assert os.listdir(out) and not os.path.exists(lock)


def test_summary_lines_keep_a_name_with_a_newline_on_one_line(tmp_path):
    out = str(tmp_path / "s\nerror: injected")
    code, text = _cli(["sample", "--dataset", "carvana", "--output", out, "--count", "2"])
    assert code == 0, text
    assert not _errors(text), text


def test_locks_are_reentrant_and_released_by_the_entry_point_that_took_them(tmp_path):
    a, b = str(tmp_path / "work"), str(tmp_path / "data")
    locks.acquire_lock(a, "run")
    token = open(_lock_file(a)).read()

    @locks.holding_locks
    def stage(fail: bool):
        locks.acquire_lock(a, "convert")  # the caller's lock: no-op
        assert publish.claim(b, "convert", complete_marker="dataset.json") == "absent"
        locks.acquire_lock(b, "convert")  # taken by claim already: no-op
        assert json.load(open(_lock_file(b)))["pid"] == os.getpid()
        if fail:
            raise RuntimeError("the stage failed")

    try:
        stage(False)
        assert not os.path.exists(_lock_file(b))
        assert open(_lock_file(a)).read() == token  # the outer lock outlives the inner stage
        with pytest.raises(RuntimeError):
            stage(True)
        assert not os.path.exists(_lock_file(b))
        assert open(_lock_file(a)).read() == token
        # Another process is still refused on the outer one.
        check = subprocess.run([sys.executable, "-c", "import sys; from tfseg.io import locks; "
                                "locks.acquire_lock(sys.argv[1], 'run')", a], capture_output=True, text=True)
        assert check.returncode != 0 and f"pid {os.getpid()}" in check.stderr
    finally:
        locks.release_lock(a)
    assert not os.path.exists(_lock_file(a))


def _tree(root) -> dict[str, bytes]:
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def _earlier_output(final):
    publish.mark_owned(str(final), "convert")
    (final / "dataset.json").write_text('{"old": true}')
    (final / "old.tfrecord").write_bytes(b"old records")


INTRUSIONS = {
    # name: (prepare the final folder before the claim, what the user does during the block, new entry)
    "into an empty folder made beforehand": (lambda final: final.mkdir(),
                                             lambda final: (final / "thesis.txt").write_bytes(b"four years"),
                                             "thesis.txt"),
    "into an earlier output (--overwrite), in a subfolder": (
        _earlier_output,
        lambda final: (final.joinpath("notes").mkdir(), (final / "notes" / "thesis.txt").write_bytes(b"four years")),
        "notes, notes/thesis.txt"),
    "a folder created where none was": (lambda final: None,
                                        lambda final: (final.mkdir(), (final / "thesis.txt").write_bytes(b"mine")),
                                        "thesis.txt"),
    "a name with control characters": (lambda final: final.mkdir(),
                                       lambda final: (final / "a\nerror: injected.txt").write_bytes(b"x"),
                                       "a\\nerror: injected.txt"),
}


@pytest.mark.parametrize("case", list(INTRUSIONS))
def test_publish_never_replaces_what_appeared_since_the_claim(tmp_path, case):
    prepare, intrude, shown = INTRUSIONS[case]
    final = tmp_path / "out"
    prepare(final)
    with pytest.raises(TfsegError) as e:
        with publish.publish_dir(str(final), "convert", complete_marker="dataset.json", overwrite=True) as staging:
            with open(os.path.join(staging, "new.tfrecord"), "wb") as f:
                f.write(b"new records")
            intrude(final)
            users = _tree(final)
            with open(os.path.join(staging, "dataset.json"), "w") as f:
                f.write('{"new": true}')
    message = str(e.value)
    assert "\n" not in message
    assert f"--output {final}: changed while tfseg convert ran (new: {shown}); nothing in it was replaced or " \
           f"removed, and the result is in {final}.unpublished-" in message
    assert _tree(final) == users  # byte for byte, the earlier output's files included
    kept = glob.glob(f"{final}.unpublished-*")
    assert len(kept) == 1 and message.endswith(kept[0])
    assert _tree(kept[0])["new.tfrecord"] == b"new records"
    assert _tree(kept[0])["dataset.json"] == b'{"new": true}'
    assert sorted(os.listdir(tmp_path)) == sorted(["out", os.path.basename(kept[0])])  # no staging, no lock


def test_publish_without_an_intrusion_replaces_the_earlier_output(tmp_path):
    """The control for the test above: the same block with nobody interfering publishes."""
    final = tmp_path / "out"
    _earlier_output(final)
    with publish.publish_dir(str(final), "convert", complete_marker="dataset.json", overwrite=True) as staging:
        with open(os.path.join(staging, "dataset.json"), "w") as f:
            f.write('{"new": true}')
    tree = _tree(final)
    assert tree["dataset.json"] == b'{"new": true}' and "old.tfrecord" not in tree
    assert sorted(os.listdir(tmp_path)) == ["out"]


def _tiny_model(seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((4,))
    return keras.Model(inp, keras.layers.Dense(3)(keras.layers.Dense(5)(inp)))


def _weights_in(path: str) -> list[np.ndarray]:
    model = _tiny_model(99)
    model.load_weights(path)
    return model.get_weights()


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.fixture
def two_backups(tmp_path):
    """RUN/backup after epochs 1 and 2 of a tiny model (latest = 2, previous = 1), a user's note beside."""
    from tfseg.fit import backup

    folder = str(tmp_path / "backup")
    weights = {}
    for epoch in (1, 2):
        model = _tiny_model(epoch)
        backup.save(model, folder, epoch)
        weights[epoch] = model.get_weights()
    assert not _same(weights[1], weights[2])
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("mine")
    return str(tmp_path), folder, weights


def _cut(path: str, size: int = 1000) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_backup_recovers_the_latest_when_it_reads_whole(two_backups, caplog):
    from tfseg.fit import backup

    run, folder, weights = two_backups
    with caplog.at_level(logging.WARNING):
        assert backup.recover(run) == 2
    assert not _warnings(caplog)
    assert _same(_weights_in(os.path.join(folder, backup.LATEST_WEIGHTS)), weights[2])


@pytest.mark.parametrize("damage", ["truncated weights", "weights of another epoch", "torn metadata"])
def test_backup_falls_back_to_the_previous_epoch(two_backups, caplog, damage):
    from tfseg.fit import backup

    run, folder, weights = two_backups
    latest = os.path.join(folder, backup.LATEST_WEIGHTS)
    if damage == "truncated weights":
        _cut(latest)
    elif damage == "weights of another epoch":  # a whole HDF5 file, not the one its metadata names
        _tiny_model(7).save_weights(latest)
    else:
        with open(os.path.join(folder, backup.LATEST_META), "w") as f:
            f.write('{"epoch": 2, "sha')
    with caplog.at_level(logging.WARNING):
        assert backup.recover(run) == 1
    lines = _warnings(caplog)
    assert len(lines) == 1 and "the latest backup cannot be read" in lines[0], lines
    assert "resuming from the previous one, after epoch 1" in lines[0]
    assert _same(_weights_in(latest), weights[1])
    assert json.load(open(os.path.join(folder, backup.LATEST_META)))["epoch"] == 1
    assert open(os.path.join(folder, "notes.txt")).read() == "mine"
    assert backup.recover(run) == 1  # the state left verifies


def test_backup_with_both_pairs_torn_starts_over(two_backups, caplog):
    from tfseg.fit import backup

    run, folder, _ = two_backups
    _cut(os.path.join(folder, backup.LATEST_WEIGHTS))
    _cut(os.path.join(folder, backup.PREVIOUS_WEIGHTS), 500)
    with caplog.at_level(logging.WARNING):
        assert backup.recover(run) == 0
    lines = _warnings(caplog)
    assert len(lines) == 1 and "the backup cannot be read" in lines[0] and "starting over from epoch 1" in lines[0]
    assert sorted(os.listdir(folder)) == ["notes.txt"]  # tfseg's four files gone, the user's note kept


def test_torn_temporary_files_of_dead_fits_are_removed_and_nothing_else(two_backups):
    from tfseg.fit import backup

    run, folder, _ = two_backups
    dead = _dead_pid()
    names = {f".tfseg-tmp-{dead}-latest.weights.h5": b"torn", f".tfseg-tmp-{os.getpid()}-latest.weights.h5": b"live",
             ".tfseg-tmp-notapid-x": b"?", "tmp-123-mine.h5": b"user"}
    for name, data in names.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    backup.remove_torn_files(run)
    left = set(os.listdir(folder))
    assert f".tfseg-tmp-{dead}-latest.weights.h5" not in left
    assert {f".tfseg-tmp-{os.getpid()}-latest.weights.h5", ".tfseg-tmp-notapid-x", "tmp-123-mine.h5"} <= left


def test_a_kill_between_the_backup_renames_resumes_from_the_last_verifiable_epoch(two_backups, caplog):
    from tfseg.fit import backup

    run, folder, weights = two_backups
    # What backup.save(model, folder, 3) leaves when killed at its pause point "backup-rename".
    os.replace(os.path.join(folder, backup.LATEST_WEIGHTS), os.path.join(folder, backup.PREVIOUS_WEIGHTS))
    with caplog.at_level(logging.WARNING):
        epoch = backup.recover(run)
    assert epoch == 2, _warnings(caplog)
    assert _same(_weights_in(os.path.join(folder, backup.LATEST_WEIGHTS)), weights[2])


def test_control_characters_are_escaped_in_messages(tmp_path):
    assert errors.safe("a\nerror: b.png") == "a\\nerror: b.png"
    assert errors.safe("x\x1b[31my\r\t") == "x\\x1b[31my\\r\\t"
    assert errors.safe("plain name.png") == "plain name.png"
    assert errors.safe("vóxel 日本.nii.gz") == "vóxel 日本.nii.gz"  # printable non-ASCII kept

    data = str(tmp_path / "bad\nerror: injected")
    code, text = _cli(["plan", "--data", data])
    line = _one_error(text, "bad\\nerror: injected")
    assert code == 2, line
    assert not any(x.startswith("error: injected") for x in text.splitlines())


# A `tfseg` command that takes its output's lock and waits (the real CLI group and handlers).
_BLOCKING_COMMAND = """
import os, time
from tfseg import errors
from tfseg.io import fs, locks, publish
from tfseg.cli import cli

@cli.command("block")
@locks.holding_locks
def block():
    locks.acquire_lock(os.environ["OUT"], "convert")
    print("ready", flush=True)
    time.sleep(600)

cli(["block"])
"""

# A process whose main thread never unwinds (as one blocked in C++ would not): the watcher ends it.
_STUCK = """
import sys, time
from tfseg import interrupts
interrupts.GRACE_SECONDS = float(sys.argv[1])
interrupts.install()
announced = False
while True:
    try:
        if not announced:
            announced = True
            print("ready", flush=True)
        time.sleep(600)
    except interrupts.Interrupted:
        pass
"""


def _start_ready(args: list[str], env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_ends_a_command_with_one_line_and_releases_its_lock(tmp_path, signum, code):
    out = str(tmp_path / "out")
    proc = _start_ready([_BLOCKING_COMMAND], env=dict(os.environ, OUT=out))
    assert os.path.exists(_lock_file(out))
    started = time.monotonic()
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - started < 5
    assert proc.returncode == code
    name = signal.Signals(signum).name
    assert stderr.strip() == (f"error: interrupted by {name}; nothing was published, and the same command "
                              "resumes (or starts over) where this one stopped"), stderr
    assert not os.path.exists(_lock_file(out))  # the stage's finally ran


def test_a_main_thread_that_cannot_unwind_is_ended_by_the_watcher():
    proc = _start_ready([_STUCK, "1.0"])
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert 0.9 < time.monotonic() - started < 8
    assert proc.returncode == 143
    assert stderr.strip().startswith("error: interrupted by SIGTERM;") and len(stderr.strip().splitlines()) == 1

    # A second signal does not wait for the grace period.
    proc = _start_ready([_STUCK, "600"])
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - started < 5 and proc.returncode == 143
    assert len(stderr.strip().splitlines()) == 1, stderr


# A `tfseg` command that publishes its output, then (argv[1]) is still printing its summary or,
# its work done, is in a slow interpreter exit (TensorFlow's teardown takes seconds).
_PUBLISHING_COMMAND = """
import atexit, os, sys, time
from tfseg.io import publish
from tfseg.cli import cli, main

PHASE = sys.argv[1]

@cli.command("make")
def make():
    with publish.publish_dir(os.environ["OUT"], "convert", complete_marker="done") as staging:
        open(os.path.join(staging, "done"), "w").close()
    if PHASE == "exit":
        atexit.register(lambda: (print("ready", flush=True), time.sleep(600)))
        return
    print("ready", flush=True)
    time.sleep(600)

sys.argv = ["tfseg", "make"]
main()
"""


@pytest.mark.parametrize("phase", ["summary", "exit"])
def test_a_signal_after_the_publish_says_the_output_is_complete(tmp_path, phase):
    """SIGTERM after the version was published said "nothing was published" (while the command
    printed its summary) or, in the interpreter's exit, ended with 143 and no line (issue 32)."""
    out = str(tmp_path / "out")
    proc = _start_ready([_PUBLISHING_COMMAND, phase], env=dict(os.environ, OUT=out))
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert os.path.isfile(os.path.join(out, "done"))
    if phase == "summary":
        assert proc.returncode == 143
        assert stderr.strip() == (f"error: interrupted by SIGTERM after {out} was published (it is complete); "
                                  "the command stopped before its end"), stderr
    else:
        assert proc.returncode == 0
        assert stderr.strip() == ("tfseg: SIGTERM arrived after the command finished; its output is complete "
                                  "as reported (exit 0)"), stderr


class _Ended(Exception):
    pass


@pytest.mark.parametrize("signals,ends_with", [((signal.SIGTERM,), signal.SIGTERM),
                                               ((signal.SIGINT, signal.SIGTERM), signal.SIGTERM)])
def test_the_watcher_starts_no_thread(monkeypatch, signals, ends_with):
    # The watcher can still be running while the interpreter shuts down after a normal unwind,
    # when a new thread cannot start (CI, Python 3.12: "can't create new thread at interpreter
    # shutdown" under the one line): it keeps the grace period itself.
    from tfseg import interrupts

    def no_threads(*args, **kwargs):
        raise RuntimeError("can't create new thread at interpreter shutdown")

    ended = []

    def exit_now(signum):
        ended.append((signum, time.monotonic()))
        raise _Ended

    monkeypatch.setattr(interrupts.threading, "Thread", no_threads)
    monkeypatch.setattr(interrupts, "_exit_now", exit_now)
    monkeypatch.setattr(interrupts, "GRACE_SECONDS", 0.3)
    r, w = os.pipe()
    try:
        os.write(w, bytes(signals))
        started = time.monotonic()
        with pytest.raises(_Ended):
            interrupts._watch(r)
    finally:
        os.close(r)
        os.close(w)
    [(signum, when)] = ended
    assert signum == ends_with
    waited = when - started
    assert (0.25 < waited < 5) if len(signals) == 1 else waited < 0.25


# A process that has created the lock file (O_EXCL) and not yet written its record: the state every
# writer is in for a moment; its record follows after argv[2] seconds.
_CREATING = """
import json, os, socket, sys, time
import fcntl
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)  # a writer that holds the lock but has not written its record yet
print("ready", flush=True)
time.sleep(float(sys.argv[2]))
os.write(fd, json.dumps({"stage": "convert", "host": socket.gethostname(), "pid": os.getpid(),
                         "proc_start": None, "time": time.time()}).encode())
os.close(fd)
sys.stdin.read()
"""


def test_a_lock_being_written_is_not_taken_over(tmp_path):
    out = str(tmp_path / "data")
    lock = _lock_file(out)
    proc = subprocess.Popen([sys.executable, "-c", _CREATING, lock, "1.0"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        try:
            locks.acquire_lock(out, "fit")
            took = True
        except TfsegError:
            took = False
        time.sleep(1.5)
        holders = {json.load(open(lock))["pid"]} if os.path.exists(lock) else set()
        if took:
            locks.release_lock(out)
        assert not took, f"took the lock of a live writer (pid {proc.pid}); the lock now names {holders}"
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


# ============================================================================================
# Slow tier: real `tfseg` processes
# ============================================================================================


def _digest(root: str) -> dict[str, str]:
    """Relative path -> sha256 (or "dir", or the link target) of everything under ``root``."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root) + "/"] = "link:" + os.readlink(path) if os.path.islink(path) else "dir"
        for name in files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            out[rel] = "link:" + os.readlink(path) if os.path.islink(path) else \
                hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def _outside(digest: dict[str, str], root: str, mine: list[str]) -> dict[str, str]:
    """``digest`` without the entries under the folders ``mine`` (absolute) and their siblings
    named after them (NAME.unpublished-*, which a refused publish leaves for the user)."""
    rels = [os.path.relpath(m, root) for m in mine]
    return {k: v for k, v in digest.items()
            if not any(k == r + "/" or k.startswith(r + "/") or k.startswith(r + publish.UNPUBLISHED_SUFFIX)
                       for r in rels)}


def _assert_unchanged(before: dict, root: str, mine: list[str]) -> None:
    after = _digest(root)
    a, b = _outside(before, root, mine), _outside(after, root, mine)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    assert not changed, f"changed outside the command's output: {changed[:8]}"


def _no_leftovers(root: str) -> None:
    """No lock, staging folder or temporary file of tfseg anywhere under ``root``."""
    left = [os.path.join(folder, n) for folder, dirs, files in os.walk(root) for n in dirs + files
            if n.startswith((locks.LOCK_PREFIX, publish.STAGING_PREFIX, ".tfseg-tmp-", ".tfseg-model."))]
    assert not left, left


def _start(argv: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tfseg.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env or _env())


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Raw Carvana samples, their dataset, a 1-epoch run, an export of it, photos, a foreign folder."""
    from tfseg.convert.pipeline import run_convert
    from tfseg.export import run_export
    from tfseg.fit import run_fit
    from tfseg.pipeline import write_sample

    root = str(tmp_path_factory.mktemp("production"))
    p = {k: os.path.join(root, k) for k in ("raw", "data", "run", "exports", "photos", "foreign")}
    p["root"] = root
    write_sample("carvana", p["raw"], count=16, seed=0)
    run_convert("carvana", p["raw"], p["data"])
    run_fit({"data": p["data"], "output": p["run"], "model": "unet", "epochs": 1, "batch_size": 4,
             "image_size": "32x32", "model_kwargs": {"base_filters": 4, "depth": 2}, "verbose": 0,
             "tensorboard": False})
    run_export(p["run"], p["exports"], "m")
    p["export_model"] = os.path.join(p["exports"], "m")
    os.makedirs(p["photos"])
    for name in sorted(os.listdir(os.path.join(p["raw"], "train")))[:4]:
        shutil.copy(os.path.join(p["raw"], "train", name), p["photos"])
    os.makedirs(p["foreign"])
    with open(os.path.join(p["foreign"], "thesis.txt"), "wb") as f:
        f.write(b"four years of work")
    return p


def _command(stage: str, p: dict, out: str, *, overwrite: bool = False, epochs: int = 1) -> list[str]:
    again = ["--overwrite"] if overwrite else []
    if stage == "convert":
        return ["convert", "--dataset", "carvana", "--input", p["raw"], "--output", out, *again]
    if stage == "fit":
        return ["fit", "--data", p["data"], "--output", out, *FIT, "--epochs", str(epochs)]
    if stage == "evaluate":
        return ["evaluate", "--run", p["run"], "--data", p["data"], "--split", "val", "--samples", "0",
                "--output", out, *again]
    if stage == "export":
        return ["export", "--run", p["run"], "--output", out, "--name", "m"]
    if stage == "predict":
        return ["predict", "--model", p["export_model"], "--input", p["photos"], "--output", out, *again]
    raise ValueError(stage)


def _versions(export_base: str) -> list[int]:
    from tfseg.export import list_versions

    return list_versions(os.path.join(export_base, "m"))


def _finite_model(path: str) -> None:
    import keras

    import tfseg.models  # noqa: F401 - registers tfseg's layers

    model = keras.saving.load_model(path, compile=False)
    assert model.weights and all(np.isfinite(np.asarray(w)).all() for w in model.weights), path


def _assert_complete(stage: str, out: str, p: dict, epochs: int = 1) -> None:
    """The output of ``stage`` at ``out`` is published and whole, checked without tfseg's readers."""
    if stage == "convert":
        info = json.load(open(os.path.join(out, "dataset.json")))
        assert {s: v["count"] for s, v in info["splits"].items()} == {"train": 8, "val": 4, "test": 4}
        import tensorflow as tf

        for split, v in info["splits"].items():
            n = sum(1 for name in v["files"] for _ in tf.data.TFRecordDataset(os.path.join(out, name)))
            assert n == v["count"], (split, n)
    elif stage == "fit":
        _finite_model(os.path.join(out, "model.keras"))
        epochs_seen = [int(r["epoch"]) for r in history_rows(out)]
        assert epochs_seen == list(range(epochs)), epochs_seen
        assert json.load(open(os.path.join(out, "run.json")))["completed_epochs"] == epochs
    elif stage == "evaluate":
        metrics = json.load(open(os.path.join(out, "metrics.json")))
        assert metrics and os.path.isfile(os.path.join(out, "report.md"))
    elif stage == "export":
        for v in _versions(out):
            assert os.path.isfile(os.path.join(out, "m", str(v), "saved_model.pb"))
    elif stage == "predict":
        summary = json.load(open(os.path.join(out, "predict_summary.json")))
        masks = sorted(n for n in os.listdir(out) if n.endswith(".png"))
        assert summary["written"] == len(os.listdir(p["photos"])) == len(masks), (summary, masks)
    else:
        raise ValueError(stage)


STAGES = ["convert", "fit", "evaluate", "export", "predict"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_two_writers_started_together(world, stage):
    """Documented outcome: one writes (exit 0), the other is refused before any work (exit 2, one
    line naming the writer's pid); for export, where they ran one after the other, two distinct
    versions. The loser's command, run again, then finishes."""
    out = os.path.join(world["root"], f"two-{stage}")
    argv = _command(stage, world, out, overwrite=True)
    before = _digest(world["root"])
    procs = [_start(argv), _start(argv)]
    results = [_finish(proc) for proc in procs]
    codes = [code for code, _ in results]
    for code, text in results:
        assert "Traceback" not in text, text
    print(f"{stage}: exit codes {codes}; " + "; ".join(e for _, text in results for e in _errors(text)))
    if stage == "export" and codes == [0, 0]:
        assert _versions(out) == [1, 2]  # one after the other: distinct versions, none replaced
        loser = 1
    else:
        assert sorted(codes) == [0, 2], results
        winner, loser = codes.index(0), codes.index(2)
        _one_error(results[loser][1], f"another `tfseg {stage}` (pid {procs[winner].pid} on {HOST}",
                   "wait for it to finish")
        assert not _errors(results[winner][1]), results[winner][1]
        if stage == "export":
            assert _versions(out) == [1]
    _assert_complete(stage, out, world)
    _assert_unchanged(before, world["root"], [out])
    _no_leftovers(world["root"])

    count = len(_versions(out)) if stage == "export" else None
    code, text = _cli(procs[loser].args[3:])
    assert code == 0 and not _errors(text) and "Traceback" not in text, text
    _assert_complete(stage, out, world)
    if stage == "export":
        assert _versions(out) == list(range(1, count + 2))
    _assert_unchanged(before, world["root"], [out])
    _no_leftovers(world["root"])


def _pause(argv: list[str], point: str, tmp: str, timeout: float = 300) -> subprocess.Popen:
    """Starts ``argv`` with the test-only pause at ``point``; returns once the process waits there."""
    flag = os.path.join(tmp, f"paused-{point}-{time.monotonic_ns()}")
    proc = _start(argv, env=_env(TFSEG_TEST_PAUSE_AT=point, TFSEG_TEST_PAUSE_FILE=flag))
    deadline = time.monotonic() + timeout
    while not os.path.exists(flag):
        if proc.poll() is not None:
            pytest.fail(f"{argv[0]} ended ({proc.returncode}) before reaching {point}:\n{proc.stdout.read()}")
        assert time.monotonic() < deadline, f"{argv[0]} did not reach {point}"
        time.sleep(0.1)
    assert int(open(flag).read()) == proc.pid
    os.unlink(flag)
    return proc


def _continued_run(world: dict, name: str) -> str:
    """A copy of the world's 1-epoch run, which `fit --epochs 3` continues."""
    out = os.path.join(world["root"], name)
    shutil.copytree(world["run"], out)
    return out


# (stage, pause point, epoch the re-run starts at ("epochs N..3" for fit), the one warning the
# re-run says about the backup (None: none))
KILLS = [
    ("convert", "publish", None, None),
    ("evaluate", "publish", None, None),
    ("export", "publish", None, None),
    ("predict", "publish", None, None),
    # epoch 2's new backup written under temporary names, not yet renamed: epoch 1's is latest
    ("fit", "backup", 2, None),
    # between the renames: epoch 1's weights already under the previous name, its metadata not
    ("fit", "backup-rename", 2, "the backup was interrupted while being renamed; resuming after epoch 1"),
    ("fit", "epoch", 3, None),  # epoch 2 finished and backed up
]


@pytest.mark.slow
@pytest.mark.parametrize("stage,point,resume,said", KILLS, ids=[f"{k[0]}-at-{k[1]}" for k in KILLS])
def test_kill_9_at_a_named_step_then_the_same_command_finishes(world, tmp_path, stage, point, resume, said):
    out = os.path.join(world["root"], f"kill-{stage}-{point}")
    if stage == "fit":
        out = _continued_run(world, f"kill-{stage}-{point}")
        before_rows = history_rows(out)
    argv = _command(stage, world, out, epochs=3)
    before = _digest(world["root"])

    proc = _pause(argv, point, str(tmp_path))
    lock = os.path.join(out, ".tfseg-lock-m") if stage == "export" else _lock_file(out)
    assert json.load(open(lock))["pid"] == proc.pid
    proc.kill()
    proc.wait(timeout=30)
    if stage == "fit":
        assert not os.path.exists(os.path.join(out, "model.keras"))  # "complete" only once the epochs finish
    elif stage == "export":
        assert _versions(out) == []
    else:
        assert not os.path.exists(out)  # nothing published

    code, text = _cli(argv)
    assert code == 0 and not _errors(text) and "Traceback" not in text, text
    taken = [line for line in text.splitlines() if "taking over the lock" in line]
    # One line per lock the killed process held (export: the name's, and its version folder's).
    assert len(taken) == (2 if stage == "export" else 1), text
    assert all(f"`tfseg {stage}` (pid {proc.pid} on {HOST}" in line for line in taken), text
    _assert_complete(stage, out, world, epochs=3)
    if stage == "export":
        assert _versions(out) == [1]  # the killed export never published its version
    if stage == "fit":
        started = re.search(r"epochs (\d+)\.\.3", text)
        assert started and int(started.group(1)) == resume, text
        # Resumed, not started over: the first epoch's row is the original run's.
        assert history_rows(out)[0] == before_rows[0]
        warned = [line for line in text.splitlines() if "WARNING tfseg.fit.backup" in line]
        assert len(warned) == (said is not None) and all(said in line for line in warned), text
    _assert_unchanged(before, world["root"], [out])
    _no_leftovers(world["root"])


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted at a fresh folder (root only), and a function that resizes it."""
    mnt = str(tmp_path / "disk")
    os.makedirs(mnt)

    def mount(size: str, remount: bool = False) -> None:
        opts = f"remount,size={size}" if remount else f"size={size}"
        proc = subprocess.run(["mount", *([] if remount else ["-t", "tmpfs"]), "-o", opts,
                               *([] if remount else ["tmpfs"]), mnt], capture_output=True, text=True)
        if proc.returncode and not remount:
            pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip() or 'mount failed'}): the "
                        "full-disk cases need root (or CAP_SYS_ADMIN)")
        assert proc.returncode == 0, proc.stderr

    try:
        yield mnt, mount
    finally:
        if os.path.ismount(mnt):
            if subprocess.run(["umount", mnt], capture_output=True).returncode:
                subprocess.run(["umount", "-l", mnt], capture_output=True)


FULL_DISKS = [
    pytest.param("fit", "400k", id="fit"),
    pytest.param("convert", "64k", id="convert"),
    pytest.param("export", "256k", id="export"),
]


@pytest.mark.slow
@pytest.mark.parametrize("stage,size", FULL_DISKS)
def test_a_full_disk_is_one_line_and_the_same_command_finishes_once_space_is_freed(world, small_disk, stage,
                                                                                  size):
    mnt, mount = small_disk
    mount(size)
    out = os.path.join(mnt, stage)
    argv = _command(stage, world, out)
    before = _digest(world["root"])
    code, text = _cli(argv)
    published = {"convert": "dataset.json", "fit": "model.keras", "export": "m/1/saved_model.pb"}[stage]
    assert not os.path.exists(os.path.join(out, published))
    _assert_unchanged(before, world["root"], [])

    mount("64m", remount=True)
    code2, text2 = _cli(argv)
    assert code2 == 0 and not _errors(text2) and "Traceback" not in text2, text2
    _assert_complete(stage, out, world)
    _no_leftovers(mnt)
    _assert_unchanged(before, world["root"], [])

    # Last, so that the re-run above is checked even where this line is wrong.
    line = _one_error(text, "no space left on the device; nothing was published, and the same command resumes "
                            "once space is freed")
    assert line.startswith(f"error: {mnt}") or line.startswith(f"error: {os.path.relpath(mnt)}"), line
    assert code == 1, line


@pytest.mark.slow
def test_sigterm_during_a_fit_ends_it_with_one_line_and_the_same_command_resumes(world, tmp_path):
    out = _continued_run(world, "sigterm-fit")
    argv = _command("fit", world, out, epochs=3)
    before = _digest(world["root"])
    proc = _pause(argv, "epoch", str(tmp_path))  # epoch 2 finished and backed up
    rows = history_rows(out)
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, text = _finish(proc, timeout=60)
    assert time.monotonic() - started < 15
    _one_error(text, "interrupted by SIGTERM; nothing was published, and the same command resumes")
    assert code == 143
    assert not os.path.exists(os.path.join(out, "model.keras"))
    assert not os.path.exists(_lock_file(out))  # released as the process unwound

    code, text = _cli(argv)
    assert code == 0 and not _errors(text) and "Traceback" not in text, text
    assert "epochs 3..3" in text, text
    assert history_rows(out)[:2] == rows  # history.csv continues
    _assert_complete("fit", out, world, epochs=3)
    _assert_unchanged(before, world["root"], [out])
    _no_leftovers(world["root"])


@pytest.mark.slow
def test_a_tf_config_peer_that_never_answers_ends_the_fit_within_the_timeout(world):
    port = free_ports(1)[0]
    cluster = {"cluster": {"worker": [f"127.0.0.1:{port}", "127.0.0.1:1"]}, "task": {"type": "worker", "index": 0}}
    out = os.path.join(world["root"], "tf-config-fit")
    before = _digest(world["root"])
    started = time.monotonic()
    code, text = _cli(_command("fit", world, out) + ["--peer-timeout", "5"],
                      env=_env(TF_CONFIG=json.dumps(cluster)), timeout=120)
    assert time.monotonic() - started < 90
    _one_error(text, "TF_CONFIG: waiting for the other workers: no answer within 5 s (--peer-timeout) from "
                     "worker 1 (127.0.0.1:1)")
    assert code == 1
    assert not os.path.exists(os.path.join(out, "model.keras"))
    _assert_unchanged(before, world["root"], [out])
    _no_leftovers(world["root"])


@pytest.mark.slow
def test_a_user_file_added_to_the_output_while_convert_runs_survives(world):
    out = os.path.join(world["root"], "udir")
    os.makedirs(out)  # empty: convert may write into it
    before = _digest(world["root"])
    proc = _start(_command("convert", world, out))
    staging = os.path.join(world["root"], publish.STAGING_PREFIX + "udir-*")
    deadline = time.monotonic() + 300
    while not glob.glob(staging):  # the claim has been made, the work is under way
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with open(os.path.join(out, "thesis.txt"), "wb") as f:
        f.write(b"four years of work")
    code, text = _finish(proc)
    _one_error(text, f"--output {out}: changed while tfseg convert ran (new: thesis.txt); nothing in it was "
                     f"replaced or removed, and the result is in {out}.unpublished-")
    assert code == 2
    assert os.listdir(out) == ["thesis.txt"]
    assert open(os.path.join(out, "thesis.txt"), "rb").read() == b"four years of work"
    kept = glob.glob(out + publish.UNPUBLISHED_SUFFIX + "*")
    assert len(kept) == 1
    _assert_complete("convert", kept[0], world)  # the result, whole, where the user can take it
    _assert_unchanged(before, world["root"], [out])
    _no_leftovers(world["root"])


@pytest.mark.slow
def test_nothing_converted_from_a_name_with_a_newline_is_one_line(world, tmp_path):
    raw = str(tmp_path / "junk\nerror: injected")
    shutil.copytree(world["raw"], raw)
    for name in os.listdir(os.path.join(raw, "train")):
        with open(os.path.join(raw, "train", name), "wb") as f:
            f.write(b"not an image")
    code, text = _cli(["convert", "--dataset", "carvana", "--input", raw, "--output", str(tmp_path / "out")])
    assert code == 1, text
    _one_error(text, "junk\\nerror: injected", "no case converted")


# Processes that race for one lock; each counts the times it held it while another did too.
_RACE = """
import os, sys, time
from tfseg import errors
from tfseg.io import fs, locks, publish
from tfseg.errors import TfsegError
path, seconds = sys.argv[1], float(sys.argv[2])
inside, wins, both = path + ".inside", 0, 0
end = time.time() + seconds
while time.time() < end:
    try:
        locks.acquire_lock(path, "convert")
    except TfsegError:
        continue
    wins += 1
    try:
        os.close(os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        time.sleep(0.002)
        os.unlink(inside)
    except FileExistsError:
        both += 1
    locks.release_lock(path)
print(wins, both)
"""


@pytest.mark.slow
def test_processes_racing_for_one_lock_never_hold_it_together(tmp_path):
    path = str(tmp_path / "out")
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, path, "4"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(4)]
    counts = [tuple(map(int, proc.communicate(timeout=120)[0].split())) for proc in procs]
    assert sum(w for w, _ in counts) > 100, counts  # they did race
    assert sum(b for _, b in counts) == 0, f"(acquisitions, held together) per process: {counts}"


@pytest.mark.slow
def test_kill_9_just_after_the_model_is_published_then_the_same_command_repairs_run_json(world):
    out = os.path.join(world["root"], "kill-fit-after-publish")
    argv = _command("fit", world, out, epochs=2)
    proc = _start(argv)
    model = os.path.join(out, "model.keras")
    deadline = time.monotonic() + 300
    while not os.path.exists(model):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.kill()
    proc.wait(timeout=30)
    if json.load(open(os.path.join(out, "run.json"))).get("completed_epochs") == 2:
        pytest.skip("the kill landed after run.json was rewritten (the window is about a second)")
    code, text = _cli(argv)
    assert code == 0 and not _errors(text) and "Traceback" not in text, text
    _assert_complete("fit", out, world, epochs=2)  # run.json completed_epochs == 2
    assert "(unet, 2 epochs" in text, text
