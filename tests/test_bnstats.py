"""Batch-norm statistics on short runs (tfseg.fit.bnstats, issue 13).

The thin-structure tests train about 90 steps, as the issue's electron-microscopy run, and check
that the published model predicts its own training images in inference mode (stored statistics)
as well as in training mode (batch statistics). IoU is computed here with numpy.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

from tfseg import schema


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def membranes_2d(rng, size: int = 32):
    """Grey cells separated by thin dark membranes (1-2 px, about 20% of pixels): image, mask."""
    mask = np.zeros((size, size), np.uint8)
    for axis in (0, 1):
        for pos in rng.choice(np.arange(2, size - 2), size=3, replace=False):
            width = int(rng.integers(1, 3))
            tilt = rng.uniform(-0.3, 0.3)
            for t in range(size):
                p = int(round(pos + tilt * (t - size / 2))) % size
                sl = (slice(p, p + width), t) if axis == 0 else (t, slice(p, p + width))
                mask[sl] = 1
    image = rng.normal(170, 25, (size, size))
    image[mask == 1] = rng.normal(90, 25, int(mask.sum()))
    return np.clip(image, 0, 255).astype(np.uint8)[..., None], mask


def write_membranes(root: str, n_train: int = 24, n_val: int = 8, size: int = 32, seed: int = 0) -> str:
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    splits, counts, examples = {}, {}, {}
    for split, n in (("train", n_train), ("val", n_val)):
        name = f"{split}-00000-of-00001.tfrecord"
        pix = np.zeros(2, np.int64)
        examples[split] = []
        with tf.io.TFRecordWriter(os.path.join(root, name)) as w:
            for i in range(n):
                image, mask = membranes_2d(rng, size)
                examples[split].append((image, mask))
                pix += np.bincount(mask.ravel(), minlength=2)
                w.write(schema.encode_example_2d(
                    image_bytes=_png(image[..., 0]), image_format="png", height=size, width=size,
                    channels=1, mask_png=_png(mask), source_id=f"{split}{i}"))
        splits[split] = {"count": n, "files": [name]}
        counts[split] = pix.tolist()
    hw = {"min": size, "max": size, "mean": size}
    info = schema.DatasetInfo(
        name="membranes", ndim=2, channels=1, num_classes=2, class_names=["cell", "membrane"],
        splits=splits, class_pixel_counts=counts, image_format="png",
        size_summary={s: {"height": hw, "width": hw} for s in splits},
    )
    with open(os.path.join(root, schema.DATASET_JSON), "w") as f:
        f.write(info.to_json())
    return root, examples


def mean_iou(pred: np.ndarray, label: np.ndarray, k: int = 2) -> float:
    ious = []
    for c in range(k):
        union = np.sum((pred == c) | (label == c))
        if union:
            ious.append(np.sum((pred == c) & (label == c)) / union)
    return float(np.mean(ious))


def modes_iou(model, images: np.ndarray, masks: np.ndarray, batch: int) -> tuple[float, float]:
    """Mean IoU of training-mode and inference-mode predictions (threshold 0.5) over batches."""
    train, infer = [], []
    for i in range(0, len(images) - batch + 1, batch):
        x = images[i : i + batch].astype("float32")
        train.append(model(x, training=True).numpy()[..., 0] > 0.5)
        infer.append(model(x, training=False).numpy()[..., 0] > 0.5)
    n = len(train) * batch
    label = masks[:n]
    return mean_iou(np.concatenate(train), label), mean_iou(np.concatenate(infer), label)


def membranes_3d(rng, size: int = 16):
    """A volume with three thin bright sheets (about 20% of voxels): volume, label."""
    label = np.zeros((size,) * 3, np.uint8)
    for axis in range(3):
        for pos in rng.choice(np.arange(2, size - 2), size=1, replace=False):
            sl = [slice(None)] * 3
            sl[axis] = slice(pos, pos + 1)
            label[tuple(sl)] = 1
    # Not centred (as after a per-case z-score the foreground shifts the mean): the first batch
    # norm's statistics are far from the moving averages' initial (0, 1).
    volume = 3.0 + 2.0 * (rng.normal(0, 1, label.shape) + 1.5 * label)
    return volume.astype(np.float32)[..., None], label


def write_membranes_3d(root: str, n: int = 8, size: int = 16, seed: int = 0):
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    name = "train-00000-of-00001.tfrecord"
    cases = []
    with tf.io.TFRecordWriter(os.path.join(root, name)) as w:
        for i in range(n):
            volume, label = membranes_3d(rng, size)
            cases.append((volume, label))
            w.write(schema.encode_example_3d(volume=volume, label=label, spacing=(1, 1, 1), source_id=str(i)))
    info = schema.DatasetInfo(
        name="sheets", ndim=3, channels=1, num_classes=2, class_names=["bg", "sheet"],
        splits={"train": {"count": n, "files": [name]}},
    )
    with open(os.path.join(root, schema.DATASET_JSON), "w") as f:
        f.write(info.to_json())
    return root, cases


# --------------------------------------------------------------------------------------------
# The estimator, exactly.
# --------------------------------------------------------------------------------------------


def _conv_bn(shape, seed=0):
    import keras

    from tfseg.models.norm import FusedBatchNorm

    keras.utils.set_random_seed(seed)
    inp = keras.Input(shape)
    conv = keras.layers.Conv2D(3, 3, padding="same", name="conv")
    bn = FusedBatchNorm(name="bn")
    x = bn(conv(inp))
    x = keras.layers.BatchNormalization(name="keras_bn")(keras.layers.ReLU()(x))
    return keras.Model(inp, x), conv


def test_estimator_gives_the_population_statistics_of_the_batches():
    import tensorflow as tf

    from tfseg.fit.bnstats import Estimator

    model, conv = _conv_bn((8, 8, 2))
    rng = np.random.default_rng(0)
    batches = [rng.normal(i, 1 + i, (3, 8, 8, 2)).astype("float32") for i in range(4)]
    ds = tf.data.Dataset.from_tensor_slices(np.stack(batches)).map(lambda x: (x, x)).repeat()
    est = Estimator(model, ds, batches=4)
    assert [layer.name for layer in est.layers] == ["bn", "keras_bn"]
    est()
    feats = np.concatenate([conv(b).numpy() for b in batches]).reshape(-1, 3).astype(np.float64)
    bn = model.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), feats.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), feats.var(0), rtol=1e-4)
    assert bn.momentum == 0.99 and model.get_layer("keras_bn").momentum == 0.99  # restored
    # The second layer's statistics are those of its training-mode input, also exactly.
    second = np.concatenate([
        np.maximum(bn(conv(b), training=True).numpy(), 0) for b in batches]).reshape(-1, 3)
    np.testing.assert_allclose(model.get_layer("keras_bn").moving_mean.numpy(), second.mean(0), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(model.get_layer("keras_bn").moving_variance.numpy(), second.var(0), rtol=1e-3)


def test_estimator_on_two_replicas_matches_one():
    """MirroredStrategy over 2 logical CPUs (a fresh TensorFlow): each replica takes half of each
    batch; the estimate equals the one-replica estimate and is the same on both replicas."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import json, sys
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        sys.path.insert(0, %r)
        from test_bnstats import _conv_bn
        from tfseg.fit.bnstats import Estimator
        rng = np.random.default_rng(0)
        batches = np.stack([rng.normal(i, 1 + i, (4, 8, 8, 2)).astype("float32") for i in range(4)])
        ds = tf.data.Dataset.from_tensor_slices(batches).repeat()
        out = {}
        for name, strategy in (("one", tf.distribute.get_strategy()), ("two", tf.distribute.MirroredStrategy(
                ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()))):
            with strategy.scope():
                model, conv = _conv_bn((8, 8, 2))
            Estimator(model, ds, batches=4, strategy=strategy)()
            v = model.get_layer("bn").moving_mean._value
            copies = getattr(v, "values", (v,))
            out[name] = [c.numpy().tolist() for c in copies]
            out[name + "_var"] = model.get_layer("bn").moving_variance.numpy().tolist()
        print("RESULT", json.dumps(out))
    """ % os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, proc.stderr[-3000:]
    out = json.loads(line[0][len("RESULT"):])
    assert len(out["two"]) == 2
    np.testing.assert_allclose(out["two"][0], out["two"][1])
    # Per-replica halves: the within-batch variance loses the halves' mean difference, so only
    # the means must agree exactly; the variances agree to the spread of the half-batch means.
    np.testing.assert_allclose(out["two"][0], out["one"][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["two_var"], out["one_var"], rtol=0.05)


def test_num_batches():
    from tfseg.fit.bnstats import num_batches

    assert num_batches(8) == 16 and num_batches(2) == 32 and num_batches(64) == 4
    assert num_batches(4, steps_per_epoch=6) == 6 and num_batches(4, steps_per_epoch=2) == 4


# --------------------------------------------------------------------------------------------
# A short 2D run on thin structures (the electron-microscopy case, tiny).
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def thin_run(tmp_path_factory):
    """24 training images, batch 4, 15 epochs: 90 steps. Returns (run_dir, data, examples)."""
    from tfseg.fit import run_fit

    root = tmp_path_factory.mktemp("membranes")
    data, examples = write_membranes(str(root / "data"))
    out = run_fit({
        "data": data, "model": "unet", "output": str(root / "run"), "epochs": 15, "batch_size": 4,
        "model_kwargs": {"depth": 2, "base_filters": 8}, "loss": "bce_dice", "verbose": 0,
        "tensorboard": False, "seed": 1,
    })
    return out, data, examples


def _stack(examples):
    return np.stack([e[0] for e in examples]), np.stack([e[1] for e in examples])


@pytest.mark.slow  # fast tier at about 3 minutes (issue 31): runs in CI's slow tier
def test_published_model_works_in_inference_mode(thin_run):
    """Fails before issue 13 (measured: training mode 0.882, inference mode 0.381)."""
    from tfseg import rundir

    out, _, examples = thin_run
    model = rundir.load_model(out)
    images, masks = _stack(examples["train"])
    train_iou, infer_iou = modes_iou(model, images, masks, batch=4)
    assert train_iou > 0.7, train_iou  # the model learned the membranes
    assert abs(train_iou - infer_iou) <= 0.05, (train_iou, infer_iou)
    with open(os.path.join(out, "run.json")) as f:
        health = json.load(f)["health"]
    assert health["ok"] and health["batches"] == 4
    assert abs(health["inference_mode_mean_iou"] - infer_iou) < 0.05
    assert abs(health["train_mode_mean_iou"] - train_iou) < 0.05


@pytest.mark.slow  # fast tier at about 3 minutes (issue 31): runs in CI's slow tier
def test_validation_metrics_are_the_published_models(thin_run):
    """The best epoch's val_mean_iou is what the published model (best.keras) scores on val."""
    import csv

    from tfseg import rundir
    from tfseg.data import make_dataset
    from tfseg.metrics import default_metrics

    out, data, _ = thin_run
    with open(os.path.join(out, "history.csv"), newline="") as f:
        best = max(float(r["val_mean_iou"]) for r in csv.DictReader(f))
    model = rundir.load_model(out)
    model.compile(metrics=default_metrics(2, None), loss="binary_crossentropy")
    ds = make_dataset(data, "val", batch_size=4, training=False, image_size=(32, 32))
    got = model.evaluate(ds, return_dict=True, verbose=0)["mean_iou"]
    assert abs(got - best) < 2e-3, (got, best)


