"""Labels and pixels are never changed silently (issue 9 items 3 and 5), class names (issue 14).

The folder layout takes the number of classes from the mask values it finds, binarizes only
{0, 255} images (or when asked), rejects out-of-range values naming them; 16-bit and float images
follow one rule; oversized images and decompression bombs are classified rejections.
"""

import json
import os
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from tfseg import schema
from tfseg.convert import base
from tfseg.convert.base import BadCase, pixels_to_uint8, read_image
from tfseg.convert.folder import FolderLayout, load_class_names
from tfseg.convert.pipeline import run_convert
from tfseg.errors import TfsegError


def read_masks(data_dir):
    import tensorflow as tf

    info = schema.load_dataset_info(data_dir)
    out = {}
    for split in info.splits:
        for r in tf.data.TFRecordDataset(info.split_files(split, data_dir)):
            d = schema.decode_2d(r, info.channels)
            out[d["source_id"].numpy().decode()] = (d["image"].numpy(), d["mask"].numpy()[..., 0])
    return info, out


def rejected(data_dir):
    with open(os.path.join(data_dir, schema.REJECTED_JSONL)) as f:
        return {os.path.basename(r["file"]): r["reason"] for r in map(json.loads, f)}


def make_folder(root, masks, size=(6, 8), image=None):
    """images/NAME.png (random gray) + masks/NAME.png for each {name: (H, W) uint8 array}."""
    os.makedirs(os.path.join(root, "images"))
    os.makedirs(os.path.join(root, "masks"))
    rng = np.random.default_rng(0)
    for name, m in masks.items():
        img = image if image is not None else rng.integers(0, 256, m.shape, dtype=np.uint8)
        Image.fromarray(img).save(os.path.join(root, "images", f"{name}.png"))
        Image.fromarray(m).save(os.path.join(root, "masks", f"{name}.png"))
    return root


def class_ids(k, seed, shape=(6, 8)):
    return np.random.default_rng(seed).integers(0, k, shape).astype(np.uint8)


# ------------------------------------------------------------------------- mask values


def test_class_ids_0_to_3_keep_their_values_and_set_num_classes(tmp_path):
    masks = {f"c{i}": class_ids(4, i) for i in range(4)}
    masks["c0"][0, :4] = [0, 1, 2, 3]  # every id appears
    root = make_folder(str(tmp_path / "in"), masks)
    out = str(tmp_path / "out")
    run_convert("folder", root, out, split="train=1", strict=True)
    info, records = read_masks(out)
    assert info.num_classes == 4
    assert info.class_names == ["class_0", "class_1", "class_2", "class_3"]  # class 0 not assumed background
    assert info.label_mapping["num_classes_from_values"] == {"values": [0, 1, 2, 3], "masks_read": 4}
    for name, m in masks.items():
        np.testing.assert_array_equal(records[name][1], m)
    expected = sum(np.bincount(m.ravel(), minlength=4) for m in masks.values())
    assert info.class_pixel_counts["train"] == expected.tolist()


def test_values_with_gaps_fail_naming_them_and_ignore_index_resolves(tmp_path):
    masks = {"a": class_ids(3, 1), "b": class_ids(3, 2)}
    masks["b"][0, 0] = 255
    root = make_folder(str(tmp_path / "in"), masks)
    with pytest.raises(TfsegError, match=r"masks hold the values \{0, 1, 2, 255\}.*pass --num-classes N"):
        run_convert("folder", root, str(tmp_path / "o1"), split="train=1")
    assert not os.path.exists(tmp_path / "o1")
    out = str(tmp_path / "o2")
    run_convert("folder", root, out, split="train=1", layout_options={"ignore_index": 255}, strict=True)
    info, records = read_masks(out)
    assert info.num_classes == 3 and info.ignore_index == 255
    np.testing.assert_array_equal(records["b"][1], masks["b"])


