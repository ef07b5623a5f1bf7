"""Helpers shared by several test modules (tests/ is on sys.path: ``from helpers import ...``).

Three kinds, each below its own heading:
  - converted datasets written with tfseg.schema (the 'squares' 2D set, 3D cubes, records of
    given examples) and read back with numpy;
  - runs: a tiny fit config, fit itself and its history, hand-made RUN_DIRs around a given or
    random model;
  - processes: free loopback ports, a GCS emulator and a local dask cluster (context managers).

TensorFlow, Keras and PIL are imported inside the functions, so modules that need none of them
(the GCS emulator tests, say) can import this one cheaply.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

from tfseg import schema

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# --------------------------------------------------------------------------------------------
# Converted datasets
# --------------------------------------------------------------------------------------------


def venv_tool(name: str) -> str:
    """A console script of the running interpreter's environment (``saved_model_cli``), found
    beside ``sys.executable`` so the tests need no activated virtual environment."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.path.exists(beside) else name


def copy_to_filesystem(src: str, dst: str) -> str:
    """Copies local folder ``src`` to ``dst`` on any TF filesystem (ram://, gs://) with tf.io.gfile
    itself, not tfseg's layer under test; returns ``dst``."""
    import tensorflow as tf

    for root, _, files in os.walk(src):
        rel = os.path.relpath(root, src)
        target = dst if rel == "." else f"{dst}/{rel}"
        tf.io.gfile.makedirs(target)
        for f in files:
            tf.io.gfile.copy(os.path.join(root, f), f"{target}/{f}", overwrite=True)
    return dst


