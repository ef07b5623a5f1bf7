"""Automatic recipes (tfseg.plan), any input size (tfseg.models.padding), time-budgeted fit."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tfseg import schema
from tfseg.errors import TfsegError
from test_train import _png, squares, write_3d_dataset

tf = pytest.importorskip("tensorflow")


def write_odd_2d(root: str, splits: dict, *, hw=(33, 34), seed: int = 0) -> str:
    """A binary 'squares' dataset stored at ``hw`` (sizes a depth-2 U-Net cannot take)."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = hw
    info_splits, counts = {}, {}
    for split, n in splits.items():
        name = f"{split}-00000-of-00001.tfrecord"
        pix = np.zeros(2, np.int64)
        with tf.io.TFRecordWriter(os.path.join(root, name)) as wr:
            for i in range(n):
                image, mask = squares(rng, max(h, w))
                image, mask = image[:h, :w], mask[:h, :w]
                pix += np.bincount(mask.ravel(), minlength=2)
                wr.write(schema.encode_example_2d(
                    image_bytes=_png(np.ascontiguousarray(image)), image_format="png", height=h, width=w,
                    channels=3, mask_png=_png(np.ascontiguousarray(mask)), source_id=f"{split}{i}"))
        info_splits[split] = {"count": n, "files": [name]}
        counts[split] = pix.tolist()
    info = schema.DatasetInfo(
        name="odd", ndim=2, channels=3, num_classes=2, class_names=["background", "square"],
        splits=info_splits, class_pixel_counts=counts, image_format="png",
        size_summary={s: {"height": {"min": h, "max": h, "mean": h}, "width": {"min": w, "max": w, "mean": w}}
                      for s in splits},
    )
    with open(os.path.join(root, schema.DATASET_JSON), "w") as f:
        f.write(info.to_json())
    return root


TINY = {"depth": 2, "base_filters": 4}


@pytest.mark.slow  # ~60 s: fit, evaluate and export on 2 shared cores
def test_odd_2d_size_fit_evaluate_export_serve(tmp_path):
    """33x34 photos and a depth-2 U-Net (multiples of 4): fit at the stored size without
    --image-size, evaluate, export; the served mask has each input's own size."""
    from tfseg.evaluate import run_evaluate
    from tfseg.export import run_export
    from tfseg.train import run_fit

    data = write_odd_2d(str(tmp_path / "data"), {"train": 8, "val": 4})
    run = run_fit({"data": data, "model": "unet", "output": str(tmp_path / "run"), "epochs": 1,
                   "batch_size": 4, "model_kwargs": TINY, "verbose": 0, "tensorboard": False, "seed": 0})
    with open(os.path.join(run, "run.json")) as f:
        assert json.load(f)["image_size"] == [33, 34]
    metrics = run_evaluate(run, data, split="val", output=str(tmp_path / "eval"), num_samples=1)
    assert metrics  # scored at the original 33x34
    version = run_export(run, str(tmp_path / "exports"), "odd")
    fn = tf.saved_model.load(version).signatures["serving_default"]
    rng = np.random.default_rng(3)
    for h, w in [(33, 34), (37, 41)]:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out = fn(image_bytes=tf.constant([_png(image)]))
        assert out["mask"].shape == (1, h, w)
        assert out["probabilities"].shape[1:3] == (33, 34)


@pytest.mark.slow  # ~25 s
def test_odd_3d_patch_fit_evaluate_export(tmp_path):
    """A 17x18x19 patch for a depth-2 3D U-Net: fit, evaluate, export; the served mask has the
    volume's size."""
    from tfseg.evaluate import run_evaluate
    from tfseg.export import run_export
    from tfseg.train import run_fit

    data = write_3d_dataset(str(tmp_path / "data"), n=2, size=20)
    run = run_fit({"data": data, "model": "unet", "output": str(tmp_path / "run"), "epochs": 1,
                   "batch_size": 2, "patch_size": "17x18x19", "model_kwargs": TINY, "verbose": 0,
                   "tensorboard": False, "seed": 0, "validation_split": None})
    run_evaluate(run, data, split="train", output=str(tmp_path / "eval"), num_samples=1)
    version = run_export(run, str(tmp_path / "exports"), "vol")
    fn = tf.saved_model.load(version).signatures["serving_default"]
    volume = np.random.default_rng(0).normal(size=(21, 20, 23, 1)).astype(np.float32)
    out = fn(volume=tf.constant(volume))
    assert tuple(out["mask"].shape) == (21, 20, 23)
