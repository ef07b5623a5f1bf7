"""The Beam conversion job: validation, rejections, --strict, determinism, atomic output, CLI."""

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tfseg import schema
from tfseg.convert import samples, transforms
from tfseg.convert.base import BadCase, Case, Loaded2D, Loaded3D
from tfseg.convert.encode import CaseStats, EncodeOptions, count_classes, encode_case, encode_png_gray
from tfseg.convert.folder import FolderLayout
from tfseg.convert.pipeline import NothingConverted, run_convert
from tfseg.convert.shards import shard_of
from tfseg.errors import TfsegError


def read_records(data_dir):
    import tensorflow as tf

    info = schema.load_dataset_info(data_dir)
    out = {}
    for split in info.splits:
        files = info.split_files(split, data_dir)
        for r in tf.data.TFRecordDataset(files, compression_type=info.compression or None):
            d = schema.decode_2d(r, info.channels)
            out[d["source_id"].numpy().decode()] = (split, d["image"].numpy(), d["mask"].numpy()[..., 0])
    return info, out


def rejected_rows(data_dir):
    with open(os.path.join(data_dir, schema.REJECTED_JSONL)) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def folder_sample(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("folder") / "sample")
    samples.write("folder", root, 8, seed=3, image_size=(24, 40))
    return root


def fresh_copy(src, tmp_path, name="input"):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------- pure functions


def test_count_classes_hand_computed():
    opts = EncodeOptions(ndim=2, channels=3, num_classes=3, ignore_index=255)
    labels = np.array([[0, 2], [255, 2]], np.uint8)
    assert count_classes(labels, opts, "m.png") == (1, 0, 2)
    with pytest.raises(BadCase, match=r"label values \[7\] outside 0..2 or 255"):
        count_classes(np.array([[0, 7], [1, 1]], np.uint8), opts, "m.png")
    no_ignore = EncodeOptions(ndim=2, channels=3, num_classes=3)
    with pytest.raises(BadCase, match=r"\[255\]"):
        count_classes(labels, no_ignore, "m.png")


def test_encode_png_gray_is_lossless_png():
    import tensorflow as tf

    a = np.arange(35 * 33, dtype=np.uint32).reshape(35, 33).astype(np.uint8)
    png = encode_png_gray(a)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), a)
    np.testing.assert_array_equal(tf.io.decode_png(png, channels=1).numpy()[..., 0], a)


def test_encode_case_rejects_size_mismatch_and_channels():
    case = Case("c", (("image", "img.png"), ("mask", "m.png")))
    opts = EncodeOptions(ndim=2, channels=3, num_classes=2)
    img = np.zeros((4, 6, 3), np.uint8)
    with pytest.raises(BadCase, match="mask 5x4 != image 6x4") as e:
        encode_case(Loaded2D(image=img, mask=np.zeros((4, 5), np.uint8)), case, opts)
    assert e.value.path == "m.png"
    with pytest.raises(BadCase, match="1 channels"):
        encode_case(Loaded2D(image=img[..., :1], mask=None), case, opts)


def test_encode_case_3d_counts_voxels():
    import tensorflow as tf

    opts = EncodeOptions(ndim=3, channels=2, num_classes=4)
    vol = np.random.default_rng(0).normal(size=(3, 4, 5, 2)).astype(np.float32)
    lab = np.zeros((3, 4, 5), np.uint8)
    lab[0, 0, :2] = 3
    lab[1] = 1
    record, stats = encode_case(Loaded3D(vol, lab, (1.0, 1.0, 2.0)), Case("v", (("image", "v.nii.gz"),)), opts)
    assert stats.class_counts == (60 - 2 - 20, 20, 0, 2)
    assert stats.shape == (3, 4, 5)
    d = schema.decode_3d(tf.constant(record), 2)
    np.testing.assert_array_equal(d["mask"].numpy()[..., 0], lab)
    np.testing.assert_allclose(d["image"].numpy(), vol.astype(np.float16).astype(np.float32))
    with pytest.raises(BadCase, match="label shape"):
        encode_case(Loaded3D(vol, lab[:2], (1.0, 1.0, 1.0)), Case("v", (("image", "v"),)), opts)


def test_shard_of_is_stable_and_spread():
    shards = [shard_of(f"case{i}", 4) for i in range(200)]
    assert shards == [shard_of(f"case{i}", 4) for i in range(200)]
    assert set(shards) == {0, 1, 2, 3}