def png(array: np.ndarray) -> bytes:
    """``array`` (uint8, HxW or HxWxC) encoded as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def squares(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """One easy binary example: a bright square (mask 1) on a dark, noisy background.

    Returns:
      image (size, size, 3) uint8 and mask (size, size) uint8 in {0, 1}.
    """
    image = rng.integers(0, 60, size=(size, size, 3)).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    side = int(rng.integers(size // 4, size // 2 + 1))
    y, x = rng.integers(0, size - side + 1, size=2)
    mask[y : y + side, x : x + side] = 1
    image[mask == 1] = rng.integers(180, 256, size=(int(mask.sum()), 3)).astype(np.uint8)
    return image, mask


def write_2d_dataset(root: str, splits: dict[str, int], *, size: int = 32, seed: int = 0) -> str:
    """Writes a binary 2D 'squares' dataset: one shard per split plus dataset.json."""
    import tensorflow as tf

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    info_splits, counts = {}, {}
    for split, n in splits.items():
        name = f"{split}-00000-of-00001.tfrecord"
        pix = np.zeros(2, np.int64)
        with tf.io.TFRecordWriter(os.path.join(root, name)) as w:
            for i in range(n):
                image, mask = squares(rng, size)
                pix += np.bincount(mask.ravel(), minlength=2)
                w.write(
                    schema.encode_example_2d(
                        image_bytes=png(image), image_format="png", height=size, width=size,
                        channels=3, mask_png=png(mask), source_id=f"{split}{i}",
                    )
                )
        info_splits[split] = {"count": n, "files": [name]}
        counts[split] = pix.tolist()
    hw = {"min": size, "max": size, "mean": size}
    info = schema.DatasetInfo(
        name="squares", ndim=2, channels=3, num_classes=2, class_names=["background", "square"],
        splits=info_splits, class_pixel_counts=counts,
        size_summary={s: {"height": hw, "width": hw} for s in splits}, image_format="png",
    )
    with open(os.path.join(root, schema.DATASET_JSON), "w") as f:
        f.write(info.to_json())
    return root


def write_3d_dataset(root: str, n: int = 2, *, size: int = 16, seed: int = 0) -> str:
    """Writes a 3-class 3D dataset of ``n`` training cubes (one channel)."""
    import tensorflow as tf

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    name = "train-00000-of-00001.tfrecord"
    with tf.io.TFRecordWriter(os.path.join(root, name)) as w:
        for i in range(n):
            label = np.zeros((size,) * 3, np.uint8)
            label[4:12, 4:12, 4:12] = 1
            label[6:10, 6:10, 6:10] = 2
            volume = (label[..., None] + rng.normal(0, 0.3, label.shape + (1,))).astype(np.float32)
            w.write(schema.encode_example_3d(volume=volume, label=label, spacing=(1, 1, 1), source_id=f"c{i}"))
    info = schema.DatasetInfo(
        name="cubes", ndim=3, channels=1, num_classes=3, class_names=["bg", "outer", "inner"],
        splits={"train": {"count": n, "files": [name]}},
    )
    with open(os.path.join(root, schema.DATASET_JSON), "w") as f:
        f.write(info.to_json())
    return root


def write_dataset(root, examples, *, ndim, channels, class_names, ignore_index=None, regions=None, split="test"):
    """Writes one shard + dataset.json; examples are (image, mask, source_id[, spacing])."""
    import tensorflow as tf

    os.makedirs(root, exist_ok=True)
    shard = f"{split}-00000-of-00001.tfrecord"
    with tf.io.TFRecordWriter(os.path.join(root, shard)) as w:
        for ex in examples:
            if ndim == 2:
                image, mask, sid = ex
                w.write(schema.encode_example_2d(
                    image_bytes=png(image), image_format="png", height=image.shape[0],
                    width=image.shape[1], channels=channels,
                    mask_png=None if mask is None else png(mask), source_id=sid,
                ))
            else:
                image, mask, sid, spacing = ex
                w.write(schema.encode_example_3d(volume=image, label=mask, spacing=spacing, source_id=sid))
    info = schema.DatasetInfo(
        name="oracle", ndim=ndim, channels=channels, num_classes=len(class_names),
        class_names=class_names, ignore_index=ignore_index, regions=regions or {},
        splits={split: {"count": len(examples), "files": [shard]}},
    )
    with open(os.path.join(root, schema.DATASET_JSON), "w") as f:
        f.write(info.to_json())
    return root


def block_mask(h, w, k, rng):
    """Class blocks on a 6x6 grid. Resized by 2 and back (half-pixel-centred bilinear), every
    block edge comes back where it was; at a corner the nearest block keeps weight 9/16. (With
    factor 3 three blocks can tie at a corner, so the tests keep to factors 1 and 2.)"""
    cells = rng.integers(0, k, (h // 6 + 1, w // 6 + 1))
    return np.kron(cells, np.ones((6, 6), int))[:h, :w].astype(np.uint8)


def read_split_numpy(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All (images float32 (N,H,W,C), masks int (N,H,W)) of a 2D split, decoded independently."""
    import tensorflow as tf
    from PIL import Image

    info = schema.load_dataset_info(data_dir)
    images, masks = [], []
    for path in info.split_files(split, data_dir):
        for rec in tf.data.TFRecordDataset(path).as_numpy_iterator():
            ex = tf.train.Example.FromString(rec).features.feature
            images.append(np.asarray(Image.open(io.BytesIO(ex[schema.IMAGE_ENCODED].bytes_list.value[0]))))
            masks.append(np.asarray(Image.open(io.BytesIO(ex[schema.MASK_ENCODED].bytes_list.value[0]))))
    return np.stack(images).astype(np.float32), np.stack(masks).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def tiny_fit_config(data: str, output: str, **kw) -> dict:
    """run_fit config of a 4-filter, depth-2 U-Net at 32x32, silent."""
    cfg = {
        "data": data, "model": "unet", "output": output, "image_size": "32x32", "epochs": 2,
        "batch_size": 4, "model_kwargs": {"depth": 2, "base_filters": 4}, "verbose": 0,
        "tensorboard": False, "seed": 1,
    }
    cfg.update(kw)
    return cfg


def fit(cfg: dict, **kw) -> str:
    """tfseg.fit.run_fit(cfg, **kw): the run directory."""
    from tfseg.fit import run_fit

    return run_fit(cfg, **kw)


def history_rows(run_dir: str) -> list[dict]:
    """The rows of RUN_DIR/history.csv as dicts of strings."""
    with open(os.path.join(run_dir, "history.csv"), newline="") as f:
        return list(csv.DictReader(f))


