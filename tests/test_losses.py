"""Losses: hand-computed 2x2 cases, numpy comparisons on random data, ignore index, serialization."""

from math import log

import keras
import numpy as np
import pytest

from tfseg.losses import LOSSES, class_weights_from_counts, get_loss

# Binary 2x2 case: truth and sigmoid foreground probabilities, shaped (B, H, W, 1).
BT = np.array([[0, 1], [1, 0]]).reshape(1, 2, 2, 1)
BP = np.array([[0.2, 0.9], [0.6, 0.4]], "float32").reshape(1, 2, 2, 1)
# Multi-class 2x2 case, 3 classes.
MT = np.array([[0, 1], [2, 2]]).reshape(1, 2, 2, 1)
MP = np.array(
    [[[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]], [[0.2, 0.3, 0.5], [0.3, 0.3, 0.4]]], "float32"
).reshape(1, 2, 2, 3)


def value(name, y_true, y_pred, **kw):
    num_classes = kw.pop("num_classes", 2 if y_pred.shape[-1] == 1 else y_pred.shape[-1])
    return float(get_loss(name, num_classes=num_classes, **kw)(y_true, y_pred))


# Each: (loss name, kwargs, truth, probabilities, value computed by hand).
HAND = [
    # BCE: mean of -log of the probability given to the true class.
    ("bce", {}, BT, BP, -(log(0.8) + log(0.9) + log(0.6) + log(0.6)) / 4),
    # Dice, foreground only: TP = .9 + .6, sum p = 2.1, sum t = 2.
    ("dice", {"smooth": 0.0}, BT, BP, 1 - 3.0 / 4.1),
    ("dice", {"smooth": 1.0}, BT, BP, 1 - 4.0 / 5.1),
    ("bce_dice", {"smooth": 0.0}, BT, BP, -(log(0.8) + log(0.9) + 2 * log(0.6)) / 4 + 1 - 3.0 / 4.1),
    # Focal, gamma 2: each term scaled by (1 - p_true)^2.
    ("focal", {}, BT, BP, -(0.2**2 * log(0.8) + 0.1**2 * log(0.9) + 2 * 0.4**2 * log(0.6)) / 4),
    # Tversky: TP 1.5, FP .2 + .4, FN .1 + .4.
    ("tversky", {"smooth": 0.0}, BT, BP, 1 - 1.5 / (1.5 + 0.3 * 0.6 + 0.7 * 0.5)),
    # BCE with class weights [1, 3]: sum w*ce / sum w.
    ("bce", {"class_weights": [1, 3]}, BT, BP, -(log(0.8) + 3 * log(0.9) + 3 * log(0.6) + log(0.6)) / 8),
    # Binary, bottom-left pixel ignored.
    ("bce", {"ignore_index": 255}, np.array([0, 1, 255, 0]).reshape(1, 2, 2, 1), BP,
     -(log(0.8) + log(0.9) + log(0.6)) / 3),
    ("dice", {"ignore_index": 255, "smooth": 0.0}, np.array([0, 1, 255, 0]).reshape(1, 2, 2, 1), BP,
     1 - 1.8 / (1.5 + 1)),
    # Categorical CE.
    ("ce", {}, MT, MP, -(log(0.7) + log(0.6) + log(0.5) + log(0.4)) / 4),
    # Multi-class Dice, per class (2 TP) / (sum p + sum t): 1.4/2.3, 1.2/2.4, 1.8/3.3.
    ("dice", {"smooth": 0.0}, MT, MP, 1 - (1.4 / 2.3 + 1.2 / 2.4 + 1.8 / 3.3) / 3),
    ("dice", {"smooth": 0.0, "include_background": False}, MT, MP, 1 - (1.2 / 2.4 + 1.8 / 3.3) / 2),
    ("dice", {"smooth": 0.0, "class_weights": [0, 1, 3]}, MT, MP, 1 - (1.2 / 2.4 + 3 * 1.8 / 3.3) / 4),
    ("ce_dice", {"smooth": 0.0, "ce_weight": 0.5, "dice_weight": 2.0}, MT, MP,
     -0.5 * (log(0.7) + log(0.6) + log(0.5) + log(0.4)) / 4
     + 2 * (1 - (1.4 / 2.3 + 1.2 / 2.4 + 1.8 / 3.3) / 3)),
    # Multi-class, last pixel ignored: CE over 3 pixels; Dice 1.4/2.0, 1.2/2.1, 1.0/1.9.
    ("ce", {"ignore_index": 255}, np.array([0, 1, 2, 255]).reshape(1, 2, 2, 1), MP,
     -(log(0.7) + log(0.6) + log(0.5)) / 3),
    ("dice", {"ignore_index": 255, "smooth": 0.0}, np.array([0, 1, 2, 255]).reshape(1, 2, 2, 1), MP,
     1 - (1.4 / 2.0 + 1.2 / 2.1 + 1.0 / 1.9) / 3),
    # Multi-class Tversky alpha .5 beta .5 equals Dice.
    ("tversky", {"smooth": 0.0, "alpha": 0.5, "beta": 0.5}, MT, MP,
     1 - (1.4 / 2.3 + 1.2 / 2.4 + 1.8 / 3.3) / 3),
]


