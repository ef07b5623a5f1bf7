"""tfseg.models.norm.FusedBatchNorm against keras.layers.BatchNormalization and numpy (issue 15)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfseg.models.norm import FusedBatchNorm, batch_norm_layers, fuse_batch_norm

SHAPES = [(4, 6, 6, 3), (2, 3, 4, 5, 3)]  # 2D NHWC and 3D NDHWC


@pytest.fixture
def policy():
    """Restores the global dtype policy after a test that changes it."""
    old = keras.config.dtype_policy().name
    yield keras.config.set_dtype_policy
    keras.config.set_dtype_policy(old)


def _batch(shape, seed):
    rng = np.random.default_rng(seed)
    return (rng.normal(3.0, 2.0, shape) * rng.uniform(0.5, 2.0, shape[-1])).astype("float32")


def _pair(shape, momentum=0.9):
    """A FusedBatchNorm and a Keras BatchNormalization with the same random gamma and beta."""
    a, b = FusedBatchNorm(momentum=momentum), keras.layers.BatchNormalization(momentum=momentum)
    a.build(shape)
    b.build(shape)
    rng = np.random.default_rng(1)
    gamma, beta = rng.uniform(0.5, 1.5, shape[-1]), rng.normal(0, 1, shape[-1])
    for layer in (a, b):
        layer.gamma.assign(gamma.astype("float32"))
        layer.beta.assign(beta.astype("float32"))
    return a, b, gamma, beta


def _numpy_bn(x, mean, var, gamma, beta, eps=1e-3):
    return (x.astype(np.float64) - mean) / np.sqrt(var + eps) * gamma + beta


def _grads(layer, x, w):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.cast(layer(x, training=True), tf.float32)
        loss = tf.reduce_sum(y * w)  # a non-trivial upstream gradient
    return [g.numpy() for g in tape.gradient(loss, [x, layer.gamma.value, layer.beta.value])]


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_matches_keras_and_numpy(shape):
    a, b, gamma, beta = _pair(shape)
    axes = tuple(range(len(shape) - 1))
    x = _batch(shape, 0)
    # Training mode: batch statistics (biased variance), checked against numpy.
    want = _numpy_bn(x, x.mean(axes), x.var(axes), gamma, beta)
    got = a(x, training=True).numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(got, b(x, training=True).numpy(), atol=2e-5)
    # Gradients with respect to the input, gamma and beta.
    w = np.random.default_rng(2).normal(size=shape).astype("float32")
    for ga, gb in zip(_grads(a, x, w), _grads(b, x, w)):
        np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-4 * np.abs(gb).max())
    # Moving statistics after N steps on different batches (the two above were steps 1-2).
    mean, var = np.zeros(shape[-1]), np.ones(shape[-1])
    for xi in (x, x):
        mean, var = 0.9 * mean + 0.1 * xi.mean(axes), 0.9 * var + 0.1 * xi.var(axes)
    for step in range(5):
        xi = _batch(shape, 10 + step)
        a(xi, training=True)
        b(xi, training=True)
        mean, var = 0.9 * mean + 0.1 * xi.mean(axes), 0.9 * var + 0.1 * xi.var(axes)
    np.testing.assert_allclose(a.moving_mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(a.moving_variance.numpy(), var, rtol=1e-5)
    np.testing.assert_allclose(a.moving_variance.numpy(), b.moving_variance.numpy(), rtol=1e-5)
    # Inference mode: the moving statistics.
    np.testing.assert_allclose(a(x, training=False).numpy(), _numpy_bn(x, mean, var, gamma, beta), atol=2e-5)
    np.testing.assert_allclose(a(x).numpy(), b(x).numpy(), atol=2e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_bfloat16_within_bf16_tolerance(shape, policy):
    policy("mixed_bfloat16")
    a, b, gamma, beta = _pair(shape)
    assert a.compute_dtype == "bfloat16" and a.moving_mean.dtype == "float32" and a.gamma.dtype == "float32"
    axes = tuple(range(len(shape) - 1))
    x = _batch(shape, 0)
    xb = tf.cast(tf.cast(x, tf.bfloat16), tf.float32).numpy()  # what the layer sees
    y = a(x, training=True)
    assert y.dtype == tf.bfloat16
    want = _numpy_bn(xb, xb.mean(axes), xb.var(axes), gamma, beta)
    # bf16 keeps 8 significant bits: a relative error of 2^-8 on outputs of magnitude <= ~5.
    np.testing.assert_allclose(tf.cast(y, tf.float32).numpy(), want, atol=5 * 2**-8)
    np.testing.assert_allclose(a.moving_mean.numpy(), 0.1 * xb.mean(axes), rtol=1e-4)
    np.testing.assert_allclose(a.moving_variance.numpy(), 0.9 + 0.1 * xb.var(axes), rtol=1e-4)
    w = np.random.default_rng(2).normal(size=shape).astype("float32")
    policy("float32")
    ref = keras.layers.BatchNormalization(momentum=0.9)
    ref.build(shape)
    ref.gamma.assign(gamma.astype("float32"))
    ref.beta.assign(beta.astype("float32"))
    for ga, gr in zip(_grads(a, xb, w), _grads(ref, xb, w)):
        np.testing.assert_allclose(ga, gr, atol=3 * 2**-8 * np.abs(gr).max())


def test_frozen_layer_normalizes_with_moving_statistics():
    shape = SHAPES[0]
    a, b, gamma, beta = _pair(shape)
    a.trainable = b.trainable = False
    x = _batch(shape, 0)
    np.testing.assert_allclose(a(x, training=True).numpy(), _numpy_bn(x, 0.0, 1.0, gamma, beta), atol=2e-5)
    np.testing.assert_allclose(a.moving_mean.numpy(), 0.0)


def test_rejects_what_the_fused_kernel_cannot_do():
    with pytest.raises(ValueError, match="last"):
        FusedBatchNorm(axis=1)
    with pytest.raises(ValueError, match="epsilon"):
        FusedBatchNorm(epsilon=1e-6)
    with pytest.raises(ValueError, match="B, H, W, C"):
        FusedBatchNorm()(np.zeros((2, 3, 4), "float32"))


def _net(norm, shape=(8, 8, 2), seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input(shape)
    x = inp
    for i in range(2):
        x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = norm(name=f"bn{i}")(x)
        x = keras.layers.ReLU()(x)
    out = keras.layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="head")(x)
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.Adam(1e-2), "binary_crossentropy")
    return model


def test_model_keras_round_trip_and_keras_bn_weights_carry_over(tmp_path):
    model = _net(FusedBatchNorm)
    x = _batch((4, 8, 8, 2), 0)
    model.fit(x, (x[..., :1] > 3).astype("float32"), batch_size=2, epochs=1, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.get_layer("bn0"), FusedBatchNorm)
    assert loaded.get_layer("bn0").get_config()["momentum"] == 0.99
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    # A Keras-BN model's weights (same names, same order) carry over to the fused one.
    old = _net(keras.layers.BatchNormalization, seed=3)
    old.fit(x, (x[..., :1] > 3).astype("float32"), batch_size=2, epochs=1, verbose=0)
    model.set_weights(old.get_weights())
    assert np.abs(old.get_layer("bn1").moving_mean.numpy()).max() > 0  # a real test: stats moved
    np.testing.assert_allclose(model.predict(x, verbose=0), old.predict(x, verbose=0), atol=1e-5)


def test_fuse_batch_norm_keeps_the_function():
    keras.utils.set_random_seed(0)
    base = _net(keras.layers.BatchNormalization)
    for layer in batch_norm_layers(base):
        layer.moving_mean.assign(np.random.default_rng(0).normal(size=4).astype("float32"))
    fused = fuse_batch_norm(base)
    assert [type(layer).__name__ for layer in batch_norm_layers(fused)] == ["FusedBatchNorm"] * 2
    x = _batch((2, 8, 8, 2), 0)
    np.testing.assert_allclose(fused.predict(x, verbose=0), base.predict(x, verbose=0), atol=1e-5)


def _loss_curve(norm, steps=12):
    model = _net(norm, seed=5)
    rng = np.random.default_rng(7)
    x = rng.normal(0, 1, (8, 8, 8, 2)).astype("float32")
    y = (x[..., :1] + x[..., 1:] > 0.5).astype("float32")
    return np.array(model.fit(x, y, batch_size=4, epochs=steps // 2, shuffle=False, verbose=0).history["loss"])


def test_loss_curve_matches_keras_bn(policy):
    fused, ref = _loss_curve(FusedBatchNorm), _loss_curve(keras.layers.BatchNormalization)
    assert fused[-1] < 0.8 * fused[0]  # it learns
    np.testing.assert_allclose(fused, ref, rtol=1e-3)
    policy("mixed_bfloat16")
    fused16, ref16 = _loss_curve(FusedBatchNorm), _loss_curve(keras.layers.BatchNormalization)
    np.testing.assert_allclose(fused16, ref16, rtol=0.05)
    np.testing.assert_allclose(fused16, ref, rtol=0.05)


@pytest.mark.slow  # fast tier at about 3 minutes (issue 31): two replicas, 13 s
def test_mirrored_replicas_keep_one_moving_average():
    """Two logical CPUs (a fresh TensorFlow): the moving statistics are the replicas' mean."""
    script = textwrap.dedent("""
        import json
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras
        from tfseg.models.norm import FusedBatchNorm
        strategy = tf.distribute.MirroredStrategy(
            ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())
        with strategy.scope():
            inp = keras.Input((4, 4, 1))
            bn = FusedBatchNorm(momentum=0.5)
            model = keras.Model(inp, bn(inp))
            model.compile("sgd", "mse")
        x = np.zeros((4, 4, 4, 1), "float32")
        x[:2] = 2.0  # replica 0: mean 2, replica 1: mean 6 with variance 4
        x[2:] = 6.0 + 2.0 * np.where(np.indices((2, 4, 4, 1))[2] % 2, 1.0, -1.0)
        model.fit(x, np.zeros_like(x), batch_size=4, epochs=1, shuffle=False, verbose=0)
        means = [float(v.numpy()[0]) for v in bn.moving_mean._value.values]
        variances = [float(v.numpy()[0]) for v in bn.moving_variance._value.values]
        print("RESULT", json.dumps([means, variances]))
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, proc.stderr[-2000:]
    means, variances = json.loads(line[0][len("RESULT"):])
    # momentum 0.5 from (0, 1): 0.5 * 0 + 0.5 * mean(2, 6); 0.5 * 1 + 0.5 * mean(0, 4).
    np.testing.assert_allclose(means, [2.0, 2.0], rtol=1e-5)
    np.testing.assert_allclose(variances, [1.5, 1.5], rtol=1e-5)
