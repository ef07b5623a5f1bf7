"""Files as other tools write them (issue 32 item 3): each test builds a file shaped like the
real export it names and checks what tfseg makes of it against pixels computed here."""

import base64
import io
import json
import os

import numpy as np
from PIL import Image

from tfseg import schema
from tfseg.convert import samples
from tfseg.convert.pipeline import run_convert


def _records(out):
    import tensorflow as tf

    info = schema.load_dataset_info(out)
    recs = {}
    for split in info.splits:
        for r in tf.data.TFRecordDataset(info.split_files(split, out)):
            d = schema.decode_2d(r, info.channels)
            recs[d["source_id"].numpy().decode()] = (d["image"].numpy(), d["mask"].numpy()[..., 0])
    return info, recs


def _png_b64(pixels):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _labelme_doc(image_path, label, box, h, w, image_data=None):
    (x0, y0), (x1, y1) = box
    return {"version": "5.4.1", "flags": {}, "imagePath": image_path, "imageData": image_data,
            "imageHeight": h, "imageWidth": w,
            "shapes": [{"label": label, "points": [[x0, y0], [x1, y1]], "group_id": None,
                        "shape_type": "rectangle", "flags": {}}]}


def test_labelme_files_as_labelme_and_other_tools_write_them(tmp_path):
    h, w = 40, 48
    rng = np.random.default_rng(0)
    embedded = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    on_disk = 255 - embedded
    raw = tmp_path / "raw"
    raw.mkdir()
    # LabelMe's tutorial file: imagePath names the JSON itself, the image is embedded.
    (raw / "tutorial.json").write_text(json.dumps(_labelme_doc("tutorial.json", "cat", ((2, 2), (10, 8)), h, w,
                                                               _png_b64(embedded))))
    # Written with sorted keys: imageData (long) comes before shapes; imagePath names another
    # file with other pixels: LabelMe's loader shows imageData, and so must tfseg.
    Image.fromarray(on_disk).save(raw / "sorted.png")
    doc = _labelme_doc("sorted.png", "dog", ((4, 4), (20, 12)), h, w, _png_b64(embedded))
    (raw / "sorted.json").write_text(json.dumps(doc, sort_keys=True))
    assert (raw / "sorted.json").read_text().index('"shapes"') > 4096
    # Latin-1 (LabelMe's loader on a Windows machine's default encoding): an accented label.
    Image.fromarray(on_disk).save(raw / "latin.png")
    (raw / "latin.json").write_bytes(json.dumps(_labelme_doc("latin.png", "café", ((0, 0), (5, 5)), h, w),
                                                ensure_ascii=False).encode("latin-1"))
    (raw / "broken.json").write_text('{"shapes": [')  # cut off: rejected, with the reason
    (raw / "settings.json").write_text('{"theme": "dark"}')  # another tool's JSON: left out
    out = str(tmp_path / "out")
    run_convert("labelme", str(raw), out, split="train=1")
    info, recs = _records(out)
    assert info.class_names == ["background", "café", "cat", "dog"]
    assert sorted(recs) == ["latin", "sorted", "tutorial"]
    np.testing.assert_array_equal(recs["tutorial"][0], embedded)
    np.testing.assert_array_equal(recs["sorted"][0], embedded)
    np.testing.assert_array_equal(recs["latin"][0], on_disk)
    mask = np.zeros((h, w), np.uint8)
    mask[4:13, 4:21] = 3  # LabelMe's rectangle: both corners inclusive, filled by ImageDraw
    np.testing.assert_array_equal(recs["sorted"][1], mask)
    with open(os.path.join(out, schema.REJECTED_JSONL)) as f:
        rejected = [json.loads(line) for line in f]
    assert [r["case_id"] for r in rejected] == ["broken"]
    assert "not valid JSON" in rejected[0]["reason"]


