"""Fit-stage benchmarks; every figure is a ratio against a baseline measured in the same run.

    python tools/bench_fit.py                  # all three, ~2-3 min on 2 CPU cores
    python tools/bench_fit.py --only pipeline  # or: unet, rss, speed, breakdown, profile, bnstats

1. pipeline: steps/s of ``model.fit`` fed by tfseg's TFRecord pipeline (decode, augment, resize,
   batch, prefetch) over steps/s of the same model fed from in-memory tensors (target >= 0.95).
2. unet: U-Net 256x256 images/s trained the tfseg way (``run_fit`` defaults: auto precision,
   XLA auto, TFRecord input) over a plain Keras float32 U-Net of the same architecture fed from
   numpy arrays, as the seeds do (target >= 1.5x); plus achieved GFLOP/s (analytic count of the
   convolutions, training = 3x forward) against the CPU's nominal peak.
3. rss: peak RSS of a 3D fit on N and 2N cases, one subprocess each (target <= 1.1x).

Throughput is timed between batch ends after a warm-up (tracing excluded).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

# --------------------------------------------------------------------------------------------
# Synthetic converted datasets.
# --------------------------------------------------------------------------------------------


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_2d(root: str, n: int, size: int, seed: int = 0) -> tuple[str, np.ndarray, np.ndarray]:
    """Writes n JPEG images with a bright ellipse (binary masks) as 2 shards + dataset.json."""
    import tensorflow as tf

    from tfseg import schema

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, masks = [], []
    for _ in range(n):
        cy, cx, ry, rx = rng.uniform(0.3, 0.7, 2).tolist() + rng.uniform(0.1, 0.3, 2).tolist()
        mask = (((yy / size - cy) / ry) ** 2 + ((xx / size - cx) / rx) ** 2 < 1).astype(np.uint8)
        image = rng.integers(0, 80, (size, size, 3)).astype(np.uint8)
        image[mask == 1] += 120
        images.append(image)
        masks.append(mask)
    os.makedirs(root, exist_ok=True)
    files = []
    for shard in range(2):
        name = f"train-{shard:05d}-of-00002.tfrecord"
        files.append(name)
        with tf.io.TFRecordWriter(os.path.join(root, name)) as w:
            for i in range(shard, n, 2):
                w.write(schema.encode_example_2d(
                    image_bytes=_jpeg(images[i]), image_format="jpeg", height=size, width=size,
                    channels=3, mask_png=_png(masks[i]), source_id=str(i)))
    hw = {"min": size, "max": size, "mean": size}
    info = schema.DatasetInfo(
        name="bench", ndim=2, channels=3, num_classes=2, class_names=["bg", "fg"],
        splits={"train": {"count": n, "files": files}}, image_format="jpeg",
        size_summary={"train": {"height": hw, "width": hw}},
    )
    with open(os.path.join(root, schema.DATASET_JSON), "w") as f:
        f.write(info.to_json())
    return root, np.stack(images).astype(np.float32), np.stack(masks)[..., None].astype(np.int32)


def make_3d(root: str, n: int, size: int, channels: int = 4, seed: int = 0) -> str:
    import tensorflow as tf

    from tfseg import schema

    rng = np.random.default_rng(seed)
    name = "train-00000-of-00001.tfrecord"
    os.makedirs(root, exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(root, name)) as w:
        for i in range(n):
            label = np.zeros((size,) * 3, np.uint8)
            a, b = size // 4, 3 * size // 4
            label[a:b, a:b, a:b] = 1
            label[a + 4 : b - 4, a + 4 : b - 4, a + 4 : b - 4] = 2
            volume = rng.normal(0, 1, (size,) * 3 + (channels,)).astype(np.float32) + label[..., None]
            w.write(schema.encode_example_3d(volume=volume, label=label, spacing=(1, 1, 1), source_id=str(i)))
    info = schema.DatasetInfo(
        name="bench3d", ndim=3, channels=channels, num_classes=3, class_names=["bg", "a", "b"],
        splits={"train": {"count": n, "files": [name]}},
    )
    with open(os.path.join(root, schema.DATASET_JSON), "w") as f:
        f.write(info.to_json())
    return root


# --------------------------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------------------------


def _timer(warmup: int):
    import keras

    class BatchTimer(keras.callbacks.Callback):
        """Seconds per batch after ``warmup`` batches of the last epoch."""

        def __init__(self):
            super().__init__()
            self.times, self.cpu = [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.times, self.cpu = [], []

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def steps_per_second(self) -> float:
            t = self.times[warmup:]
            return (len(t) - 1) / (t[-1] - t[0])

        def steps_per_cpu_second(self) -> float:
            """Steps per CPU-second of this process (all its threads): robust to other jobs
            sharing the cores, which stretch wall time but not the work done."""
            t = self.cpu[warmup:]
            return (len(t) - 1) / (t[-1] - t[0])

    return BatchTimer()


def conv_flops(model) -> float:
    """Forward FLOPs per example of the model's convolutions (2 x multiply-adds)."""
    import keras

    total = 0.0
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.Conv2DTranspose) or isinstance(layer, keras.layers.Conv3DTranspose):
            k = np.prod(layer.kernel_size)
            cin = layer.input.shape[-1]
            total += 2.0 * np.prod(layer.input.shape[1:-1]) * cin * k * layer.filters
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv3D)):
            k = np.prod(layer.kernel_size)
            cin = layer.input.shape[-1]
            total += 2.0 * np.prod(layer.output.shape[1:-1]) * layer.filters * k * cin
    return total


