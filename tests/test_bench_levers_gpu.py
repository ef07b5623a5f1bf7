"""The accelerator lever harness (tools/bench_levers_gpu.py): its augmentation geometry and its
batch-norm re-estimate against numpy, and tfseg's models computing the same function under
Keras's JAX backend (where the harness runs) as under TensorFlow."""

import importlib.util
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _harness():
    spec = importlib.util.spec_from_file_location("bench_levers_gpu", os.path.join(ROOT, "tools", "bench_levers_gpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_affine_rows_flip_is_an_exact_mirror():
    h = _harness()
    image = np.random.default_rng(0).uniform(0, 255, (2, 6, 10, 3)).astype(np.float32)
    rows = h.affine_rows(np.random.default_rng(1), 2, (6, 10), {"hflip": 1.0})
    out = ops.convert_to_numpy(ops.image.affine_transform(image, rows, interpolation="nearest"))
    np.testing.assert_array_equal(out, image[:, :, ::-1])


def test_affine_rows_zoom_and_shift_map_points_as_drawn():
    h = _harness()
    hw = (40, 60)
    # scale [2, 2]: every output point is the centre plus half its offset; no shift, no rotation.
    row = h.affine_rows(np.random.default_rng(0), 1, hw, {"scale": [2.0, 2.0]})[0]
    c = np.array([(hw[1] - 1) / 2, (hw[0] - 1) / 2])
    for x, y in [(0.0, 0.0), (59.0, 39.0), (10.0, 30.0)]:
        mapped = np.array([row[0] * x + row[1] * y + row[2], row[3] * x + row[4] * y + row[5]])
        np.testing.assert_allclose(mapped, c + (np.array([x, y]) - c) / 2, atol=1e-4)
    # A rotation keeps distances from the centre (the map is a rotation about it, scaled by 1).
    row = h.affine_rows(np.random.default_rng(3), 1, hw, {"rotate": 30})[0]
    m = np.array([[row[0], row[1]], [row[3], row[4]]])
    np.testing.assert_allclose(m @ m.T, np.eye(2), atol=1e-5)
    np.testing.assert_allclose(m @ c + row[[2, 5]], c, atol=1e-4)


def test_reestimate_batch_norm_gives_population_statistics():
    from tfseg.models.norm import batch_norm

    h = _harness()
    inputs = keras.Input((4, 5, 3))
    model = keras.Model(inputs, batch_norm("bn")(keras.layers.Dense(3, name="d")(inputs)))
    rng = np.random.default_rng(0)
    batches = [rng.normal(i, 1 + i, (2, 4, 5, 3)).astype(np.float32) for i in range(3)]
    h.reestimate_batch_norm(model, batches)
    features = keras.Model(inputs, model.get_layer("d").output)
    acts = np.concatenate([ops.convert_to_numpy(features(b)).reshape(-1, 3) for b in batches]).astype(np.float64)
    bn = model.get_layer("bn")
    np.testing.assert_allclose(ops.convert_to_numpy(bn.moving_mean), acts.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ops.convert_to_numpy(bn.moving_variance), acts.var(0), rtol=1e-4, atol=1e-4)
    assert bn.momentum == pytest.approx(0.99)  # restored


JAX_SCRIPT = """
import sys, numpy as np, keras
from tfseg.models import build_model
model = build_model("unet", input_shape=(32, 48, 3), num_classes=4, depth=1, base_filters=4)
weights = np.load(sys.argv[1])
model.set_weights([weights[f"w{i}"] for i in range(len(weights.files))])
x = np.load(sys.argv[2])
np.save(sys.argv[3], keras.ops.convert_to_numpy(model(x, training=False)))
print(keras.backend.backend(), "tensorflow" in sys.modules,
      sorted({type(l).__name__ for l in model.layers if "Norm" in type(l).__name__}))
"""


@pytest.mark.slow  # fast tier at about 3 minutes (issue 31): runs in CI's slow tier
def test_unet_is_the_same_function_under_jax(tmp_path):
    pytest.importorskip("jax")
    from tfseg.models import build_model

    model = build_model("unet", input_shape=(32, 48, 3), num_classes=4, depth=1, base_filters=4)
    rng = np.random.default_rng(0)
    for layer in model.layers:  # statistics far from the initial 0/1, so a lost one shows
        if hasattr(layer, "moving_mean"):
            layer.moving_mean.assign(rng.normal(0, 0.5, layer.moving_mean.shape).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape).astype(np.float32))
    x = rng.uniform(0, 255, (2, 32, 48, 3)).astype(np.float32)
    expected = ops.convert_to_numpy(model(x, training=False))
    # By order, as the harness moves weights between sizes: Keras's .weights.h5 files key a
    # layer's variables by its class, so FusedBatchNorm's do not load into BatchNormalization.
    weights, inputs, out = (str(tmp_path / n) for n in ("w.npz", "x.npy", "y.npy"))
    np.savez(weights, **{f"w{i}": w for i, w in enumerate(model.get_weights())})
    np.save(inputs, x)
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", JAX_SCRIPT, weights, inputs, out], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "jax False ['BatchNormalization']"
    np.testing.assert_allclose(np.load(out), expected, atol=2e-5)