def test_ade20k_object_list_as_the_csv_writes_it(tmp_path):
    """objectInfo150.csv (Idx,Ratio,Train,Val,Name) writes every separator in Name as ';':
    ``screen;door;screen`` is "screen door, screen". Its names must be the .txt list's, none cut
    at the first ';' (14 were, and 'screen' came out twice, refusing the file)."""
    from tfseg.convert.ade20k import OBJECT_NAMES

    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    samples.write("ade20k", raw, 4, seed=1, image_size=(24, 32))
    base = os.path.join(raw, "ADEChallengeData2016")
    os.remove(os.path.join(base, "objectInfo150.txt"))
    rows = ["Idx,Ratio,Train,Val,Name"] + [
        f"{k},0.01,100,10,{name.replace(', ', ';').replace(' ', ';')}" for k, name in enumerate(OBJECT_NAMES, 1)]
    rows[12] = "12,0.01,100,10,sidewalk;pavement;kerb"  # words the .txt list lacks: kept, joined by spaces
    with open(os.path.join(base, "objectInfo150.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    assert any(r.endswith(",screen;door;screen") for r in rows)  # as the real file has it
    run_convert("ade20k", raw, out)
    info = schema.load_dataset_info(out)
    expected = [n.split(",")[0].strip() for n in OBJECT_NAMES]
    expected[11] = "sidewalk pavement kerb"
    assert info.class_names == expected
    assert len(set(info.class_names)) == 150 and "screen door" in info.class_names and "swivel chair" in info.class_names
    assert info.label_mapping["names_from"] == "objectInfo150.csv"


def _coco_doc(categories, images, annotations):
    return {"info": {"description": "labelme2coco"}, "licenses": [], "categories": categories,
            "images": images, "annotations": annotations}


def test_labelme2coco_background_category_is_class_0(tmp_path):
    """labelme2coco declares ``_background_`` as category 0: it is class 0, so the ids match the
    VOC export of the same data (cat 1, dog 2), not shifted by an empty class."""
    raw = tmp_path / "raw"
    (raw / "JPEGImages").mkdir(parents=True)
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(raw / "JPEGImages" / "a.png")
    doc = _coco_doc(
        [{"id": 0, "name": "_background_", "supercategory": None}, {"id": 1, "name": "cat", "supercategory": None},
         {"id": 2, "name": "dog", "supercategory": None}],
        [{"id": 0, "file_name": "JPEGImages/a.png", "height": 20, "width": 30}],
        [{"id": 0, "image_id": 0, "category_id": 1, "iscrowd": 0, "segmentation": [[2, 2, 10, 2, 10, 10, 2, 10]],
          "area": 64, "bbox": [2, 2, 8, 8]},
         {"id": 1, "image_id": 0, "category_id": 2, "iscrowd": 0,
          "segmentation": [[15, 5, 25, 5, 25, 15, 15, 15]], "area": 100, "bbox": [15, 5, 10, 10]}])
    (raw / "annotations.json").write_text(json.dumps(doc))
    out = str(tmp_path / "out")
    run_convert("coco", str(raw), out, split="train=1")
    info, recs = _records(out)
    assert info.class_names == ["background", "cat", "dog"]
    from pycocotools import mask as mask_utils

    (mask,) = [m for _, m in recs.values()]
    for ann, cls in ((doc["annotations"][0], 1), (doc["annotations"][1], 2)):
        want = mask_utils.decode(mask_utils.frPyObjects(ann["segmentation"], 20, 30)).any(-1)
        assert np.all(mask[want] == cls)
    assert set(np.unique(mask)) == {0, 1, 2}


def test_duplicate_annotation_files_and_identical_photos(tmp_path):
    """A COCO export copied twice under one input (top level and annotations/) stored every image
    twice; the same photo under two names with two masks (a real CVAT export has one) could land
    in train and val. Now: the copy is read once and counted, identical photos share a split, and
    --strict refuses both."""
    import pytest

    from tfseg.errors import TfsegError

    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "annotations").mkdir()
    rng = np.random.default_rng(1)
    n = 16
    photos = [rng.integers(0, 255, (12, 16, 3), dtype=np.uint8) for _ in range(n)]
    photos[5] = photos[2]  # the same photo twice, under another name, annotated differently
    for i, p in enumerate(photos):
        Image.fromarray(p).save(raw / "images" / f"p{i:02d}.png")
    images = [{"id": i, "file_name": f"images/p{i:02d}.png", "height": 12, "width": 16} for i in range(n)]
    anns = [{"id": i, "image_id": i, "category_id": 1, "iscrowd": 0,
             "segmentation": [[1, 1, 8 + i % 5, 1, 8 + i % 5, 8, 1, 8]]} for i in range(n)]
    text = json.dumps(_coco_doc([{"id": 1, "name": "thing"}], images, anns))
    (raw / "export.json").write_text(text)
    (raw / "annotations" / "export.json").write_text(text)  # the same file, copied
    out = str(tmp_path / "out")
    run_convert("coco", str(raw), out, split="train=0.5,val=0.5")
    info, recs = _records(out)
    assert len(recs) == n  # each image once, not twice
    assert info.duplicates == {"images": 1, "annotation_files": 1}
    split_of = {}
    for split in info.splits:
        import tensorflow as tf

        for r in tf.data.TFRecordDataset(info.split_files(split, out)):
            split_of[schema.decode_2d(r, 3)["source_id"].numpy().decode()] = split
    assert split_of["images/p02"] == split_of["images/p05"]
    assert len(set(split_of.values())) == 2  # both splits used: the pair's agreement is not by chance alone
    with pytest.raises(TfsegError, match="1 image\\(s\\) identical to another case's and 1 duplicate annotation "
                                         "file\\(s\\), refused with --strict"):
        run_convert("coco", str(raw), str(tmp_path / "strict"), split="train=0.5,val=0.5", strict=True)