# ------------------------------------------------------------------------- Beam transforms


def test_convert_cases_transform_tags_rejections(folder_sample, tmp_path):
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    layout = FolderLayout()
    cases = layout.list_cases(folder_sample)[:3]
    bad = Case("ghost", (("image", str(tmp_path / "ghost.png")),))
    opts = EncodeOptions(ndim=2, channels=layout.channels, num_classes=2)
    with TestPipeline() as p:
        out = (p | beam.Create(transforms.batch_cases([("train", 0, c) for c in cases + [bad]], 3))
               | transforms.ConvertCases(layout, opts))
        assert_that(out["examples"] | "Ids" >> beam.Map(lambda e: e.case_id),
                    equal_to([c.case_id for c in cases]), label="examples")
        assert_that(out[transforms.REJECTED] | "Files" >> beam.Map(lambda r: (r["case_id"], r["reason"])),
                    equal_to([("ghost", "no mask (masks/ghost.* absent)")]), label="rejected")


def test_split_stats_combiner():
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    stats = [
        ("train", CaseStats((3, 1), (2, 2), "png")),
        ("train", CaseStats((0, 6), (2, 3), "png", exif_orientation=6)),  # a phone photo, turned
        ("val", CaseStats(None, (4, 4), "png")),
    ]
    expected = [
        ("train", {"count": 2, "labelled": 2, "class_pixel_counts": [3, 7], "image_formats": ["png"],
                   "size": {"height": {"min": 2, "max": 2, "mean": 2.0}, "width": {"min": 2, "max": 3, "mean": 2.5}},
                   "exif_oriented": 1}),
        ("val", {"count": 1, "labelled": 0, "class_pixel_counts": None, "image_formats": ["png"],
                 "size": {"height": {"min": 4, "max": 4, "mean": 4.0}, "width": {"min": 4, "max": 4, "mean": 4.0}},
                 "exif_oriented": 0}),
    ]
    with TestPipeline() as p:
        out = p | beam.Create(stats) | beam.CombinePerKey(transforms.SplitStatsFn())
        assert_that(out, equal_to(expected))


# ------------------------------------------------------------------------- the job


def test_bad_inputs_are_rejected_and_listed(folder_sample, tmp_path):
    root = fresh_copy(folder_sample, tmp_path)
    images = sorted(os.listdir(os.path.join(root, "images")))
    # 1: truncated image; 2: undecodable image; 3: missing mask; 4: mask size mismatch;
    # 5: label outside the class range (multi-class run below).
    with open(os.path.join(root, "images", images[0]), "rb") as f:
        data = f.read()
    with open(os.path.join(root, "images", images[0]), "wb") as f:
        f.write(data[: len(data) // 2])
    with open(os.path.join(root, "images", images[1]), "wb") as f:
        f.write(b"this is not an image")
    os.remove(os.path.join(root, "masks", images[2]))
    m = Image.open(os.path.join(root, "masks", images[3]))
    m.resize((m.width + 2, m.height), Image.NEAREST).save(os.path.join(root, "masks", images[3]))

    out = str(tmp_path / "out")
    summary = run_convert("folder", root, out, split="train=1")
    assert summary["rejected"] == 4
    assert summary["splits"] == {"train": 4}
    rows = {os.path.basename(r["file"]): r["reason"] for r in rejected_rows(out)}
    assert "truncated" in rows[images[0]]
    assert "not a decodable image" in rows[images[1]]
    assert rows[images[2]].startswith("no mask")
    assert "!= image" in rows[images[3]]
    info, records = read_records(out)
    assert sorted(records) == sorted(os.path.splitext(f)[0] for f in images[4:])
    assert info.conversion_args["rejected"] == 4
    with open(os.path.join(out, "convert.json")) as f:  # the settings it ran with, beside dataset.json
        assert json.load(f) == {
            "layout_name": "folder", "input_dir": os.path.abspath(root), "output_dir": os.path.abspath(out),
            "layout_options": None, "split": "train=1", "image_size": None, "num_shards": None,
            "compression": "", "strict": False, "overwrite": False, "beam_args": [], "threads": None}

    # Labels out of range: a 3-class run over {0, 255} masks rejects every masked case, so no case
    # is converted: the conversion fails (exit 1 in the CLI) naming the value, nothing published.
    out3 = str(tmp_path / "out3")
    with pytest.raises(NothingConverted,
                       match=r"no case converted, all 8 rejected.*masks/vein_\d+.png: label values \[255\] outside "
                             r"0..2 \(and 3 alike\)"):
        run_convert("folder", root, out3, layout_options={"num_classes": 3}, split="train=1")
    assert not os.path.exists(out3)


def test_strict_fails_without_output(folder_sample, tmp_path):
    root = fresh_copy(folder_sample, tmp_path)
    os.remove(os.path.join(root, "masks", sorted(os.listdir(os.path.join(root, "masks")))[0]))
    out = str(tmp_path / "out")
    with pytest.raises(TfsegError, match="1 case\\(s\\) rejected with --strict; first: .*no mask"):
        run_convert("folder", root, out, strict=True)
    assert not os.path.exists(os.path.join(out, schema.DATASET_JSON))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".out")]


