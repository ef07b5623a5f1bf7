"""Input pipeline throughput on a generated 2D 128x128 JPEG/PNG record set.

    python tools/bench_data.py [--n 512] [--batch 16] [--seconds 8]

Baseline in the same run: the same decoded examples held in memory as tensors
(from_tensor_slices -> batch -> prefetch), which is what "no pipeline" costs.
"""

import argparse
import io
import os
import tempfile
import time

import numpy as np
from PIL import Image


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()

    import tensorflow as tf

    from tfseg import data, schema

    root = tempfile.mkdtemp(prefix="bench_data_")
    rng = np.random.default_rng(0)
    shards, recs, imgs, msks = 4, [], [], []
    for k in range(args.n):
        yy, xx = np.mgrid[:128, :128]
        m = ((yy - rng.integers(30, 98)) ** 2 + (xx - rng.integers(30, 98)) ** 2 < rng.integers(200, 900)).astype(np.uint8)
        im = np.clip(rng.normal(100, 30, (128, 128, 3)) + 80 * m[..., None], 0, 255).astype(np.uint8)
        bi, bm = io.BytesIO(), io.BytesIO()
        Image.fromarray(im).save(bi, format="JPEG", quality=90)
        Image.fromarray(m).save(bm, format="PNG")
        recs.append(schema.encode_example_2d(image_bytes=bi.getvalue(), image_format="jpeg", height=128, width=128,
                                             channels=3, mask_png=bm.getvalue(), source_id=str(k)))
        imgs.append(im)
        msks.append(m)
    files = []
    for i in range(shards):
        name = f"train-{i:05d}-of-{shards:05d}.tfrecord"
        with tf.io.TFRecordWriter(os.path.join(root, name)) as w:
            for r in recs[i::shards]:
                w.write(r)
        files.append(name)
    info = schema.DatasetInfo(name="bench", ndim=2, channels=3, num_classes=2, class_names=["bg", "fg"],
                              splits={"train": {"count": args.n, "files": files}},
                              size_summary={"train": {"height": {"min": 128, "max": 128},
                                                      "width": {"min": 128, "max": 128}}})
    with open(os.path.join(root, "dataset.json"), "w") as f:
        f.write(info.to_json())

    def rate(ds):
        it = iter(ds)
        for _ in range(5):
            next(it)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            next(it)
            n += 1
        return n / (time.perf_counter() - t0)

    x = tf.constant(np.stack(imgs), tf.float32)
    y = tf.constant(np.stack(msks)[..., None], tf.int32)
    base = rate(tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(args.batch, drop_remainder=True).prefetch(2))
    full = {"hflip": 0.5, "vflip": 0.5, "rotate": 15, "shift": 0.1, "scale": [0.9, 1.1], "hue": 0.05,
            "brightness": 0.2, "contrast": 0.2, "noise": 5.0, "blur": 0.2}
    cases = [
        ("records, no augmentation", dict(augment=None)),
        ("records, geometric aug (flip/rotate/shift/scale)", dict(augment={k: full[k] for k in ("hflip", "vflip", "rotate", "shift", "scale")})),
        ("records, all 10 augmentations", dict(augment=full)),
        ("records, all augmentations, cache=True", dict(augment=full, cache=True)),
    ]
    print(f"cpu cores: {os.cpu_count()}, batch {args.batch}, 128x128x3, {args.n} JPEG records in {shards} shards")
    print(f"{'in-memory tensors (baseline)':52s} {base:8.1f} batches/s {base * args.batch:9.0f} img/s")
    for name, kw in cases:
        ds = data.make_dataset(root, "train", batch_size=args.batch, training=True, image_size=(128, 128),
                               repeat=-1, seed=0, **kw)
        r = rate(ds)
        print(f"{name:52s} {r:8.1f} batches/s {r * args.batch:9.0f} img/s")


if __name__ == "__main__":
    main()
