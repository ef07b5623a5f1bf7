"""One harness for every registered model: build, call, fit, .keras round trip, mixed precision."""

import os

import keras
import numpy as np
import pytest

from tfseg.models import MODELS, build_model, min_divisor
from tfseg.models.norm import FusedBatchNorm, batch_norm_layers

TINY = {
    "unet": dict(depth=2, base_filters=4),
    "improved_unet": dict(depth=3, base_filters=4),
    "dense_unet": dict(depth=2, base_filters=4, growth_rate=4, layers_per_block=2),
    "mobilenetv2_unet": dict(alpha=0.35, decoder_filters=(8, 8, 4, 4)),
}

# (model, input_shape, num_classes): both heads (sigmoid, softmax), 2D and 3D where supported.
CASES = [
    ("unet", (32, 32, 3), 2),
    ("unet", (16, 16, 16, 2), 4),
    ("improved_unet", (32, 32, 3), 3),
    ("improved_unet", (16, 16, 16, 1), 2),
    ("dense_unet", (32, 32, 1), 2),
    ("dense_unet", (16, 16, 16, 2), 3),
    ("mobilenetv2_unet", (32, 32, 3), 5),
]


def test_cases_cover_the_registry():
    assert {c[0] for c in CASES} == set(MODELS)
    for name, spec in MODELS.items():
        assert {len(c[1]) - 1 for c in CASES if c[0] == name} == set(spec.ndims)


def _data(input_shape, num_classes, n=2, seed=0):
    rng = np.random.default_rng(seed)
    scale = 255.0 if len(input_shape) == 3 else 1.0  # 2D: 0..255 RGB; 3D: z-scored
    x = (rng.random((n, *input_shape)) * scale).astype("float32")
    y = rng.integers(0, num_classes, (n, *input_shape[:-1], 1)).astype("int32")
    return x, y


