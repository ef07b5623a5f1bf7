"""Class colours, palette PNGs, overlays and legends (tfseg.visualize)."""

import io

import numpy as np
import pytest
from PIL import Image

from tfseg import visualize as vz


def test_voc_colormap_matches_vocs_published_colours():
    cmap = vz.voc_colormap(256)
    assert cmap[0].tolist() == [0, 0, 0]
    assert cmap[1].tolist() == [128, 0, 0]  # aeroplane
    assert cmap[15].tolist() == [192, 128, 128]  # person
    assert cmap[255].tolist() == [224, 224, 192]  # VOC's boundary colour


def test_default_colors_distinct_and_class0_black():
    for k in (2, 14, 21, 60):
        c = vz.default_colors(k)
        assert c.shape == (k, 3) and c.dtype == np.uint8
        assert c[0].tolist() == [0, 0, 0]
        assert len({tuple(x) for x in c}) == k
    assert vz.default_colors(3)[1].tolist() == [243, 195, 0]  # Kelly's first colour


def test_dataset_colors_voc_palette_and_recorded():
    assert (vz.dataset_colors({"name": "voc", "num_classes": 21}) == vz.voc_colormap(21)).all()
    # folder layout: label_mapping.palette {"R,G,B": id}; classes without a colour keep the map's.
    info = {"name": "folder", "num_classes": 4, "ignore_index": 255,
            "label_mapping": {"palette": {"10,20,30": 0, "0,255,0": 2, "255,255,255": 255, "#ff0000": 1}}}
    c = vz.dataset_colors(info)
    assert c[0].tolist() == [10, 20, 30] and c[1].tolist() == [255, 0, 0] and c[2].tolist() == [0, 255, 0]
    assert c[3].tolist() == vz.default_colors(4)[3].tolist()
    given = [[1, 2, 3], [4, 5, 6]]
    assert vz.dataset_colors({"num_classes": 2, "class_colors": given}).tolist() == given
    assert (vz.dataset_colors({"name": "carvana", "num_classes": 2}) == vz.default_colors(2)).all()


def test_run_colors_read_the_runs_dataset(tmp_path):
    (tmp_path / "dataset.json").write_text('{"name": "voc", "num_classes": 21}')
    assert (vz.run_colors({"num_classes": 21, "data_dir": str(tmp_path)}) == vz.voc_colormap(21)).all()
    # dataset gone or different: the fixed map
    assert (vz.run_colors({"num_classes": 3, "data_dir": str(tmp_path)}) == vz.default_colors(3)).all()
    assert (vz.run_colors({"num_classes": 3, "data_dir": str(tmp_path / "gone")}) == vz.default_colors(3)).all()


def test_palette_png_reads_back_as_class_ids():
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 21, (37, 53)).astype(np.uint8)
    colors = vz.voc_colormap(21)
    data = vz.encode_palette_png(mask, colors, ignore_index=255)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.mode == "P" and im.size == (53, 37)
        assert np.array_equal(np.array(im), mask)
        pal = np.array(im.getpalette()[: 21 * 3]).reshape(21, 3)
        assert np.array_equal(pal, colors)
        rgb = np.array(im.convert("RGB"))
    assert np.array_equal(rgb, colors[mask])
    with pytest.raises(ValueError):
        vz.encode_palette_png(np.zeros((2, 2, 2), np.uint8), colors)


def test_overlay_blends_and_keeps_background():
    colors = np.array([[0, 0, 0], [200, 0, 0], [0, 100, 0]], np.uint8)
    image = np.full((2, 2, 3), 100, np.uint8)
    mask = np.array([[0, 1], [2, 0]])
    out = vz.overlay(image, mask, colors, alpha=0.5)
    assert out[0, 0].tolist() == [100, 100, 100]
    assert out[0, 1].tolist() == [150, 50, 50]
    assert out[1, 0].tolist() == [50, 100, 50]
    painted = vz.overlay(image, mask, colors, alpha=0.5, paint_background=True)
    assert painted[0, 0].tolist() == [50, 50, 50]
    with pytest.raises(ValueError):
        vz.overlay(image, np.zeros((3, 3)), colors)


def test_overlay_with_legend_same_size_and_draws_present_classes():
    image = np.full((120, 200, 3), 128, np.uint8)
    mask = np.zeros((120, 200), np.uint8)
    mask[60:, 100:] = 2
    names = ["background", "cat", "dog"]
    colors = vz.default_colors(3)
    entries = vz.legend_entries(mask, names, colors)
    assert [n for n, _ in entries] == ["dog"]  # class 0 is background, class 1 absent
    out = vz.overlay_with_legend(image, mask, names, colors)
    assert out.shape == image.shape
    plain = vz.overlay(image, mask, colors)
    diff = np.any(out != plain, axis=-1)
    ys, xs = np.nonzero(diff)
    assert diff.any() and ys.max() < 60 and xs.max() < 100  # the legend box sits in the top-left corner
    # the swatch holds the class colour
    assert any((out[y, x] == colors[2]).all() for y, x in zip(ys, xs))
    # class 0 not named background: it is painted and listed
    entries = vz.legend_entries(mask, ["sky", "road", "car"], colors, skip_background=False)
    assert [n for n, _ in entries] == ["sky", "car"]


def test_legend_strip_and_grid():
    strip = vz.legend_strip([f"class_{i}" for i in range(30)], vz.default_colors(30), 200)
    assert strip.shape[1] == 200 and strip.shape[0] > 40  # wrapped over several rows
    a = np.zeros((4, 5, 3), np.uint8)
    b = np.full((6, 3, 3), 7, np.uint8)
    g = vz.grid([[a, b], [b, a]], pad=1)
    assert g.shape == (1 + 6 + 1 + 6 + 1, 1 + 5 + 1 + 5 + 1, 3)
    assert (g[1:7, 7:10] == 7).all()