def peak_gflops() -> tuple[float, str]:
    """Nominal FP32 peak: cores x GHz x 64 (AVX-512: 2 FMA units x 16 lanes x 2 flops)."""
    mhz, name = 0.0, "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz") and not mhz:
                mhz = float(line.split(":")[1])
            if line.startswith("model name") and name == "?":
                name = line.split(":")[1].strip()
    cores = len(os.sched_getaffinity(0))
    per_cycle = 64 if "avx512f" in open("/proc/cpuinfo").read() else 32
    return cores * mhz / 1000 * per_cycle, f"{cores} cores x {mhz / 1000:.2f} GHz x {per_cycle} flop/cycle ({name})"


# --------------------------------------------------------------------------------------------
# 1. TFRecord pipeline vs in-memory tensors.
# --------------------------------------------------------------------------------------------


def bench_pipeline(work: str, steps: int = 15, rounds: int = 2) -> dict:
    import keras
    import tensorflow as tf

    from tfseg.data import make_dataset
    from tfseg.losses import get_loss
    from tfseg.models import build_model

    size, batch = 128, 8
    data, x, y = make_2d(os.path.join(work, "pipe"), 64, size)
    augment = {"hflip": 0.5, "rotate": 15, "shift": 0.05, "brightness": 0.1}
    runs = {}
    for name in ("memory", "tfrecord", "tfrecord_noaug"):
        keras.utils.set_random_seed(0)
        model = build_model("unet", input_shape=(size, size, 3), num_classes=2, depth=3, base_filters=8)
        model.compile(keras.optimizers.Adam(1e-3), get_loss("bce_dice", num_classes=2))
        if name == "memory":
            ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(batch, drop_remainder=True).prefetch(2)
        else:
            ds = make_dataset(data, "train", batch_size=batch, training=True, image_size=(size, size),
                              augment=augment if name == "tfrecord" else None, repeat=-1)
        model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)  # tracing
        runs[name] = (model, ds)
    # Alternate the two, best of `rounds`: the machine is shared, so load drifts over time.
    results = {name: 0.0 for name in runs}
    for _ in range(rounds):
        for name, (model, ds) in runs.items():
            timer = _timer(warmup=1)
            model.fit(ds, steps_per_epoch=steps, epochs=1, callbacks=[timer], verbose=0)
            results[name] = max(results[name], timer.steps_per_second())
    return {
        "model": f"unet depth 3, 8 filters, {size}x{size}, batch {batch}",
        "steps_per_s_memory": round(results["memory"], 3),
        "steps_per_s_tfrecord": round(results["tfrecord"], 3),
        "ratio": round(results["tfrecord"] / results["memory"], 3),
        "target": ">= 0.95",
        "steps_per_s_tfrecord_no_augment": round(results["tfrecord_noaug"], 3),
        "ratio_no_augment": round(results["tfrecord_noaug"] / results["memory"], 3),
        "augment": augment,
    }


