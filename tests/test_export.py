"""tfseg export: TF Serving layout, signatures, fresh-process reload equal to the Keras model, bad inputs."""

import io
import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")
from helpers import make_run, venv_tool  # noqa: E402
from PIL import Image  # noqa: E402

from tfseg import export, inference, schema  # noqa: E402
from tfseg.errors import TfsegError  # noqa: E402


def encode(array, fmt):
    buf = io.BytesIO()
    Image.fromarray(array.squeeze() if array.shape[-1] == 1 else array).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run, model = make_run(root / "run")
    base = str(root / "models")
    version_dir = export.run_export(run, base, "tiny")
    return {"run": run, "model": model, "base": base, "version_dir": version_dir, "root": root}


def reference(model, image, binary=False):
    """What tfseg.inference (resize mode) predicts for one decoded image."""
    probs = inference.predict_image(model, image, size=(16, 16), mode="resize")
    small = np.asarray(model(tf.image.resize(image.astype(np.float32), (16, 16))[None]))[0]
    return inference.probs_to_mask(probs, binary), small


def test_layout_versions_config_readme(exported, tmp_path):
    base = exported["base"]
    assert exported["version_dir"] == os.path.join(base, "tiny", "1")
    assert os.path.isfile(os.path.join(exported["version_dir"], "saved_model.pb"))
    meta = export.read_metadata(exported["version_dir"])
    assert meta["image_size"] == [16, 16] and meta["version"] == 1
    with open(os.path.join(exported["version_dir"], "assets.extra", "export.json")) as f:  # the settings
        settings = json.load(f)
    assert settings["run_dir"] == exported["run"] and settings["name"] == "tiny" and settings["version"] is None
    assert settings["precision"] == "float32" and settings["format"] == "savedmodel"
    readme = open(os.path.join(base, "tiny", "README.md")).read()
    assert f"-v {os.path.abspath(base)}/tiny:/models/tiny -e MODEL_NAME=tiny tensorflow/serving" in readme
    assert "localhost:8501/v1/models/tiny:predict" in readme and "PredictRequest" in readme
    # A second model and a second version of the first: auto-increment, config keeps both names.
    other = str(tmp_path / "base")
    v1 = export.run_export(exported["run"], other, "a")
    v2 = export.run_export(exported["run"], other, "a")
    export.run_export(exported["run"], other, "b", version=7)
    assert (os.path.basename(v1), os.path.basename(v2)) == ("1", "2")
    assert export.list_versions(os.path.join(other, "a")) == [1, 2]
    config = open(os.path.join(other, "models.config")).read()
    assert config.count("config {") == 2
    assert "name: 'a'" in config and "base_path: '/models/b'" in config
    assert not [e for e in os.listdir(os.path.join(other, "a")) if e.startswith(".")]  # no temp dirs left
    with pytest.raises(TfsegError, match="already exists"):
        export.run_export(exported["run"], other, "b", version=7)
    with pytest.raises(TfsegError, match="--name"):
        export.run_export(exported["run"], other, "bad/name")
    with pytest.raises(TfsegError, match="run.json"):
        export.run_export(str(tmp_path), other, "c")


def test_saved_model_cli_lists_signatures(exported):
    out = subprocess.run(
        [venv_tool("saved_model_cli"), "show", "--all", "--dir", exported["version_dir"]],
        capture_output=True, text=True, check=True,
    ).stdout
    for sig in ("serving_default", "predict_masks_png", "predict_images", "predict_examples"):
        assert f"signature_def['{sig}']" in out
    for name in ("image_bytes", "mask_png_bytes", "probabilities", "height", "width"):
        assert f"['{name}']" in out


FRESH = textwrap.dedent(
    """
    import pickle, sys
    import tensorflow as tf
    loaded = tf.saved_model.load(sys.argv[1])
    with open(sys.argv[2], "rb") as f:
        calls = pickle.load(f)
    results = []
    for sig, arg in calls:
        fn = loaded.signatures[sig]
        name = list(fn.structured_input_signature[1])[0]
        out = fn(**{name: tf.constant(arg)})
        results.append({k: v.numpy() for k, v in out.items()})
    with open(sys.argv[3], "wb") as f:
        pickle.dump(results, f)
    """
)