def test_input_errors_before_pipeline(tmp_path):
    with pytest.raises(TfsegError, match="input directory not found"):
        run_convert("folder", str(tmp_path / "nope"), str(tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TfsegError, match="input directory is empty"):
        run_convert("folder", str(tmp_path / "empty"), str(tmp_path / "o"))
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "x.txt").write_text("x")
    with pytest.raises(TfsegError, match="not a Carvana layout"):
        run_convert("carvana", str(tmp_path / "wrong"), str(tmp_path / "o"))
    with pytest.raises(TfsegError, match="--image-dir folder not found"):
        run_convert("folder", str(tmp_path / "wrong"), str(tmp_path / "o"))
    with pytest.raises(TfsegError, match="unknown dataset layout"):
        run_convert("nope", str(tmp_path / "wrong"), str(tmp_path / "o"))
    with pytest.raises(TfsegError, match="--split"):
        run_convert("folder", str(tmp_path / "wrong"), str(tmp_path / "o"), split="train")
    assert not os.path.exists(tmp_path / "o")


def test_deterministic_shards_and_existing_output(folder_sample, tmp_path):
    outs = [str(tmp_path / f"out{i}") for i in range(2)]
    for out in outs:
        run_convert("folder", folder_sample, out, split="train=1", num_shards=3, compression="gzip")
    names = sorted(f for f in os.listdir(outs[0]) if ".tfrecord" in f)
    assert names == [f"train-0000{i}-of-00003.tfrecord.gz" for i in range(3)]
    for name in names:
        with open(os.path.join(outs[0], name), "rb") as a, open(os.path.join(outs[1], name), "rb") as b:
            assert a.read() == b.read(), name
    info, records = read_records(outs[0])
    assert info.splits["train"]["count"] == 8 == len(records)
    # Within a shard, records are in case-id order.
    import tensorflow as tf

    for f in info.split_files("train", outs[0]):
        ids = [schema.decode_2d(r, 1)["source_id"].numpy() for r in tf.data.TFRecordDataset(f, "GZIP")]
        assert ids == sorted(ids)

    with pytest.raises(TfsegError, match="output (already )?exists; pass --overwrite"):
        run_convert("folder", folder_sample, outs[0])
    summary = run_convert("folder", folder_sample, outs[0], split="train=1", overwrite=True)
    assert summary["num_shards"] == {"train": 1}
    assert sorted(f for f in os.listdir(outs[0]) if ".tfrecord" in f) == ["train-00000-of-00001.tfrecord"]


def test_resize_at_conversion(folder_sample, tmp_path):
    out = str(tmp_path / "out")
    run_convert("folder", folder_sample, out, split="train=1", image_size=(16, 20))
    info, records = read_records(out)
    assert info.size_summary["train"]["height"] == {"min": 16, "max": 16, "mean": 16.0}
    for case_id, (_, image, mask) in records.items():
        assert image.shape == (16, 20, 1) and mask.shape == (16, 20)
        original = np.asarray(Image.open(os.path.join(folder_sample, "masks", case_id + ".png"))) // 255
        # Nearest-neighbour masks keep only original values and match PIL's own nearest resize.
        expected = np.asarray(Image.fromarray(original.astype(np.uint8)).resize((20, 16), Image.NEAREST))
        np.testing.assert_array_equal(mask, expected)
    counts = np.zeros(2, np.int64)
    for _, _, mask in records.values():
        counts += np.bincount(mask.ravel(), minlength=2)
    assert info.class_pixel_counts["train"] == counts.tolist()