@pytest.mark.parametrize("name,input_shape,num_classes", CASES, ids=lambda v: str(v))
def test_build_call_fit_save_load(name, input_shape, num_classes, tmp_path):
    from tfseg.losses import get_loss
    from tfseg.metrics import default_metrics

    keras.utils.set_random_seed(0)
    model = build_model(name, input_shape=input_shape, num_classes=num_classes, **TINY[name])
    x, y = _data(input_shape, num_classes)

    probs = np.asarray(model(x, training=False))
    channels = 1 if num_classes == 2 else num_classes
    assert probs.shape == (2, *input_shape[:-1], channels)
    assert probs.dtype == np.float32
    assert (probs >= 0).all() and (probs <= 1).all()
    if channels > 1:
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)

    loss = "bce_dice" if num_classes == 2 else "ce_dice"
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=get_loss(loss, num_classes=num_classes),
        metrics=default_metrics(num_classes),
        run_eagerly=True,  # tracing costs more than two tiny steps; graph mode: test_graph_mode_fit
    )
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(x, y, batch_size=1, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert any(not np.array_equal(a, w.numpy()) for a, w in zip(before, model.trainable_weights))

    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(
        np.asarray(restored(x, training=False)), np.asarray(model(x, training=False)), rtol=1e-5, atol=1e-6
    )
    assert [layer.name for layer in restored.layers] == [layer.name for layer in model.layers]
    assert restored.loss.get_config() == model.loss.get_config()


@pytest.fixture
def bfloat16_policy():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("name,input_shape,num_classes", CASES[::2] + CASES[3:4], ids=lambda v: str(v))
def test_mixed_bfloat16_outputs_float32(name, input_shape, num_classes, bfloat16_policy):
    model = build_model(name, input_shape=input_shape, num_classes=num_classes, **TINY[name])
    assert any(layer.compute_dtype == "bfloat16" for layer in model.layers)
    assert model.get_layer("logits").compute_dtype == "float32"
    x, _ = _data(input_shape, num_classes)
    out = model(x)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert model.outputs[0].dtype == "float32"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sizes_not_divisible_are_padded(name, tmp_path):
    """A size the network cannot take is padded up inside the model and cropped back: the output
    equals the bare network's on the zero-padded input, cropped by hand, and survives .keras."""
    d = min_divisor(name, **TINY[name])
    shape = (3 * d + d // 2, 2 * d + 1, 3)
    keras.utils.set_random_seed(0)
    model = build_model(name, input_shape=shape, num_classes=3, **TINY[name])
    x, _ = _data(shape, 3)
    probs = np.asarray(model(x, training=False))
    assert probs.shape == (2, shape[0], shape[1], 3)
    inner = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    assert len(inner) == 1 and tuple(inner[0].input_shape[1:3]) == (4 * d, 3 * d)
    top, left = (4 * d - shape[0]) // 2, (3 * d - shape[1]) // 2
    padded = np.pad(x, ((0, 0), (top, 4 * d - shape[0] - top), (left, 3 * d - shape[1] - left), (0, 0)))
    expected = np.asarray(inner[0](padded, training=False))[:, top : top + shape[0], left : left + shape[1]]
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    path = str(tmp_path / "m.keras")
    model.save(path)
    np.testing.assert_allclose(np.asarray(keras.models.load_model(path, compile=False)(x)), probs, atol=1e-6)


def test_min_divisor_follows_depth():
    assert min_divisor("unet", depth=3) == 8
    assert min_divisor("unet") == 16
    assert min_divisor("improved_unet", depth=5) == 16
    assert min_divisor("dense_unet", depth=2) == 4
    assert min_divisor("mobilenetv2_unet") == 32
    with pytest.raises(ValueError, match="unknown model"):
        min_divisor("segformer")


def test_odd_3d_size_is_padded():
    model = build_model("unet", input_shape=(17, 18, 19, 1), num_classes=3, depth=2, base_filters=4)
    x, _ = _data((17, 18, 19, 1), 3, n=1)
    assert np.asarray(model(x)).shape == (1, 17, 18, 19, 3)
    assert model.get_layer("fit_pad").padding == ((1, 2), (1, 1), (0, 1))
    with pytest.raises(ValueError, match=r"spatial size 0\b"):
        build_model("unet", input_shape=(0, 16, 16, 1), num_classes=3, depth=2, base_filters=4)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="2D RGB"):
        build_model("mobilenetv2_unet", input_shape=(32, 32, 1), num_classes=3)
    with pytest.raises(ValueError, match="2D inputs"):
        build_model("mobilenetv2_unet", input_shape=(32, 32, 32, 3), num_classes=3)
    with pytest.raises(ValueError, match="not found"):
        build_model("mobilenetv2_unet", input_shape=(32, 32, 3), num_classes=3, weights="/nonexistent.h5")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("unet", input_shape=(32, 32, 3), num_classes=1, **TINY["unet"])
    with pytest.raises(ValueError, match="unknown model"):
        build_model("unet3", input_shape=(32, 32, 3), num_classes=2)
    with pytest.raises(ValueError, match="2D or 3D"):
        build_model("unet", input_shape=(32, 3), num_classes=2)


def test_unknown_spatial_dims_take_any_multiple():
    model = build_model("unet", input_shape=(None, None, 3), num_classes=3, **TINY["unet"])
    out = model(np.zeros((1, 24, 40, 3), "float32"))
    assert out.shape == (1, 24, 40, 3)


def test_layer_names_are_deterministic():
    a = build_model("unet", input_shape=(32, 32, 3), num_classes=2, **TINY["unet"])
    b = build_model("unet", input_shape=(32, 32, 3), num_classes=2, **TINY["unet"])
    names = [layer.name for layer in a.layers]
    assert names == [layer.name for layer in b.layers]
    expected = ["image", "normalize", "enc0_conv1", "enc1_conv2", "bottleneck_conv1", "dec0_up"]
    expected += ["logits", "probs"]
    assert set(expected) <= set(names)


def test_normalization_inside_the_model():
    model = build_model("unet", input_shape=(32, 32, 3), num_classes=2, **TINY["unet"])
    x = np.full((1, 32, 32, 3), 255.0, "float32")
    assert np.allclose(model.get_layer("normalize")(x), 1.0)
    m = build_model("mobilenetv2_unet", input_shape=(32, 32, 3), num_classes=2, **TINY["mobilenetv2_unet"])
    assert np.allclose(m.get_layer("normalize")(x), 1.0)
    assert np.allclose(m.get_layer("normalize")(np.zeros_like(x)), -1.0)


def test_improved_unet_deep_supervision_layers():
    kw = dict(depth=4, base_filters=4)
    model = build_model("improved_unet", input_shape=(32, 32, 1), num_classes=3, **kw)
    names = {layer.name for layer in model.layers}
    assert {"dec1_seg", "dec2_seg", "logits_sum", "enc1_dropout", "enc0_in1"} <= names
    plain = build_model("improved_unet", input_shape=(32, 32, 1), num_classes=3, deep_supervision=False, **kw)
    assert not any("seg" in layer.name for layer in plain.layers)


def test_mobilenetv2_loads_a_local_weights_file(tmp_path):
    keras.utils.set_random_seed(1)
    base = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None
    )
    path = os.path.join(tmp_path, "mobilenetv2.weights.h5")
    base.save_weights(path)
    keras.utils.set_random_seed(2)
    model = build_model(
        "mobilenetv2_unet", input_shape=(32, 32, 3), num_classes=3, weights=path, **TINY["mobilenetv2_unet"]
    )
    kernel = model.get_layer("mobilenetv2_encoder").get_layer("Conv1").kernel
    np.testing.assert_array_equal(kernel.numpy(), base.get_layer("Conv1").kernel.numpy())



