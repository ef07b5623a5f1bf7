"""The shared contracts: record schema round trips, dataset.json, config overrides, atomic outputs, scoring."""

import io

import numpy as np
import pytest
from PIL import Image

from tfseg import config, schema, scoring
from tfseg.convert.base import Case, assign_split, hash_fraction, parse_split_spec
from tfseg.errors import TfsegError


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_2d_record_round_trip_is_lossless():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (7, 5), dtype=np.uint8)
    mask[0, 0] = 255
    rec = schema.encode_example_2d(
        image_bytes=_png(image), image_format="png", height=7, width=5, channels=3,
        mask_png=_png(mask), source_id="case-1",
    )
    out = schema.decode_2d(tf.constant(rec), channels=3)
    np.testing.assert_array_equal(out["image"].numpy(), image)
    np.testing.assert_array_equal(out["mask"].numpy()[..., 0], mask)
    assert out["has_mask"].numpy() and out["source_id"].numpy() == b"case-1"


def test_2d_record_without_mask_decodes_to_zeros():
    import tensorflow as tf

    image = np.full((4, 6, 1), 9, np.uint8)
    rec = schema.encode_example_2d(
        image_bytes=_png(image[..., 0]), image_format="png", height=4, width=6, channels=1,
        mask_png=None, source_id="x",
    )
    out = schema.decode_2d(tf.constant(rec), channels=1)
    assert not out["has_mask"].numpy()
    assert out["mask"].shape == (4, 6, 1) and out["mask"].numpy().max() == 0


def test_3d_record_round_trip():
    import tensorflow as tf

    rng = np.random.default_rng(1)
    vol = rng.normal(size=(3, 4, 5, 2)).astype(np.float32)
    lab = rng.integers(0, 4, (3, 4, 5), dtype=np.uint8)
    rec = schema.encode_example_3d(volume=vol, label=lab, spacing=(2.0, 1.0, 1.5), source_id="b")
    out = schema.decode_3d(tf.constant(rec), channels=2)
    np.testing.assert_allclose(out["image"].numpy(), vol.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(out["mask"].numpy()[..., 0], lab)
    np.testing.assert_allclose(out["spacing"].numpy(), [2.0, 1.0, 1.5])
    with pytest.raises(ValueError, match="does not match"):
        schema.encode_example_3d(volume=vol, label=lab[:2], spacing=(1, 1, 1), source_id="b")


def test_dataset_info_round_trip_and_errors(tmp_path):
    info = schema.DatasetInfo(name="t", ndim=2, channels=3, num_classes=2, class_names=["bg", "fg"],
                              splits={"train": {"count": 1, "files": ["train-00000-of-00001.tfrecord"]}})
    (tmp_path / "dataset.json").write_text(info.to_json())
    back = schema.load_dataset_info(str(tmp_path))
    assert back == info and back.binary
    assert back.split_files("train", "/r") == ["/r/train-00000-of-00001.tfrecord"]
    with pytest.raises(TfsegError, match="no split 'test'"):
        back.split_files("test", "/r")
    with pytest.raises(TfsegError, match="no dataset.json"):
        schema.load_dataset_info(str(tmp_path / "missing"))
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(TfsegError, match="not a valid"):
        schema.load_dataset_info(str(tmp_path))


def test_overrides_and_sizes(tmp_path):
    base = {"fit": {"epochs": 3, "augment": {"hflip": 0.5}}}
    out = config.apply_overrides(base, ["fit.epochs=7", "fit.augment.rotate=15", "name=x", "fit.size=[1, 2]"])
    assert out["fit"]["epochs"] == 7 and out["fit"]["augment"] == {"hflip": 0.5, "rotate": 15}
    assert out["name"] == "x" and out["fit"]["size"] == [1, 2] and base["fit"]["epochs"] == 3
    with pytest.raises(TfsegError, match="KEY=VALUE"):
        config.apply_overrides(base, ["fit.epochs"])
    assert config.parse_size("128x96") == (128, 96)
    assert config.parse_size("64", ndim=3) == (64, 64, 64)
    with pytest.raises(TfsegError):
        config.parse_size("12x0")
    p = tmp_path / "c.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(TfsegError, match="mapping"):
        config.load_config(str(p))


def test_splits_are_stable_and_grouped():
    spec = parse_split_spec("train=8,val=1,test=1")
    assert [n for n, _ in spec] == ["train", "val", "test"]
    assert abs(sum(f for _, f in spec) - 1) < 1e-12
    a = Case("car1_01", (("image", "a"),), group="car1")
    b = Case("car1_02", (("image", "b"),), group="car1")
    assert assign_split(a, spec) == assign_split(b, spec)
    assert assign_split(Case("x", (), split="val"), spec) == "val"
    fractions = [hash_fraction(f"id{i}") for i in range(4000)]
    assert 0.48 < np.mean(np.array(fractions) < 0.5) < 0.52
    with pytest.raises(ValueError):
        parse_split_spec("train")


def test_scoring_hand_computed():
    # truth [[0, 1], [1, 1]], prediction [[0, 1], [0, 1]]: class 1 has TP 2, FN 1, FP 0.
    cm = scoring.confusion_matrix([[0, 1], [1, 1]], [[0, 1], [0, 1]], num_classes=2)
    np.testing.assert_array_equal(cm, [[1, 0], [1, 2]])
    np.testing.assert_allclose(scoring.per_class_iou(cm), [1 / 2, 2 / 3])
    np.testing.assert_allclose(scoring.per_class_precision(cm), [1 / 2, 1])
    np.testing.assert_allclose(scoring.per_class_recall(cm), [1, 2 / 3])
    np.testing.assert_allclose(scoring.per_class_dice(cm), [2 / 3, 4 / 5])
    cm = scoring.confusion_matrix([[0, 255]], [[2, 1]], num_classes=3, ignore_index=255)
    assert cm.sum() == 1 and cm[0, 2] == 1
    assert np.isnan(scoring.per_class_iou(cm)[1])
