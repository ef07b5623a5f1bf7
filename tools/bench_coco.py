"""Benchmark: ``tfseg convert --dataset coco`` vs a plain pycocotools loop, on a COCO-format sample.

Both sides read the same N images + ``annotations/instances_{train,val}2017.json`` (written once by
``samples.write("coco", ...)`` at COCO's usual 480x640, 1-3 objects, crowds, RLE) in the same
invocation:

- baseline: what a user writes by hand: ``COCO(json)``, then for each image PIL-decode the JPEG,
  ``annToMask`` every annotation and paint them by the same rule (crowd 255, then from large to
  small), PNG-encode the mask and write image bytes + mask into one ``tf.io.TFRecordWriter``;
- tfseg: ``run_convert("coco", ...)`` (the Beam job on the DirectRunner, its default threads:
  validation, class counts, sharded deterministic output, dataset.json).

The two outputs' masks are compared afterwards (outside the timings): they must be equal.
Rounds alternate the two sides and keep each side's best wall time, because the machine may be
shared; CPU seconds (user + system, this process and its children) are printed too.

Usage::

    python tools/bench_coco.py                  # 500 images, 2 rounds
    python tools/bench_coco.py --count 100 --repeats 1
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def baseline(raw: str, out: str) -> dict[str, np.ndarray]:
    """The plain loop; returns {stem: mask} for the comparison."""
    import tensorflow as tf
    from PIL import Image
    from pycocotools.coco import COCO

    masks = {}
    os.makedirs(out, exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(out, "baseline.tfrecord")) as writer:
        for split in ("train2017", "val2017"):
            coco = COCO(os.path.join(raw, "annotations", f"instances_{split}.json"))
            classes = {c: i + 1 for i, c in enumerate(sorted(coco.cats))}
            for iid in sorted(coco.imgs):
                img = coco.imgs[iid]
                path = os.path.join(raw, split, img["file_name"])
                with open(path, "rb") as f:
                    data = f.read()
                Image.open(io.BytesIO(data)).convert("RGB").load()
                mask = np.zeros((img["height"], img["width"]), np.uint8)
                anns = []
                for a in coco.loadAnns(coco.getAnnIds(imgIds=iid)):
                    if isinstance(a["segmentation"], list):  # pycocotools fails on 2-point parts
                        a = dict(a, segmentation=[p for p in a["segmentation"] if len(p) >= 6])
                    anns.append((a, coco.annToMask(a).astype(bool)))
                for a, m in anns:
                    if a["iscrowd"]:
                        mask[m] = 255
                objects = [x for x in anns if not x[0]["iscrowd"]]
                for a, m in sorted(objects, key=lambda x: (-int(x[1].sum()), x[0]["id"])):
                    mask[m] = classes[a["category_id"]]
                buf = io.BytesIO()
                Image.fromarray(mask).save(buf, format="PNG")
                feature = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
                           "mask": tf.train.Feature(bytes_list=tf.train.BytesList(value=[buf.getvalue()]))}
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
                masks[os.path.splitext(img["file_name"])[0]] = mask
    return masks


def tfseg_masks(out: str) -> dict[str, np.ndarray]:
    import tensorflow as tf

    from tfseg import schema

    info = schema.load_dataset_info(out)
    masks = {}
    for split in info.splits:
        for r in tf.data.TFRecordDataset(info.split_files(split, out)):
            d = schema.decode_2d(r, info.channels)
            masks[d["source_id"].numpy().decode()] = d["mask"].numpy()[..., 0]
    return masks


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=500)
    ap.add_argument("--size", default="480x640", help="HxW of the generated images")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="keep the data here (default: a temporary folder)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from tfseg.cli import quiet

    quiet.quiet_environment()
    import tensorflow as tf  # noqa: F401  (imported once, outside the timings)

    from tfseg.convert.pipeline import run_convert

    h, w = (int(v) for v in args.size.split("x"))
    root = args.workdir or tempfile.mkdtemp(prefix="bench_coco_")
    raw = os.path.join(root, "raw")
    t0 = time.time()
    if not os.path.isdir(raw):
        from tfseg.convert import samples

        samples.write("coco", raw, args.count, seed=0, image_size=(h, w))
    n_ann = sum(len(json.load(open(os.path.join(raw, "annotations", f)))["annotations"])
                for f in os.listdir(os.path.join(raw, "annotations")))
    print(f"data: {args.count} images {w}x{h}, {n_ann} annotations ({time.time() - t0:.1f} s to generate)")
    best = {"baseline": (float("inf"), 0.0), "tfseg": (float("inf"), 0.0)}
    for rnd in range(args.repeats):
        for side in ("baseline", "tfseg"):
            out = os.path.join(root, f"out_{side}")
            shutil.rmtree(out, ignore_errors=True)
            c0, t0 = cpu_seconds(), time.perf_counter()
            if side == "baseline":
                base_masks = baseline(raw, out)
            else:
                run_convert("coco", raw, out)
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            print(f"round {rnd + 1} {side:8s}: {wall:6.2f} s wall, {cpu:6.2f} CPU-s, {args.count / wall:6.1f} images/s")
            if wall < best[side][0]:
                best[side] = (wall, cpu)
    ours = tfseg_masks(os.path.join(root, "out_tfseg"))
    same = sorted(ours) == sorted(base_masks) and all(np.array_equal(ours[k], base_masks[k]) for k in ours)
    (bw, bc), (tw, tc) = best["baseline"], best["tfseg"]
    print(f"best: baseline {bw:.2f} s ({bc:.2f} CPU-s), tfseg {tw:.2f} s ({tc:.2f} CPU-s); "
          f"tfseg / baseline speed = {bw / tw:.2f}x wall, {bc / tc:.2f}x CPU; masks identical: {same}")
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
