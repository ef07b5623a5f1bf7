"""The annotation formats users bring (issue 22): coco, cityscapes, ade20k, labelme, cvat-mask.

Each converter's masks are compared with an oracle computed here by other code: pycocotools'
``COCO.annToMask`` with the stated overlap rule, cityscapesscripts' label table, LabelMe shapes
rasterized one by one with PIL's ImageDraw and composed in numpy, CVAT colours looked up in a
dict read from labelmap.txt. Inputs are the layouts' samples (the formats' on-disk shape) and
hand-made files holding the awkward cases: crowd RLE, a polygon with fewer than 3 points, a
category with no images, an image listed twice, a mask of another size, unknown labels/colours.
"""

import base64
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tfseg import schema
from tfseg.convert import samples
from tfseg.convert.pipeline import run_convert
from tfseg.errors import TfsegError


def read_records(data_dir):
    """{source_id: (split, image (H, W, C), mask (H, W))} of a converted dataset."""
    import tensorflow as tf

    info = schema.load_dataset_info(data_dir)
    out = {}
    for split in info.splits:
        for r in tf.data.TFRecordDataset(info.split_files(split, data_dir)):
            d = schema.decode_2d(r, info.channels)
            out[d["source_id"].numpy().decode()] = (split, d["image"].numpy(), d["mask"].numpy()[..., 0])
    return info, out


def tf_decode(path):
    import tensorflow as tf

    return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False).numpy()


def rejected(data_dir):
    with open(os.path.join(data_dir, schema.REJECTED_JSONL)) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_counts(info, records):
    """class_pixel_counts agrees with the masks (ignore pixels excluded)."""
    for split, counts in info.class_pixel_counts.items():
        expected = np.zeros(info.num_classes, np.int64)
        for s, _, mask in records.values():
            if s == split:
                expected += np.bincount(mask[mask != 255].ravel(), minlength=info.num_classes)
        assert counts == expected.tolist(), split


def save_jpeg(path, h, w, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=95)


# ------------------------------------------------------------------------------------- coco


def coco_oracle(coco, image_id, class_of):
    """The stated rule through pycocotools' own annToMask: crowd -> 255, then objects from large
    to small (ties by id), polygon parts under 3 points removed first."""
    img = coco.imgs[image_id]
    out = np.zeros((img["height"], img["width"]), np.uint8)
    anns = []
    for a in coco.imgToAnns[image_id]:
        if a["category_id"] not in class_of:
            continue
        a = dict(a)
        if isinstance(a["segmentation"], list):
            a["segmentation"] = [p for p in a["segmentation"] if len(p) >= 6]
            if not a["segmentation"]:
                continue
        anns.append((a, coco.annToMask(a).astype(bool)))
    for a, m in anns:
        if a["iscrowd"]:
            out[m] = 255
    for a, m in sorted((x for x in anns if not x[0]["iscrowd"]), key=lambda x: (-int(x[1].sum()), x[0]["id"])):
        out[m] = class_of[a["category_id"]]
    return out


def test_coco_sample_equals_pycocotools_oracle(tmp_path):
    from pycocotools.coco import COCO


    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    samples.write("coco", raw, 15, seed=3, image_size=(40, 56))
    summary = run_convert("coco", raw, out)
    assert summary["rejected"] == 0 and summary["splits"] == {"train": 12, "val": 3}  # the JSON files' splits
    info, records = read_records(out)
    assert info.class_names == ["background", "person", "car", "dog", "bottle"] and info.ignore_index == 255
    assert info.label_mapping["table"] == {"1": 1, "3": 2, "18": 3, "44": 4}
    assert info.label_mapping["categories_without_annotations"] == ["bottle"]
    assert info.label_mapping["counts"]["degenerate_polygons"] == 1
    kinds = {"crowd": 0, "rle": 0, "empty": 0, "overlap": 0}
    for split in ("train2017", "val2017"):
        coco = COCO(os.path.join(raw, "annotations", f"instances_{split}.json"))
        class_of = {1: 1, 3: 2, 18: 3, 44: 4}
        for iid, img in coco.imgs.items():
            stem = os.path.splitext(img["file_name"])[0]
            s, image, mask = records[stem]
            assert s == split[:-4] or (s, split) == ("val", "val2017")
            np.testing.assert_array_equal(mask, coco_oracle(coco, iid, class_of), err_msg=stem)
            np.testing.assert_array_equal(image, tf_decode(os.path.join(raw, split, img["file_name"])))
            anns = coco.imgToAnns[iid]
            kinds["crowd"] += any(a["iscrowd"] for a in anns)
            kinds["rle"] += any(isinstance(a["segmentation"], dict) and not a["iscrowd"] for a in anns)
            kinds["empty"] += not anns
            masks = [coco.annToMask(a) for a in anns if not a["iscrowd"]]
            kinds["overlap"] += len(masks) > 1 and int(np.sum(masks, 0).max()) > 1
    assert all(kinds.values()), kinds  # the sample holds each awkward case
    assert (255 == np.concatenate([m.ravel() for _, _, m in records.values()])).any()
    check_counts(info, records)
    assert info.class_pixel_counts["train"][4] == 0  # bottle: a class without pixels


