"""Building blocks shared by tfseg's model builders.

One code path serves 2D and 3D, as MONAI's ``spatial_dims``: :func:`ops_for` picks ``Conv2D`` or
:class:`Conv3D` (and friends) from the number of spatial dimensions of the input.

Every block takes a ``name`` prefix and names its layers deterministically (``f"{name}_conv"``,
``f"{name}_bn"``, ...) so checkpoints and summaries are stable across builds.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import keras
from keras import ops as kops

from tfseg.models.norm import batch_norm

# Layers that must run in float32 under a mixed precision policy: the logits and everything after
# them, so probabilities (and the losses computed from them) keep full precision.
HEAD_DTYPE = "float32"


def bf16_conv3d_filter_grad_is_wrong(depth, kernel_depth: int, padding: str, dilation: int = 1) -> bool:
    """Whether TensorFlow's bfloat16 ``Conv3DBackpropFilterV2`` on CPU gets this convolution wrong.

    The kernel gradient of a bfloat16 3D convolution with ``"same"`` padding is wrong when the
    input's depth (the first spatial axis) is larger than 1 and smaller than the kernel's extent
    along it: relative errors around 1 against a float64 reference, and now and then garbage from
    uninitialized memory (1e33, inf, NaN). Measured on TensorFlow 2.21 with oneDNN on an
    AVX512-BF16 CPU over 1824 shapes (depth 1-8, kernel depth 1/2/3/5, strides 1/2, "same"/"valid"):
    every wrong case has 1 < depth < kernel depth and "same" padding; the forward convolution, the
    input gradient, float16, float32 and 2D convolutions are right. In a U-Net this is the level
    whose depth is 2 (a 16^3 patch at depth 4, a 32^3 patch at depth 5): the cause of the "loss nan"
    divergences of issue 20. ``tests/test_numerics.py`` re-runs the sweep against this rule; with
    "valid" padding the kernel is right, which is how :class:`Conv3D` avoids the bug.

    Args:
      depth: the input's static depth, or None when unknown (then False: nothing to decide on).
      kernel_depth, dilation: the kernel's size and dilation along the depth.
      padding: the layer's padding (``"same"`` or ``"valid"``).
    """
    if depth is None or str(padding).lower() != "same":
        return False
    extent = (int(kernel_depth) - 1) * int(dilation) + 1
    return 1 < int(depth) < extent


def same_padding(size, kernel: int, stride: int, dilation: int = 1):
    """TensorFlow's "same" padding of one axis as (before, after); None when it depends on an
    unknown size (strides > 1 only: at stride 1 it is the kernel's extent - 1 at any size)."""
    extent = (int(kernel) - 1) * int(dilation) + 1
    if int(stride) == 1:
        total = extent - 1
    elif size is None:
        return None
    else:
        out = -(-int(size) // int(stride))
        total = max((out - 1) * int(stride) + extent - int(size), 0)
    return total // 2, total - total // 2


@keras.saving.register_keras_serializable(package="tfseg")
class Conv3D(keras.layers.Conv3D):
    """``keras.layers.Conv3D`` that avoids TensorFlow's wrong bfloat16 kernel gradient (issue 20).

    Under ``mixed_bfloat16``, a call whose input depth makes TensorFlow's bfloat16 kernel gradient
    wrong (:func:`bf16_conv3d_filter_grad_is_wrong`, decided from the static shape when the layer
    is traced) pads its input with zeros exactly as "same" padding would and convolves with
    "valid" padding: the same output, still in bfloat16, and a kernel gradient computed on an input
    at least as deep as the kernel, where the bfloat16 kernel is right. Where a padding depends on
    an unknown size (strides > 1), the call convolves in float32 instead (input and kernel cast,
    the result cast back). Every other call is Keras's convolution. Same weights and config as
    Keras's layer: weight files of either load into the other.
    """

    def convolution_op(self, inputs, kernel):
        shape = inputs.shape
        if self.data_format != "channels_last" or kops.dtype(inputs) != "bfloat16" or (
            not bf16_conv3d_filter_grad_is_wrong(shape[1], self.kernel_size[0], self.padding, self.dilation_rate[0])
        ):
            return super().convolution_op(inputs, kernel)
        pads = [same_padding(size, k, s, d) for size, k, s, d in
                zip(shape[1:4], self.kernel_size, self.strides, self.dilation_rate)]
        if any(p is None for p in pads):
            outputs = super().convolution_op(kops.cast(inputs, "float32"), kops.cast(kernel, "float32"))
            return kops.cast(outputs, "bfloat16")
        padded = kops.pad(inputs, [(0, 0), *pads, (0, 0)])
        return kops.conv(padded, kernel, strides=list(self.strides), padding="valid",
                         dilation_rate=self.dilation_rate, data_format=self.data_format)


@dataclasses.dataclass(frozen=True)
class SpatialOps:
    """The layer classes of one spatial rank (2 or 3)."""

    ndim: int
    conv: Callable
    conv_transpose: Callable
    max_pool: Callable
    upsampling: Callable
    spatial_dropout: Callable


def ops_for(ndim: int) -> SpatialOps:
    """Layer classes for ``ndim`` spatial dimensions.

    Raises:
      ValueError: ``ndim`` is not 2 or 3.
    """
    if ndim == 2:
        return SpatialOps(
            2,
            keras.layers.Conv2D,
            keras.layers.Conv2DTranspose,
            keras.layers.MaxPooling2D,
            keras.layers.UpSampling2D,
            keras.layers.SpatialDropout2D,
        )
    if ndim == 3:
        return SpatialOps(
            3,
            Conv3D,
            keras.layers.Conv3DTranspose,
            keras.layers.MaxPooling3D,
            keras.layers.UpSampling3D,
            keras.layers.SpatialDropout3D,
        )
    raise ValueError(f"only 2D and 3D inputs are supported, got {ndim} spatial dimensions")


def image_input(input_shape, name: str = "image") -> keras.KerasTensor:
    """The model's float32 input; float32 even under mixed precision (the source value range)."""
    return keras.Input(shape=tuple(input_shape), dtype="float32", name=name)


def normalize_input(x, ndim: int, name: str = "normalize"):
    """Maps the model input to the range the first convolution expects.

    2D images arrive as 0..255 floats and are scaled to 0..1; 3D volumes arrive z-scored from
    conversion and pass through unchanged (the model I/O contract in :mod:`tfseg.rundir`).
    """
    if ndim == 2:
        return keras.layers.Rescaling(1.0 / 255.0, name=name)(x)
    return x


def conv_norm_act(
    x,
    filters: int,
    *,
    ops: SpatialOps,
    name: str,
    index: int | str = "",
    kernel_size: int = 3,
    strides: int = 1,
    norm: str | None = "batch",
    activation: str = "relu",
):
    """Convolution -> optional normalization -> activation.

    Args:
      x: (B, *spatial, C) tensor.
      name, index: the layers are named ``f"{name}_conv{index}"``, ``f"{name}_bn{index}"`` (or
        ``_in``), ``f"{name}_{activation}{index}"``.
      norm: ``"batch"``, ``"instance"`` or None.
      activation: ``"relu"`` or ``"leaky_relu"`` (slope 0.01, as Isensee et al.).

    Returns:
      (B, *spatial / strides, filters) tensor.
    """
    x = ops.conv(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=norm is None,
        kernel_initializer="he_normal",
        name=f"{name}_conv{index}",
    )(x)
    x = normalization(x, norm, name=f"{name}_{'bn' if norm == 'batch' else 'in'}{index}")
    return activation_layer(activation, name=f"{name}_{activation}{index}")(x)


def normalization(x, norm: str | None, *, name: str):
    """Batch norm, instance norm (GroupNormalization with one group per channel) or identity.

    Batch norm is :func:`tfseg.models.norm.batch_norm`: Keras's BatchNormalization rule
    (momentum 0.99, epsilon 1e-3, same weights), through the fused kernel in the compute dtype
    under the TensorFlow backend.
    """
    if norm is None:
        return x
    if norm == "batch":
        return batch_norm(name)(x)
    if norm == "instance":
        return keras.layers.GroupNormalization(groups=-1, epsilon=1e-5, name=name)(x)
    raise ValueError(f"unknown normalization {norm!r}; expected 'batch', 'instance' or None")


def activation_layer(activation: str, *, name: str) -> keras.layers.Layer:
    if activation == "relu":
        return keras.layers.ReLU(name=name)
    if activation == "leaky_relu":
        return keras.layers.LeakyReLU(negative_slope=0.01, name=name)
    raise ValueError(f"unknown activation {activation!r}; expected 'relu' or 'leaky_relu'")


def output_channels(num_classes: int) -> int:
    """1 sigmoid channel for binary tasks (num_classes == 2), else one softmax channel per class."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return 1 if num_classes == 2 else num_classes


def probabilities(logits, num_classes: int, name: str = "probs"):
    """Sigmoid (binary) or softmax over the channel axis, in float32."""
    activation = "sigmoid" if num_classes == 2 else "softmax"
    return keras.layers.Activation(activation, dtype=HEAD_DTYPE, name=name)(logits)


def segmentation_head(x, num_classes: int, *, ops: SpatialOps, name: str = "logits"):
    """1x1 convolution to the output channels, in float32 so mixed precision is safe.

    Returns:
      (B, *spatial, 1 or K) float32 logits.
    """
    return ops.conv(output_channels(num_classes), 1, padding="same", dtype=HEAD_DTYPE, name=name)(x)
