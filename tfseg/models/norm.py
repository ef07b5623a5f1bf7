"""Batch normalization through TensorFlow's fused kernel, in the layer's compute dtype.

Keras 3's ``BatchNormalization`` casts every activation to float32 and computes the moments with
separate ops, so under ``mixed_bfloat16`` a U-Net spends most of a training step converting and
reducing tensors (issue 15). :class:`FusedBatchNorm` keeps the activations in the compute dtype
(bfloat16, float16 or float32) and normalizes them with one ``tf.raw_ops.FusedBatchNormV3``
call, whose scale, offset and statistics are float32 (the kernel accumulates in float32), and
whose gradient is the fused ``FusedBatchNormGradV3``.

It is a drop-in replacement for ``keras.layers.BatchNormalization`` on a channels-last axis:

* the same weights in the same order (``gamma``, ``beta``, ``moving_mean``, ``moving_variance``,
  all float32 and never autocast), so ``get_weights()`` of a model built with either layer
  ``set_weights()`` into the other (Keras's ``.weights.h5`` files key variables by the layer's
  class, so those files do not cross over: tests/test_bench_levers_gpu.py found that);
* the same defaults (momentum 0.99, epsilon 1e-3) and the same moving-statistics rule:
  ``moving = moving * momentum + batch * (1 - momentum)`` with the *biased* batch variance (the
  kernel returns the unbiased one; it is rescaled by (n - 1) / n);
* the same modes: batch statistics when called with ``training=True`` and the layer is
  trainable, the moving statistics otherwise (a frozen layer normalizes in inference mode).

3D inputs (B, D, H, W, C) are reshaped to (B, D, H*W, C) for the 4D kernel and back: batch
norm reduces over every axis but the channels, so the result is the same.

Distribution: like Keras's layer (``synchronized=False``, its default), each replica normalizes
with the statistics of its own part of the global batch. A synchronized version would need an
all-reduce of the moments before normalizing, which the fused kernel cannot take, and a second
kernel call; the population statistics the published model uses are re-estimated over whole
batches after training anyway (:mod:`tfseg.fit.bnstats`). Under ``MirroredStrategy`` each replica's
moving-statistics update is averaged across replicas (the variables are created with
``aggregation="mean"``), so replicas never drift apart.

Other Keras backends (JAX, PyTorch): the fused kernel is TensorFlow's, so :func:`batch_norm` gives
Keras's own ``BatchNormalization`` there (same weights, defaults and rule), and the models build
and train under any backend; ``tools/bench_levers_gpu.py`` uses that to run recipe comparisons on
an accelerator that has no TensorFlow.
"""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="tfseg")
class FusedBatchNorm(keras.layers.Layer):
    """Channels-last batch normalization with the fused kernel (see the module docstring).

    Args:
      momentum: momentum of the moving statistics (Keras's default 0.99).
      epsilon: added to the variance (Keras's default 1e-3; the kernel needs >= 1.001e-5).
      center, scale: learn the offset ``beta`` / the scale ``gamma``.
      beta_initializer, gamma_initializer, moving_mean_initializer,
        moving_variance_initializer: Keras initializers.
      axis: must be -1 (or the last axis): the kernel is NHWC.
    """

    def __init__(
        self,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        axis: int = -1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if axis != -1:
            raise ValueError(f"FusedBatchNorm normalizes the last (channels) axis only; got axis={axis}")
        if epsilon < 1.001e-5:
            raise ValueError(f"FusedBatchNorm: epsilon must be >= 1.001e-5, got {epsilon}")
        self.axis = -1
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.moving_mean_initializer = keras.initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = keras.initializers.get(moving_variance_initializer)

    def build(self, input_shape):
        if len(input_shape) not in (4, 5):
            raise ValueError(
                f"FusedBatchNorm takes (B, H, W, C) or (B, D, H, W, C) inputs, got shape {input_shape}"
            )
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"FusedBatchNorm: the channel count of {input_shape} must be known")
        shape = (int(channels),)
        common = dict(shape=shape, dtype="float32", autocast=False)
        if self.scale:
            self.gamma = self.add_weight(name="gamma", initializer=self.gamma_initializer, **common)
        if self.center:
            self.beta = self.add_weight(name="beta", initializer=self.beta_initializer, **common)
        # aggregation="mean": a replica's update is averaged over the replicas (MirroredStrategy).
        self.moving_mean = self.add_weight(
            name="moving_mean", initializer=self.moving_mean_initializer, trainable=False,
            aggregation="mean", **common
        )
        self.moving_variance = self.add_weight(
            name="moving_variance", initializer=self.moving_variance_initializer, trainable=False,
            aggregation="mean", **common
        )
        self.input_spec = keras.layers.InputSpec(ndim=len(input_shape), axes={-1: int(channels)})

    def compute_output_shape(self, input_shape):
        return input_shape

    def call(self, inputs, training=None, mask=None):
        if mask is not None:
            raise ValueError("FusedBatchNorm does not support masks; use keras.layers.BatchNormalization")
        import tensorflow as tf

        x = tf.convert_to_tensor(inputs)
        if x.dtype != self.compute_dtype:
            x = tf.cast(x, self.compute_dtype)
        channels = self.moving_mean.shape[0]
        scale = self.gamma.value if self.scale else tf.ones((channels,), tf.float32)
        offset = self.beta.value if self.center else tf.zeros((channels,), tf.float32)
        shape = None
        if x.shape.rank == 5:  # (B, D, H, W, C) -> (B, D, H*W, C) for the 4D kernel
            shape = tf.shape(x)
            x = tf.reshape(x, tf.stack([shape[0], shape[1], shape[2] * shape[3], shape[4]]))
        if training and self.trainable:
            empty = tf.constant([], tf.float32)
            y, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=scale, offset=offset, mean=empty, variance=empty, epsilon=self.epsilon,
                exponential_avg_factor=1.0, data_format="NHWC", is_training=True,
            )
            # The kernel's batch variance is unbiased; Keras's moving average uses the biased one.
            n = tf.cast(tf.size(x, out_type=tf.int64) // channels, tf.float32)
            variance = variance * ((n - 1.0) / tf.maximum(n, 1.0))
            m = self.momentum
            self.moving_mean.assign(self.moving_mean.value * m + mean * (1.0 - m))
            self.moving_variance.assign(self.moving_variance.value * m + variance * (1.0 - m))
        else:
            y, _, _, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=scale, offset=offset, mean=self.moving_mean.value,
                variance=self.moving_variance.value, epsilon=self.epsilon, data_format="NHWC",
                is_training=False,
            )
        if shape is not None:
            y = tf.reshape(y, shape)
        return y

    def get_config(self):
        config = super().get_config()
        config.update(
            momentum=self.momentum,
            epsilon=self.epsilon,
            center=self.center,
            scale=self.scale,
            beta_initializer=keras.initializers.serialize(self.beta_initializer),
            gamma_initializer=keras.initializers.serialize(self.gamma_initializer),
            moving_mean_initializer=keras.initializers.serialize(self.moving_mean_initializer),
            moving_variance_initializer=keras.initializers.serialize(self.moving_variance_initializer),
        )
        return config


