"""Benchmark: `tfseg predict` locally vs as a Beam job (RunInference) on the DirectRunner and on
Beam's DaskRunner with 1 and 2 workers on loopback (issue 24 item 3).

A UNet (``--model``, ``--size`` input, ``--base-filters``) is written as a RUN_DIR and exported
with :func:`tfseg.export.run_export`; ``--distinct`` smooth JPEGs of ``--image`` pixels are
generated and hard-linked under new names up to each job size. Every config predicts the same
inputs with ``run_predict`` (the export, batch ``--batch``):

- ``local``: the local predictor in this process (TensorFlow's default threads: every core);
- ``direct``: ``runner="DirectRunner"`` (in this process);
- ``dask:W``: ``runner="dask"`` against a scheduler + W worker processes (1 dask thread each,
  TF_NUM_INTRAOP_THREADS=1 / TF_NUM_INTEROP_THREADS=1: a worker is one core), started and warmed
  with one small job before the timings (the model loads once per worker process and stays).

For each config, wall = fixed + n x per-image is fitted over the job sizes (best of
``--repeats`` alternating rounds per size); CPU seconds count this process, reaped children and
the dask processes. The masks of every config are checked byte-identical to the local ones.

Usage::

    python tools/bench_predict_beam.py                       # sizes 32,128; local, direct, dask:1, dask:2
    python tools/bench_predict_beam.py --sizes 64,256 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _write_export(work: str, args) -> str:
    import keras

    from tfseg.export import run_export
    from tfseg.models import build_model

    keras.utils.set_random_seed(0)
    model = build_model(args.model, input_shape=(args.size, args.size, 3), num_classes=args.num_classes,
                        base_filters=args.base_filters)
    run_dir = os.path.join(work, "run")
    os.makedirs(run_dir)
    model.save(os.path.join(run_dir, "model.keras"))
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump({"model": args.model, "ndim": 2, "channels": 3, "num_classes": args.num_classes,
                   "binary": args.num_classes == 2, "class_names": [str(i) for i in range(args.num_classes)],
                   "image_size": [args.size, args.size]}, f)
    return run_export(run_dir, os.path.join(work, "models"), "bench")


def _write_images(folder: str, n: int, side: int, distinct: int) -> None:
    from PIL import Image

    src = os.path.join(os.path.dirname(folder), "_distinct")
    if not os.path.isdir(src):
        os.makedirs(src)
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
        for i in range(distinct):
            a, b, c = rng.uniform(0.5, 4, 3)
            img = np.stack([np.sin(a * xx + b * yy), np.cos(b * xx - c * yy), np.sin(c * xx * yy + a)], -1)
            img = ((img + 1) * 127.5 + rng.normal(0, 4, img.shape)).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(src, f"d{i}.jpg"), quality=90)
    os.makedirs(folder)
    for i in range(n):
        os.link(os.path.join(src, f"d{i % distinct}.jpg"), os.path.join(folder, f"img{i:05d}.jpg"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="32,128", help="job sizes (images)")
    p.add_argument("--configs", default="local,direct,dask:1,dask:2")
    p.add_argument("--model", default="unet")
    p.add_argument("--size", type=int, default=128, help="model input size (square)")
    p.add_argument("--image", type=int, default=256, help="JPEG side (square)")
    p.add_argument("--base-filters", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--distinct", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from bench_convert import DaskCluster, _children_cpu, _fit

    from tfseg.predict import run_predict

    sizes = sorted(int(s) for s in args.sizes.split(","))
    configs = [c for c in args.configs.split(",") if c]
    work = tempfile.mkdtemp(prefix="bench_predict_beam_")
    clusters: dict[int, DaskCluster] = {}
    try:
        model = _write_export(work, args)
        for n in sizes + [4]:
            _write_images(os.path.join(work, f"in{n}"), n, args.image, args.distinct)
        print(f"{args.model} {args.size}x{args.size} base {args.base_filters}, {args.image}x{args.image} JPEGs, "
              f"batch {args.batch}; {os.cpu_count()} CPUs (shared cores), load {os.getloadavg()[0]:.1f}", flush=True)
        old = {k: os.environ.get(k) for k in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")}
        os.environ.update(TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1")  # the workers' env only
        try:
            for c in configs:
                if c.startswith("dask:"):
                    w = int(c.split(":")[1])
                    os.makedirs(os.path.join(work, f"dask{w}"))
                    clusters[w] = DaskCluster(os.path.join(work, f"dask{w}"), w)
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)

        masks: dict[int, dict[str, dict[str, bytes]]] = {}

        def run(config, n, r):
            cluster = clusters.get(int(config.split(":")[1])) if config.startswith("dask:") else None
            kwargs = {}
            if config == "direct":
                kwargs = dict(runner="DirectRunner")
            elif cluster is not None:
                kwargs = dict(runner="dask", beam_args=[f"--dask_client_address={cluster.address}"])
            out = os.path.join(work, f"out-{config.replace(':', '')}-{n}-{r}")
            load = os.getloadavg()[0]
            c0, k0, d0 = time.process_time(), _children_cpu(), cluster.cpu_seconds() if cluster else 0.0
            w0 = time.perf_counter()
            try:
                s = run_predict(model, os.path.join(work, f"in{n}"), out, batch_size=args.batch, **kwargs)
                wall = time.perf_counter() - w0
                cpu = time.process_time() - c0 + _children_cpu() - k0 + (cluster.cpu_seconds() - d0 if cluster else 0)
                if r == 0:
                    masks.setdefault(n, {})[config] = {f: open(os.path.join(out, f), "rb").read()
                                                       for f in sorted(os.listdir(out)) if f.endswith(".png")}
            finally:
                shutil.rmtree(out, ignore_errors=True)
            assert s["written"] == n and not s["failed"], s
            return wall, cpu, load

        for c in configs:  # warm-up: model loads, imports (the dask workers keep theirs)
            run(c, 4, -1)
        rows: dict[tuple[str, int], list] = {}
        for r in range(args.repeats):
            order = configs[r % len(configs):] + configs[:r % len(configs)]
            for n in sizes:
                for c in order:
                    wall, cpu, load = run(c, n, r)
                    rows.setdefault((c, n), []).append((wall, cpu, load))
                    print(f"  round {r + 1} {c:>7} n={n:4d}: {wall:6.2f} s wall, {n / wall:6.1f} images/s, "
                          f"{cpu:6.2f} CPU-s, load {load:.1f}", flush=True)
        for n, by in masks.items():
            ref = by[configs[0]]
            for c, got in by.items():
                assert got == ref, f"n={n}: {c}'s masks differ from {configs[0]}'s"
            print(f"n={n}: every config's {len(ref)} masks byte-identical")
        best = {k: min(v) for k, v in rows.items()}
        loads = [x[2] for v in rows.values() for x in v]
        print(f"\nshared cores: load average {min(loads):.1f}-{max(loads):.1f}; best of {args.repeats}")
        print(f"| config | fixed (s) | per image (ms) | CPU per image (ms) | images/s at n={sizes[-1]} | vs local |")
        print("|---|---|---|---|---|---|")
        results = {}
        local = best.get(("local", sizes[-1]))
        for c in configs:
            fixed, per = _fit([(n, best[(c, n)][0]) for n in sizes])
            _, cper = _fit([(n, best[(c, n)][1]) for n in sizes])
            ips = sizes[-1] / best[(c, sizes[-1])][0]
            vs = local[0] / best[(c, sizes[-1])][0] if local else float("nan")
            results[c] = {"fixed_s": round(fixed, 2), "per_image_ms": round(per * 1000, 1),
                          "cpu_per_image_ms": round(cper * 1000, 1), "images_per_s": round(ips, 2),
                          "vs_local": round(vs, 2), "walls": {n: round(best[(c, n)][0], 2) for n in sizes}}
            print(f"| {c} | {fixed:.2f} | {per * 1000:.1f} | {cper * 1000:.1f} | {ips:.1f} | {vs:.2f}x |")
        if ("dask:1", sizes[-1]) in best and ("dask:2", sizes[-1]) in best:
            s = best[("dask:1", sizes[-1])][0] / best[("dask:2", sizes[-1])][0]
            results["speedup_dask"] = round(s, 2)
            print(f"dask: 2 workers / 1 worker at n={sizes[-1]}: {s:.2f}x (wall)")
        print(json.dumps(results))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        for cluster in clusters.values():
            cluster.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
