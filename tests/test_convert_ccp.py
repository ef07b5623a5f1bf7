"""The CCP layout: the 59 -> 14 table, real files, the synthetic sample, bad .mat files, end to end."""

import os

import numpy as np
import pytest
import scipy.io
from PIL import Image

from tfseg.convert import ccp, samples
from tfseg.convert.base import BadCase
from tfseg.errors import TfsegError


def test_table_maps_every_tag_exactly_once_to_a_seed_class():
    assert len(ccp.CCP_TAGS) == 59 and len(set(ccp.CCP_TAGS)) == 59
    assert sorted(ccp.TAG_TO_CLASS) == sorted(ccp.CCP_TAGS)
    assert set(ccp.TAG_TO_CLASS.values()) == set(ccp.SEED_CLASSES)
    table = ccp.seed_table()
    assert sorted(table) == list(range(59))
    for v, tag in enumerate(ccp.CCP_TAGS):
        assert ccp.SEED_CLASSES[table[v]] == ccp.TAG_TO_CLASS[tag]
    assert table[0] == 0 and ccp.SEED_CLASSES[table[ccp.CCP_TAGS.index("jeans")]] == "trousers"
    info = ccp.CcpLayout().info()
    assert info.num_classes == 14 and info.label_mapping["table"] == table
    assert ccp.CcpLayout(label_set="full").info().num_classes == 59


def test_unknown_label_set_is_a_user_error():
    with pytest.raises(TfsegError, match="label set"):
        ccp.CcpLayout(label_set="small")


def test_official_split_by_id():
    assert [ccp.official_split(i) for i in ("0001", "0704", "0705", "0804", "0805", "x1")] == [
        "train", "train", "val", "val", "test", None]


def test_real_files_load_with_seed_and_full_labels(shared_data):
    root = os.path.join(shared_data, "ccp")
    if not os.path.isdir(root):
        pytest.skip(f"no CCP data at {root}")
    cases = ccp.CcpLayout().list_cases(root)
    assert len(cases) == 804
    splits = [c.split for c in cases]
    assert splits.count("train") == 704 and splits.count("val") == 100
    table = ccp.seed_table()
    full, seed = ccp.CcpLayout(label_set="full"), ccp.CcpLayout()
    for case in cases[:: 200]:
        raw = scipy.io.loadmat(case.paths["mask"])["groundtruth"]
        loaded = seed.load_case(case)
        h, w = loaded.image.shape[:2]
        assert w == 550 and 801 <= h <= 873 and loaded.mask.shape == (h, w)
        assert loaded.mask.max() <= 13
        expected = np.vectorize(table.get)(raw).astype(np.uint8)
        np.testing.assert_array_equal(loaded.mask, expected)
        np.testing.assert_array_equal(full.load_case(case).mask, raw)
        with Image.open(case.paths["image"]) as im:
            np.testing.assert_array_equal(loaded.image, np.asarray(im.convert("RGB")))
        assert loaded.image_format == "jpeg" and loaded.image_bytes[:2] == b"\xff\xd8"


def test_sample_loads_and_covers_several_classes(tmp_path):
    samples.write("ccp", str(tmp_path), 10, seed=1)
    layout = ccp.CcpLayout()
    cases = layout.list_cases(str(tmp_path))
    assert len(cases) == 10 and {c.split for c in cases} == {"train", "val"}
    seen = set()
    for case in cases:
        loaded = layout.load_case(case)
        raw = scipy.io.loadmat(case.paths["mask"])["groundtruth"]
        assert loaded.image.shape == raw.shape + (3,) and loaded.image.dtype == np.uint8
        np.testing.assert_array_equal(loaded.mask, layout._lut[raw])
        seen |= set(np.unique(loaded.mask).tolist())
    assert {0, 1, 2, 13} <= seen and len(seen) >= 8


def _one_case(tmp_path):
    samples.write("ccp", str(tmp_path), 1)
    layout = ccp.CcpLayout()
    return layout, layout.list_cases(str(tmp_path))[0]


def test_truncated_mat_is_a_bad_case(tmp_path):
    layout, case = _one_case(tmp_path)
    data = open(case.paths["mask"], "rb").read()
    open(case.paths["mask"], "wb").write(data[: len(data) // 2])
    with pytest.raises(BadCase, match="unreadable .mat"):
        layout.load_case(case)


def test_mat_without_groundtruth_or_wrong_size_or_values_is_a_bad_case(tmp_path):
    layout, case = _one_case(tmp_path)
    h, w = np.asarray(Image.open(case.paths["image"])).shape[:2]
    scipy.io.savemat(case.paths["mask"], {"labels": np.zeros((h, w), np.uint8)})
    with pytest.raises(BadCase, match="no 'groundtruth'"):
        layout.load_case(case)
    scipy.io.savemat(case.paths["mask"], {"groundtruth": np.zeros((h - 1, w), np.uint8)})
    with pytest.raises(BadCase, match=f"annotation {w}x{h - 1} != photo {w}x{h}"):
        layout.load_case(case)
    gt = np.zeros((h, w), np.uint8)
    gt[0, 0] = 59
    scipy.io.savemat(case.paths["mask"], {"groundtruth": gt})
    with pytest.raises(BadCase, match=r"tag values \[59\]"):
        layout.load_case(case)
    os.remove(case.paths["image"])
    with pytest.raises(BadCase, match="missing photo"):
        layout.load_case(case)


def test_wrong_folder_or_label_list_is_a_user_error(tmp_path):
    with pytest.raises(TfsegError, match="not a CCP dataset"):
        ccp.CcpLayout().list_cases(str(tmp_path))
    samples.write("ccp", str(tmp_path), 1)
    cells = np.empty((1, 3), dtype=object)
    cells[0, :] = ["null", "a", "b"]
    scipy.io.savemat(str(tmp_path / "label_list.mat"), {"label_list": cells})
    with pytest.raises(TfsegError, match="expected CCP's 59 tags"):
        ccp.CcpLayout().list_cases(str(tmp_path))


def test_sample_converts_end_to_end_losslessly(tmp_path):
    import tensorflow as tf

    from tfseg import schema
    from tfseg.convert.pipeline import run_convert

    samples.write("ccp", str(tmp_path / "raw"), 6)
    run_convert("ccp", str(tmp_path / "raw"), str(tmp_path / "out"))
    info = schema.load_dataset_info(str(tmp_path / "out"))
    assert info.num_classes == 14 and info.class_names == list(ccp.SEED_CLASSES)
    assert info.splits["train"]["count"] == 5 and info.splits["val"]["count"] == 1
    assert info.label_mapping["by_name"]["boots"] == "shoes"
    layout = ccp.CcpLayout()
    expected = {c.case_id: layout.load_case(c) for c in layout.list_cases(str(tmp_path / "raw"))}
    got = 0
    for split in info.splits:
        for record in tf.data.TFRecordDataset(info.split_files(split, str(tmp_path / "out"))):
            ex = schema.decode_2d(record, channels=3)
            want = expected[ex["source_id"].numpy().decode()]
            np.testing.assert_array_equal(ex["mask"].numpy()[..., 0], want.mask)
            # The photo is stored as its original JPEG bytes (TF's and PIL's IDCTs differ by a few levels).
            raw = tf.io.parse_single_example(record, schema.feature_spec_2d())
            assert raw[schema.IMAGE_ENCODED].numpy() == want.image_bytes
            np.testing.assert_array_equal(ex["image"].numpy(), tf.io.decode_jpeg(want.image_bytes).numpy())
            assert np.abs(ex["image"].numpy().astype(int) - want.image).mean() < 3.0
            got += 1
    assert got == 6