# --------------------------------------------------------------------------------------------
# 2. tfseg defaults vs plain Keras float32 U-Net from numpy.
# --------------------------------------------------------------------------------------------


def plain_keras_unet(size: int, depth: int, base: int):
    """The seeds' style of U-Net: Conv-BN-ReLU x2 per level, max-pool, transposed-conv decoder."""
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 3))
    x = layers.Rescaling(1.0 / 255)(inputs)
    skips = []
    for level in range(depth):
        for _ in range(2):
            x = layers.Conv2D(base * 2**level, 3, padding="same", use_bias=False)(x)
            x = layers.ReLU()(layers.BatchNormalization()(x))
        skips.append(x)
        x = layers.MaxPooling2D()(x)
    for _ in range(2):
        x = layers.Conv2D(base * 2**depth, 3, padding="same", use_bias=False)(x)
        x = layers.ReLU()(layers.BatchNormalization()(x))
    for level in reversed(range(depth)):
        x = layers.Conv2DTranspose(base * 2**level, 2, strides=2)(x)
        x = layers.Concatenate()([x, skips[level]])
        for _ in range(2):
            x = layers.Conv2D(base * 2**level, 3, padding="same", use_bias=False)(x)
            x = layers.ReLU()(layers.BatchNormalization()(x))
    outputs = layers.Conv2D(1, 1, activation="sigmoid")(x)
    return keras.Model(inputs, outputs)


def plain_keras_unet_nobn(size: int, depth: int, base: int):
    """The same U-Net without batch norm (biases on): the fastest plain-Keras model."""
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 3))
    x = layers.Rescaling(1.0 / 255)(inputs)
    skips = []
    for level in range(depth):
        for _ in range(2):
            x = layers.Conv2D(base * 2**level, 3, padding="same", activation="relu")(x)
        skips.append(x)
        x = layers.MaxPooling2D()(x)
    for _ in range(2):
        x = layers.Conv2D(base * 2**depth, 3, padding="same", activation="relu")(x)
    for level in reversed(range(depth)):
        x = layers.Conv2DTranspose(base * 2**level, 2, strides=2)(x)
        x = layers.Concatenate()([x, skips[level]])
        for _ in range(2):
            x = layers.Conv2D(base * 2**level, 3, padding="same", activation="relu")(x)
    outputs = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32")(x)
    return keras.Model(inputs, outputs)


