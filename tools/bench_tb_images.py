"""Cost of the TensorBoard prediction pictures (tfseg.fit.tb_images) on a training epoch.

    python tools/bench_tb_images.py                 # demo size and Carvana size, ~3 min on 2 cores
    python tools/bench_tb_images.py --only demo     # or: carvana

One ``run_fit`` per configuration with the picture forced after every epoch (the worst case);
the time spent writing each picture is measured inside the same fit and set against the epoch
it was written in (epoch wall time minus the picture, validation included, the first epoch and
its tracing left out). The default schedule writes about 4 pictures per run, so the cost per
epoch is the per-picture figure divided by ``default_every(epochs)``; both are printed, plus the
one-off cost of reading the fixed validation examples at the start.

Configurations: ``demo`` = `tfseg demo`'s fit (64x64, U-Net depth 3, 8 filters, batch 8, 67 train /
14 val images); ``carvana`` = the carvana pipeline's model and size (256x256, depth 4, 16
filters, batch 8) on 32 train / 8 val images.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

CONFIGS = {
    "demo": dict(size=64, train=67, val=14, epochs=5, depth=3, filters=8),
    "carvana": dict(size=256, train=32, val=8, epochs=3, depth=4, filters=16),
}


def _encode(array: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def make_dataset(root: str, size: int, splits: dict[str, int], seed: int = 0) -> str:
    """Binary ellipses on noise, JPEG images + PNG masks, one shard per split, dataset.json."""
    import tensorflow as tf

    from tfseg import schema

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    info_splits, counts = {}, {}
    os.makedirs(root, exist_ok=True)
    for split, n in splits.items():
        name = f"{split}-00000-of-00001.tfrecord"
        pix = np.zeros(2, np.int64)
        with tf.io.TFRecordWriter(os.path.join(root, name)) as w:
            for i in range(n):
                cy, cx, ry, rx = rng.uniform(0.3, 0.7, 2).tolist() + rng.uniform(0.1, 0.3, 2).tolist()
                mask = (((yy / size - cy) / ry) ** 2 + ((xx / size - cx) / rx) ** 2 < 1).astype(np.uint8)
                image = rng.integers(0, 80, (size, size, 3)).astype(np.uint8)
                image[mask == 1] += 120
                pix += np.bincount(mask.ravel(), minlength=2)
                w.write(schema.encode_example_2d(
                    image_bytes=_encode(image, "JPEG"), image_format="jpeg", height=size, width=size,
                    channels=3, mask_png=_encode(mask, "PNG"), source_id=f"{split}{i}"))
        info_splits[split] = {"count": n, "files": [name]}
        counts[split] = pix.tolist()
    hw = {"min": size, "max": size, "mean": size}
    info = schema.DatasetInfo(
        name="ellipses", ndim=2, channels=3, num_classes=2, class_names=["background", "ellipse"],
        splits=info_splits, class_pixel_counts=counts,
        size_summary={s: {"height": hw, "width": hw} for s in splits}, image_format="jpeg")
    with open(os.path.join(root, schema.DATASET_JSON), "w") as f:
        f.write(info.to_json())
    return root


def bench(name: str, work: str) -> dict:
    import keras

    from tfseg.fit import run_fit, tb_images

    c = CONFIGS[name]
    data = make_dataset(os.path.join(work, name + "-data"), c["size"], {"train": c["train"], "val": c["val"]})
    picture_s, load_s = [], []
    real_write, real_begin = tb_images.PredictionImages.write, tb_images.PredictionImages.on_train_begin

    def timed_write(self, step):
        t = time.perf_counter()
        real_write(self, step)
        picture_s.append((step, time.perf_counter() - t))

    def timed_begin(self, logs=None):
        t = time.perf_counter()
        real_begin(self, logs)
        load_s.append(time.perf_counter() - t)

    epoch_s = {}

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):  # runs after tfseg's callbacks, picture included
            epoch_s[epoch + 1] = time.perf_counter() - self.t

    tb_images.PredictionImages.write = timed_write
    tb_images.PredictionImages.on_train_begin = timed_begin
    old_times = tb_images.TIMES_PER_RUN
    tb_images.TIMES_PER_RUN = c["epochs"]  # a picture after every epoch: the worst case
    try:
        run_fit({
            "data": data, "model": "unet", "output": os.path.join(work, name + "-run"),
            "image_size": [c["size"], c["size"]], "epochs": c["epochs"], "batch_size": 8,
            "model_kwargs": {"depth": c["depth"], "base_filters": c["filters"], "batch_norm": True},
            "loss": "bce_dice", "verbose": 0, "tensorboard": True, "seed": 0,
        }, callbacks=[EpochTimer()])
    finally:
        tb_images.PredictionImages.write, tb_images.PredictionImages.on_train_begin = real_write, real_begin
        tb_images.TIMES_PER_RUN = old_times
    rows = [(step, p, epoch_s[step] - p) for step, p in picture_s if step > 1]  # epoch 1 traces
    per_picture = float(np.median([p / e for _, p, e in rows]))
    every = tb_images.default_every(30 if name == "carvana" else 25)  # the pipelines' epochs
    return {
        "config": name, **c,
        "picture_ms": round(1000 * float(np.median([p for _, p, _ in rows])), 1),
        "epoch_s_without_picture": round(float(np.median([e for _, _, e in rows])), 2),
        "per_picture_pct_of_epoch": round(100 * per_picture, 2),
        "default_every": every,
        "default_pct_per_epoch": round(100 * per_picture / every, 2),
        "load_examples_s": round(load_s[0], 2) if load_s else None,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=sorted(CONFIGS))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_tb_") as work:
        for name in ([args.only] if args.only else list(CONFIGS)):
            print(json.dumps(bench(name, work)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
