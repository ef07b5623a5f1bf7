"""Confusion-matrix metrics against tfseg.scoring (numpy), hand-computed 2x2 cases, batching, replicas."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from tfseg import scoring
from tfseg.metrics import (
    ClassIoU,
    ClassPrecision,
    ClassRecall,
    ConfusionMatrixMetric,
    Dice,
    MeanIoU,
    RegionDice,
    default_metrics,
)

MSD = {"WT": [1, 2, 3], "TC": [2, 3], "ET": [3]}


def measure(metric, y_true, y_pred):
    metric.update_state(y_true, y_pred)
    return np.asarray(metric.result())


def one_hot_probs(ids, num_classes):
    return np.eye(num_classes, dtype="float32")[np.asarray(ids)]


def random_case(num_classes, seed, shape=(3, 6, 5), ignore=255):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, (*shape, 1))
    y[rng.random(y.shape) < 0.15] = ignore
    if num_classes == 2:
        probs = rng.random((*shape, 1)).astype("float32")
        pred = (probs[..., 0] > 0.5).astype(int)
    else:
        probs = rng.dirichlet(np.ones(num_classes), size=shape).astype("float32")
        pred = probs.argmax(-1)
    return y, probs, pred


@pytest.mark.parametrize("num_classes", [2, 3, 6])
def test_random_data_matches_scoring(num_classes):
    y, probs, pred = random_case(num_classes, seed=num_classes)
    cm = scoring.confusion_matrix(y, pred, num_classes, ignore_index=255)
    tol = dict(rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(measure(ConfusionMatrixMetric(num_classes, 255), y, probs), cm)
    for metric, expected in [
        (MeanIoU, scoring.nanmean(scoring.per_class_iou(cm))),
        (ClassIoU, scoring.per_class_iou(cm)),
        (ClassPrecision, scoring.per_class_precision(cm)),
        (ClassRecall, scoring.per_class_recall(cm)),
    ]:
        np.testing.assert_allclose(measure(metric(num_classes, 255), y, probs), expected, **tol)
    for k in range(num_classes):
        np.testing.assert_allclose(
            measure(ClassIoU(num_classes, 255, class_id=k), y, probs), scoring.per_class_iou(cm)[k], **tol
        )
    dice = scoring.per_class_dice(cm)
    expected = dice[1] if num_classes == 2 else scoring.nanmean(dice)
    np.testing.assert_allclose(measure(Dice(num_classes, 255), y, probs), expected, **tol)
    if num_classes > 2:
        np.testing.assert_allclose(
            measure(Dice(num_classes, 255, include_background=False), y, probs),
            scoring.nanmean(dice[1:]),
            **tol,
        )


def test_region_dice_matches_numpy_on_3d_data():
    y, probs, pred = random_case(4, seed=11, shape=(2, 4, 5, 6))
    t = y[..., 0]
    valid = t != 255
    for name, ids in MSD.items():
        tr, pr = np.isin(t, ids) & valid, np.isin(pred, ids) & valid
        expected = 2 * (tr & pr).sum() / (tr.sum() + pr.sum())
        got = measure(RegionDice(4, MSD, region=name, ignore_index=255), y, probs)
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_hand_computed_binary_2x2():
    y = np.array([[0, 1], [1, 1]]).reshape(1, 2, 2, 1)
    probs = np.array([[0.7, 0.8], [0.2, 0.9]], "float32").reshape(1, 2, 2, 1)  # predicts [[1,1],[0,1]]
    # TP 2, FP 1 (top-left), FN 1 (bottom-left), TN 0.
    np.testing.assert_array_equal(measure(ConfusionMatrixMetric(2), y, probs), [[0, 1], [1, 2]])
    assert measure(ClassIoU(2, class_id=1), y, probs) == pytest.approx(2 / 4)
    assert measure(ClassIoU(2, class_id=0), y, probs) == pytest.approx(0.0)
    assert measure(MeanIoU(2), y, probs) == pytest.approx(0.25)
    assert measure(Dice(2), y, probs) == pytest.approx(4 / 6)
    assert measure(ClassPrecision(2, class_id=1), y, probs) == pytest.approx(2 / 3)
    assert measure(ClassRecall(2, class_id=1), y, probs) == pytest.approx(2 / 3)


def test_hand_computed_multiclass_2x2_with_absent_class():
    y = np.array([[0, 1], [2, 2]]).reshape(1, 2, 2, 1)
    probs = one_hot_probs([[[0, 2], [2, 1]]], 4)  # class 3 is neither true nor predicted
    # IoU: class 0 1/1, class 1 0/2, class 2 1/3, class 3 undefined (left out of the mean).
    iou = measure(ClassIoU(4), y, probs)
    np.testing.assert_allclose(iou[:3], [1, 0, 1 / 3], rtol=1e-6)
    assert np.isnan(iou[3])
    assert measure(MeanIoU(4), y, probs) == pytest.approx(4 / 9)
    assert measure(Dice(4), y, probs) == pytest.approx((1 + 0 + 2 / 4) / 3)


def test_hand_computed_brats_regions_2x2():
    y = np.array([[0, 1], [2, 3]]).reshape(1, 2, 2, 1)
    probs = one_hot_probs([[[1, 1], [3, 3]]], 4)
    # WT: truth 3 pixels, prediction 4, overlap 3; TC: identical pair; ET: truth 1, prediction 2.
    for region, expected in {"WT": 6 / 7, "TC": 1.0, "ET": 2 / 3}.items():
        assert measure(RegionDice(4, MSD, region=region), y, probs) == pytest.approx(expected)
    assert measure(RegionDice(4, MSD), y, probs) == pytest.approx((6 / 7 + 1 + 2 / 3) / 3)
    # The BraTS convention (labels 1, 2, 4 remapped to 1, 2, 3): WT {1,2,3}, TC {1,3}, ET {3}.
    brats = {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}
    # TC truth {1, 3} = 2 pixels, prediction {1, 1, 3, 3} = 4, overlap 2.
    assert measure(RegionDice(4, brats, region="TC"), y, probs) == pytest.approx(4 / 6)


def test_ignore_index_pixels_are_not_counted():
    y = np.array([[255, 1], [1, 255]]).reshape(1, 2, 2, 1)
    probs = np.array([[0.9, 0.9], [0.1, 0.1]], "float32").reshape(1, 2, 2, 1)
    cm = measure(ConfusionMatrixMetric(2, ignore_index=255), y, probs)
    np.testing.assert_array_equal(cm, [[0, 0], [1, 1]])
    assert measure(Dice(2, ignore_index=255), y, probs) == pytest.approx(2 / 3)


def test_several_batches_equal_one_big_batch():
    y, probs, _ = random_case(5, seed=21, shape=(6, 8, 8))
    whole = [m for m in default_metrics(5, 255, {"A": [1, 2], "B": [4]})] + [ClassIoU(5, 255)]
    parts = [m for m in default_metrics(5, 255, {"A": [1, 2], "B": [4]})] + [ClassIoU(5, 255)]
    for m in whole:
        m.update_state(y, probs)
    for start, stop in [(0, 1), (1, 4), (4, 6)]:
        for m in parts:
            m.update_state(y[start:stop], probs[start:stop])
    for a, b in zip(whole, parts):
        np.testing.assert_allclose(np.asarray(a.result()), np.asarray(b.result()), rtol=1e-7, err_msg=a.name)
        np.testing.assert_array_equal(a.confusion_matrix.numpy(), b.confusion_matrix.numpy())


def test_reset_and_sample_weight():
    y, probs, pred = random_case(3, seed=4)
    m = ConfusionMatrixMetric(3, 255)
    m.update_state(y, probs)
    m.reset_state()
    assert m.confusion_matrix.numpy().sum() == 0
    m.update_state(y, probs, sample_weight=np.array([1.0, 0.0, 1.0]))
    keep = [0, 2]
    np.testing.assert_array_equal(m.result(), scoring.confusion_matrix(y[keep], pred[keep], 3, 255))


def test_integer_predictions_are_class_ids():
    y, _, pred = random_case(4, seed=8)
    cm = measure(ConfusionMatrixMetric(4, 255), y, pred.astype("int32"))
    np.testing.assert_array_equal(cm, scoring.confusion_matrix(y, pred, 4, 255))


def test_default_metrics_and_serialization():
    metrics = default_metrics(4, ignore_index=255, regions=MSD)
    assert [m.name for m in metrics] == ["mean_iou", "dice", "dice_WT", "dice_TC", "dice_ET"]
    y, probs, _ = random_case(4, seed=2)
    for m in metrics + [ClassIoU(4, 255, class_id=2)]:
        restored = keras.metrics.deserialize(keras.metrics.serialize(m))
        assert type(restored) is type(m) and restored.get_config() == m.get_config()
        np.testing.assert_allclose(measure(restored, y, probs), measure(m, y, probs), rtol=1e-7)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="outside"):
        RegionDice(4, {"WT": [1, 4]})
    with pytest.raises(ValueError, match="not one of"):
        RegionDice(4, MSD, region="NCR")
    with pytest.raises(ValueError, match="num_classes == 2"):
        MeanIoU(3).update_state(np.zeros((1, 2, 2, 1)), np.zeros((1, 2, 2, 1), "float32"))
    with pytest.raises(ValueError, match="class_id"):
        ClassIoU(3, class_id=3)


_REPLICA_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from tfseg.metrics import MeanIoU, ConfusionMatrixMetric
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    # Replica 0 sees 1 pixel, replica 1 sees 3: averaging per-replica ratios would be wrong.
    y = [rng.integers(0, 3, (1, 1, 1, 1)), rng.integers(0, 3, (1, 3, 1, 1))]
    p = [rng.dirichlet(np.ones(3), size=(1, 1, 1)), rng.dirichlet(np.ones(3), size=(1, 3, 1))]
    with strategy.scope():
        metrics = [MeanIoU(3), ConfusionMatrixMetric(3)]
    def values(data, dtype):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(data[ctx.replica_id_in_sync_group], dtype))
    @tf.function
    def step(y_true, y_pred):
        for m in metrics:
            m.update_state(y_true, y_pred)
    strategy.run(step, args=(values(y, tf.int32), values(p, tf.float32)))
    json.dump({"miou": float(metrics[0].result()), "cm": metrics[1].result().numpy().tolist(),
               "y": [a.ravel().tolist() for a in y], "p": [a.argmax(-1).ravel().tolist() for a in p]},
              sys.stdout)
    """
)


@pytest.mark.slow  # fast tier at about 3 minutes (issue 31): runs in CI's slow tier
def test_mirrored_strategy_sums_confusion_matrices():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "-c", _REPLICA_SCRIPT], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    cm = scoring.confusion_matrix(sum(got["y"], []), sum(got["p"], []), 3)
    np.testing.assert_array_equal(got["cm"], cm)
    assert got["miou"] == pytest.approx(scoring.nanmean(scoring.per_class_iou(cm)), abs=1e-6)


@pytest.mark.parametrize("num_classes,regions", [(2, None), (4, MSD)])
def test_update_compiles_with_xla(num_classes, regions):
    import tensorflow as tf

    y, probs, _ = random_case(num_classes, seed=9)
    eager = default_metrics(num_classes, 255, regions)
    compiled = default_metrics(num_classes, 255, regions)

    @tf.function(jit_compile=True)
    def update(y_true, y_pred):
        for m in compiled:
            m.update_state(y_true, y_pred)

    update(tf.constant(y, tf.int32), tf.constant(probs))
    for a, b in zip(eager, compiled):
        np.testing.assert_allclose(measure(a, y, probs), np.asarray(b.result()), rtol=1e-7)