def bench_speed(work: str, steps: int = 8, rounds: int = 4) -> dict:
    """Issue 15: tfseg defaults vs (a) plain Keras float32 with Keras BN, (b) plain Keras
    mixed_bfloat16 without BN; interleaved rounds, best of each (the cores are shared)."""
    import keras

    from tfseg import rundir, runtime
    from tfseg.data import make_dataset
    from tfseg.fit import run_fit

    size, batch, depth, base = 256, 8, 4, 16
    data, x, y = make_2d(os.path.join(work, "speed"), 32, size)
    x, y = np.concatenate([x, x]), np.concatenate([y, y]).astype(np.float32)  # 8 steps per epoch
    runs = {}
    # tfseg: run_fit with its defaults (auto precision, jit auto, TFRecord pipeline); the timer
    # keeps the model, which later rounds train further on the same pipeline.
    timer = _timer(warmup=2)
    out = run_fit({
        "data": data, "model": "unet", "output": os.path.join(work, "speed-run"), "image_size": [size, size],
        "batch_size": batch, "epochs": 1, "steps_per_epoch": steps + 2, "loss": "bce",
        "model_kwargs": {"depth": depth, "base_filters": base}, "verbose": 0, "tensorboard": False,
    }, callbacks=[timer])
    tfseg_model = timer.model
    ds = make_dataset(data, "train", batch_size=batch, training=True, image_size=(size, size), repeat=-1)
    best = {"tfseg": timer.steps_per_second() * batch}
    runs["tfseg"] = lambda t: tfseg_model.fit(ds, steps_per_epoch=steps, epochs=1, callbacks=[t], verbose=0)
    for name, build, policy in (("plain_f32_keras_bn", plain_keras_unet, "float32"),
                                ("plain_bf16_no_bn", plain_keras_unet_nobn, "mixed_bfloat16")):
        old = runtime.set_precision(policy)
        try:
            keras.utils.set_random_seed(0)
            model = build(size, depth, base)
            model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
            model.fit(x[: 2 * batch], y[: 2 * batch], batch_size=batch, epochs=1, verbose=0)  # tracing
        finally:
            runtime.set_precision(old)
        runs[name] = (lambda m: lambda t: m.fit(x, y, batch_size=batch, epochs=1, callbacks=[t], verbose=0))(model)
        best[name] = 0.0
    samples = {name: [] for name in runs}
    cpu = {name: [] for name in runs}  # images per CPU-second
    for _ in range(rounds):
        for name, run in runs.items():
            timer = _timer(warmup=1)
            run(timer)
            ips = timer.steps_per_second() * batch
            samples[name].append(round(ips, 2))
            cpu[name].append(round(timer.steps_per_cpu_second() * batch, 3))
            best[name] = max(best[name], ips)
    info = rundir.load_run_config(out)
    med = {k: float(np.median(v)) for k, v in cpu.items()}
    return {
        "model": f"unet depth {depth}, {base} filters, {size}x{size}, batch {batch}",
        "tfseg_precision": info["precision"],
        "cpu_native_bf16": runtime.cpu_has_native_bf16(),
        "images_per_s_best": {k: round(v, 2) for k, v in best.items()},
        "images_per_s_rounds": samples,
        "images_per_cpu_s_rounds": cpu,
        "cpu_ratio_a": round(med["tfseg"] / med["plain_f32_keras_bn"], 3),
        "cpu_ratio_b": round(med["tfseg"] / med["plain_bf16_no_bn"], 3),
        "speedup_vs_plain_f32_keras_bn": round(best["tfseg"] / best["plain_f32_keras_bn"], 3),
        "target_a": ">= 1.8",
        "speedup_vs_plain_bf16_no_bn": round(best["tfseg"] / best["plain_bf16_no_bn"], 3),
        "target_b": ">= 0.9",
        "median_ratio_a": round(float(np.median(samples["tfseg"]) / np.median(samples["plain_f32_keras_bn"])), 3),
        "median_ratio_b": round(float(np.median(samples["tfseg"]) / np.median(samples["plain_bf16_no_bn"])), 3),
    }


def bench_breakdown(work: str, steps: int = 4, rounds: int = 4) -> dict:
    """Where a training step's time goes: the same U-Net (tfseg builder, in-memory tensors) with
    Keras's BatchNormalization, with FusedBatchNorm and without batch norm, float32 and bf16.
    Normalization's share of a step = t(with BN) - t(without BN), in CPU-seconds (the median
    round; robust to other jobs on the cores) beside the best wall time."""
    import keras
    import tensorflow as tf

    from tfseg import runtime
    from tfseg.models import build_model
    from tfseg.models import layers as tfseg_layers

    size, batch, depth, base = 256, 8, 4, 16
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32))
    y = tf.constant((rng.random((batch, size, size, 1)) > 0.5).astype(np.float32))
    fused_norm = tfseg_layers.normalization

    def keras_norm(t, norm, *, name):
        if norm == "batch":
            return keras.layers.BatchNormalization(name=name)(t)
        return fused_norm(t, norm, name=name)

    steps_fn = {}
    for policy in ("float32", "mixed_bfloat16"):
        for bn in ("keras_bn", "fused_bn", "no_bn"):
            old = runtime.set_precision(policy)
            tfseg_layers.normalization = keras_norm if bn == "keras_bn" else fused_norm
            try:
                keras.utils.set_random_seed(0)
                model = build_model("unet", input_shape=(size, size, 3), num_classes=2, depth=depth,
                                    base_filters=base, batch_norm=bn != "no_bn")
                model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
                model.train_on_batch(x, y)  # tracing
            finally:
                tfseg_layers.normalization = fused_norm
                runtime.set_precision(old)
            steps_fn[(policy, bn)] = model
    best = {k: float("inf") for k in steps_fn}  # wall seconds per step, best round
    cpu = {k: [] for k in steps_fn}  # CPU-seconds per step (all threads), every round
    for _ in range(rounds):
        for key, model in steps_fn.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                model.train_on_batch(x, y)
            best[key] = min(best[key], (time.perf_counter() - start) / steps)
            cpu[key].append((time.process_time() - start_cpu) / steps)
    table = {}
    for policy in ("float32", "mixed_bfloat16"):
        base_t = float(np.median(cpu[(policy, "no_bn")]))
        for bn in ("keras_bn", "fused_bn", "no_bn"):
            t = float(np.median(cpu[(policy, bn)]))
            table[f"{policy}/{bn}"] = {
                "wall_ms_per_step_best": round(1000 * best[(policy, bn)], 1),
                "cpu_ms_per_step": round(1000 * t, 1),
                "normalization_cpu_ms": round(1000 * (t - base_t), 1),
                "normalization_share": round((t - base_t) / t, 3),
            }
    return {"model": f"unet depth {depth}, {base} filters, {size}x{size}, batch {batch}, train_on_batch",
            "best_of_rounds": rounds, "steps": steps, "table": table}