def test_graph_mode_fit_with_ignore_index():
    """Losses and metrics traced by tf.function (what `tfseg fit` runs); binary and XLA tracing are
    covered in test_losses.py and test_metrics.py, more cheaply than by fitting."""
    input_shape, num_classes, regions = (16, 16, 16, 1), 4, {"WT": [1, 2, 3], "ET": [3]}
    from tfseg.losses import get_loss
    from tfseg.metrics import default_metrics

    model = build_model("unet", input_shape=input_shape, num_classes=num_classes, **TINY["unet"])
    model.compile(
        optimizer="adam",
        loss=get_loss("focal", num_classes=num_classes, ignore_index=255),
        metrics=default_metrics(num_classes, ignore_index=255, regions=regions),
    )
    x, y = _data(input_shape, num_classes)
    y[:, :4] = 255
    logs = model.fit(x, y, batch_size=1, epochs=1, verbose=0).history
    assert np.isfinite(logs["loss"][0])
    for key in ["mean_iou", "dice"] + [f"dice_{r}" for r in regions or {}]:
        assert 0 <= logs[key][0] <= 1, key


def test_builder_options_change_the_graph():
    unet = build_model(
        "unet", input_shape=(16, 16, 16, 1), num_classes=3, depth=2, base_filters=4,
        batch_norm=False, dropout=0.5, upsampling="nearest",
    )
    names = {layer.name for layer in unet.layers}
    assert {"enc1_dropout", "bottleneck_dropout", "dec0_upsample"} <= names
    assert not batch_norm_layers(unet)
    with_bn = build_model("unet", input_shape=(16, 16, 16, 1), num_classes=3, depth=2, base_filters=4)
    assert len(batch_norm_layers(with_bn)) == 10  # 2 per level, 2 levels down + bottleneck + 2 up
    assert unet.get_layer("enc1_conv1").filters == 8 and unet.get_layer("bottleneck_conv1").filters == 16

    dense = build_model(
        "dense_unet", input_shape=(32, 32, 1), num_classes=2, depth=2, base_filters=4,
        growth_rate=3, layers_per_block=2, compression=0.5, dropout=0.2,
    )
    # Block input 4 maps + 2 layers x 3 new maps = 10, halved by the transition.
    assert dense.get_layer("enc0_concat2").output.shape[-1] == 10
    assert dense.get_layer("enc0_down_conv").filters == 5
    assert "enc0_dropout1" in {layer.name for layer in dense.layers}
    with pytest.raises(ValueError, match="upsampling"):
        build_model("unet", input_shape=(32, 32, 3), num_classes=2, upsampling="bilinear", **TINY["unet"])


@pytest.mark.parametrize("name", ["unet", "dense_unet", "mobilenetv2_unet"])
def test_batch_norm_is_the_fused_layer_everywhere(name):
    shape = (32, 32, 3)
    model = build_model(name, input_shape=shape, num_classes=3, **TINY[name])
    layers = batch_norm_layers(model)
    assert layers and all(isinstance(layer, FusedBatchNorm) for layer in layers)


def test_a_padded_model_loads_in_a_fresh_process(tmp_path):
    """evaluate, export and predict load model.keras in a new process: the padding layers must be
    known there without a model having been built first (a 320x208 fit at depth 5 could not be
    evaluated: "Could not locate class 'SpatialPad'")."""
    import subprocess
    import sys

    shape = (40, 26, 3)  # not a multiple of 2**depth
    model = build_model("unet", input_shape=shape, num_classes=3, depth=3, base_filters=4)
    assert any(layer.__class__.__name__ == "SpatialPad" for layer in model.layers)
    os.makedirs(tmp_path / "run")
    model.save(str(tmp_path / "run" / "model.keras"))
    x = np.random.default_rng(0).uniform(0, 255, (1, *shape)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, numpy as np; from tfseg import rundir; m = rundir.load_model(sys.argv[1]); "
            "np.save(sys.argv[2], np.asarray(m(np.load(sys.argv[3]), training=False)))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run"), str(tmp_path / "y.npy"),
                           str(tmp_path / "x.npy")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), np.asarray(model(x, training=False)), atol=1e-6)