def run_fresh(version_dir, calls, tmp_path):
    """Runs signatures in a fresh Python process that only has TensorFlow and the SavedModel."""
    script, inp, outp = tmp_path / "fresh.py", tmp_path / "in.pkl", tmp_path / "out.pkl"
    script.write_text(FRESH)
    with open(inp, "wb") as f:
        pickle.dump(calls, f)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH="")
    subprocess.run([sys.executable, str(script), version_dir, str(inp), str(outp)], check=True, env=env,
                   cwd=str(tmp_path))
    with open(outp, "rb") as f:
        return pickle.load(f)


def test_each_weight_is_stored_once(exported):
    """The SavedModel's variables hold the model's weights once (Keras's ExportArchive stored a
    tracked model's variables a second time, under ``variables/`` beside ``_all_variables/``);
    the fresh-process test below serves from the same files."""
    version = exported["version_dir"]
    reader = tf.train.load_checkpoint(os.path.join(version, "variables", "variables"))
    stored = [k for k in reader.get_variable_to_shape_map() if k != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    weights = exported["model"].weights
    assert len(stored) == len(weights)
    values = sorted(float(np.sum(reader.get_tensor(k))) for k in stored)
    np.testing.assert_allclose(values, sorted(float(np.sum(w.numpy())) for w in weights), rtol=1e-6)
    folder = sum(os.path.getsize(os.path.join(version, "variables", f)) for f in os.listdir(os.path.join(version, "variables")))
    assert folder < 1.25 * sum(w.numpy().nbytes for w in weights) + 4096


@pytest.mark.slow  # fast tier at about 3 minutes (issue 31): runs in CI's slow tier
def test_fresh_process_outputs_equal_keras(exported, tmp_path):
    model = exported["model"]
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
        rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
        rng.integers(0, 256, (9, 40, 1), dtype=np.uint8),  # grayscale in, RGB model
        rng.integers(0, 256, (33, 17, 3), dtype=np.uint8),
    ]
    encoded = [encode(images[0], "PNG"), encode(images[1], "BMP"), encode(images[2], "PNG"), encode(images[3], "JPEG")]
    # The reference decodes with the same decoder as the graph (JPEG decoders differ in rounding).
    decoded = [tf.io.decode_image(b, channels=3, expand_animations=False).numpy() for b in encoded]
    assert (decoded[0] == images[0]).all() and (decoded[2] == np.repeat(images[2], 3, -1)).all()
    same_size = rng.integers(0, 256, (3, 12, 21, 3), dtype=np.uint8)
    records = [schema.encode_example_2d(image_bytes=b, image_format="png", height=i.shape[0], width=i.shape[1],
                                        channels=3, mask_png=None, source_id=f"id{k}")
               for k, (b, i) in enumerate(zip(encoded[:2], images[:2]))]
    calls = [
        ("serving_default", np.array(encoded[:1], dtype=object)),  # batch of 1
        ("serving_default", np.array(encoded, dtype=object)),  # batch of 4, four sizes
        ("predict_images", same_size),
        ("predict_examples", np.array(records, dtype=object)),
        ("predict_masks_png", np.array(encoded, dtype=object)),
    ]
    one, four, imgs, exs, pngs = run_fresh(exported["version_dir"], calls, tmp_path)
    assert sorted(pngs) == ["height", "mask_png_bytes", "width"]
    assert list(pngs["mask_png_bytes"]) == list(four["mask_png_bytes"])

    for out, batch in ((one, decoded[:1]), (four, decoded), (imgs, list(same_size)), (exs, decoded[:2])):
        assert out["mask"].dtype == np.uint8 and out["mask"].shape[0] == len(batch)
        for k, image in enumerate(batch):
            h, w = image.shape[:2]
            assert (out["height"][k], out["width"][k]) == (h, w)
            mask, small = reference(model, image)
            np.testing.assert_allclose(out["probabilities"][k], small, atol=1e-5)
            np.testing.assert_array_equal(out["mask"][k, :h, :w], mask)
            assert (out["mask"][k, h:, :] == 0).all() and (out["mask"][k, :, w:] == 0).all()
            png = np.array(Image.open(io.BytesIO(out["mask_png_bytes"][k])))
            np.testing.assert_array_equal(png, out["mask"][k, :h, :w])
    np.testing.assert_array_equal(exs["source_id"], [b"id0", b"id1"])
    np.testing.assert_allclose(one["probabilities"][0], four["probabilities"][0], atol=1e-5)