def _op_table(model, x, y, steps: int, top: int) -> dict:
    """TF profiler over ``steps`` train_on_batch calls: self-time per op type (host ops)."""
    import glob
    import tempfile

    import tensorflow as tf
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as plugin

    logdir = tempfile.mkdtemp(prefix="prof-")
    tf.profiler.experimental.start(logdir)
    for _ in range(steps):
        model.train_on_batch(x, y)
    tf.profiler.experimental.stop()
    paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    data, ok = plugin.xspace_to_tools_data(paths, "framework_op_stats", {})
    if not ok:
        raise RuntimeError(data[:300])
    tables = json.loads(data)
    table = tables[0] if isinstance(tables, list) else tables
    cols = [c["id"] for c in table["cols"]]
    by_type: dict = {}
    for row in table["rows"]:
        r = dict(zip(cols, (c.get("v") if c else None for c in row["c"])))
        if r.get("type") in ("IDLE", None):
            continue
        by_type[r["type"]] = by_type.get(r["type"], 0.0) + float(r["total_self_time"])
    total = sum(by_type.values())
    ranked = sorted(by_type.items(), key=lambda kv: -kv[1])
    out = {t: {"ms_per_step": round(v / 1000 / steps, 1), "share": round(v / total, 3)} for t, v in ranked[:top]}
    out["(other op types)"] = {"ms_per_step": round(sum(v for _, v in ranked[top:]) / 1000 / steps, 1),
                               "share": round(sum(v for _, v in ranked[top:]) / total, 3)}
    out["(all ops)"] = {"ms_per_step": round(total / 1000 / steps, 1), "share": 1.0}
    return out


def bench_profile(work: str, steps: int = 3, top: int = 10) -> dict:
    """Where a ccp training step goes (the committed recipe's U-Net: depth 5, 16 filters, 256x160,
    14 classes, batch 8), TF profiler self-time per op type: before (Keras BatchNormalization)
    and after (FusedBatchNorm), both mixed_bfloat16, plus Keras BN in float32."""
    import keras
    import tensorflow as tf

    from tfseg import runtime
    from tfseg.losses import get_loss
    from tfseg.models import build_model
    from tfseg.models import layers as tfseg_layers

    h, w, batch, k = 256, 160, 8, 14
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(0, 255, (batch, h, w, 3)).astype(np.float32))
    y = tf.constant(rng.integers(0, k, (batch, h, w, 1)).astype(np.int32))
    fused_norm = tfseg_layers.normalization

    def keras_norm(t, norm, *, name):
        return keras.layers.BatchNormalization(name=name)(t) if norm == "batch" else fused_norm(t, norm, name=name)

    report = {"model": f"unet depth 5, 16 filters, {h}x{w}, {k} classes, batch {batch}, loss ce",
              "profiled_steps": steps}
    for label, policy, norm in (("before: keras BN, mixed_bfloat16", "mixed_bfloat16", keras_norm),
                                ("after: FusedBatchNorm, mixed_bfloat16", "mixed_bfloat16", fused_norm),
                                ("keras BN, float32", "float32", keras_norm)):
        old = runtime.set_precision(policy)
        tfseg_layers.normalization = norm
        try:
            keras.utils.set_random_seed(0)
            model = build_model("unet", input_shape=(h, w, 3), num_classes=k, depth=5, base_filters=16)
            model.compile(keras.optimizers.Adam(1e-3), get_loss("ce", num_classes=k))
            model.train_on_batch(x, y)  # tracing
            model.train_on_batch(x, y)
        finally:
            tfseg_layers.normalization = fused_norm
            runtime.set_precision(old)
        report[label] = _op_table(model, x, y, steps, top)
    return report