def make_run(path, *, ndim=2, num_classes=3, channels=3, size=(16, 16), seed=2):
    """A hand-written RUN_DIR (run.json + model.keras) with a tiny model following the contract."""
    import keras

    os.makedirs(path, exist_ok=True)
    keras.utils.set_random_seed(seed)
    inp = keras.Input(tuple(size) + (channels,))
    conv = keras.layers.Conv2D if ndim == 2 else keras.layers.Conv3D
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inp) if ndim == 2 else inp
    x = conv(8, 3, padding="same", activation="relu")(x)
    binary = num_classes == 2
    out = conv(1 if binary else num_classes, 1, activation="sigmoid" if binary else "softmax")(x)
    model = keras.Model(inp, out)
    # Sharpen the random head so the predicted classes vary from pixel to pixel: a test model
    # that predicts one class everywhere could not tell a right resize from a wrong one.
    head = model.layers[-1]
    head.set_weights([w * 30 for w in head.get_weights()])
    model.save(os.path.join(path, "model.keras"))
    cfg = {"model": "tiny", "model_kwargs": {}, "ndim": ndim, "channels": channels, "num_classes": num_classes,
           "binary": binary, "class_names": [f"c{i}" for i in range(num_classes)], "ignore_index": None,
           "regions": {}, "image_size" if ndim == 2 else "patch_size": list(size)}
    with open(os.path.join(path, "run.json"), "w") as f:
        json.dump(cfg, f)
    return str(path), model


def randomize_weights(model, seed: int = 0) -> None:
    """Random weights everywhere, moving variances positive: the batch norm's statistics count."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        shape = tuple(w.shape)
        if "moving_variance" in w.path:
            value = rng.uniform(0.5, 2.0, shape)
        elif "moving_mean" in w.path:
            value = rng.normal(0, 0.2, shape)
        else:
            value = w.numpy() + rng.normal(0, 0.05, shape)
        w.assign(value.astype(np.float32))


def oracle_model(ndim, channels, num_classes):
    """Built-in layers only, so model.keras loads in safe mode.

    2D: input channel k holds 255 * (mask == k); binary: the model outputs channel 1 / 255,
    multi-class: softmax(10 * x / 255) over the channels, whose argmax is the mask even after
    bilinear resizing blends neighbouring pixels. 3D: channel k holds (mask == k).
    """
    import keras

    shape = (None,) * ndim + (channels,)
    x = inp = keras.Input(shape)
    conv = keras.layers.Conv2D if ndim == 2 else keras.layers.Conv3D
    scale = 1 / 255.0 if ndim == 2 else 1.0
    if num_classes == 2:
        w = np.zeros((1,) * ndim + (channels, 1), np.float32)
        w[..., 1, 0] = scale
        out = conv(1, 1, use_bias=False, name="pick")(x)
    else:
        w = np.eye(channels, num_classes, dtype=np.float32) * 10 * scale
        w = w.reshape((1,) * ndim + (channels, num_classes))
        out = conv(num_classes, 1, use_bias=False, activation="softmax", name="pick")(x)
    model = keras.Model(inp, out)
    model.get_layer("pick").set_weights([w])
    return model


def write_run(
    run_dir, model, *, ndim, channels, class_names, size, ignore_index=None, regions=None, history=True
):
    """A RUN_DIR around a given ``model``: run.json, model.keras and (``history``) a 3-epoch history.csv."""
    os.makedirs(run_dir, exist_ok=True)
    run = {
        "model": "oracle", "model_kwargs": {}, "ndim": ndim, "channels": channels,
        "num_classes": len(class_names), "binary": len(class_names) == 2, "class_names": class_names,
        "ignore_index": ignore_index, "regions": regions or {},
        ("image_size" if ndim == 2 else "patch_size"): list(size), "data_dir": "",
        "config": {"fit": {"monitor": "val_mean_iou"}},
    }
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump(run, f)
    model.save(os.path.join(run_dir, "model.keras"))
    if history:
        with open(os.path.join(run_dir, "history.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["epoch", "learning_rate", "loss", "mean_iou", "val_loss", "val_mean_iou"])
            for e in range(3):
                w.writerow([e, 0.001, 1.0 / (e + 1), 0.3 * e, 1.2 / (e + 1), 0.25 * e])
    return run_dir


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def run_readme_python(readme: str, exports: str, version: int, shown_hw: tuple[int, int]) -> tuple[int, int]:
    """Runs the README's ```python block as written, from EXPORTS (its paths are relative to the
    export base), on a phone photo ``photo.jpg``: pixels stored turned, EXIF orientation 6. Returns
    the (height, width) of the mask the snippet computes: the displayed photo's when the snippet
    turns it."""
    from PIL import Image

    code = readme.split("```python\n", 1)[1].split("```", 1)[0].replace("VERSION", str(version))
    h, w = shown_hw
    sensor = Image.fromarray(np.random.default_rng(0).integers(0, 256, (w, h, 3), dtype=np.uint8))
    exif = sensor.getexif()
    exif[0x0112] = 6  # a viewer turns the stored (w, h) pixels clockwise into (h, w)
    sensor.save(os.path.join(exports, "photo.jpg"), exif=exif)
    out = subprocess.run([sys.executable, "-c", code + "\nprint(mask.size[1], mask.size[0])"], cwd=exports,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows, cols = out.stdout.split()[-2:]
    return int(rows), int(cols)


def free_ports(n: int) -> list[int]:
    """n TCP ports free on loopback right now (for worker clusters and emulators)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop(procs) -> None:
    for p in reversed(procs):
        p.terminate()
    for p in reversed(procs):
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


