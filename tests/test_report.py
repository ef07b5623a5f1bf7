"""Pictures and markdown of the evaluate stage."""

import csv
import os

import numpy as np
from PIL import Image

from tfseg.evaluate import report
from tfseg.evaluate import SegmentationScorer


def _png_size(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_palette_is_voc_and_distinct():
    p = report.palette(21)
    assert p.shape == (21, 3) and p.dtype == np.uint8
    # Pascal VOC's published colours for background, aeroplane, bicycle, person.
    assert p[0].tolist() == [0, 0, 0]
    assert p[1].tolist() == [128, 0, 0]
    assert p[2].tolist() == [0, 128, 0]
    assert p[15].tolist() == [192, 128, 128]
    assert len({tuple(c) for c in report.palette(64)}) == 64


def test_colorize_and_overlay():
    colors = report.palette(3)
    mask = np.array([[0, 1], [2, 255]])
    rgb = report.colorize(mask, colors, ignore_index=255)
    assert rgb[0, 1].tolist() == [128, 0, 0] and rgb[1, 0].tolist() == [0, 128, 0]
    assert rgb[1, 1].tolist() == [255, 255, 255]
    image = np.full((2, 2, 3), 100, np.uint8)
    out = report.overlay(image, mask, colors, alpha=0.5, ignore_index=255)
    assert out[0, 0].tolist() == [100, 100, 100]  # background: the image shows through unchanged
    assert out[0, 1].tolist() == [114, 50, 50]  # (100 + 128) / 2, (100 + 0) / 2
    assert out[1, 1].tolist() == [177, 177, 177]  # ignore: half white


def test_to_display_gray_and_float():
    gray = report.to_display(np.arange(4, dtype=np.uint8).reshape(2, 2, 1))
    assert gray.shape == (2, 2, 3) and gray[1, 1].tolist() == [3, 3, 3]
    vol_slice = np.linspace(-2, 2, 100, dtype=np.float32).reshape(10, 10, 1)
    shown = report.to_display(vol_slice)
    assert shown.dtype == np.uint8 and shown.min() == 0 and shown.max() == 255
    assert report.to_display(np.zeros((3, 3, 4), np.float32)).shape == (3, 3, 3)  # 4 modalities: first


def test_main_metric_choice():
    cols = ["epoch", "dice", "learning_rate", "loss", "mean_iou", "val_dice", "val_loss", "val_mean_iou"]
    assert report.main_metric(cols, "val_dice") == "dice"
    assert report.main_metric(cols) == "mean_iou"
    assert report.main_metric(["epoch", "loss", "acc", "val_acc", "val_loss"]) == "acc"
    assert report.main_metric(["epoch", "loss", "val_loss"]) is None


def test_pictures_are_valid_pngs(tmp_path):
    rng = np.random.default_rng(0)
    names = ["background", "a", "b"]
    samples = [
        {"image": rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
         "truth": rng.integers(0, 3, (20, 30)), "prediction": rng.integers(0, 3, (20, 30)), "title": "x"},
        {"image": rng.normal(size=(30, 20, 1)).astype(np.float32),
         "truth": rng.integers(0, 3, (30, 20)), "prediction": rng.integers(0, 3, (30, 20)), "title": "y"},
    ]
    w, h = _png_size(report.plot_samples(samples, names, str(tmp_path / "s.png"), ignore_index=255))
    assert w > 300 and h > 300
    cm = rng.integers(0, 100, (3, 3))
    w, h = _png_size(report.plot_confusion_matrix(cm, names, str(tmp_path / "cm.png")))
    assert w > 200 and h > 200
    # 30 classes: no per-cell numbers, still a picture.
    _png_size(report.plot_confusion_matrix(np.eye(30), [f"c{i}" for i in range(30)], str(tmp_path / "cm30.png")))

    hist = tmp_path / "history.csv"
    with open(hist, "w", newline="") as f:
        w_ = csv.writer(f)
        w_.writerow(["epoch", "loss", "dice", "val_loss", "val_dice"])
        w_.writerows([[0, 1.0, 0.1, 1.1, 0.05], [1, 0.5, 0.4, 0.7, 0.3]])
    assert report.read_history(str(hist))["val_dice"] == [0.05, 0.3]
    _png_size(report.plot_history(str(hist), str(tmp_path / "h.png")))
    assert report.plot_history(str(tmp_path / "missing.csv"), str(tmp_path / "h2.png")) is None
    assert not os.path.exists(tmp_path / "h2.png")


def test_markdown_table_and_cells():
    md = report.markdown_table(["class", "IoU"], [["a|b", 0.123456], ["c", float("nan")], ["d", None], ["e", 3]])
    lines = md.strip().split("\n")
    assert lines[0] == "| class | IoU |" and lines[1] == "|---|---|"
    assert lines[2] == "| a\\|b | 0.1235 |"
    assert lines[3] == "| c | – |" and lines[4] == "| d | – |" and lines[5] == "| e | 3 |"


def test_render_markdown_binary_sections():
    s = SegmentationScorer(2, ["background", "lesion"])
    s.add(np.array([[0, 1], [1, 1]]), np.array([[0, 1], [0, 1]]), "isic1")
    m = {"split": "test", "model": "improved_unet", "pictures": {"samples": "samples.png"}, **s.result()}
    md = report.render_markdown(m)
    assert "## Binary foreground" in md and "thresholded Jaccard" in md
    assert "## Per class, dataset-level" in md and "## Per class, per-image mean" in md
    assert "](samples.png)" in md and "confusion_matrix.png" not in md
    # The lesion row of the dataset-level table: IoU 2/3, precision 1, recall 2/3, Dice 4/5.
    assert "| lesion | 0.6667 | 1.0000 | 0.6667 | 0.8000 | 3 |" in md
    assert "## Regions" not in md


def test_history_plot_reads_a_run_on_a_non_local_filesystem(tmp_path):
    """history.png was silently missing for gs:// and ram:// runs (report read with open())."""
    import tensorflow as tf

    from tfseg.evaluate import report

    csv_path = "ram://report-history/history.csv"
    with tf.io.gfile.GFile(csv_path, "w") as f:
        f.write("epoch,loss,mean_iou,val_loss,val_mean_iou\n0,1.0,0.2,1.1,0.1\n1,0.5,0.4,0.6,0.3\n")
    assert report.read_history(csv_path)["val_mean_iou"] == [0.1, 0.3]
    png = str(tmp_path / "history.png")
    assert report.plot_history(csv_path, png, monitor="val_mean_iou") == png
    assert os.path.getsize(png) > 0