def bench_unet(work: str, steps: int = 8) -> dict:
    import keras

    from tfseg import rundir, runtime
    from tfseg.fit import run_fit

    size, batch, depth, base = 256, 8, 4, 16
    data, x, y = make_2d(os.path.join(work, "unet"), 32, size)

    # Baseline: plain Keras, float32, numpy arrays.
    keras.utils.set_random_seed(0)
    plain = plain_keras_unet(size, depth, base)
    plain.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
    timer = _timer(warmup=2)
    plain.fit(x, y.astype(np.float32), batch_size=batch, epochs=2, steps_per_epoch=x.shape[0] // batch,
              callbacks=[timer], verbose=0)
    plain_ips = timer.steps_per_second() * batch
    plain_flops = conv_flops(plain)

    # tfseg: run_fit with its defaults (auto precision, jit auto, TFRecord pipeline).
    timer = _timer(warmup=2)
    out = run_fit({
        "data": data, "model": "unet", "output": os.path.join(work, "unet-run"), "image_size": [size, size],
        "batch_size": batch, "epochs": 2, "steps_per_epoch": steps, "loss": "bce",
        "model_kwargs": {"depth": depth, "base_filters": base}, "verbose": 0, "tensorboard": False,
    }, callbacks=[timer])
    tfseg_ips = timer.steps_per_second() * batch
    # The baseline once more, best of the two: the machine is shared and load drifts.
    timer = _timer(warmup=1)
    plain.fit(x, y.astype(np.float32), batch_size=batch, epochs=1, steps_per_epoch=x.shape[0] // batch,
              callbacks=[timer], verbose=0)
    plain_ips = max(plain_ips, timer.steps_per_second() * batch)
    info = rundir.load_run_config(out)
    model = rundir.load_model(out)
    tfseg_flops = conv_flops(model)
    peak, peak_note = peak_gflops()
    achieved = 3 * tfseg_flops * tfseg_ips / 1e9
    return {
        "model": f"unet depth {depth}, {base} filters, {size}x{size}, batch {batch}",
        "tfseg_precision": info["precision"],
        "tfseg_jit_compile": info["jit_compile"],
        "cpu_native_bf16": runtime.cpu_has_native_bf16(),
        "images_per_s_plain_keras_f32_numpy": round(plain_ips, 2),
        "images_per_s_tfseg_defaults": round(tfseg_ips, 2),
        "speedup": round(tfseg_ips / plain_ips, 3),
        "target": ">= 1.5",
        "forward_gflop_per_image": round(tfseg_flops / 1e9, 3),
        "plain_forward_gflop_per_image": round(plain_flops / 1e9, 3),
        "achieved_gflop_per_s_tfseg": round(achieved, 1),
        "achieved_gflop_per_s_plain": round(3 * plain_flops * plain_ips / 1e9, 1),
        "peak_gflop_per_s": round(peak, 1),
        "peak_note": peak_note,
        "fraction_of_peak": round(achieved / peak, 3),
    }


# --------------------------------------------------------------------------------------------
# 3. 3D peak RSS with N and 2N cases.
# --------------------------------------------------------------------------------------------


