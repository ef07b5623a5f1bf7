"""Serving overhead: the exported serving_default (JPEG bytes in, mask out) vs the bare Keras forward.

Builds a tfseg UNet, writes a RUN_DIR and exports it with :func:`tfseg.export.run_export` (the
real path), then, in this one process, times

* ``serving_default`` on one 512x512 JPEG: decode, validate, resize, model, resize back,
  threshold/argmax, PNG-encode (the mask is fetched to numpy);
* the bare Keras forward pass on the same pre-processed (resized, float32) tensor, both as
  ``model(x)`` wrapped in one ``tf.function`` (the fair, graph-mode baseline; the ratio target
  <= 1.2x is against it) and eager ``model(x, training=False)`` for reference;

and images/s at batch 8 for both. Then a model built under ``mixed_bfloat16`` (as ``fit
--precision auto`` trains on a CPU with AVX512-BF16 or a GPU) is exported twice, with the
default ``--precision float32`` and with ``--precision mixed_bfloat16``, and both
``serving_default`` graphs are timed interleaved on the same JPEG (``bf16_export_vs_float32``
is their p50 ratio; skip with ``--no-bf16``). Run::

    python tools/bench_serve.py --size 256 --base-filters 16 --repeats 30
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np


def _timeit(fns, repeats: int, warmup: int = 3) -> list[np.ndarray]:
    """Per-call seconds of each function, calls interleaved so that load from other processes
    on a shared machine hits all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [np.array(t) for t in times]


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(flag in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="unet")
    p.add_argument("--size", type=int, default=256, help="model input size (square)")
    p.add_argument("--image", type=int, default=512, help="JPEG side (square)")
    p.add_argument("--base-filters", type=int, default=16)
    p.add_argument("--num-classes", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="skip the bf16-trained model exported in float32 and in bfloat16")
    args = p.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    from PIL import Image

    from tfseg.export import run_export
    from tfseg.models import build_model

    work = tempfile.mkdtemp(prefix="bench_serve-")

    def write_run(name, policy):
        """A RUN_DIR holding the benchmark model built under the Keras dtype policy ``policy``."""
        import keras

        old = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(policy)
        try:
            keras.utils.set_random_seed(0)
            model = build_model(args.model, input_shape=(args.size, args.size, 3), num_classes=args.num_classes,
                                base_filters=args.base_filters)
        finally:
            keras.mixed_precision.set_global_policy(old)
        run_dir = os.path.join(work, name)
        os.makedirs(run_dir)
        model.save(os.path.join(run_dir, "model.keras"))
        with open(os.path.join(run_dir, "run.json"), "w") as f:
            json.dump({"model": args.model, "ndim": 2, "channels": 3, "num_classes": args.num_classes,
                       "binary": args.num_classes == 2, "class_names": [str(i) for i in range(args.num_classes)],
                       "image_size": [args.size, args.size], "precision": policy}, f)
        return run_dir, model

    run_dir, model = write_run("run", "float32")
    version_dir = run_export(run_dir, os.path.join(work, "models"), "bench")
    serve = tf.saved_model.load(version_dir).signatures["serving_default"]

    rng = np.random.default_rng(0)
    # A smooth image: JPEG of pure noise is unrealistically large and slow to decode.
    yy, xx = np.mgrid[0 : args.image, 0 : args.image]
    base = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.float32)
    image = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    one = tf.constant([jpeg])
    batch = tf.constant([jpeg] * args.batch)
    x1 = tf.image.resize(tf.cast(tf.io.decode_jpeg(jpeg, channels=3), tf.float32), (args.size, args.size))[None]
    x8 = tf.repeat(x1, args.batch, axis=0)

    forward = tf.function(lambda x: model(x, training=False))

    def run_serve(inp):
        return lambda: serve(image_bytes=inp)["mask"].numpy()

    def run_forward(inp):
        return lambda: forward(inp).numpy()

    def run_eager(inp):
        return lambda: model(inp, training=False).numpy()

    t_serve, t_fwd = _timeit([run_serve(one), run_forward(x1)], args.repeats)
    (t_eager,) = _timeit([run_eager(x1)], max(3, args.repeats // 4), warmup=1)
    t_serve8, t_fwd8 = _timeit([run_serve(batch), run_forward(x8)], max(3, args.repeats // 4))

    def ms(t, q):
        return 1000 * float(np.percentile(t, q))

    res = {
        "device": (tf.config.list_physical_devices("GPU") or ["CPU"])[0].__str__(),
        "model": f"{args.model} base_filters={args.base_filters} input {args.size}x{args.size}, "
                 f"{args.num_classes} classes, JPEG {args.image}x{args.image} ({len(jpeg)} bytes)",
        "serving_default_ms": {"p50": ms(t_serve, 50), "p95": ms(t_serve, 95)},
        "keras_forward_tf_function_ms": {"p50": ms(t_fwd, 50), "p95": ms(t_fwd, 95)},
        "keras_forward_eager_ms": {"p50": ms(t_eager, 50), "p95": ms(t_eager, 95)},
        "ratio_p50_vs_tf_function": ms(t_serve, 50) / ms(t_fwd, 50),
        "ratio_p95_vs_tf_function": ms(t_serve, 95) / ms(t_fwd, 95),
        "ratio_p50_vs_eager": ms(t_serve, 50) / ms(t_eager, 50),
        f"serving_default_images_per_s_batch{args.batch}": args.batch / float(np.median(t_serve8)),
        f"keras_forward_images_per_s_batch{args.batch}": args.batch / float(np.median(t_fwd8)),
    }
    if args.bf16:
        bf16_run, _ = write_run("run_bf16", "mixed_bfloat16")
        exports = {p: run_export(bf16_run, os.path.join(work, "models"), f"bf16_{p}", precision=p)
                   for p in ("float32", "mixed_bfloat16")}
        fns = {p: tf.saved_model.load(d).signatures["serving_default"] for p, d in exports.items()}
        t_f32, t_bf16 = _timeit([lambda: fns["float32"](image_bytes=one)["mask"].numpy(),
                                 lambda: fns["mixed_bfloat16"](image_bytes=one)["mask"].numpy()], args.repeats)
        res["bf16_trained_model"] = {
            "export_float32_ms": {"p50": ms(t_f32, 50), "p95": ms(t_f32, 95)},
            "export_mixed_bfloat16_ms": {"p50": ms(t_bf16, 50), "p95": ms(t_bf16, 95)},
            "bf16_export_vs_float32_p50": ms(t_bf16, 50) / ms(t_f32, 50),
            "cpu_flags_bf16": _cpu_has("avx512_bf16") or _cpu_has("amx_bf16"),
        }
    json.dump(res, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
