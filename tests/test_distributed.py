"""Training on several replicas past the third epoch: MirroredStrategy over 2 logical CPUs through
the CLI, and MultiWorkerMirroredStrategy with two worker processes on loopback (TF_CONFIG),
including a worker killed mid-run. (Before the fix every multi-replica run died at epoch 3 with
StopIteration: Keras keeps one validation iterator for the whole fit.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from helpers import TESTS_DIR, free_ports, history_rows, tiny_fit_config, write_2d_dataset

EPOCHS = 6


@pytest.mark.slow  # three CLI fits on 2 logical CPUs: ~1 min on 2 cores
@pytest.mark.parametrize("val", [3, 5, 0], ids=["val-smaller-than-a-batch", "val-not-a-multiple", "no-val"])
def test_two_replicas_train_six_epochs_through_the_cli(tmp_path, val):
    splits = {"train": 12, **({"val": val} if val else {})}
    data = write_2d_dataset(str(tmp_path / "data"), splits)
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "tfseg.cli", "fit", "--data", data, "--model", "unet", "--output", out,
           "--epochs", str(EPOCHS), "--batch-size", "4", "--image-size", "32x32", "--cpu-replicas", "2",
           "--set", "model_kwargs.base_filters=4", "--set", "model_kwargs.depth=2", "--set", "verbose=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    info = json.load(open(os.path.join(out, "run.json")))
    assert (info["strategy"], info["replicas"], info["completed_epochs"]) == ("MirroredStrategy", 2, EPOCHS)
    rows = history_rows(out)
    assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS))
    if val:
        assert all(np.isfinite(float(r["val_loss"])) for r in rows)


_WORKER = """
import json, logging, os, sys
import numpy as np
import keras
logging.basicConfig(level=logging.INFO)
from tfseg.fit import run_fit

class Dump(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        import time
        time.sleep(float(os.environ.get("EPOCH_SLEEP", "0")))  # time to kill a worker mid-run

    def on_train_end(self, logs=None):
        np.savez(sys.argv[1], *[keras.ops.convert_to_numpy(w.value) for w in self.model.weights])

run_fit({cfg!r}, callbacks=[Dump()])
"""


def _start_workers(cfg: dict, tmp_path, tag: str, epoch_sleep: float = 0) -> list[subprocess.Popen]:
    cluster = {"worker": [f"localhost:{p}" for p in free_ports(2)]}
    script = textwrap.dedent(_WORKER.format(cfg=cfg))
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", EPOCH_SLEEP=str(epoch_sleep),
                   TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
                   PYTHONPATH=TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / f"weights-{tag}-{index}.npz")], env=env,
            stdout=open(tmp_path / f"log-{tag}-{index}.txt", "w"), stderr=subprocess.STDOUT, text=True,
            start_new_session=True))
    return procs


def _wait(procs, tmp_path, tag: str, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1, deadline - time.time()))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for i, p in enumerate(procs):
        assert p.returncode == 0, (tmp_path / f"log-{tag}-{i}.txt").read_text()[-3000:]


@pytest.mark.slow  # two TensorFlow processes, killed and restarted: ~2-3 min on 2 cores
def test_two_workers_survive_a_kill_and_end_with_the_same_weights(tmp_path):
    from tfseg import rundir

    data = write_2d_dataset(str(tmp_path / "data"), {"train": 8, "val": 3})
    out = str(tmp_path / "run")
    cfg = tiny_fit_config(data, out, epochs=EPOCHS, steps_per_epoch=2, batch_size=4)

    # First attempt: kill worker 1 once the chief has finished two epochs, then the chief (a
    # collective with a dead peer waits forever).
    procs = _start_workers(cfg, tmp_path, "a", epoch_sleep=3)
    deadline = time.time() + 300
    while time.time() < deadline and len(history_rows(out) if os.path.exists(os.path.join(out, "history.csv"))
                                         else []) < 2:
        assert all(p.poll() is None for p in procs), (tmp_path / "log-a-0.txt").read_text()[-3000:]
        time.sleep(0.5)
    os.killpg(procs[1].pid, signal.SIGKILL)
    time.sleep(1)
    os.killpg(procs[0].pid, signal.SIGKILL)
    for p in procs:
        p.wait()
    killed_at = len(history_rows(out))
    assert 2 <= killed_at < EPOCHS and not os.path.exists(os.path.join(out, "model.keras"))

    # Re-running both resumes and completes.
    procs = _start_workers(cfg, tmp_path, "b")
    _wait(procs, tmp_path, "b")
    resumed_at = killed_at  # the backup may trail the history by the epoch being written
    log0 = (tmp_path / "log-b-0.txt").read_text()
    assert any(f"epochs {e + 1}..{EPOCHS}" in log0 for e in (resumed_at - 1, resumed_at)), log0[-2000:]
    info = json.load(open(os.path.join(out, "run.json")))
    assert (info["strategy"], info["replicas"], info["completed_epochs"]) == (
        "MultiWorkerMirroredStrategy", 2, EPOCHS)
    assert [int(r["epoch"]) for r in history_rows(out)] == list(range(EPOCHS))

    # Both workers hold the same weights, and the chief's published model holds them too
    # (model.keras is the best checkpoint; compare with the backup, the chief's last epoch, the
    # workers' final weights).
    w0 = np.load(tmp_path / "weights-b-0.npz")
    w1 = np.load(tmp_path / "weights-b-1.npz")
    assert len(w0.files) == len(w1.files) > 0
    for k in w0.files:
        np.testing.assert_array_equal(w0[k], w1[k])
    last = rundir.load_model(out)
    last.load_weights(os.path.join(out, "backup", "latest.weights.h5"))
    for a, k in zip(last.weights, w0.files):
        np.testing.assert_allclose(np.asarray(a.value), w0[k], rtol=0, atol=0)
    best = json.load(open(os.path.join(out, "run.json"))).get("monitor")
    assert best
    assert os.path.isfile(os.path.join(out, "model.keras"))
