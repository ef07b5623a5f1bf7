"""The 2D layouts (carvana, isic, voc, folder): sample data and real files convert losslessly."""

import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

from tfseg import schema
from tfseg.convert import samples
from tfseg.convert.carvana import rle_decode, rle_encode
from tfseg.convert.pipeline import run_convert
from tfseg.convert.voc import voc_colormap


def read_records(data_dir):
    """{source_id: (split, image (H,W,C), mask (H,W), image/encoded bytes)} via schema.decode_2d."""
    import tensorflow as tf

    info = schema.load_dataset_info(data_dir)
    out = {}
    for split in info.splits:
        for r in tf.data.TFRecordDataset(info.split_files(split, data_dir), compression_type=info.compression or None):
            d = schema.decode_2d(r, info.channels)
            raw = tf.io.parse_single_example(r, schema.feature_spec_2d())[schema.IMAGE_ENCODED].numpy()
            out[d["source_id"].numpy().decode()] = (split, d["image"].numpy(), d["mask"].numpy()[..., 0], raw)
    return info, out


def tf_decode_file(path, channels=3):
    import tensorflow as tf

    return tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False).numpy()


def check_class_counts(info, records):
    for split, counts in info.class_pixel_counts.items():
        expected = np.zeros(info.num_classes, np.int64)
        for s, _, mask, _ in records.values():
            if s == split:
                valid = mask[mask != info.ignore_index] if info.ignore_index is not None else mask
                expected += np.bincount(valid.ravel(), minlength=info.num_classes)
        assert counts == expected.tolist(), split


# ------------------------------------------------------------------------- carvana


def test_rle_hand_computed():
    mask = np.array([[0, 1, 1], [1, 0, 0]], np.uint8)
    assert rle_encode(mask) == "2 3"
    np.testing.assert_array_equal(rle_decode("2 3", (2, 3)), mask)
    np.testing.assert_array_equal(rle_decode("1 1 6 1", (2, 3)), [[1, 0, 0], [0, 0, 1]])