def batch_norm(name: str) -> keras.layers.Layer:
    """A batch-norm layer with Keras's defaults: :class:`FusedBatchNorm` under the TensorFlow
    backend, ``keras.layers.BatchNormalization`` under the others (no fused kernel there)."""
    if keras.backend.backend() == "tensorflow":
        return FusedBatchNorm(name=name)
    return keras.layers.BatchNormalization(momentum=0.99, epsilon=1e-3, name=name)


def is_batch_norm(layer) -> bool:
    """True for tfseg's FusedBatchNorm and Keras's BatchNormalization (the layers with moving
    statistics that :mod:`tfseg.fit.bnstats` re-estimates)."""
    return isinstance(layer, (FusedBatchNorm, keras.layers.BatchNormalization))


def all_layers(model) -> list:
    """Every layer of ``model``, nested models' layers included (after the nested model), in the
    models' layer order: a walk over the public ``layers`` of each model. tfseg's models put no
    layer inside a custom layer, where only Keras's private ``_flatten_layers`` would look
    (tests/test_norm.py checks that the two agree on every architecture)."""
    out, seen = [], set()

    def walk(m):
        for layer in m.layers:
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            out.append(layer)
            if isinstance(layer, keras.Model):
                walk(layer)

    walk(model)
    return out


def batch_norm_layers(model) -> list:
    """Every batch-norm layer of ``model``, nested models included, in a stable order."""
    return [layer for layer in all_layers(model) if is_batch_norm(layer)]


def fuse_batch_norm(model):
    """A copy of functional ``model`` whose Keras BatchNormalization layers are FusedBatchNorm.

    Used for ``keras.applications`` encoders; every weight (loaded pre-trained ones included)
    is copied, so the copy computes the same function. Layers keep their names.
    """

    def clone(layer):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.axis in (-1, len(layer.input.shape) - 1):
            c = layer.get_config()
            return FusedBatchNorm(
                momentum=c["momentum"], epsilon=max(c["epsilon"], 1.001e-5), center=c["center"],
                scale=c["scale"], name=c["name"], dtype=c.get("dtype"), trainable=c.get("trainable", True),
            )
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone)
    for old, new in zip(model.layers, copy.layers):
        if old.weights:
            new.set_weights(old.get_weights())
    return copy
