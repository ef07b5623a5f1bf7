"""Two local worker processes on loopback train one MultiWorkerMirroredStrategy run (TF_CONFIG)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from helpers import TESTS_DIR, free_ports, history_rows, tiny_fit_config, write_2d_dataset


@pytest.mark.slow  # two TensorFlow processes plus gRPC collectives: ~40-60 s on 2 cores
def test_two_workers_on_loopback_complete_a_multi_worker_run(tmp_path):
    data = write_2d_dataset(str(tmp_path / "data"), {"train": 8, "val": 4})
    out = str(tmp_path / "run")
    cfg = tiny_fit_config(data, out, epochs=2, steps_per_epoch=2, batch_size=4)
    cluster = {"worker": [f"localhost:{p}" for p in free_ports(2)]}
    script = textwrap.dedent(f"""
        import logging
        logging.basicConfig(level=logging.INFO)
        from tfseg.fit import run_fit
        run_fit({cfg!r})
    """)
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                   TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
                   PYTHONPATH=TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    info = json.load(open(os.path.join(out, "run.json")))
    assert (info["strategy"], info["replicas"]) == ("MultiWorkerMirroredStrategy", 2)
    assert info["completed_epochs"] == 2
    assert os.path.isfile(os.path.join(out, "model.keras"))
    assert [r["epoch"] for r in history_rows(out)] == ["0", "1"]
    # The second worker kept its files apart and wrote no model.
    worker_dir = os.path.join(out, ".tfseg-worker-worker-1")
    assert os.path.isdir(worker_dir) and not os.path.exists(os.path.join(worker_dir, "model.keras"))