def test_bad_inputs_raise_invalid_argument(exported, tmp_path):
    run = exported["run"]
    small_limit = export.run_export(run, str(tmp_path), "limited", max_pixels=600)
    fn = tf.saved_model.load(small_limit).signatures["serving_default"]
    ok = encode(np.zeros((20, 30, 3), np.uint8), "PNG")  # 600 pixels: exactly at the limit
    assert fn(image_bytes=tf.constant([ok]))["mask"].shape == (1, 20, 30)
    big_png = encode(np.zeros((21, 30, 3), np.uint8), "PNG")
    big_jpeg = encode(np.zeros((30, 30, 3), np.uint8), "JPEG")
    big_gif = encode(np.zeros((30, 30, 3), np.uint8), "GIF")
    for bad, message in [
        (b"", "empty image string"),
        (b"this is not an image at all", "not a JPEG, PNG, GIF or BMP"),
        (big_png, "limit of 600 pixels"),
        (big_jpeg, "limit of 600 pixels"),
        (big_gif, "limit of 600 pixels"),
        (ok[:40], None),  # truncated PNG: the decoder's own error
    ]:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            fn(image_bytes=tf.constant([ok, bad]))
    images_fn = tf.saved_model.load(small_limit).signatures["predict_images"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="limit"):
        images_fn(images=tf.zeros((1, 40, 40, 3), tf.uint8))


def test_served_photos_are_read_as_displayed(exported):
    """A client sending a phone photo's bytes as they are (EXIF orientation 6, turned by viewers)
    gets the mask of the displayed photo: the same as sending the displayed pixels."""
    fn = tf.saved_model.load(exported["version_dir"]).signatures["serving_default"]
    rng = np.random.default_rng(3)
    shown = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    sensor = np.rot90(shown, 1)  # what the phone stored; orientation 6 turns it back clockwise
    img = Image.fromarray(np.ascontiguousarray(sensor))
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "PNG", exif=exif)
    out = fn(image_bytes=tf.constant([buf.getvalue(), encode(shown, "PNG")]))
    assert out["mask"].shape == (2, 20, 30)
    np.testing.assert_array_equal(out["mask"][0].numpy(), out["mask"][1].numpy())
    np.testing.assert_array_equal(out["probabilities"][0].numpy(), out["probabilities"][1].numpy())


def test_binary_grayscale_model_gif_bmp(tmp_path):
    run, model = make_run(tmp_path / "run", num_classes=2, channels=1)
    fn = tf.saved_model.load(export.run_export(run, str(tmp_path / "m"), "bin")).signatures["serving_default"]
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (13, 19, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (13, 19, 1), dtype=np.uint8)
    batch = [encode(rgb, "BMP"), encode(gray, "PNG"), encode(rgb, "GIF")]
    out = fn(image_bytes=tf.constant(batch))
    assert out["probabilities"].shape == (3, 16, 16, 1)
    gray_of_rgb = tf.image.rgb_to_grayscale(rgb).numpy()
    gif_rgb = tf.io.decode_image(batch[2], channels=3, expand_animations=False)
    for k, image in enumerate([gray_of_rgb, gray, tf.image.rgb_to_grayscale(gif_rgb).numpy()]):
        mask, small = reference(model, image, binary=True)
        np.testing.assert_allclose(out["probabilities"][k].numpy(), small, atol=1e-5)
        np.testing.assert_array_equal(out["mask"][k].numpy(), mask)
        assert set(np.unique(out["mask"][k].numpy())) <= {0, 1}