@pytest.mark.slow  # fast tier at about 3 minutes (issue 31): runs in CI's slow tier
def test_health_check_flags_statistics_that_do_not_fit(thin_run):
    from tfseg import rundir
    from tfseg.data import make_dataset
    from tfseg.fit.bnstats import Estimator, health_check
    from tfseg.models.norm import batch_norm_layers

    out, data, _ = thin_run
    model = rundir.load_model(out)
    ds = make_dataset(data, "train", batch_size=4, training=True, image_size=(32, 32), repeat=-1, seed=0)
    for layer in batch_norm_layers(model):  # the moving averages' initial values
        layer.moving_mean.assign(np.zeros_like(layer.moving_mean.numpy()))
        layer.moving_variance.assign(np.ones_like(layer.moving_variance.numpy()))
    bad = health_check(model, ds, num_classes=2)
    assert not bad["ok"] and bad["difference"] > 0.1, bad
    assert np.all(batch_norm_layers(model)[0].moving_mean.numpy() == 0)  # the check changed nothing
    Estimator(model, ds, batches=6)()
    good = health_check(model, ds, num_classes=2)
    assert good["ok"] and abs(good["difference"]) < 0.05, good


# --------------------------------------------------------------------------------------------
# 3D, batch 2.
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~25 s
def test_3d_batch_2_published_model_works_in_inference_mode(tmp_path):
    """8 volumes x 4 patches, batch 2, 6 epochs: 96 steps. Fails before issue 13 (measured:
    training mode 0.999, inference mode 0.473)."""
    from tfseg import rundir
    from tfseg.fit import run_fit

    data, cases = write_membranes_3d(str(tmp_path / "data"))
    out = run_fit({
        "data": data, "model": "unet", "output": str(tmp_path / "run"), "epochs": 6, "batch_size": 2,
        "patch_size": [16, 16, 16], "model_kwargs": {"depth": 2, "base_filters": 8}, "loss": "bce_dice",
        "learning_rate": 3e-3, "verbose": 0, "tensorboard": False, "seed": 1,
    })
    model = rundir.load_model(out)
    volumes, labels = np.stack([c[0] for c in cases]), np.stack([c[1] for c in cases])
    train_iou, infer_iou = modes_iou(model, volumes, labels, batch=2)
    assert train_iou > 0.8, train_iou
    assert abs(train_iou - infer_iou) <= 0.05, (train_iou, infer_iou)
    with open(os.path.join(out, "run.json")) as f:
        assert json.load(f)["health"]["ok"]