def test_carvana_gif_and_rle(tmp_path):
    gif_root, rle_root = str(tmp_path / "gif"), str(tmp_path / "rle")
    samples.write("carvana", gif_root, 12, seed=5, image_size=(32, 48))
    samples.write("carvana", rle_root, 12, seed=5, image_size=(32, 48), rle=True)
    assert not os.path.exists(os.path.join(rle_root, "train_masks"))
    out = str(tmp_path / "out")
    run_convert("carvana", gif_root, out, split="train=0.5,val=0.5")
    info, records = read_records(out)
    assert info.num_classes == 2 and info.image_format == "jpeg" and len(records) == 12
    split_of_car = {}
    for case_id, (split, image, mask, raw) in records.items():
        jpg = os.path.join(gif_root, "train", case_id + ".jpg")
        with open(jpg, "rb") as f:
            assert raw == f.read()  # the original JPEG, byte for byte
        np.testing.assert_array_equal(image, tf_decode_file(jpg))
        gif = np.asarray(Image.open(os.path.join(gif_root, "train_masks", case_id + "_mask.gif")).convert("L"))
        np.testing.assert_array_equal(mask, gif // 255)
        assert split_of_car.setdefault(case_id.rsplit("_", 1)[0], split) == split  # views never straddle
    assert len(set(split_of_car.values())) == 2
    check_class_counts(info, records)

    out_rle = str(tmp_path / "out_rle")
    run_convert("carvana", rle_root, out_rle, split="train=0.5,val=0.5")
    _, rle_records = read_records(out_rle)
    assert sorted(rle_records) == sorted(records)
    for case_id, (split, _, mask, _) in rle_records.items():
        np.testing.assert_array_equal(mask, records[case_id][2])
        assert split == records[case_id][0]


# ------------------------------------------------------------------------- isic


def test_isic_sample_and_official_splits(tmp_path):
    root = str(tmp_path / "isic")
    samples.write("isic", root, 6, seed=2, image_size=(24, 32))
    # A validation folder in the 2018 names switches to the official split.
    os.makedirs(os.path.join(root, "ISIC2018_Task1-2_Validation_Input"))
    os.makedirs(os.path.join(root, "ISIC2018_Task1_Validation_GroundTruth"))
    for stem in ("ISIC_0000004", "ISIC_0000005"):
        os.rename(os.path.join(root, "ISIC2018_Task1-2_Training_Input", stem + ".jpg"),
                  os.path.join(root, "ISIC2018_Task1-2_Validation_Input", stem + ".jpg"))
        os.rename(os.path.join(root, "ISIC2018_Task1_Training_GroundTruth", stem + "_segmentation.png"),
                  os.path.join(root, "ISIC2018_Task1_Validation_GroundTruth", stem + "_segmentation.png"))
    out = str(tmp_path / "out")
    summary = run_convert("isic", root, out)
    assert summary["splits"] == {"train": 4, "val": 2}
    info, records = read_records(out)
    for case_id, (split, image, mask, _) in records.items():
        assert split == ("val" if case_id in ("ISIC_0000004", "ISIC_0000005") else "train")
        png = glob.glob(os.path.join(root, "*GroundTruth", case_id + "_segmentation.png"))[0]
        np.testing.assert_array_equal(mask, np.asarray(Image.open(png)) // 255)
    check_class_counts(info, records)


def test_isic_real_files(shared_data, tmp_path):
    src = os.path.join(shared_data, "isic", "data")
    if not os.path.isdir(src):
        pytest.skip(f"no ISIC data at {src}")
    # Four pairs, the smallest images, through symlinks (the real folder names are kept).
    images = sorted(glob.glob(os.path.join(src, "example_image", "*.jpg")), key=os.path.getsize)[:4]
    for d in ("example_image", "example_segmentation"):
        os.makedirs(tmp_path / "in" / d)
    for path in images:
        stem = os.path.splitext(os.path.basename(path))[0]
        os.symlink(path, tmp_path / "in" / "example_image" / os.path.basename(path))
        seg = os.path.join(src, "example_segmentation", stem + "_segmentation.png")
        os.symlink(seg, tmp_path / "in" / "example_segmentation" / os.path.basename(seg))
    out = str(tmp_path / "out")
    summary = run_convert("isic", str(tmp_path / "in"), out, split="train=1", strict=True)
    assert summary["splits"] == {"train": 4} and summary["rejected"] == 0
    info, records = read_records(out)
    for path in images:
        stem = os.path.splitext(os.path.basename(path))[0]
        _, image, mask, _ = records[stem]
        original = Image.open(path)
        assert image.shape == (original.height, original.width, 3)
        assert set(np.unique(mask)) == {0, 1}
        seg = np.asarray(Image.open(os.path.join(src, "example_segmentation", stem + "_segmentation.png")))
        np.testing.assert_array_equal(mask, seg // 255)
    check_class_counts(info, records)


# ------------------------------------------------------------------------- voc


def test_voc_sample_official_split_and_labels(tmp_path):
    root = str(tmp_path / "voc")
    samples.write("voc", root, 6, seed=4, image_size=(24, 32))
    voc = os.path.join(root, "VOCdevkit", "VOC2012")
    # One mask saved as RGB (colour-coded) converts to the same indices; one gets an
    # index (30) outside the 21 classes and is rejected.
    rgb_id, bad_id = "2007_000002", "2007_000003"
    idx = np.asarray(Image.open(os.path.join(voc, "SegmentationClass", rgb_id + ".png")))
    Image.fromarray(voc_colormap()[idx]).save(os.path.join(voc, "SegmentationClass", rgb_id + ".png"))
    bad = Image.open(os.path.join(voc, "SegmentationClass", bad_id + ".png"))
    arr = np.asarray(bad).copy()
    arr[0, 0] = 30
    out_img = Image.frombytes("P", bad.size, arr.tobytes())
    out_img.putpalette(bad.getpalette())
    out_img.save(os.path.join(voc, "SegmentationClass", bad_id + ".png"))

    out = str(tmp_path / "out")
    summary = run_convert("voc", os.path.join(root, "VOCdevkit"), out)
    assert summary["rejected"] == 1
    info, records = read_records(out)
    assert info.num_classes == 21 and info.ignore_index == 255
    with open(os.path.join(voc, "ImageSets", "Segmentation", "val.txt")) as f:
        val = f.read().split()
    for case_id, (split, image, mask, _) in records.items():
        assert split == ("val" if case_id in val else "train")
        if case_id == rgb_id:
            np.testing.assert_array_equal(mask, idx)
        else:
            png = os.path.join(voc, "SegmentationClass", case_id + ".png")
            np.testing.assert_array_equal(mask, np.asarray(Image.open(png)))
        np.testing.assert_array_equal(image, tf_decode_file(os.path.join(voc, "JPEGImages", case_id + ".jpg")))
    assert bad_id not in records and 255 in np.concatenate([m.ravel() for _, _, m, _ in records.values()])
    with open(os.path.join(out, schema.REJECTED_JSONL)) as f:
        (row,) = [json.loads(line) for line in f]
    assert row["file"].endswith(bad_id + ".png") and "[30]" in row["reason"]
    check_class_counts(info, records)


# ------------------------------------------------------------------------- folder


def test_folder_sample_grayscale_lossless(tmp_path):
    root = str(tmp_path / "veins")
    samples.write("folder", root, 5, seed=1, image_size=(20, 36))
    out = str(tmp_path / "out")
    run_convert("folder", root, out, split="train=1")
    info, records = read_records(out)
    assert info.channels == 1 and info.class_names == ["background", "foreground"] and len(records) == 5
    for case_id, (_, image, mask, _) in records.items():
        original = np.asarray(Image.open(os.path.join(root, "images", case_id + ".png")))
        np.testing.assert_array_equal(image[..., 0], original)
        labels = np.asarray(Image.open(os.path.join(root, "masks", case_id + ".png"))) // 255
        np.testing.assert_array_equal(mask, labels)
    check_class_counts(info, records)


def test_folder_rgb_palette_suffix_same_dir(tmp_path):
    root = tmp_path / "data"
    (root / "all").mkdir(parents=True)
    colours = {"#000000": 0, "255,0,0": 1, "(0, 255, 0)": 2, "255,255,255": 255}
    rgb = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [255, 255, 255]], np.uint8)
    rng = np.random.default_rng(0)
    expected = {}
    for i in range(3):
        idx = rng.integers(0, 4, (9, 11))
        Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)).save(root / "all" / f"p{i}.png")
        Image.fromarray(rgb[idx]).save(root / "all" / f"p{i}_mask.png")
        expected[f"p{i}"] = np.array([0, 1, 2, 255], np.uint8)[idx]
    (root / "palette.json").write_text(json.dumps(colours))
    out = str(tmp_path / "out")
    options = {"image_dir": "all", "mask_dir": "all", "mask_suffix": "_mask", "num_classes": 3,
               "ignore_index": 255, "palette": str(root / "palette.json")}
    run_convert("folder", str(root), out, layout_options=options, split="train=1", strict=True)
    info, records = read_records(out)
    assert info.num_classes == 3 and info.ignore_index == 255 and info.channels == 3
    assert info.label_mapping["palette"]["255,0,0"] == 1
    assert sorted(records) == sorted(expected)
    for case_id, (_, image, mask, _) in records.items():
        np.testing.assert_array_equal(mask, expected[case_id])
        np.testing.assert_array_equal(image, np.asarray(Image.open(root / "all" / f"{case_id}.png")))
    check_class_counts(info, records)