@pytest.mark.parametrize(
    "name,kw,y_true,y_pred,expected", HAND, ids=[f"{h[0]}{i}" for i, h in enumerate(HAND)]
)
def test_hand_computed_2x2(name, kw, y_true, y_pred, expected):
    assert value(name, np.asarray(y_true), y_pred, **kw) == pytest.approx(expected, rel=1e-5)


def test_hand_cases_cover_every_loss():
    assert {h[0] for h in HAND} == set(LOSSES)


# ---- independent numpy references (loops over classes and pixels) ----


def np_reference(name, y_true, probs, num_classes, ignore_index=None, class_weights=None, smooth=1.0,
                 gamma=2.0, alpha=0.3, beta=0.7):
    t = y_true.reshape(-1).astype(np.int64)
    p = probs.reshape(t.size, -1).astype(np.float64)
    if p.shape[1] == 1:
        p = np.concatenate([1 - p, p], axis=1)
    keep = (t >= 0) & (t < num_classes) & (t != (ignore_index if ignore_index is not None else -1))
    t, p = t[keep], p[keep]
    w = np.ones(num_classes) if class_weights is None else np.asarray(class_weights, np.float64)
    if name in ("ce", "focal"):
        pt = np.clip(p[np.arange(t.size), t], 1e-7, 1 - 1e-7)
        terms = -np.log(pt) * ((1 - pt) ** gamma if name == "focal" else 1.0)
        return float((terms * w[t]).sum() / w[t].sum())
    classes = [1] if num_classes == 2 else range(num_classes)
    scores, weights = [], []
    for k in classes:
        tp = p[t == k, k].sum()
        fp = p[t != k, k].sum()
        fn = (1 - p[t == k, k]).sum()
        if name == "dice":
            scores.append((2 * tp + smooth) / (2 * tp + fp + fn + smooth))
        else:
            scores.append((tp + smooth) / (tp + alpha * fp + beta * fn + smooth))
        weights.append(w[k])
    return float(1 - np.dot(scores, weights) / np.sum(weights))


def random_case(num_classes, seed, shape=(3, 5, 7)):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, (*shape, 1))
    y[rng.random(y.shape) < 0.2] = 255
    channels = 1 if num_classes == 2 else num_classes
    logits = rng.normal(size=(*shape, channels))
    if channels == 1:
        probs = 1 / (1 + np.exp(-logits))
    else:
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return y, probs.astype("float32")


@pytest.mark.parametrize("num_classes", [2, 4])
@pytest.mark.parametrize("name", ["ce", "focal", "dice", "tversky"])
@pytest.mark.parametrize("weighted", [False, True])
def test_random_data_matches_numpy(name, num_classes, weighted):
    y, probs = random_case(num_classes, seed=num_classes)
    weights = list(np.linspace(0.5, 2.0, num_classes)) if weighted else None
    kw = dict(ignore_index=255, class_weights=weights)
    got = value(name, y, probs, num_classes=num_classes, **kw)
    assert got == pytest.approx(np_reference(name, y, probs, num_classes, **kw), rel=1e-5, abs=1e-6)


def test_ignored_pixels_change_nothing():
    y, probs = random_case(5, seed=3)
    other = probs.copy()
    rng = np.random.default_rng(0)
    other[y[..., 0] == 255] = rng.dirichlet(np.ones(5), size=int((y == 255).sum()))
    for name in ("ce", "dice", "focal", "tversky", "ce_dice"):
        loss = get_loss(name, num_classes=5, ignore_index=255)
        assert float(loss(y, probs)) == pytest.approx(float(loss(y, other)), rel=1e-6), name


def test_low_precision_predictions_are_computed_in_float32():
    y, probs = random_case(3, seed=5)
    loss = get_loss("ce_dice", num_classes=3, ignore_index=255)
    out = loss(y, keras.ops.cast(probs, "bfloat16"))
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    rounded = keras.ops.cast(keras.ops.cast(probs, "bfloat16"), "float32")
    assert float(out) == pytest.approx(float(loss(y, rounded)), rel=1e-6)