@contextlib.contextmanager
def gcs_emulator(log_dir, bucket: str):
    """A GCS emulator (``gcp-storage-emulator``) on a free loopback port with ``bucket`` created;
    STORAGE_EMULATOR_HOST points at it while the block runs (Beam's GCS filesystem honours it, TF's
    gs:// client does not). Yields its address."""
    port = free_ports(1)[0]
    log = open(os.path.join(log_dir, "emulator.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1",
                             f"--port={port}", "--in-memory"], stdout=log, stderr=subprocess.STDOUT)
    host = f"http://127.0.0.1:{port}"
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = host
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert proc.poll() is None, "the GCS emulator exited"
                time.sleep(0.1)
        gcs_client().create_bucket(bucket)
        yield host
    finally:
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old
        _stop([proc])
        log.close()


def gcs_client():
    """An anonymous client of the emulator STORAGE_EMULATOR_HOST names."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project="test", credentials=AnonymousCredentials())


def gcs_objects(bucket: str, prefix: str) -> dict[str, bytes]:
    """{name relative to prefix: bytes} of every object under gs://bucket/prefix/."""
    return {b.name[len(prefix) + 1:]: b.download_as_bytes()
            for b in gcs_client().list_blobs(bucket, prefix=prefix + "/")}


def gcs_upload_tree(local: str, bucket: str, prefix: str) -> None:
    """Uploads the files under ``local`` to gs://bucket/prefix/, keeping relative paths."""
    b = gcs_client().bucket(bucket)
    for root, _, files in os.walk(local):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), local).replace(os.sep, "/")
            b.blob(f"{prefix}/{rel}").upload_from_filename(os.path.join(root, f))


@contextlib.contextmanager
def dask_cluster(log_dir, env: dict | None = None):
    """A dask scheduler and two worker processes (1 thread each) on 127.0.0.1, started with ``env``
    (default: this process's); yields the scheduler file once both workers have joined."""
    from distributed import Client

    sched_file = os.path.join(log_dir, "scheduler.json")
    logs = open(os.path.join(log_dir, "cluster.log"), "w")
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", "0", "--no-dashboard", "--scheduler-file", sched_file],
                              stdout=logs, stderr=subprocess.STDOUT, env=env)]
    try:
        for _ in range(120):
            if os.path.exists(sched_file):
                break
            time.sleep(0.5)
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                                       sched_file, "--nworkers", "2", "--nthreads", "1", "--no-dashboard",
                                       "--host", "127.0.0.1"], stdout=logs, stderr=subprocess.STDOUT, env=env))
        with Client(scheduler_file=sched_file, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            assert len(client.scheduler_info()["workers"]) == 2
        yield sched_file
    finally:
        _stop(procs)
        logs.close()