def _coco_file(root, images, annotations, categories):
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    with open(os.path.join(root, "annotations", "instances_default.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def _uncompressed(mask):
    from tfseg.convert.samples.coco import _rle_counts

    return {"size": list(mask.shape), "counts": _rle_counts(mask)}


@pytest.fixture
def coco_awkward(tmp_path):
    """A CVAT-style COCO export (annotations/instances_default.json + images/) with the awkward cases."""
    from pycocotools import mask as mask_utils

    root = str(tmp_path / "awkward")
    h, w = 20, 30
    for name in ("a", "b", "c", "d", "e", "f"):
        save_jpeg(os.path.join(root, "images", f"{name}.jpg"), h, w)
    crowd = np.zeros((h, w), bool)
    crowd[0:10, 20:30] = True  # part over the car, part over background
    dog = np.zeros((h, w), np.uint8)
    dog[14:19, 2:8] = 1
    dog_rle = mask_utils.encode(np.asfortranarray(dog))
    images = [
        {"id": 1, "file_name": "a.jpg", "height": h, "width": w},
        {"id": 2, "file_name": "b.jpg", "height": h, "width": w},
        {"id": 2, "file_name": "b.jpg", "height": h, "width": w},   # listed twice, same entry
        {"id": 3, "file_name": "c.jpg", "height": h, "width": w},
        {"id": 4, "file_name": "c.jpg", "height": h, "width": w},   # one file under two ids
        {"id": 5, "file_name": "d.jpg", "height": 40, "width": 40},  # the file is 30x20
        {"id": 6, "file_name": "e.jpg", "height": h, "width": w},
        {"id": 7, "file_name": "f.jpg", "height": h, "width": w},   # no annotation
    ]
    annotations = [
        # the small person first (lower id): painting in file order would bury it under the car
        {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [[8, 4, 14, 4, 14, 12, 8, 12]]},
        {"id": 11, "image_id": 1, "category_id": 3, "iscrowd": 0,
         "segmentation": [[2, 2, 26, 2, 26, 16, 2, 16]]},
        {"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 1, "segmentation": _uncompressed(crowd)},
        {"id": 13, "image_id": 1, "category_id": 18, "iscrowd": 0,
         "segmentation": {"size": [h, w], "counts": dog_rle["counts"].decode("ascii")}},
        # two points only: pycocotools alone would read these 4 numbers as a box
        {"id": 14, "image_id": 1, "category_id": 18, "iscrowd": 0, "segmentation": [[20, 12, 29, 19]]},
        {"id": 20, "image_id": 2, "category_id": 3, "iscrowd": 0, "segmentation": [[0, 0, 10, 0, 10, 10]]},
        {"id": 30, "image_id": 3, "category_id": 3, "iscrowd": 0, "segmentation": [[0, 0, 10, 0, 10, 10]]},
        {"id": 50, "image_id": 5, "category_id": 3, "iscrowd": 0, "segmentation": [[0, 0, 10, 0, 10, 10]]},
        {"id": 60, "image_id": 6, "category_id": 1, "iscrowd": 1,
         "segmentation": _uncompressed(np.ones((10, 10), bool))},
    ]
    categories = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"},
                  {"id": 90, "name": "unused"}]
    _coco_file(root, images, annotations, categories)
    return root


def test_coco_awkward_cases(coco_awkward, tmp_path):
    from pycocotools.coco import COCO

    out = str(tmp_path / "out")
    summary = run_convert("coco", coco_awkward, out, split="train=1")
    info, records = read_records(out)
    assert info.class_names == ["background", "person", "car", "dog", "unused"]
    assert sorted(records) == ["a", "b", "f"]  # b listed twice is one case; f (no annotation) kept
    rows = {r["case_id"]: r for r in rejected(out)}
    assert summary["rejected"] == 3 and sorted(rows) == ["c", "d", "e"]
    assert rows["c"]["reason"] == "c.jpg listed twice, as image ids 3, 4"
    assert rows["c"]["file"].endswith("instances_default.json")
    assert rows["d"]["file"].endswith("d.jpg") and rows["d"]["reason"].startswith(
        "image is 30x20 but instances_default.json lists image id 5 as 40x40")
    # e: a crowd RLE of 10x10 for a 30x20 image, named by its annotation id
    assert rows["e"]["reason"] == "annotation 60: RLE of 10x10 for an image of 30x20"

    coco = COCO(os.path.join(coco_awkward, "annotations", "instances_default.json"))
    expected = coco_oracle(coco, 1, {1: 1, 3: 2, 18: 3, 90: 4})
    mask = records["a"][2]
    np.testing.assert_array_equal(mask, expected)
    # hand-checked: the small person sits on the car (pycocotools fills x in [8, 14), y in [4, 12));
    # the crowd is ignore outside the car only
    assert (mask[4:12, 8:14] == 1).all() and mask[3, 3] == 2 and mask[4, 14] == 2
    assert mask[1, 25] == 255 and mask[5, 25] == 2 and mask[15, 4] == 3
    # the 2-point polygon painted nothing; pycocotools alone takes its 4 numbers for a box (and
    # pycocotools 2.0.11 then fails on it)
    assert mask[18, 28] == 0 and mask[17, 21] == 0
    try:
        assert coco.annToMask(coco.anns[14])[18, 28] == 1
    except TypeError:
        pass
    assert not records["f"][2].any()

    # --categories picks and orders; other categories' objects vanish (a person stays on top)
    out2 = str(tmp_path / "out2")
    run_convert("coco", coco_awkward, out2, split="train=1",
                layout_options={"categories": "dog,person", "empty_images": "drop"})
    info2, records2 = read_records(out2)
    assert info2.class_names == ["background", "dog", "person"]
    assert "f" not in records2 and "b" not in records2  # b holds only a car: empty, dropped
    np.testing.assert_array_equal(records2["a"][2], coco_oracle(coco, 1, {18: 1, 1: 2}))
    assert records2["a"][2][3, 3] == 0 and info2.label_mapping["counts"]["empty_dropped"] == 3  # b, d, f


def test_coco_roboflow_export(tmp_path):
    """Roboflow's shape: {train,valid}/_annotations.coco.json beside the images, the same file name
    in both folders, and an id-0 super-category that no annotation uses."""
    root = str(tmp_path / "rf")
    cats = [{"id": 0, "name": "cells", "supercategory": "none"}, {"id": 1, "name": "cell", "supercategory": "cells"}]
    for folder in ("train", "valid"):
        save_jpeg(os.path.join(root, folder, "x_jpg.rf.1.jpg"), 10, 12)
        doc = {"images": [{"id": 0, "file_name": "x_jpg.rf.1.jpg", "height": 10, "width": 12}],
               "annotations": [{"id": 0, "image_id": 0, "category_id": 1, "iscrowd": 0,
                                "segmentation": [[0, 0, 6, 0, 6, 6, 0, 6]]}], "categories": cats}
        with open(os.path.join(root, folder, "_annotations.coco.json"), "w") as f:
            json.dump(doc, f)
    out = str(tmp_path / "out")
    run_convert("coco", root, out)
    info, records = read_records(out)
    assert info.class_names == ["background", "cells", "cell"]
    assert sorted(records) == ["train/_annotations.coco/x_jpg.rf.1", "valid/_annotations.coco/x_jpg.rf.1"]
    assert {k.split("/")[0]: v[0] for k, v in records.items()} == {"train": "train", "valid": "val"}
    expected = np.zeros((10, 12), np.uint8)
    expected[0:6, 0:6] = 2
    for _, _, mask in records.values():
        np.testing.assert_array_equal(mask, expected)


def test_coco_option_errors(coco_awkward, tmp_path):
    with pytest.raises(TfsegError, match=r"--categories: 'cat' is not a category of the dataset \(person, car"):
        run_convert("coco", coco_awkward, str(tmp_path / "o1"), layout_options={"categories": "person,cat"})
    with pytest.raises(TfsegError, match="--categories does not apply to --dataset cityscapes"):
        run_convert("cityscapes", coco_awkward, str(tmp_path / "o2"), layout_options={"categories": "person"})
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "notes.json").write_text('{"shapes": []}')
    with pytest.raises(TfsegError, match="no COCO annotation file"):
        run_convert("coco", str(tmp_path / "empty"), str(tmp_path / "o3"))
    assert not any(os.path.exists(tmp_path / o) for o in ("o1", "o2", "o3"))


def test_coco_panoptic(tmp_path):
    """Panoptic PNG + segments_info: classes in id order, void and crowd ignored, unknown ids rejected."""
    root = str(tmp_path / "pan")
    h, w = 12, 16
    for name in ("p", "q"):
        save_jpeg(os.path.join(root, "val2017", f"{name}.jpg"), h, w)
    seg = np.zeros((h, w), np.int64)
    seg[:6] = 1 + 2 * 256          # sky (stuff) id 513
    seg[6:, :8] = 7 + 65536        # person 65543
    seg[6:, 8:] = 9                # crowd
    seg[0, 0] = 0                  # void
    os.makedirs(os.path.join(root, "annotations", "panoptic_val2017"))
    rgb = np.stack([seg % 256, seg // 256 % 256, seg // 65536], -1).astype(np.uint8)
    Image.fromarray(rgb).save(os.path.join(root, "annotations", "panoptic_val2017", "p.png"))
    bad = rgb.copy()
    bad[0, 1] = (5, 0, 0)          # segment 5 is not in segments_info
    Image.fromarray(bad).save(os.path.join(root, "annotations", "panoptic_val2017", "q.png"))
    info_p = [{"id": 513, "category_id": 119, "iscrowd": 0}, {"id": 65543, "category_id": 1, "iscrowd": 0},
              {"id": 9, "category_id": 1, "iscrowd": 1}]
    doc = {"images": [{"id": 1, "file_name": "p.jpg", "height": h, "width": w},
                      {"id": 2, "file_name": "q.jpg", "height": h, "width": w}],
           "annotations": [{"image_id": 1, "file_name": "p.png", "segments_info": info_p},
                           {"image_id": 2, "file_name": "q.png", "segments_info": info_p}],
           "categories": [{"id": 1, "name": "person", "isthing": 1}, {"id": 119, "name": "sky", "isthing": 0}]}
    with open(os.path.join(root, "annotations", "panoptic_val2017.json"), "w") as f:
        json.dump(doc, f)
    out = str(tmp_path / "out")
    run_convert("coco", root, out, split="train=1")
    info, records = read_records(out)
    assert info.class_names == ["person", "sky"] and info.label_mapping["kind"] == "panoptic"
    expected = np.select([seg == 513, seg == 65543], [1, 0], 255).astype(np.uint8)
    np.testing.assert_array_equal(records["p"][2], expected)
    assert [r["reason"] for r in rejected(out)] == ["segment id 5 is not in the segments_info of panoptic_val2017.json"]


# ------------------------------------------------------------------------------------- cityscapes


def cityscapes_oracle(label_ids):
    from cityscapesscripts.helpers.labels import id2label

    lut = {i: (255 if lab.trainId in (-1, 255) else lab.trainId) for i, lab in id2label.items() if i >= 0}
    return np.vectorize(lut.__getitem__, otypes=[np.uint8])(label_ids)


def test_cityscapes_sample_equals_label_table(tmp_path):
    from cityscapesscripts.helpers.labels import trainId2label


    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    samples.write("cityscapes", raw, 10, seed=1, image_size=(32, 64))
    # awkward: a value outside the table, a labels PNG of another size, and the test split
    gt = os.path.join(raw, "gtFine", "train", "aachen")
    bad = np.array(Image.open(os.path.join(gt, "aachen_000000_000019_gtFine_labelIds.png")))
    bad[0, 5] = 40
    Image.fromarray(bad).save(os.path.join(gt, "aachen_000000_000019_gtFine_labelIds.png"))
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(os.path.join(gt, "aachen_000002_000019_gtFine_labelIds.png"))
    shutil.copytree(os.path.join(raw, "leftImg8bit", "val"), os.path.join(raw, "leftImg8bit", "test"))
    run_convert("cityscapes", raw, out)
    info, records = read_records(out)
    assert info.class_names == [trainId2label[i].name for i in range(19)]
    palette = info.label_mapping["palette"]
    assert all(palette[",".join(map(str, trainId2label[i].color))] == i for i in range(19))
    reasons = {r["case_id"]: r["reason"] for r in rejected(out)}
    assert reasons == {"aachen_000000_000019": "label id(s) 40 are not in the Cityscapes label table",
                       "aachen_000002_000019": "mask 32x16 != image 64x32"}
    assert len(records) == 8 and {s for s, _, _ in records.values()} == {"train", "val"}  # test left out
    for stem, (split, image, mask) in records.items():
        city = stem.split("_")[0]
        ids = np.array(Image.open(os.path.join(raw, "gtFine", split, city, f"{stem}_gtFine_labelIds.png")))
        np.testing.assert_array_equal(mask, cityscapes_oracle(ids))
        assert split == ("val" if city in ("frankfurt", "munster") else "train")
    masks = np.concatenate([m.ravel() for _, _, m in records.values()])
    assert (masks == 255).any() and len(np.unique(masks)) >= 6
    check_counts(info, records)


def test_cityscapes_sample_has_the_benchmarks_file_modes_and_16bit_label_ids_read_alike(tmp_path):
    """The sample writes what the benchmark ships (labelIds 8-bit gray, instanceIds 16-bit gray,
    colour RGB), and a labelIds PNG saved 16-bit converts to the same masks as the 8-bit one."""

    raw = str(tmp_path / "raw")
    samples.write("cityscapes", raw, 5, seed=3, image_size=(32, 64))
    gt = os.path.join(raw, "gtFine", "train", "aachen")
    stem = os.path.join(gt, "aachen_000000_000019")
    with Image.open(stem + "_gtFine_labelIds.png") as im:
        assert (im.mode, im.info.get("transparency")) == ("L", None)
    with Image.open(stem + "_gtFine_instanceIds.png") as im:
        assert im.mode in ("I;16", "I")  # Pillow reads 16-bit gray PNGs as one or the other by version
        inst = np.asarray(im)
    assert inst.max() >= 26000  # car instances: 26 * 1000 + k, beyond 8 bits
    with Image.open(stem + "_gtFine_color.png") as im:
        assert im.mode == "RGB"
    out8 = str(tmp_path / "out8")
    run_convert("cityscapes", raw, out8)
    for name in sorted(os.listdir(gt)):
        if name.endswith("_labelIds.png"):
            ids = np.array(Image.open(os.path.join(gt, name)))
            Image.fromarray(ids.astype(np.uint16)).save(os.path.join(gt, name))
            with Image.open(os.path.join(gt, name)) as im:
                assert im.mode in ("I;16", "I")
    out16 = str(tmp_path / "out16")
    run_convert("cityscapes", raw, out16)
    _, rec8 = read_records(out8)
    _, rec16 = read_records(out16)
    assert rec8.keys() == rec16.keys() and len(rec8) == 5
    for k in rec8:
        np.testing.assert_array_equal(rec8[k][2], rec16[k][2])


# ------------------------------------------------------------------------------------- ade20k


def test_ade20k_sample_names_and_zero_ignore(tmp_path):
    from tfseg.convert.ade20k import OBJECT_NAMES

    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    samples.write("ade20k", raw, 6, seed=2, image_size=(24, 48))
    base = os.path.join(raw, "ADEChallengeData2016")
    info_file = os.path.join(base, "objectInfo150.txt")
    with open(info_file) as f:
        lines = f.read().splitlines()
    lines[1] = "1\t0.1576\t11664\t1172\tparies, wall"  # the file, not the built-in list, names classes
    with open(info_file, "w") as f:
        f.write("\n".join(lines) + "\n")
    ann = os.path.join(base, "annotations", "training", "ADE_train_00000002.png")
    a = np.array(Image.open(ann))
    a[5, 5] = 151
    Image.fromarray(a).save(ann)
    run_convert("ade20k", raw, out)
    info, records = read_records(out)
    assert info.num_classes == 150 and info.ignore_index == 255
    assert info.class_names[:4] == ["paries", "building", "sky", "floor"] and info.class_names[-1] == "flag"
    assert info.label_mapping["names_from"] == "objectInfo150.txt"
    assert info.label_mapping["source_names"][1] == "building, edifice"
    assert [r["reason"] for r in rejected(out)] == ["annotation value(s) 151 above 150"]
    assert {s for s, _, _ in records.values()} == {"train", "val"}
    for stem, (split, _, mask) in records.items():
        folder = {"train": "training", "val": "validation"}[split]
        src = np.array(Image.open(os.path.join(base, "annotations", folder, stem + ".png"))).astype(np.int16)
        np.testing.assert_array_equal(mask, np.where(src == 0, 255, src - 1))
        assert (mask == 255).any()
    check_counts(info, records)

    os.remove(info_file)  # without the object list: the built-in names, and dataset.json says so
    out2 = str(tmp_path / "out2")
    run_convert("ade20k", base, out2)
    info2 = schema.load_dataset_info(out2)
    assert info2.class_names[0] == "wall" and "built-in" in info2.label_mapping["names_from"]
    assert info2.label_mapping["source_names"] == list(OBJECT_NAMES) and len(set(info2.class_names)) == 150


# ------------------------------------------------------------------------------------- labelme


def labelme_oracle(doc, h, w, table):
    """Each shape rasterized alone by PIL ImageDraw (as LabelMe's shape_to_mask), composed in order."""
    out = np.zeros((h, w), np.uint8)
    for s in doc["shapes"]:
        kind, pts = s.get("shape_type", "polygon"), [tuple(p) for p in s["points"]]
        one = Image.new("1", (w, h), 0)
        draw = ImageDraw.Draw(one)
        if kind == "polygon" and len(pts) >= 3:
            draw.polygon(pts, outline=1, fill=1)
        elif kind == "rectangle":
            (x0, y0), (x1, y1) = pts
            draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=1, fill=1)
        elif kind == "circle":
            (cx, cy), (ex, ey) = pts
            r = ((ex - cx) ** 2 + (ey - cy) ** 2) ** 0.5
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=1, fill=1)
        else:
            continue
        out[np.asarray(one, bool)] = table[s["label"]]
    return out


def test_labelme_sample_equals_imagedraw_oracle(tmp_path):

    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    samples.write("labelme", raw, 10, seed=4, image_size=(40, 56))
    # awkward: a 2-point polygon, an unknown label, an image of another size than the JSON says
    with open(os.path.join(raw, "img_0000.json")) as f:
        doc = json.load(f)
    doc["shapes"].append({"label": "cat", "points": [[1, 1], [30, 30]], "shape_type": "polygon"})
    with open(os.path.join(raw, "img_0000.json"), "w") as f:
        json.dump(doc, f)
    with open(os.path.join(raw, "img_0003.json")) as f:
        doc = json.load(f)
    doc["shapes"].append({"label": "dog", "points": [[1, 1], [9, 1], [5, 9]], "shape_type": "polygon"})
    with open(os.path.join(raw, "img_0003.json"), "w") as f:
        json.dump(doc, f)
    save_jpeg(os.path.join(raw, "img_0004.jpg"), 20, 20)
    run_convert("labelme", raw, out, split="train=1", layout_options={"labels": os.path.join(raw, "labels.txt")})
    info, records = read_records(out)
    assert info.class_names == ["background", "cat", "box", "ball"]
    reasons = {r["case_id"]: r["reason"] for r in rejected(out)}
    assert reasons["img_0003"].startswith("label(s) 'dog' not in --labels (background, cat, box, ball")
    assert reasons["img_0004"] == "shapes drawn on a 56x40 image, but the image is 20x20"
    assert len(reasons) == 2 and len(records) == 8
    table = {"cat": 1, "box": 2, "ball": 3, "__ignore__": 255}
    kinds, ignored = set(), 0
    for stem, (_, image, mask) in records.items():
        with open(os.path.join(raw, stem + ".json")) as f:
            doc = json.load(f)
        np.testing.assert_array_equal(mask, labelme_oracle(doc, 40, 56, table), err_msg=stem)
        kinds |= {s["shape_type"] for s in doc["shapes"]}
        ignored += int((mask == 255).sum())
        if doc["imageData"]:  # the embedded image, no file beside it
            emb = np.asarray(Image.open(io.BytesIO(base64.b64decode(doc["imageData"]))).convert("RGB"))
            np.testing.assert_array_equal(image, emb)
    assert kinds >= {"polygon", "rectangle", "circle", "line"} and ignored > 0
    check_counts(info, records)

    out2 = str(tmp_path / "out2")  # without --labels: background, then the labels found, sorted
    run_convert("labelme", raw, out2, split="train=1", layout_options={"labels": "cat,box,ball,dog"})
    assert schema.load_dataset_info(out2).class_names == ["background", "cat", "box", "ball", "dog"]
    out3 = str(tmp_path / "out3")
    run_convert("labelme", raw, out3, split="train=1")
    assert schema.load_dataset_info(out3).class_names == ["background", "ball", "box", "cat", "dog"]


def test_labelme_polygon_hand_checked(tmp_path):
    """A 2-point polygon paints nothing; a later shape covers an earlier one; a triangle by hand."""
    from tfseg.convert.labelme import shapes_to_mask

    shapes = [{"label": "a", "points": [[0, 0], [7, 0], [0, 7]], "shape_type": "polygon"},
              {"label": "b", "points": [[0, 0], [7, 7]], "shape_type": "polygon"},
              {"label": "b", "points": [[5, 5], [7, 7]], "shape_type": "rectangle"}]
    mask = shapes_to_mask(shapes, 8, 8, {"a": 1, "b": 2}, "x.json")
    yy, xx = np.mgrid[0:8, 0:8]
    expected = np.where(xx + yy <= 7, 1, 0)
    expected[5:8, 5:8] = 2
    np.testing.assert_array_equal(mask, expected)

    # a LabelMe 5 "mask" shape: a PNG of the box between its two points, pasted at the first
    buf = io.BytesIO()
    Image.fromarray(np.array([[1, 0, 1], [1, 1, 0]], bool)).save(buf, format="PNG")
    shape = {"label": "a", "points": [[4, 1], [6, 2]], "shape_type": "mask",
             "mask": base64.b64encode(buf.getvalue()).decode("ascii")}
    mask = shapes_to_mask([shape], 4, 8, {"a": 1}, "x.json")
    expected = np.zeros((4, 8), np.uint8)
    expected[1:3, 4:7] = [[1, 0, 1], [1, 1, 0]]
    np.testing.assert_array_equal(mask, expected)


# ------------------------------------------------------------------------------------- cvat-mask


def test_cvat_mask_sample_colours_and_splits(tmp_path):

    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    samples.write("cvat-mask", raw, 8, seed=5, image_size=(32, 40))
    colours = {}
    with open(os.path.join(raw, "labelmap.txt")) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                name, rgb = line.split(":")[:2]
                colours[tuple(int(v) for v in rgb.split(","))] = len(colours)
    sets = os.path.join(raw, "ImageSets", "Segmentation")
    with open(os.path.join(sets, "default.txt")) as f:
        ids = f.read().split()
    os.remove(os.path.join(sets, "default.txt"))
    with open(os.path.join(sets, "Train.txt"), "w") as f:
        f.write("\n".join(ids[:6]) + "\n")
    with open(os.path.join(sets, "Validation.txt"), "w") as f:
        f.write("\n".join(ids[6:]) + "\n")
    m = np.array(Image.open(os.path.join(raw, "SegmentationClass", ids[1] + ".png")))
    m[3, 3] = (1, 2, 3)  # a colour the label map does not have
    Image.fromarray(m).save(os.path.join(raw, "SegmentationClass", ids[1] + ".png"))
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(os.path.join(raw, "SegmentationClass", ids[2] + ".png"))
    run_convert("cvat-mask", raw, out)
    info, records = read_records(out)
    assert info.class_names == ["background", "road", "car", "tree"] and info.ignore_index is None
    assert info.label_mapping["palette"] == {"0,0,0": 0, "128,64,128": 1, "250,50,83": 2, "51,221,255": 3}
    reasons = {r["case_id"]: r["reason"] for r in rejected(out)}
    assert reasons == {ids[1]: "colour(s) (1, 2, 3) not in labelmap.txt (background, road, car, tree)",
                       ids[2]: "mask 10x10 != image 40x32"}
    for stem, (split, _, mask) in records.items():
        rgb = np.array(Image.open(os.path.join(raw, "SegmentationClass", stem + ".png")))
        expected = np.array([[colours[tuple(p)] for p in row] for row in rgb], np.uint8)
        np.testing.assert_array_equal(mask, expected)
        assert split == ("val" if stem in ids[6:] else "train")
    assert len(np.unique(np.concatenate([m.ravel() for _, _, m in records.values()]))) == 4
    check_counts(info, records)


def test_cvat_labelmap_errors(tmp_path):
    from tfseg.convert.cvat_mask import read_labelmap

    p = tmp_path / "labelmap.txt"
    p.write_text("background:0,0,0::\ncar:300,0,0::\n")
    with pytest.raises(TfsegError, match=r"labelmap.txt:2: expected 'label:R,G,B::'"):
        read_labelmap(str(p))
    p.write_text("background:0,0,0::\ncar:0,0,0::\n")
    with pytest.raises(TfsegError, match=r"labelmap.txt:2: colour \(0, 0, 0\) is also 'background'"):
        read_labelmap(str(p))


# ------------------------------------------------------------------------------------- CLI, end to end


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["coco", "cityscapes", "ade20k", "labelme", "cvat-mask"])
def test_cli_sample_convert_round_trip(layout, tmp_path):
    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "tfseg.cli", *args], capture_output=True, text=True)

    r = run("sample", "--dataset", layout, "--output", raw, "--count", "10")
    assert r.returncode == 0, r.stderr
    extra = ["--labels", os.path.join(raw, "labels.txt")] if layout == "labelme" else []
    r = run("convert", "--dataset", layout, "--input", raw, "--output", out, "--split", "train=0.7,val=0.3", *extra)
    assert r.returncode == 0, r.stderr
    assert f"converted {layout}:" in r.stdout and "rejected 0" in r.stdout
    info = schema.load_dataset_info(out)
    assert sum(v["count"] for v in info.splits.values()) == 10


@pytest.mark.slow
def test_cli_run_coco_automatic_plan(tmp_path):
    """`tfseg run --dataset coco --budget ...`: sample -> convert -> plan -> fit -> evaluate -> export."""
    raw, work = str(tmp_path / "raw"), str(tmp_path / "work")
    r = subprocess.run([sys.executable, "-m", "tfseg.cli", "sample", "--dataset", "coco", "--output", raw,
                        "--count", "30"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "tfseg.cli", "run", "--dataset", "coco", "--input", raw,
                        "--workdir", work, "--budget", "40s"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mean IoU" in r.stdout
    info = schema.load_dataset_info(os.path.join(work, "data"))
    # bottle has no pixels: the plan, the class weights and the metrics live with an empty class
    assert info.class_names == ["background", "person", "car", "dog", "bottle"]
    assert info.class_pixel_counts["train"][4] == 0
    assert os.path.isfile(os.path.join(work, "plan.yaml"))