def test_per_sample_values_repeat_the_batch_value():
    y, probs = random_case(3, seed=7)
    loss = get_loss("dice", num_classes=3, ignore_index=255, reduction="none")
    per_sample = np.asarray(loss(y, probs))
    assert per_sample.shape == (3,)
    assert np.allclose(per_sample, value("dice", y, probs, num_classes=3, ignore_index=255))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_serialization_round_trip(name):
    num_classes = 2 if name.startswith("bce") else 4
    loss = get_loss(name, num_classes=num_classes, ignore_index=255, class_weights=[1.0] * num_classes)
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is type(loss) and restored.get_config() == loss.get_config()
    y, probs = random_case(num_classes, seed=1)
    assert float(restored(y, probs)) == pytest.approx(float(loss(y, probs)))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("lovasz", num_classes=2)
    with pytest.raises(ValueError, match="binary"):
        get_loss("bce", num_classes=3)
    with pytest.raises(ValueError, match="class_weights has 2 values for 3 classes"):
        get_loss("ce", num_classes=3, class_weights=[1, 2])
    with pytest.raises(ValueError, match="loss dice"):
        get_loss("dice", num_classes=3, gamma=2)
    with pytest.raises(ValueError, match="channels"):
        get_loss("ce", num_classes=3)(MT, MP[..., :2])


def test_class_weights_from_counts():
    assert class_weights_from_counts([10, 30, 60]) == pytest.approx([3.0, 1.0, 0.5])  # median freq .3
    assert class_weights_from_counts([0, 10, 30]) == pytest.approx([0.0, 2.0, 2 / 3])  # median of .25, .75
    # 1/sqrt(.2) = 2 x 1/sqrt(.8); scaled to mean 1.
    assert class_weights_from_counts([10, 40], scheme="inverse_sqrt") == pytest.approx([4 / 3, 2 / 3])
    with pytest.raises(ValueError, match="scheme"):
        class_weights_from_counts([1, 2], scheme="log")
    with pytest.raises(ValueError, match="positive total"):
        class_weights_from_counts([0, 0])


@pytest.mark.parametrize("num_classes", [2, 4])
def test_losses_compile_with_xla(num_classes):
    import tensorflow as tf

    y, probs = random_case(num_classes, seed=12)
    for name in LOSSES:
        if name.startswith("bce") and num_classes != 2:
            continue
        loss = get_loss(name, num_classes=num_classes, ignore_index=255)
        compiled = tf.function(lambda t, p: loss(t, p), jit_compile=True)
        assert float(compiled(tf.constant(y, tf.int32), tf.constant(probs))) == pytest.approx(
            float(loss(y, probs)), rel=1e-5
        ), name


def _lovasz_reference(labels, probs, valid):
    """Berman et al.'s reference algorithm, one class at a time in plain numpy."""
    per_class = []
    for c in range(probs.shape[-1]):
        fg = (labels[valid] == c).astype(np.float64)
        if fg.sum() == 0:
            continue
        errors = np.abs(fg - probs[valid][:, c])
        order = np.argsort(-errors, kind="stable")
        fg_sorted = fg[order]
        gts = fg_sorted.sum()
        intersection = gts - np.cumsum(fg_sorted)
        union = gts + np.cumsum(1.0 - fg_sorted)
        jaccard = 1.0 - intersection / union
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
        per_class.append(float(np.dot(errors[order], jaccard)))
    return float(np.mean(per_class))


def _lovasz_term(labels, probs, ignore_index=None, **kw):
    both = get_loss("ce_dice", num_classes=probs.shape[-1], ignore_index=ignore_index, lovasz_weight=1.0, **kw)
    base = get_loss("ce_dice", num_classes=probs.shape[-1], ignore_index=ignore_index, **kw)
    y_true, y_pred = labels[None, ..., None], probs[None]
    return float(both(y_true, y_pred)) - float(base(y_true, y_pred))


def test_lovasz_of_hard_predictions_is_one_minus_iou():
    # On 0/1 predictions the Lovasz extension is the set function itself: 1 - IoU per class.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(6, 7))
    pred = np.where(rng.random((6, 7)) < 0.7, labels, rng.integers(0, 3, size=(6, 7)))
    probs = np.eye(3, dtype=np.float32)[pred]
    ious = [(np.sum((labels == c) & (pred == c)) / np.sum((labels == c) | (pred == c))) for c in range(3)]
    assert _lovasz_term(labels, probs) == pytest.approx(1.0 - np.mean(ious), abs=1e-5)


def test_lovasz_matches_the_reference_on_soft_predictions_with_ignored_pixels():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=(9, 11))
    labels[0, :5] = 255
    logits = rng.normal(size=(9, 11, 4))
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    expected = _lovasz_reference(labels, probs, labels != 255)
    assert _lovasz_term(labels, probs, ignore_index=255) == pytest.approx(expected, abs=1e-5)


def test_lovasz_on_a_pixel_subset_uses_every_odd_strided_pixel():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, size=(10, 10))
    probs = rng.dirichlet(np.ones(3), size=(10, 10)).astype(np.float32)
    # 100 pixels, at most 30: stride ceil(100 / 30) = 4, made odd: 5.
    flat_labels, flat_probs = labels.reshape(-1)[::5], probs.reshape(-1, 3)[::5]
    expected = _lovasz_reference(flat_labels, flat_probs, np.ones_like(flat_labels, bool))
    assert _lovasz_term(labels, probs, lovasz_pixels=30) == pytest.approx(expected, abs=1e-5)