def _rss_child(data: str, out: str) -> None:
    from tfseg.fit import run_fit

    run_fit({
        "data": data, "model": "unet", "output": out, "patch_size": [32, 32, 32], "batch_size": 2,
        "epochs": 1, "model_kwargs": {"depth": 2, "base_filters": 4}, "verbose": 0, "tensorboard": False,
    })
    print("RSS_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def bench_rss(work: str, n: int = 12, size: int = 112) -> dict:
    results = {}
    for count in (n, 2 * n):
        data = make_3d(os.path.join(work, f"vol{count}"), count, size)
        proc = subprocess.run(
            [sys.executable, __file__, "--rss-child", data, os.path.join(work, f"rss-run{count}")],
            capture_output=True, text=True, check=False,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RSS_MB")]
        if proc.returncode or not lines:
            raise RuntimeError(proc.stderr[-3000:])
        results[count] = float(lines[-1].split()[1])
    case_mb = size**3 * 4 * 2 / 2**20
    return {
        "cases": f"{n} vs {2 * n} volumes of {size}^3 x 4 channels ({case_mb:.1f} MB each as float16), "
                 "patches 32^3, one epoch",
        "peak_rss_mb_n": round(results[n], 1),
        "peak_rss_mb_2n": round(results[2 * n], 1),
        "ratio": round(results[2 * n] / results[n], 3),
        "target": "<= 1.1",
        "extra_cases_decoded_mb": round(n * size**3 * 4 * 4 / 2**20, 1),  # what holding them would add
    }

# --------------------------------------------------------------------------------------------
# 7. Issue 13: the seed pipelines' sample runs with and without the batch-norm re-estimation.
# --------------------------------------------------------------------------------------------

_BNSTATS_CHILD = r"""
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
name, mode, work, extra = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
from tfseg.fit import bnstats
if mode == "before":
    bnstats.make_callback = lambda *a, **k: None  # Keras's moving averages alone, as before issue 13
from tfseg.convert import samples
from tfseg.pipeline import demo_overrides, load_pipeline, run_pipeline
cfg = load_pipeline(name, [*demo_overrides(load_pipeline(name)), *extra, "fit.verbose=0"])
raw = os.path.join(work, "raw")
samples.write(cfg["dataset"], raw, cfg["demo"]["sample_count"])
summary = run_pipeline(cfg, raw, os.path.join(work, "work"), stages=("convert", "fit", "evaluate"))
m = json.load(open(os.path.join(summary["paths"]["eval"], "metrics.json")))
run = json.load(open(os.path.join(summary["paths"]["run"], "run.json")))
print("RESULT", json.dumps({"split": m.get("split"), "mean_iou": m["dataset_level"]["mean_iou"],
                            "per_image_mean_iou": m["per_image_mean"]["mean_iou"], "health": run.get("health")}))
"""

BNSTATS_RUNS = (("carvana", []), ("vein", ["fit.epochs=15"]), ("isic", ["fit.epochs=15"]),
                ("voc", ["fit.epochs=15"]), ("ccp", ["fit.epochs=15"]), ("brats", ["fit.epochs=6"]))


def bench_bnstats(work: str) -> dict:
    """Each seed pipeline's sample data (``tfseg demo`` sizes; the 1-epoch demos at 15 epochs,
    brats 6) through convert, fit, evaluate: mean IoU of the published model with Keras's moving
    averages alone ("before") and with tfseg.fit.bnstats ("after"), one fresh process each."""
    results = {}
    for name, extra in BNSTATS_RUNS:
        for mode in ("before", "after"):
            out = os.path.join(work, f"bn-{name}-{mode}")
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", _BNSTATS_CHILD, name, mode, out, json.dumps(extra)],
                                  capture_output=True, text=True, check=False)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
            if proc.returncode or not lines:
                raise RuntimeError(proc.stderr[-3000:])
            res = json.loads(lines[-1][len("RESULT"):])
            res["seconds"] = round(time.perf_counter() - start)
            results[f"{name}/{mode}"] = res
            print(name, mode, json.dumps(res), flush=True)
    return results



def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["pipeline", "unet", "rss", "speed", "breakdown", "profile", "bnstats"], action="append")
    parser.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        _rss_child(*args.rss_child)
        return
    todo = args.only or ["pipeline", "unet", "rss", "speed", "breakdown", "profile"]
    report = {}
    with tempfile.TemporaryDirectory(prefix="bench_fit-") as work:
        for name in todo:
            start = time.perf_counter()
            report[name] = {"pipeline": bench_pipeline, "unet": bench_unet, "rss": bench_rss,
                            "speed": bench_speed, "breakdown": bench_breakdown,
                            "profile": bench_profile, "bnstats": bench_bnstats}[name](work)
            report[name]["bench_seconds"] = round(time.perf_counter() - start, 1)
            print(name, json.dumps(report[name], indent=2), flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