# ------------------------------------------------------------------------- CLI


def test_cli_sample_and_convert(tmp_path):
    from click.testing import CliRunner

    from tfseg.cli import cli

    runner = CliRunner()
    sample = str(tmp_path / "s")
    res = runner.invoke(cli, ["sample", "--dataset", "carvana", "--output", sample, "--count", "8", "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert len(os.listdir(os.path.join(sample, "train"))) == 8
    # Remove one mask: exit 0 with a rejection, then --strict exits 2 with a one-line error.
    gif = sorted(os.listdir(os.path.join(sample, "train_masks")))[0]
    os.remove(os.path.join(sample, "train_masks", gif))
    out = str(tmp_path / "o")
    res = runner.invoke(cli, ["convert", "--dataset", "carvana", "--input", sample, "--output", out,
                              "--split", "train=0.5,val=0.5", "--direct_num_workers=1"])
    assert res.exit_code == 0, res.output
    assert "rejected 1" in res.output
    info = schema.load_dataset_info(out)
    assert sum(s["count"] for s in info.splits.values()) == 7
    assert info.conversion_args["beam_args"] == ["--direct_num_workers=1"]
    res = runner.invoke(cli, ["convert", "--dataset", "carvana", "--input", sample, "--output",
                              str(tmp_path / "o2"), "--strict"])
    assert res.exit_code == 2
    # Progress lines (stderr) come first; the error is one last line.
    assert res.output.strip().splitlines()[-1].startswith("error: 1 case(s) rejected") and "Traceback" not in res.output
    res = runner.invoke(cli, ["convert", "--dataset", "carvana", "--input", sample, "--output", out])
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = runner.invoke(cli, ["convert", "--dataset", "carvana", "--input", sample, "--output", out,
                              "--mask-suffix", "_m"])
    assert res.exit_code == 2 and "--mask-suffix does not apply" in res.output


class FakeVolumes:
    """A minimal 3D layout (the real ones live in tfseg.convert.brats): shows the pipeline
    needs nothing layout-specific for Loaded3D cases."""

    name = "fake3d"

    def __init__(self):
        pass

    def info(self):
        from tfseg.convert.base import LayoutInfo

        return LayoutInfo(name="fake3d", ndim=3, channels=2, class_names=("bg", "a", "b"),
                          regions={"WT": [1, 2]}, modalities=("t1", "t2"))

    def list_cases(self, root):
        return [Case(f"v{i}", (("image", os.path.join(root, f"v{i}.npy")),)) for i in range(3)]

    def load_case(self, case):
        vol = np.load(case.main_path)
        depth = vol.shape[0]
        label = (np.arange(depth * 4 * 5).reshape(depth, 4, 5) % 3).astype(np.uint8)
        return Loaded3D(vol, label, (1.0, 1.0, 1.0))


def test_pipeline_converts_3d_cases(tmp_path, monkeypatch):
    import tensorflow as tf

    import tfseg.convert

    root = tmp_path / "in"
    root.mkdir()
    for i in range(3):
        np.save(root / f"v{i}.npy", np.full((2 + i, 4, 5, 2), i, np.float32))
    monkeypatch.setattr(tfseg.convert, "get_layout_class", lambda name: FakeVolumes)
    out = str(tmp_path / "out")
    summary = run_convert("fake3d", str(root), out, split="train=1")
    assert summary["splits"] == {"train": 3}
    info = schema.load_dataset_info(out)
    assert info.ndim == 3 and info.regions == {"WT": [1, 2]} and info.modalities == ["t1", "t2"]
    assert info.size_summary["train"]["depth"] == {"min": 2, "max": 4, "mean": 3.0}
    voxels = sum(d * 20 for d in (2, 3, 4))
    expected = np.zeros(3, np.int64)
    for d in (2, 3, 4):
        expected += np.bincount(np.arange(d * 20) % 3, minlength=3)
    assert info.class_pixel_counts["train"] == expected.tolist() and sum(expected) == voxels
    depths = []
    for r in tf.data.TFRecordDataset(info.split_files("train", out)):
        d = schema.decode_3d(r, 2)
        depths.append(int(d["image"].shape[0]))
        assert float(d["image"][0, 0, 0, 0]) == depths[-1] - 2
    assert sorted(depths) == [2, 3, 4]