def test_health_check_scores_like_evaluate_and_judges_nothing_when_every_pixel_is_ignored():
    import keras
    import tensorflow as tf

    from tfseg import scoring
    from tfseg.fit.bnstats import health_check

    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(3, 1, activation="softmax")])
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 8, 8, 3)).astype("float32")
    masks = rng.integers(0, 3, size=(2, 8, 8, 1)).astype("int32")
    masks[0, :4] = 255
    pred = model(images).numpy().argmax(-1)
    cm = np.zeros((3, 3), np.int64)
    for t, p in zip(masks[..., 0].ravel(), pred.ravel()):  # an independent confusion matrix
        if t != 255:
            cm[t, p] += 1
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    expected = float(np.mean(tp[union > 0] / union[union > 0]))
    health = health_check(model, tf.data.Dataset.from_tensors((images, masks)), num_classes=3, ignore_index=255)
    assert health["inference_mode_mean_iou"] == pytest.approx(expected, abs=1e-4)
    assert scoring.mean_iou(cm) == pytest.approx(expected)

    ignored = np.full_like(masks, 255)
    nothing = health_check(model, tf.data.Dataset.from_tensors((images, ignored)), num_classes=3, ignore_index=255)
    assert nothing["inference_mode_mean_iou"] is None and nothing["difference"] is None and nothing["ok"]


def test_statistics_are_estimated_on_batches_augmented_as_in_training(tmp_path):
    # The weights are trained normalized by augmented batches' statistics; estimating them on
    # unaugmented images shifted every layer (demo: car IoU 0.771 -> 0.956 with this fix).
    from helpers import write_2d_dataset

    from tfseg.fit.bnstats import stats_dataset
    from tfseg.fit.checks import check_against_dataset
    from tfseg.fit.config import FitConfig
    from tfseg.schema import load_dataset_info

    data = write_2d_dataset(str(tmp_path / "d"), {"train": 8})
    for augment, black_corners in ((None, False), ({"rotate": 45, "scale": [0.7, 0.7]}, True)):
        cfg = FitConfig.from_dict({"data": data, "model": "unet", "output": str(tmp_path / "r"), "batch_size": 4,
                                   "image_size": "32x32", "augment": augment, "seed": 1})
        images, _ = next(iter(stats_dataset(cfg, check_against_dataset(cfg, load_dataset_info(data)))))
        corners = images.numpy()[:, [0, 0, -1, -1], [0, -1, 0, -1], :]
        assert bool((corners == 0).all()) == black_corners  # rotated and zoomed out: nothing there
