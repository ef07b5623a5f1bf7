"""Names and colours recorded in dataset.json reach evaluate's table, predict's PNG palette and
legend, and the export's metadata and README (issue 14)."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("keras")
from helpers import block_mask, oracle_model, write_dataset, write_run  # noqa: E402
from tfseg import export, predict, visualize  # noqa: E402
from tfseg.evaluate import report  # noqa: E402
from tfseg.cli import cli  # noqa: E402

NAMES = ["sky", "road", "car"]  # class 0 is a real class here, not background
PALETTE = {"10,20,200": 0, "90,90,90": 1, "250,0,0": 2}
COLOURS = [[10, 20, 200], [90, 90, 90], [250, 0, 0]]


@pytest.fixture(scope="module")
def named(tmp_path_factory):
    root = tmp_path_factory.mktemp("names")
    rng = np.random.default_rng(3)
    examples = []
    for i in range(2):
        mask = block_mask(24, 36, 3, rng)
        examples.append(((np.eye(3, dtype=np.uint8)[mask] * 255).astype(np.uint8), mask, f"img{i}"))
    data = write_dataset(str(root / "data"), examples, ndim=2, channels=3, class_names=NAMES)
    with open(os.path.join(data, "dataset.json")) as f:
        info = json.load(f)
    info.update(name="folder", label_mapping={"palette": PALETTE})  # what `convert --palette` records
    with open(os.path.join(data, "dataset.json"), "w") as f:
        json.dump(info, f)
    run = write_run(str(root / "run"), oracle_model(2, 3, 3), ndim=2, channels=3, class_names=NAMES,
                     size=(12, 18))
    with open(os.path.join(run, "run.json")) as f:
        cfg = json.load(f)
    cfg["data_dir"] = data  # as `tfseg fit` records it
    with open(os.path.join(run, "run.json"), "w") as f:
        json.dump(cfg, f)
    images = root / "photos"
    images.mkdir()
    for image, mask, sid in examples:
        Image.fromarray(image).save(images / f"{sid}.png")
    return {"root": root, "data": data, "run": run, "images": str(images), "examples": examples}


def test_names_reach_evaluates_table_and_colours_its_pictures(named, monkeypatch):
    seen = {}
    real = report.plot_samples

    def spy(samples, class_names, path, **kw):
        seen["names"], seen["colors"] = list(class_names), np.asarray(kw["colors"]).tolist()
        return real(samples, class_names, path, **kw)

    monkeypatch.setattr(report, "plot_samples", spy)
    out = str(named["root"] / "eval")
    res = CliRunner().invoke(cli, ["evaluate", "--run", named["run"], "--data", named["data"], "--output", out])
    assert res.exit_code == 0, res.output
    rows = [ln.split()[0] for ln in res.output.splitlines() if ln.split() and ln.split()[0] in NAMES]
    assert rows == NAMES  # the printed per-class table, in class order
    assert "evaluating test: 2/2 images" in res.output  # the plain progress line (not a terminal)
    md = open(os.path.join(out, "report.md")).read()
    for name in NAMES:
        assert f"| {name} | 1.0000 |" in md  # the oracle scores 1 on every class
    assert seen == {"names": NAMES, "colors": COLOURS}


def _legend_spy(monkeypatch):
    legends = []
    real = visualize.draw_legend

    def spy(image, entries, **kw):
        legends.append([name for name, _ in entries])
        return real(image, entries, **kw)

    monkeypatch.setattr(visualize, "draw_legend", spy)
    return legends


def _check_predictions(out, named):
    for image, mask, sid in named["examples"]:
        with Image.open(os.path.join(out, f"{sid}.png")) as im:
            assert im.mode == "P"
            np.testing.assert_array_equal(np.array(im), mask)
            assert np.array(im.getpalette()[:9]).reshape(3, 3).tolist() == COLOURS
        with Image.open(os.path.join(out, "overlays", f"{sid}.png")) as ov:
            assert ov.size == (image.shape[1], image.shape[0])


def test_names_and_colours_reach_predicts_legend_and_the_export(named, monkeypatch):
    legends = _legend_spy(monkeypatch)
    out = str(named["root"] / "pred_run")
    predict.run_predict(named["run"], named["images"], out, overlay=True)
    _check_predictions(out, named)
    # class 0 ("sky") is not background, so it is painted and named too
    assert legends and all(set(names) <= set(NAMES) for names in legends) and "sky" in legends[0]

    base = str(named["root"] / "models")
    version_dir = export.run_export(named["run"], base, "street")
    meta = export.read_metadata(version_dir)
    assert meta["class_names"] == NAMES and meta["class_colors"] == COLOURS
    readme = open(os.path.join(base, "street", "README.md")).read()
    assert "| 2 | car | `#fa0000` | 250, 0, 0 |" in readme
    # The export is all predict needs: move the dataset away and predict from it.
    os.rename(named["data"], named["data"] + ".moved")
    try:
        legends.clear()
        out2 = str(named["root"] / "pred_export")
        predict.run_predict(os.path.join(base, "street"), named["images"], out2, overlay=True)
        _check_predictions(out2, named)
        assert legends and "sky" in legends[0] and all(set(names) <= set(NAMES) for names in legends)
    finally:
        os.rename(named["data"] + ".moved", named["data"])
