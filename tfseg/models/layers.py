"""Building blocks shared by tfseg's model builders.

One code path serves 2D and 3D, as MONAI's ``spatial_dims``: :func:`ops_for` picks ``Conv2D`` or
``Conv3D`` (and friends) from the number of spatial dimensions of the input.

Every block takes a ``name`` prefix and names its layers deterministically (``f"{name}_conv"``,
``f"{name}_bn"``, ...) so checkpoints and summaries are stable across builds.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import keras

from tfseg.models.norm import FusedBatchNorm

# Layers that must run in float32 under a mixed precision policy: the logits and everything after
# them, so probabilities (and the losses computed from them) keep full precision.
HEAD_DTYPE = "float32"


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
            keras.layers.Conv3D,
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

    Batch norm is :class:`tfseg.models.norm.FusedBatchNorm`: Keras's BatchNormalization rule
    (momentum 0.99, epsilon 1e-3, same weights) through the fused kernel in the compute dtype.
    """
    if norm is None:
        return x
    if norm == "batch":
        return FusedBatchNorm(name=name)(x)
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