def test_black_white_masks_binarized_only_when_exactly_0_255(tmp_path):
    bw = np.zeros((6, 8), np.uint8)
    bw[2:4, 1:5] = 255
    ids = (bw // 255).astype(np.uint8)
    mixed = bw.copy()
    mixed[0, 0] = 1  # {0, 1, 255}: not a black/white image, 255 is no class of 2
    root = make_folder(str(tmp_path / "in"), {"bw": bw, "ids": ids, "mixed": mixed})
    out = str(tmp_path / "out")
    run_convert("folder", root, out, split="train=1", layout_options={"num_classes": 2})
    info, records = read_masks(out)
    assert info.class_names == ["background", "foreground"]
    np.testing.assert_array_equal(records["bw"][1], ids)
    np.testing.assert_array_equal(records["ids"][1], ids)
    assert "mixed" not in records
    assert rejected(out) == {"mixed.png": "label values [255] outside 0..1"}


def test_value_at_or_above_num_classes_rejects_that_case_naming_it(tmp_path):
    good = class_ids(4, 0)
    bad = class_ids(4, 1)
    bad[3, 3] = 7
    root = make_folder(str(tmp_path / "in"), {"good": good, "bad": bad})
    out = str(tmp_path / "out")
    summary = run_convert("folder", root, out, split="train=1", layout_options={"num_classes": 4})
    assert summary["splits"] == {"train": 1} and summary["rejected"] == 1
    assert rejected(out) == {"bad.png": "label values [7] outside 0..3"}


def test_mask_threshold_binarizes_lossy_masks_when_asked(tmp_path):
    lossy = np.array([[0, 3, 99, 100], [250, 252, 7, 180]], np.uint8)
    root = make_folder(str(tmp_path / "in"), {"j": lossy}, size=lossy.shape)
    with pytest.raises(TfsegError, match=r"values \{0, 3, 7, 99, 100, 180, 250, 252\}"):
        run_convert("folder", root, str(tmp_path / "o1"), split="train=1")
    out = str(tmp_path / "o2")
    run_convert("folder", root, out, split="train=1", layout_options={"mask_threshold": 100}, strict=True)
    _, records = read_masks(out)
    np.testing.assert_array_equal(records["j"][1], [[0, 0, 0, 1], [1, 1, 0, 1]])
    with pytest.raises(TfsegError, match="--mask-threshold makes 2 classes"):
        FolderLayout(mask_threshold=100, num_classes=3)


# ------------------------------------------------------------------------- class names (issue 14)


def test_class_names_file_and_palette_names_reach_dataset_json(tmp_path):
    masks = {f"c{i}": class_ids(3, i) for i in range(3)}
    root = make_folder(str(tmp_path / "in"), masks)
    names = tmp_path / "names.txt"
    names.write_text("sky\nroad\ncar\n")
    out = str(tmp_path / "o1")
    from click.testing import CliRunner

    from tfseg.cli import cli

    res = CliRunner().invoke(cli, ["convert", "--dataset", "folder", "--input", root, "--output", out,
                                   "--split", "train=1", "--class-names", str(names)])
    assert res.exit_code == 0, res.output
    with open(os.path.join(out, "dataset.json")) as f:
        d = json.load(f)
    assert d["class_names"] == ["sky", "road", "car"] and d["num_classes"] == 3

    (tmp_path / "names.json").write_text(json.dumps(["a", "b"]))
    assert load_class_names(str(tmp_path / "names.json")) == ["a", "b"]
    with pytest.raises(TfsegError, match="2 class names for --num-classes 3"):
        FolderLayout(class_names=str(tmp_path / "names.json"), num_classes=3)
    (tmp_path / "dup.txt").write_text("a\nb\na\n")
    with pytest.raises(TfsegError, match="'a' names two classes"):
        load_class_names(str(tmp_path / "dup.txt"))

    # Names inside the --palette JSON (RGB masks).
    rgb_root = tmp_path / "rgb"
    (rgb_root / "images").mkdir(parents=True)
    (rgb_root / "masks").mkdir()
    colours = np.array([[0, 0, 255], [128, 128, 128], [255, 0, 0]], np.uint8)
    for i in range(2):
        Image.fromarray(np.full((4, 5, 3), i, np.uint8)).save(rgb_root / "images" / f"p{i}.png")  # distinct photos
        Image.fromarray(colours[class_ids(3, i, (4, 5))]).save(rgb_root / "masks" / f"p{i}.png")
    palette = {"0,0,255": {"id": 0, "name": "sky"}, "#808080": {"id": 1, "name": "road"},
               "255,0,0": {"id": 2, "name": "car"}}
    (tmp_path / "pal.json").write_text(json.dumps(palette))
    out2 = str(tmp_path / "o2")
    run_convert("folder", str(rgb_root), out2, split="train=1", strict=True,
                layout_options={"palette": str(tmp_path / "pal.json")})
    info, records = read_masks(out2)
    assert info.class_names == ["sky", "road", "car"] and info.num_classes == 3
    np.testing.assert_array_equal(records["p1"][1], class_ids(3, 1, (4, 5)))


# ------------------------------------------------------------------------- 16-bit and float pixels


def test_16_bit_images_scale_by_their_type_range(tmp_path):
    v8 = np.array([[0, 1, 2, 127], [128, 200, 254, 255]], np.uint8)
    path = str(tmp_path / "w.png")
    Image.fromarray(v8.astype(np.uint16) * 257).save(path)
    assert Image.open(path).mode == "I;16"
    loaded = read_image(path, 1)
    np.testing.assert_array_equal(loaded.image[..., 0], v8)  # v * 257 comes back exactly
    odd = np.array([[65535, 128, 129, 384, 385]], np.uint16)  # round(v / 257): 255, 0, 1, 1, 1
    Image.fromarray(odd).save(path)
    np.testing.assert_array_equal(read_image(path, 3).image, np.repeat(np.array([[[255], [0], [1], [1], [1]]],
                                                                                np.uint8), 3, -1))


def test_float_images_in_0_1_scale_else_rejected(tmp_path):
    path = str(tmp_path / "f.tif")
    f = np.array([[0.0, 0.5, 1.0], [0.25, 0.001, 0.999]], np.float32)
    Image.fromarray(f).save(path)
    assert Image.open(path).mode == "F"
    np.testing.assert_array_equal(read_image(path, 1).image[..., 0], [[0, 128, 255], [64, 0, 255]])
    Image.fromarray(f * 1000).save(path)
    with pytest.raises(BadCase, match=r"float image values 0..1000 are outside \[0, 1\]"):
        read_image(path, 1)
    Image.fromarray(np.array([[np.nan, 0.5]], np.float32)).save(path)
    with pytest.raises(BadCase, match="NaN or infinite"):
        read_image(path, 1)
    Image.fromarray(np.array([[5, 70000]], np.int32)).save(str(tmp_path / "i.tif"))
    with pytest.raises(BadCase, match="32-bit integer image"):
        pixels_to_uint8(Image.open(str(tmp_path / "i.tif")), "i.tif")


def test_16_bit_dataset_converts_without_saturating(tmp_path):
    root = tmp_path / "in"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    v8 = np.random.default_rng(0).integers(0, 256, (6, 8)).astype(np.uint8)
    Image.fromarray(v8.astype(np.uint16) * 257).save(root / "images" / "a.png")
    Image.fromarray(class_ids(2, 0)).save(root / "masks" / "a.png")
    out = str(tmp_path / "out")
    run_convert("folder", str(root), out, split="train=1", strict=True)
    info, records = read_masks(out)
    assert info.channels == 1
    np.testing.assert_array_equal(records["a"][0][..., 0], v8)


# ------------------------------------------------------------------------- bounds


def png_header_only(path, width, height):
    """A PNG that claims width x height pixels (its data is a few bytes): a decompression bomb."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_oversized_images_and_bombs_are_rejected_cases(tmp_path, monkeypatch, caplog):
    root = make_folder(str(tmp_path / "in"), {f"ok{i}": class_ids(2, i) for i in range(2)})
    png_header_only(os.path.join(root, "images", "bomb.png"), 30000, 30000)  # over PIL's own limit
    png_header_only(os.path.join(root, "images", "big.png"), 9000, 8000)  # over tfseg's 2**26
    for name in ("bomb", "big"):
        Image.fromarray(class_ids(2, 0)).save(os.path.join(root, "masks", f"{name}.png"))
    out = str(tmp_path / "out")
    with caplog.at_level("WARNING"):
        summary = run_convert("folder", root, out, split="train=1", layout_options={"num_classes": 2})
    assert summary["splits"] == {"train": 2} and summary["rejected"] == 2
    reasons = rejected(out)
    assert reasons["bomb.png"].startswith("decompression bomb rejected (Image size (900000000 pixels) exceeds")
    assert reasons["big.png"] == ("image 9000x8000 = 72000000 pixels exceeds tfseg's limit of 67108864 pixels "
                                  "(2**26; a decompression bomb or an image to tile first)")
    lines = [r for r in caplog.records if "bomb.png" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None and "\n" not in lines[0].getMessage()
    assert not any(r.exc_info for r in caplog.records)


def test_image_size_bound():
    from tfseg.convert.checks import check_image_size

    assert check_image_size((8192, 8192)) == (8192, 8192)
    with pytest.raises(TfsegError, match=r"--image-size 8193x8192: 67117056 pixels exceeds the limit of 67108864"):
        check_image_size((8193, 8192))


def test_pixel_budget_serializes_large_cases():
    budget = base._PixelBudget(100)
    inside, peak, lock = [0], [0], threading.Lock()

    def case():
        budget.begin()
        budget.reserve(60)
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        budget.reserve(30)  # a second reservation in the same case never waits
        threading.Event().wait(0.05)
        with lock:
            inside[0] -= 1
        budget.release()

    threads = [threading.Thread(target=case) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert peak[0] == 1 and budget.used == 0
    budget.reserve(10**9)  # outside a case (no begin): not counted
    assert budget.used == 0


def test_nifti_header_claiming_a_huge_volume_is_rejected_before_reading(tmp_path):
    import nibabel as nib

    from tfseg.convert.brats import _read_nifti

    path = str(tmp_path / "bomb.nii")
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), path)
    with open(path, "r+b") as f:  # dim[0..3] at byte 40: rank 3, 2000 x 2000 x 2000
        f.seek(40)
        f.write(struct.pack("<4h", 3, 2000, 2000, 2000))
    with pytest.raises(BadCase, match=r"volume 2000x2000x2000 exceeds tfseg's limit of 268435456 values"):
        _read_nifti(path, ndim=3)
