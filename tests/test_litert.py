"""LiteRT export (tfseg.export.litert) and its predictor (tfseg.predict.litert).

Fast tier: every 2D architecture converts at an odd size (the padding wrapper) with random
weights and moving statistics (the fused batch norm), and the float32 file computes the Keras
model's probabilities within 1e-4; 3D models and SavedModel-only options are refused in one
line; the resize outside the model is evaluation's; int8 masks of a tiny trained model agree
with float32 on at least 98% of the pixels. Slow tier: the CLI round trip export -> evaluate ->
predict in subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import helpers
from tfseg import preprocess, rundir
from tfseg.errors import TfsegError
from tfseg.export import litert

SIZE = (40, 36)  # not a multiple of any model's divisor: the padding wrapper pads and crops
# (name, model kwargs) small enough to convert in a few seconds each.
MODELS = [
    ("unet", {"depth": 2, "base_filters": 4, "batch_norm": True}),  # FusedBatchNorm
    ("improved_unet", {"depth": 3, "base_filters": 4}),
    ("mobilenetv2_unet", {"alpha": 0.35, "decoder_filters": (8, 8, 8, 8)}),
    ("dense_unet", {"depth": 2, "base_filters": 4}),
]
INT8_AGREEMENT = 0.98  # int8 mask == float32 mask on at least this fraction of the pixels


def _run_info(num_classes: int, size=SIZE, ndim: int = 2, **kw) -> rundir.RunInfo:
    return rundir.RunInfo(ndim=ndim, channels=3, num_classes=num_classes,
                          head="sigmoid" if num_classes == 2 else "softmax",
                          class_names=tuple(f"c{i}" for i in range(num_classes)), size=tuple(size), **kw)


def _runner(data: bytes):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=data, num_threads=1).get_signature_runner(litert.SIGNATURE)


@pytest.mark.parametrize("name,kwargs", MODELS, ids=[m[0] for m in MODELS])
def test_float32_file_computes_the_keras_model(name, kwargs):
    from tfseg.models import build_model, norm

    model = build_model(name, input_shape=SIZE + (3,), num_classes=4, **kwargs)
    if name == "unet":
        assert norm.batch_norm_layers(model) and all(isinstance(b, norm.FusedBatchNorm)
                                                     for b in norm.batch_norm_layers(model))
    helpers.randomize_weights(model)
    data, info = litert.convert(model, _run_info(4), "none")
    x = np.random.default_rng(1).integers(0, 256, (1,) + SIZE + (3,)).astype(np.uint8)
    out = _runner(data)(image=x)
    want = model(x.astype(np.float32), training=False).numpy()
    assert out["probabilities"].shape == want.shape and out["probabilities"].dtype == np.float32
    np.testing.assert_allclose(out["probabilities"], want, atol=1e-4)
    assert out["mask"].dtype == np.uint8
    top2 = np.sort(want, axis=-1)[..., -2:]
    # Pixels whose arg-max a 1e-4 difference cannot flip (random weights leave close calls).
    clear = (top2[..., 1] - top2[..., 0]) > 3e-4
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(out["mask"][clear], want.argmax(-1)[clear])
    # The op reader sees a float model's convolutions as float ops (int8 exports list these).
    assert info["float_ops"].get("CONV_2D", 0) >= 1 and info["float_ops"].get("CONV_2D") == info["op_counts"]["CONV_2D"]
    assert not info["input_quantization"][0]  # uint8 pixels cast inside: no input quantization


def test_binary_mask_thresholds_the_foreground_probability():
    from tfseg.models import build_model

    model = build_model("unet", input_shape=SIZE + (3,), num_classes=2, depth=2, base_filters=4)
    helpers.randomize_weights(model, 3)
    out = _runner(litert.convert(model, _run_info(2), "none")[0])(
        image=np.random.default_rng(2).integers(0, 256, (1,) + SIZE + (3,)).astype(np.uint8))
    assert out["probabilities"].shape == (1,) + SIZE + (1,)
    p = out["probabilities"][..., 0]
    far = np.abs(p - 0.5) > 1e-4
    np.testing.assert_array_equal(out["mask"][far], (p > 0.5)[far].astype(np.uint8))


def test_3d_and_savedmodel_options_are_refused_in_one_line():
    cases = [
        (dict(run=_run_info(3, size=(16, 16, 16), ndim=3), quantize="none"), "3D models are not exported"),
        (dict(run=_run_info(3), quantize="int4"), "--quantize 'int4'"),
        (dict(run=_run_info(3), quantize="none", tta=True), "--tile/--tta"),
        (dict(run=_run_info(3), quantize="none", precision="mixed_bfloat16"), "--precision mixed_bfloat16"),
    ]
    for kwargs, expected in cases:
        with pytest.raises(TfsegError) as e:
            litert.check_exportable(**kwargs)
        assert expected in str(e.value) and "\n" not in str(e.value)


def test_model_input_is_the_recorded_preprocessing():
    """Independent of tfseg.preprocess: convert's antialiased resize rounded to uint8, then the
    plain bilinear resize to the model size, rounded to uint8 (the model's input type)."""
    import tensorflow as tf

    image = np.random.default_rng(4).integers(0, 256, (53, 47, 3)).astype(np.uint8)
    record = {"resize": {"method": "bilinear", "antialias": True, "dtype": "uint8", "format": "png",
                         "size": [30, 26]}}
    stored = np.clip(np.round(tf.image.resize(image.astype(np.float32), (30, 26), antialias=True).numpy()), 0, 255)
    want = np.clip(np.round(tf.image.resize(stored, SIZE).numpy()), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(preprocess.uint8_model_input(image, SIZE, record), want)
    # At the model's size already (records converted at the training size): the pixels as they are.
    same = image[:40, :36]
    np.testing.assert_array_equal(preprocess.uint8_model_input(same, SIZE, None), same)


@pytest.fixture(scope="module")
def trained(trained_squares, tmp_path_factory):
    """The session's tiny U-Net trained on squares (conftest), exported float32 and int8."""
    from tfseg.export import run_export

    data, run = trained_squares["data"], trained_squares["run"]
    exports = str(tmp_path_factory.mktemp("litert") / "exports")
    f32 = run_export(run, exports, "sq", format="litert")
    i8 = run_export(run, exports, "sq", format="litert", quantize="int8", calibration_records=32)
    return {"data": data, "run": run, "exports": exports, "float32": f32, "int8": i8}


def test_export_layout_facts_and_versions(trained):
    from tfseg.export import METADATA, list_versions, read_metadata, run_export

    assert [os.path.basename(trained["float32"]), os.path.basename(trained["int8"])] == ["1", "2"]
    assert list_versions(os.path.join(trained["exports"], "sq")) == [1, 2]
    meta = read_metadata(trained["int8"])
    run = rundir.load_run_config(trained["run"])
    for key in ("ndim", "channels", "num_classes", "class_names", "image_size", "preprocessing", "head"):
        assert meta[key] == run[key], key
    assert meta["format"] == "litert" and meta["precision"] == "int8"
    lit = meta["litert"]
    assert lit["calibration"]["records"] == 32 and lit["input_quantization"] == [1.0, 0]
    assert lit["full_integer"] is True and lit["float_ops"] == {}
    assert os.path.getsize(os.path.join(trained["int8"], "model.tflite")) == lit["bytes"]
    assert os.path.isfile(os.path.join(trained["int8"], METADATA))
    readme = open(os.path.join(trained["exports"], "sq", "README.md")).read()
    assert "```kotlin" in readme and "```python" in readme and "uint8 (1, 32, 32, 3)" in readme
    assert "exif_transpose" in readme
    version = int(os.path.basename(trained["int8"]))
    assert helpers.run_readme_python(readme, trained["exports"], version, (30, 50)) == (30, 50)
    # A SavedModel under the same NAME is refused (TF Serving would serve a .tflite version).
    with pytest.raises(TfsegError, match="holds LiteRT versions"):
        run_export(trained["run"], trained["exports"], "sq")
    with pytest.raises(TfsegError, match="for --format litert only"):
        run_export(trained["run"], trained["exports"], "sm", quantize="int8")


def test_predictor_resizes_like_evaluation(trained):
    """The LiteRT predictor's resize to and from the model size is evaluation's: with the same
    (uint8) model input, its probabilities at the image's size are the Keras model's through
    tfseg.inference (what `evaluate --run` computes) within 1e-4."""
    import tensorflow as tf

    from tfseg import inference
    from tfseg.export import with_precision
    from tfseg.predict import make_predictor
    from tfseg.predict.litert import LiteRtPredictor

    predictor = make_predictor(trained["float32"])
    assert isinstance(predictor, LiteRtPredictor)
    model = with_precision(rundir.load_model(trained["run"]), "float32")  # as exported
    image = np.random.default_rng(5).integers(0, 256, (45, 27, 3)).astype(np.uint8)
    x = preprocess.uint8_model_input(image, (32, 32), None)
    probs = model(x[None].astype(np.float32), training=False).numpy()[0]
    want = tf.image.resize(probs, (45, 27), method="bilinear").numpy()
    np.testing.assert_allclose(predictor.probabilities(image), want, atol=1e-4)
    # And evaluation's own call on the same pixels (at the model's size nothing is rounded).
    np.testing.assert_allclose(predictor.probabilities(x), inference.predict_image(model, x, size=(32, 32)),
                               atol=1e-4)
    mask = predictor.predict_images([helpers.png(image)])[0]
    assert mask.shape == (45, 27) and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, (want[..., 0] > 0.5).astype(np.uint8))


def test_int8_masks_agree_with_float32(trained):
    from tfseg.predict.litert import LiteRtPredictor

    f32, i8 = LiteRtPredictor(trained["float32"]), LiteRtPredictor(trained["int8"])
    images, masks = helpers.read_split_numpy(trained["data"], "val")
    a = np.stack([f32.mask(im.astype(np.uint8)) for im in images])
    b = np.stack([i8.mask(im.astype(np.uint8)) for im in images])
    agreement = float((a == b).mean())
    assert agreement >= INT8_AGREEMENT, agreement
    # The model learned the squares: agreement is not on an all-background mask (measured 1.0).
    fg_iou = float(((a == 1) & (masks == 1)).sum() / ((a == 1) | (masks == 1)).sum())
    assert fg_iou > 0.8, fg_iou


def _tfseg(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "tfseg.cli", *args], capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_cli_round_trip_export_evaluate_predict(trained, tmp_path):
    from PIL import Image

    from tfseg.predict.litert import LiteRtPredictor

    exports = str(tmp_path / "exports")
    proc = _tfseg("export", "--run", trained["run"], "--output", exports, "--name", "sq", "--format", "litert",
                  "--quantize", "int8", "--calibration-records", "16")
    assert "fully_quantize" not in proc.stderr  # the quantizer's C++ settings line stays hidden
    version = os.path.join(exports, "sq", "1")
    _tfseg("evaluate", "--model", os.path.join(exports, "sq"), "--data", trained["data"], "--split", "val",
           "--output", str(tmp_path / "eval_lite"))
    _tfseg("evaluate", "--run", trained["run"], "--data", trained["data"], "--split", "val",
           "--output", str(tmp_path / "eval_run"))
    lite = json.load(open(tmp_path / "eval_lite" / "metrics.json"))
    keras_ = json.load(open(tmp_path / "eval_run" / "metrics.json"))
    assert lite["inference"]["precision"] == "int8" and lite["export_dir"].endswith("sq/1")
    assert os.path.isfile(tmp_path / "eval_lite" / "report.md") and os.path.isfile(tmp_path / "eval_lite" / "samples.png")
    assert abs(lite["dataset_level"]["mean_iou"] - keras_["dataset_level"]["mean_iou"]) < 0.02
    # predict on a folder of images of other sizes: the masks are the predictor's.
    images, _ = helpers.read_split_numpy(trained["data"], "val")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, im in enumerate(images[:3]):
        Image.fromarray(im.astype(np.uint8)).resize((40 + i, 29)).save(inputs / f"im{i}.png")
    proc = _tfseg("predict", "--model", version, "--input", str(inputs), "--output", str(tmp_path / "masks"))
    assert "XNNPACK" not in proc.stderr  # LiteRT's C++ delegate notice stays hidden
    predictor = LiteRtPredictor(version)
    for i in range(3):
        got = np.asarray(Image.open(tmp_path / "masks" / f"im{i}.png"))
        want = predictor.mask(np.asarray(Image.open(inputs / f"im{i}.png")))
        assert got.shape == (29, 40 + i)
        np.testing.assert_array_equal(got, want)
