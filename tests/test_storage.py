"""Every TF stage on a filesystem that is not the local disk.

TF's in-memory ``ram://`` filesystem goes through the same ``tf.io.gfile`` layer as gs://, s3://
and hdfs://: a stage that passes here has no os.path / open() / rename left on a user path
(an os call on ``ram://...`` finds nothing, or writes a folder literally named ``ram:``).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from helpers import copy_to_filesystem, write_2d_dataset


@pytest.mark.slow  # fast tier at about 3 minutes (issue 31): runs in CI's slow tier
def test_fit_evaluate_export_predict_on_ram_filesystem(tmp_path, monkeypatch):
    from PIL import Image

    from tfseg.evaluate import run_evaluate
    from tfseg.export import run_export
    from tfseg.fit import run_fit
    from tfseg.io import fs, publish
    from tfseg.predict import run_predict

    monkeypatch.chdir(tmp_path)  # a stray os call would create ./ram:/... here
    local = write_2d_dataset(str(tmp_path / "data"), {"train": 8, "val": 4})
    root = "ram://tfseg-storage-test"
    data = f"{root}/data"
    copy_to_filesystem(local, data)

    run = f"{root}/run"
    cfg = {"data": data, "output": run, "model": "unet", "epochs": 2, "batch_size": 4, "image_size": "32x32",
           "model_kwargs": {"base_filters": 4, "depth": 2}, "verbose": 0, "seed": 1}
    assert run_fit(cfg) == run
    names = set(fs.listdir(run))
    assert {"run.json", "model.keras", "history.csv", "checkpoints", "backup", "logs", publish.OWNER_FILE} <= names
    assert json.loads(fs.read_text(f"{run}/run.json"))["completed_epochs"] == 2
    # Re-running resumes from the backup on the same filesystem: nothing to do, and more epochs continue.
    run_fit(dict(cfg, epochs=3))
    assert json.loads(fs.read_text(f"{run}/run.json"))["completed_epochs"] == 3

    metrics = run_evaluate(run, data, "val", f"{root}/eval", num_samples=2)
    assert 0 <= metrics["dataset_level"]["mean_iou"] <= 1
    assert {"metrics.json", "report.md"} <= set(fs.listdir(f"{root}/eval"))
    assert json.loads(fs.read_text(f"{root}/eval/metrics.json"))["num_images"] == 4

    version = run_export(run, f"{root}/exports", "squares")
    assert version == f"{root}/exports/squares/1"
    assert fs.isfile(f"{version}/saved_model.pb")
    assert "squares" in fs.read_text(f"{root}/exports/models.config")
    served = tf.saved_model.load(version)  # TF Serving's model_base_path may point here

    photos = f"{root}/photos"
    tf.io.gfile.makedirs(photos)
    rng = np.random.default_rng(0)
    image = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "p.png")
    tf.io.gfile.copy(str(tmp_path / "p.png"), f"{photos}/p.png")
    summary = run_predict(f"{root}/exports/squares", photos, f"{root}/masks")
    assert summary["written"] == 1 and not summary["failed"]
    mask_bytes = fs.read_bytes(f"{root}/masks/p.png")
    mask = np.array(Image.open(__import__("io").BytesIO(mask_bytes)))
    assert mask.shape == (40, 48)
    expected = served.signatures["serving_default"](tf.constant([open(tmp_path / "p.png", "rb").read()]))
    np.testing.assert_array_equal(mask, np.squeeze(expected["mask"].numpy()[0]).astype(mask.dtype))
    # The Beam job (RunInference) reads its inputs through the same filesystem layer.
    summary = run_predict(f"{root}/exports/squares", photos, f"{root}/masks-beam", runner="DirectRunner")
    assert summary["written"] == 1 and not summary["failed"], summary
    beam_mask = np.array(Image.open(__import__("io").BytesIO(fs.read_bytes(f"{root}/masks-beam/p.png"))))
    np.testing.assert_array_equal(beam_mask, mask)

    assert not os.path.exists(tmp_path / "ram:"), "an os call wrote a local folder named ram:"
