"""The evaluate stage: score definitions by hand, HD95 against brute force, oracle models end to end."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from helpers import block_mask as _block_mask
from helpers import oracle_model as _oracle_model
from helpers import write_dataset as _write_dataset
from helpers import write_run as _write_run
from tfseg import scoring
from tfseg.errors import TfsegError
from tfseg.evaluate import SegmentationScorer

# --------------------------------------------------------------------------------------------
# Definitions on hand-computed cases.
# --------------------------------------------------------------------------------------------

# Two 2x2 images, 3 classes. By hand (IoU = tp / (truth + pred - tp)):
#   image 1: class 0 tp=1 truth=1 pred=2 -> 1/2; class 1 tp=2 truth=3 pred=2 -> 2/3; class 2 absent.
#   image 2: class 0 tp=1 truth=2 pred=1 -> 1/2; class 1 not in truth (1 false positive);
#            class 2 tp=2 truth=2 pred=2 -> 1.
TRUTH = [np.array([[0, 1], [1, 1]]), np.array([[0, 0], [2, 2]])]
PRED = [np.array([[0, 1], [0, 1]]), np.array([[1, 0], [2, 2]])]


def _score(truths, preds, k=3, ignore_index=None, names=None):
    s = SegmentationScorer(k, names or [f"c{i}" for i in range(k)], ignore_index)
    for i, (t, p) in enumerate(zip(truths, preds)):
        s.add(t, p, f"img{i}")
    return s.result()


def test_per_image_mean_and_dataset_level_differ_as_computed_by_hand():
    r = _score(TRUTH, PRED)
    pi, ds = r["per_image_mean"]["per_class"], r["dataset_level"]["per_class"]
    # Per-image mean: class 0 (1/2 + 1/2) / 2, class 1 only image 1 has it, class 2 only image 2.
    assert pi["iou"] == pytest.approx({"c0": 0.5, "c1": 2 / 3, "c2": 1.0})
    assert r["per_image_mean"]["mean_iou"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    # Dataset level: summed cm; class 1 truth 3, pred 3 (incl. image 2's false positive), tp 2.
    assert ds["iou"] == pytest.approx({"c0": 2 / 4, "c1": 2 / 4, "c2": 1.0})
    assert r["dataset_level"]["mean_iou"] == pytest.approx(2 / 3)
    # Precision: per image 0: class 0 1/2, class 1 2/2; image 1: class 0 1/1, class 2 2/2.
    assert pi["precision"] == pytest.approx({"c0": 0.75, "c1": 1.0, "c2": 1.0})
    assert ds["precision"] == pytest.approx({"c0": 2 / 3, "c1": 2 / 3, "c2": 1.0})
    assert ds["recall"] == pytest.approx({"c0": 2 / 3, "c1": 2 / 3, "c2": 1.0})
    assert ds["dice"] == pytest.approx({"c0": 4 / 6, "c1": 4 / 6, "c2": 1.0})
    assert r["per_image_mean"]["images_with_class"] == {"c0": 2, "c1": 1, "c2": 1}
    assert r["dataset_level"]["pixel_accuracy"] == pytest.approx(6 / 8)
    assert np.array_equal(r["confusion_matrix"], [[2, 1, 0], [1, 2, 0], [0, 0, 2]])


def test_per_image_precision_counts_zero_when_class_present_but_never_predicted():
    # 3x3 with an ignore pixel (255) whose prediction must not count anywhere.
    truth = np.array([[1, 1, 0], [0, 0, 0], [0, 0, 255]])
    pred = np.array([[0, 0, 0], [0, 0, 0], [0, 0, 1]])
    r = _score([truth], [pred], k=2, ignore_index=255)
    pi, ds = r["per_image_mean"]["per_class"], r["dataset_level"]["per_class"]
    assert pi["precision"]["c1"] == 0.0  # present in truth, never predicted: counts as 0
    assert ds["precision"]["c1"] is None  # dataset level: 0/0 is undefined
    assert ds["iou"]["c0"] == pytest.approx(6 / 8)  # 8 valid pixels, ignore pixel left out
    assert r["confusion_matrix"] == [[6, 0], [2, 0]]


def test_thresholded_jaccard_by_hand():
    assert scoring.thresholded_jaccard([0.9, 0.6, 0.65, 0.0]) == pytest.approx((0.9 + 0.65) / 4)
    assert scoring.thresholded_jaccard([0.64], threshold=0.65) == 0.0


def test_binary_scores_by_hand():
    # image 1: tp 1, fp 1, fn 1 -> J 1/3 (thresholded to 0), Dice 1/2; image 2 both empty -> 1;
    # image 3: tp 3, fp 1 -> J 3/4, Dice 6/7.
    truths = [np.array([[1, 1], [0, 0]]), np.zeros((2, 2), int), np.array([[1, 1], [1, 0]])]
    preds = [np.array([[1, 0], [1, 0]]), np.zeros((2, 2), int), np.array([[1, 1], [1, 1]])]
    b = _score(truths, preds, k=2)["binary"]
    assert b["per_image_jaccard_mean"] == pytest.approx((1 / 3 + 1 + 3 / 4) / 3)
    assert b["thresholded_jaccard"] == pytest.approx((0 + 1 + 3 / 4) / 3)
    assert b["per_image_dice_mean"] == pytest.approx((1 / 2 + 1 + 6 / 7) / 3)
    # Dataset level foreground: tp 4, fp 2, fn 1.
    assert b["foreground_iou"] == pytest.approx(4 / 7)
    assert b["foreground_dice"] == pytest.approx(8 / 11)


# --------------------------------------------------------------------------------------------
# HD95.
# --------------------------------------------------------------------------------------------


def _brute_surface(m):
    """A voxel is on the surface if one of its 6 neighbours (outside the array = outside) is not."""
    p = np.pad(m, 1)
    inner = np.ones_like(m)
    for ax in range(m.ndim):
        for shift in (-1, 1):
            inner &= np.roll(p, shift, axis=ax)[tuple(slice(1, -1) for _ in range(m.ndim))]
    return m & ~inner


def _brute_hd(t, p, spacing, q):
    a = np.argwhere(_brute_surface(t)) * spacing
    b = np.argwhere(_brute_surface(p)) * spacing
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), q), np.percentile(d.min(0), q))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_matches_brute_force_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    spacing = np.array([2.0, 1.0, 0.5])
    t = rng.random((7, 9, 10)) < 0.3
    p = rng.random((7, 9, 10)) < 0.25
    t[2:5, 3:7, 2:8] = True  # a solid block, so there are interior voxels that are not surface
    for q in (95.0, 100.0, 50.0):
        assert scoring.hausdorff_distance(t, p, spacing, q) == pytest.approx(_brute_hd(t, p, spacing, q))


def test_hd_known_shifts_with_anisotropic_spacing():
    shape = (16, 16, 16)
    spacing = (2.0, 1.0, 0.5)
    # Two one-voxel-thick planes 3 slices apart along depth: every distance is 3 * 2 mm.
    a, b = np.zeros(shape, bool), np.zeros(shape, bool)
    a[4, 2:10, 2:10] = True
    b[7, 2:10, 2:10] = True
    assert scoring.hd95(a, b, spacing) == pytest.approx(6.0)
    # A cube shifted by 2 voxels: the Hausdorff distance is the shift in mm along that axis.
    for axis, expected in ((0, 4.0), (1, 2.0), (2, 1.0)):
        a, b = np.zeros(shape, bool), np.zeros(shape, bool)
        a[2:10, 2:10, 2:10] = True
        sl = [slice(2, 10)] * 3
        sl[axis] = slice(4, 12)
        b[tuple(sl)] = True
        assert scoring.hausdorff_distance(a, b, spacing, 100) == pytest.approx(expected)
        assert 0 < scoring.hd95(a, b, spacing) <= expected
    assert scoring.hd95(a, a, spacing) == 0.0


def test_hd95_empty_conventions():
    shape, spacing = (4, 5, 6), (2.0, 1.0, 3.0)
    empty, full = np.zeros(shape, bool), np.zeros(shape, bool)
    full[1, 1, 1] = True
    assert scoring.hd95(empty, empty, spacing) == 0.0
    # BraTS's number, whatever the (cropped) array's size: sqrt(240^2 + 240^2 + 155^2) at 1 mm.
    brats = np.sqrt(240.0**2 + 240.0**2 + 155.0**2)
    assert scoring.hd95(empty, full, spacing) == pytest.approx(brats, abs=0.005)
    assert scoring.hd95(full, empty, spacing) == pytest.approx(brats, abs=0.005)
    # The documented alternative: this array's diagonal in mm.
    diag = np.sqrt(8.0**2 + 5.0**2 + 18.0**2)
    assert scoring.hd95(empty, full, spacing, empty_distance=None) == pytest.approx(diag)
    assert scoring.hd95(full, empty, spacing, empty_distance=None) == pytest.approx(diag)
    assert scoring.mask_dice(empty, empty) == 1.0 and scoring.mask_dice(empty, full) == 0.0


def test_region_scores_in_scorer():
    truth = np.zeros((6, 6, 6), int)
    truth[1:4, 1:4, 1:4] = 2  # edema
    truth[2, 2, 2] = 3  # enhancing
    pred = truth.copy()
    pred[2, 2, 2] = 1  # enhancing predicted as necrosis: TC right, ET missed
    s = SegmentationScorer(4, ["bg", "ncr", "ed", "et"], None, {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]})
    s.add(truth, pred, "case", spacing=(1.0, 1.0, 1.0))
    r = s.result()["regions"]
    case = r["per_case"][0]
    assert case["WT"]["dice"] == 1.0 and case["WT"]["hd95_mm"] == 0.0
    assert case["TC"]["dice"] == 1.0 and case["ET"]["dice"] == 0.0
    # ET predicted empty, truth not: BraTS's 373.13 mm, not this 6^3 array's diagonal (10.4 mm).
    assert case["ET"]["hd95_mm"] == pytest.approx(373.13)
    assert r["mean"]["ET"]["dice"] == 0.0


# --------------------------------------------------------------------------------------------
# End to end with oracle models: records whose image encodes the mask.
# --------------------------------------------------------------------------------------------


def _valid_png(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_oracle_multiclass_scores_one_at_original_resolution(tmp_path, monkeypatch):
    from tfseg import evaluate, inference

    rng = np.random.default_rng(0)
    names = ["background", "shirt", "pants"]
    examples = []
    sizes = [(32, 16), (16, 32), (32, 32)]
    for i, (h, w) in enumerate(sizes):
        mask = _block_mask(h, w, 3, rng)
        image = (np.eye(3, dtype=np.uint8)[mask] * 255).astype(np.uint8)
        mask[0, :3] = 255  # ignore pixels: their (wrong) prediction must not count
        examples.append((image, mask, f"img{i}"))
    examples.append((np.zeros((16, 16, 3), np.uint8), None, "unlabelled"))
    data = _write_dataset(
        str(tmp_path / "data"), examples, ndim=2, channels=3, class_names=names, ignore_index=255
    )
    run = _write_run(
        str(tmp_path / "run"), _oracle_model(2, 3, 3), ndim=2, channels=3, class_names=names, size=(16, 16)
    )

    # Record the shapes the model and the scorer see: resizing must happen both ways.
    seen = []
    real_predict = inference.predict_image

    def spy(model, image, **kw):
        probs = real_predict(model, image, **kw)
        seen.append((image.shape[:2], probs.shape[:2], tuple(kw["size"])))
        return probs

    monkeypatch.setattr(inference, "predict_image", spy)
    out = str(tmp_path / "eval")
    m = evaluate.run_evaluate(run, data, "test", out, num_samples=2)
    assert [s[0] for s in seen] == sizes and [s[1] for s in seen] == sizes
    assert all(s[2] == (16, 16) for s in seen)
    assert m["num_images"] == 3 and m["unlabelled_skipped"] == 1
    assert m["dataset_level"]["mean_iou"] == pytest.approx(1.0)
    assert m["per_image_mean"]["mean_iou"] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in m["dataset_level"]["per_class"]["iou"].values())
    assert sum(map(sum, m["confusion_matrix"])) == sum(h * w - 3 for h, w in sizes)

    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["dataset_level"]["mean_iou"] == pytest.approx(1.0)
    with open(os.path.join(out, "evaluate.json")) as f:  # the settings it ran with
        assert json.load(f) == {"run_dir": run, "data_dir": data, "split": "test", "output": out, "num_samples": 2,
                                "tile": False, "tta": False, "max_examples": None, "overwrite": False,
                                "export_dir": None}
    md = open(os.path.join(out, "report.md")).read()
    for pic in ("samples.png", "confusion_matrix.png", "history.png"):
        assert f"]({pic})" in md
        w, h = _valid_png(os.path.join(out, pic))
        assert w > 100 and h > 100
    assert "per-image mean" in md and "dataset-level" in md and "shirt" in md

    # A complete output is refused without overwrite, replaced with it.
    with pytest.raises(TfsegError, match="already exists"):
        evaluate.run_evaluate(run, data, "test", out)
    m2 = evaluate.run_evaluate(run, data, "test", out, num_samples=1, max_examples=1, overwrite=True)
    assert m2["num_images"] == 1
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".eval")]


def test_binary_oracle_and_a_wrong_model_score_differently(tmp_path):
    from tfseg import evaluate

    rng = np.random.default_rng(1)
    names = ["background", "car"]
    examples = []
    for i in range(3):
        mask = _block_mask(32, 24, 2, rng)
        image = np.zeros((32, 24, 3), np.uint8)
        image[..., 1] = mask * 255
        examples.append((image, mask, f"car{i}"))
    data = _write_dataset(str(tmp_path / "data"), examples, ndim=2, channels=3, class_names=names)
    run = _write_run(str(tmp_path / "run"), _oracle_model(2, 3, 2), ndim=2, channels=3, class_names=names,
                     size=(16, 16), history=False)
    m = evaluate.run_evaluate(run, data, "test", str(tmp_path / "eval"), tile=True)
    assert m["inference"]["mode"] == "tile"
    b = m["binary"]
    assert b["foreground_dice"] == pytest.approx(1.0) and b["thresholded_jaccard"] == pytest.approx(1.0)
    assert "history" not in m["pictures"]

    # A model that predicts everything as foreground: Dice = 2 * fg / (fg + all), per image.
    import keras

    inp = keras.Input((None, None, 3))
    always = keras.Model(inp, keras.layers.Conv2D(1, 1, bias_initializer="ones", kernel_initializer="zeros")(inp))
    run2 = _write_run(str(tmp_path / "run2"), always, ndim=2, channels=3, class_names=names, size=(16, 16))
    m = evaluate.run_evaluate(run2, data, "test", str(tmp_path / "eval2"))
    fg = np.array([(e[1] == 1).sum() for e in examples], float)
    jac = fg / (32 * 24)
    assert m["binary"]["foreground_iou"] == pytest.approx(fg.sum() / (3 * 32 * 24))
    assert m["binary"]["per_image_jaccard_mean"] == pytest.approx(jac.mean())
    assert m["binary"]["thresholded_jaccard"] == pytest.approx(np.where(jac < 0.65, 0, jac).mean())


def test_3d_oracle_regions(tmp_path):
    from tfseg import evaluate

    rng = np.random.default_rng(2)
    names = ["background", "ncr", "ed", "et"]
    regions = {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}
    examples = []
    for i in range(2):
        label = np.zeros((12, 16, 16), np.uint8)
        label[3:9, 4:12, 4:12] = 2
        label[4:8, 6:10, 6:10] = rng.integers(1, 4)
        volume = np.eye(4, dtype=np.float32)[label]
        examples.append((volume, label, f"case{i}", (2.0, 1.0, 1.0)))
    data = _write_dataset(str(tmp_path / "data"), examples, ndim=3, channels=4, class_names=names, regions=regions)
    run = _write_run(str(tmp_path / "run"), _oracle_model(3, 4, 4), ndim=3, channels=4, class_names=names,
                     size=(8, 8, 8), regions=regions)
    m = evaluate.run_evaluate(run, data, "test", str(tmp_path / "eval"), num_samples=2)
    assert m["dataset_level"]["mean_iou"] == pytest.approx(1.0)
    for n in regions:
        assert m["regions"]["mean"][n]["dice"] == pytest.approx(1.0)
        assert m["regions"]["mean"][n]["hd95_mm"] == pytest.approx(0.0)
    assert [c["source_id"] for c in m["regions"]["per_case"]] == ["case0", "case1"]
    md = open(tmp_path / "eval" / "report.md").read()
    assert "HD95" in md and "case1" in md
    _valid_png(tmp_path / "eval" / "samples.png")


def test_missing_split_names_the_available_ones(tmp_path):
    from tfseg import evaluate

    names = ["bg", "fg"]
    blank = (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8), "a")
    data = _write_dataset(str(tmp_path / "data"), [blank],
                          ndim=2, channels=3, class_names=names, split="val")
    run = _write_run(
        str(tmp_path / "run"), _oracle_model(2, 3, 2), ndim=2, channels=3, class_names=names, size=(8, 8)
    )
    with pytest.raises(TfsegError, match=r"no split 'test'; available: val"):
        evaluate.run_evaluate(run, data, "test", str(tmp_path / "eval"))
    assert not os.path.exists(tmp_path / "eval")


def test_cli_evaluate(tmp_path):
    from click.testing import CliRunner

    from tfseg.cli import cli

    names = ["bg", "fg"]
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 1
    image = np.zeros((16, 16, 3), np.uint8)
    image[..., 1] = mask * 255
    data = _write_dataset(str(tmp_path / "data"), [(image, mask, "a")], ndim=2, channels=3, class_names=names)
    run = _write_run(
        str(tmp_path / "run"), _oracle_model(2, 3, 2), ndim=2, channels=3, class_names=names, size=(8, 8)
    )
    out = str(tmp_path / "eval")
    res = CliRunner().invoke(cli, ["evaluate", "--run", run, "--data", data, "--output", out, "--samples", "1"])
    assert res.exit_code == 0, res.output
    assert "mean IoU" in res.output and os.path.isfile(os.path.join(out, "metrics.json"))
    res = CliRunner().invoke(cli, ["evaluate", "--run", run, "--data", data, "--output", out])
    assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output
    args = ["evaluate", "--run", run, "--data", data, "--split", "nope", "--output", out + "2"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2 and "available: test" in res.output


def test_hd95_crop_matches_whole_volume_on_real_brats(shared_data):
    """The bounding-box crop in hd95 changes nothing on real 240x240x155 label maps."""
    import glob

    nib = pytest.importorskip("nibabel")
    pattern = os.path.join(shared_data, "brats", "BraTS-Toolkit", "data", "*", "*", "segmentation", "*.nii.gz")
    segs = sorted(glob.glob(pattern))
    if len(segs) < 2:
        pytest.skip("fewer than two BraTS segmentations in shared data")
    t = np.isin(np.asarray(nib.load(segs[0]).dataobj), [1, 4])  # tumour core, BraTS labels
    p = np.isin(np.asarray(nib.load(segs[1]).dataobj), [1, 4])
    spacing = (1.0, 1.2, 0.8)  # anisotropic on purpose
    st, sp = scoring.surface(t), scoring.surface(p)
    d1 = scoring._directed_surface_distances(st, sp, spacing)
    d2 = scoring._directed_surface_distances(sp, st, spacing)
    assert scoring.hd95(t, p, spacing) == pytest.approx(max(np.percentile(d1, 95), np.percentile(d2, 95)))


@pytest.mark.parametrize("tile", [False, True])
def test_real_unet_at_odd_image_sizes(tmp_path, tile):
    """A tfseg UNet (untrained) trained at 16x16 scores images of odd sizes at their own size."""
    from tfseg import evaluate
    from tfseg.models import build_model

    rng = np.random.default_rng(3)
    names = ["bg", "a", "b"]
    examples = [
        (rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, 3, (h, w), dtype=np.uint8), f"i{h}x{w}")
        for h, w in ((37, 29), (13, 50))
    ]
    data = _write_dataset(str(tmp_path / "data"), examples, ndim=2, channels=3, class_names=names)
    model = build_model("unet", input_shape=(None, None, 3), num_classes=3, depth=2, base_filters=4)
    run = _write_run(str(tmp_path / "run"), model, ndim=2, channels=3, class_names=names, size=(16, 16))
    m = evaluate.run_evaluate(run, data, "test", str(tmp_path / "eval"), tile=tile, num_samples=2)
    assert sum(map(sum, m["confusion_matrix"])) == 37 * 29 + 13 * 50
    assert 0.0 <= m["dataset_level"]["mean_iou"] <= 1.0
    assert m["inference"]["mode"] == ("tile" if tile else "resize")


# --------------------------------------------------------------------------------------------
# What is evaluated is what is served: evaluate --run against evaluate --model on its export.
# --------------------------------------------------------------------------------------------


def _tiny_model(ndim, channels, num_classes, seed=5):
    """A small random model whose 3x3 kernels make flips matter (TTA changes its masks), with a
    sharpened head so most pixels are far from a tie between classes."""
    import keras

    keras.utils.set_random_seed(seed)
    conv = keras.layers.Conv2D if ndim == 2 else keras.layers.Conv3D
    inp = keras.Input((None,) * ndim + (channels,))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inp) if ndim == 2 else inp
    x = conv(8, 3, padding="same", activation="relu")(x)
    out = conv(num_classes, 1, activation="softmax", name="head")(x)
    model = keras.Model(inp, out)
    head = model.get_layer("head")
    head.set_weights([w * 20 for w in head.get_weights()])
    return model


def _set_flips(run_dir, augment):
    path = os.path.join(run_dir, "run.json")
    with open(path) as f:
        run = json.load(f)
    run["config"] = {"augment": augment}
    with open(path, "w") as f:
        json.dump(run, f)


def _agreement(tmp_path, *, ndim, tile=False, tta=False):
    from tfseg import evaluate, export

    rng = np.random.default_rng(11)
    names = ["bg", "a", "b"]
    if ndim == 2:
        examples = []
        for i, (h, w) in enumerate(((64, 48), (40, 70), (64, 48))):
            mask = _block_mask(h, w, 3, rng)
            image = np.clip(mask[..., None] * 80.0 + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            examples.append((image, mask, f"i{i}"))
        size, augment = (16, 16), {"hflip": 0.5}
    else:
        examples = []
        for i, shape in enumerate(((12, 10, 9), (8, 16, 11))):
            mask = rng.integers(0, 3, shape, dtype=np.uint8)
            vol = (mask[..., None] + rng.normal(0, 0.5, shape + (2,))).astype(np.float32)
            examples.append((vol, mask, f"v{i}", (1.0, 1.0, 1.0)))
        size, augment = (8, 8, 8), {"flip3d": True}
    channels = 3 if ndim == 2 else 2
    data = _write_dataset(str(tmp_path / "data"), examples, ndim=ndim, channels=channels, class_names=names)
    run = _write_run(str(tmp_path / "run"), _tiny_model(ndim, channels, 3), ndim=ndim, channels=channels,
                     class_names=names, size=size)
    _set_flips(run, augment)
    version = export.run_export(run, str(tmp_path / "exports"), "m", tile=tile, tta=tta)
    meta = export.read_metadata(version)
    m_run = evaluate.run_evaluate(run, data, "test", str(tmp_path / "eval_run"), tile=tile, tta=tta, num_samples=1)
    m_model = evaluate.run_evaluate(None, data, "test", str(tmp_path / "eval_model"), num_samples=1,
                                    export_dir=str(tmp_path / "exports" / "m"))
    return m_run, m_model, meta


@pytest.mark.parametrize("ndim, tile, tta", [
    pytest.param(2, False, False, marks=pytest.mark.slow), pytest.param(2, True, False, marks=pytest.mark.slow),
    pytest.param(2, False, True, marks=pytest.mark.slow), pytest.param(2, True, True, marks=pytest.mark.slow),
    (3, False, True)])
def test_evaluate_run_and_model_agree(tmp_path, ndim, tile, tta):
    m_run, m_model, meta = _agreement(tmp_path, ndim=ndim, tile=tile, tta=tta)
    mode = "sliding_window" if ndim == 3 else ("tile" if tile else "resize")
    flips = ([1] if ndim == 2 else [0, 1, 2]) if tta else []
    assert meta["inference"]["mode"] == mode and meta["inference"]["tta_flip_axes"] == flips
    assert meta["precision"] == "float32"
    assert m_model["inference"]["mode"] == m_run["inference"]["mode"] == mode
    assert m_model["inference"]["tta_flip_axes"] == m_run["inference"]["tta_flip_axes"] == flips
    assert m_model["export_dir"].endswith(os.path.join("m", "1"))
    cm_run, cm_model = np.array(m_run["confusion_matrix"]), np.array(m_model["confusion_matrix"])
    assert cm_run.sum() == cm_model.sum()
    # The same masks up to float ties: at most 0.1% of the pixels differ.
    assert np.abs(cm_run - cm_model).sum() / 2 <= 1e-3 * cm_run.sum()
    assert abs(m_run["dataset_level"]["mean_iou"] - m_model["dataset_level"]["mean_iou"]) <= 1e-3
    assert abs(m_run["per_image_mean"]["mean_iou"] - m_model["per_image_mean"]["mean_iou"]) <= 1e-3
    # The scores are informative: the model is neither perfect nor useless.
    assert 0.05 < m_model["dataset_level"]["mean_iou"] < 0.999


@pytest.mark.slow
def test_served_tta_and_tile_change_the_masks(tmp_path):
    """The options reach the graph: a TTA or tiled export predicts differently from a plain one."""
    from tfseg import evaluate, export

    _, plain, _ = _agreement(tmp_path, ndim=2)
    cms = {"plain": np.array(plain["confusion_matrix"])}
    for name, kw in (("tta", {"tta": True}), ("tile", {"tile": True})):
        export.run_export(str(tmp_path / "run"), str(tmp_path / "exports"), name, **kw)
        m = evaluate.run_evaluate(None, str(tmp_path / "data"), "test", str(tmp_path / f"eval_{name}"),
                                  num_samples=0, export_dir=str(tmp_path / "exports" / name))
        cms[name] = np.array(m["confusion_matrix"])
    assert np.abs(cms["tta"] - cms["plain"]).sum() > 0
    assert np.abs(cms["tile"] - cms["plain"]).sum() > 0


def test_evaluate_model_refuses_tile_tta_and_both_sources(tmp_path):
    from tfseg import evaluate

    with pytest.raises(TfsegError, match="--tile/--tta"):
        evaluate.run_evaluate(None, str(tmp_path), "test", str(tmp_path / "e"), tta=True, export_dir=str(tmp_path))
    with pytest.raises(TfsegError, match="one of --run"):
        evaluate.run_evaluate(str(tmp_path), str(tmp_path), "test", str(tmp_path / "e"), export_dir=str(tmp_path))
    with pytest.raises(TfsegError, match="saved_model.pb"):
        evaluate.run_evaluate(None, str(tmp_path), "test", str(tmp_path / "e"), export_dir=str(tmp_path))