@pytest.mark.slow  # fast tier at about 3 minutes (issue 31): runs in CI's slow tier
def test_volume_signature_tiles_like_predict_volume(tmp_path):
    run, model = make_run(tmp_path / "run", ndim=3, num_classes=4, channels=2, size=(8, 8, 8))
    version_dir = export.run_export(run, str(tmp_path / "m"), "vol")
    out = subprocess.run([venv_tool("saved_model_cli"), "show", "--all", "--dir", version_dir],
                         capture_output=True, text=True, check=True).stdout
    assert "['volume']" in out and "signature_def['predict_examples']" in out
    loaded = tf.saved_model.load(version_dir)
    rng = np.random.default_rng(2)
    for shape in [(11, 12, 13), (5, 9, 8)]:  # odd sizes and an axis smaller than the patch
        volume = rng.normal(size=shape + (2,)).astype(np.float16).astype(np.float32)
        expected = inference.predict_volume(model, volume, patch_size=(8, 8, 8), overlap=0.5)
        got = loaded.signatures["serving_default"](volume=tf.constant(volume))
        np.testing.assert_allclose(got["probabilities"].numpy(), expected, atol=1e-5)
        np.testing.assert_array_equal(got["mask"].numpy(), inference.probs_to_mask(expected, False))
    record = schema.encode_example_3d(volume=volume, label=None, spacing=(1, 1, 1), source_id="case1")
    ex = loaded.signatures["predict_examples"](example=tf.constant(record))
    np.testing.assert_allclose(ex["probabilities"].numpy(), expected, atol=1e-5)
    assert ex["source_id"].numpy() == b"case1"


def _has_bfloat16(version_dir):
    """Whether any op or variable of the SavedModel (graph and function library) is bfloat16."""
    from tensorflow.core.framework import types_pb2
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    with open(os.path.join(version_dir, "saved_model.pb"), "rb") as f:
        sm.ParseFromString(f.read())
    graph = sm.meta_graphs[0].graph_def
    nodes = list(graph.node) + [n for fn in graph.library.function for n in fn.node_def]
    bf16 = types_pb2.DT_BFLOAT16
    ops = any(v.type == bf16 or bf16 in v.list.type for n in nodes for v in n.attr.values())
    variables = any(node.variable.dtype == bf16 for node in sm.meta_graphs[0].object_graph_def.nodes)
    return ops or variables


@pytest.mark.slow  # fast tier at about 3 minutes (issue 31): runs in CI's slow tier
def test_bf16_run_exports_float32_by_default(tmp_path):
    """A run trained under mixed_bfloat16 serves in float32 unless --precision keeps bfloat16."""
    old = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        run, bf16_model = make_run(tmp_path / "run", num_classes=3)
    finally:
        keras.mixed_precision.set_global_policy(old)
    assert export.model_precision(bf16_model) == "mixed_bfloat16"
    base = str(tmp_path / "models")
    f32 = export.run_export(run, base, "m")
    kept = export.run_export(run, base, "m", precision="mixed_bfloat16")
    assert export.read_metadata(f32)["precision"] == "float32"
    assert export.read_metadata(f32)["trained_precision"] == "mixed_bfloat16"
    assert export.read_metadata(kept)["precision"] == "mixed_bfloat16"
    assert not _has_bfloat16(f32) and _has_bfloat16(kept)
    readme = open(os.path.join(base, "m", "README.md")).read()
    assert "Computes in **mixed_bfloat16** (trained in mixed_bfloat16)" in readme

    # float32 compute equals the same weights under a float32 policy, and is close to bf16.
    f32_model = export.with_precision(bf16_model, "float32")
    assert {layer.dtype_policy.name for layer in f32_model.layers} == {"float32"}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    served = tf.saved_model.load(f32).signatures["predict_images"](images=tf.constant(images))["probabilities"].numpy()
    x = images.astype(np.float32)
    np.testing.assert_allclose(served, np.asarray(f32_model(x)), atol=1e-5)
    np.testing.assert_allclose(served, np.asarray(bf16_model(x), np.float32), atol=0.05)
    assert np.abs(served - np.asarray(bf16_model(x), np.float32)).max() > 0  # bf16 really differs
    with pytest.raises(TfsegError, match="export config: precision = .float16. is not one of"):
        export.run_export(run, base, "m", precision="float16")
