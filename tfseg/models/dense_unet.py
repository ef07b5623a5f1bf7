"""Dense U-Net: a U-Net whose encoder and decoder levels are dense blocks (the finger-vein seed).

A dense block (Huang et al. 2017) stacks ``layers_per_block`` BN -> ReLU -> 3x3 conv layers of
``growth_rate`` filters, each fed the concatenation of the block input and all earlier outputs.
Going down, a transition (BN -> ReLU -> 1x1 conv compressing the channels -> 2x max pool) follows
each encoder block; going up, a 2x transposed convolution is concatenated with the skip and fed to a
decoder dense block. 2D or 3D from the input rank. Spatial sizes must be divisible by ``2 ** depth``.
"""

from __future__ import annotations

import keras

from tfseg.models import layers as L

NDIMS = (2, 3)


def min_divisor(depth: int = 4, **_) -> int:
    return 2**depth


def build_dense_unet(
    input_shape,
    num_classes: int,
    *,
    depth: int = 4,
    base_filters: int = 32,
    growth_rate: int = 16,
    layers_per_block: int = 4,
    compression: float = 0.5,
    dropout: float = 0.0,
    name: str = "dense_unet",
) -> keras.Model:
    """Builds a dense U-Net.

    Args:
      input_shape: (H, W, C) or (D, H, W, C); spatial dims may be None.
      num_classes: classes including background; 2 gives one sigmoid channel.
      depth: number of 2x downsamplings.
      base_filters: filters of the stem convolution and of the top decoder upsampling (doubled
        per level down).
      growth_rate: filters added by each layer of a dense block.
      layers_per_block: layers per dense block.
      compression: fraction of channels kept by a transition's 1x1 convolution.
      dropout: spatial dropout rate after each dense layer's convolution (0 disables).

    Returns:
      A functional model: float32 (B, *spatial, C) -> float32 probabilities (B, *spatial, 1 or K).
    """
    if not 0 < compression <= 1:
        raise ValueError(f"compression must be in (0, 1], got {compression}")
    ndim = len(input_shape) - 1
    ops = L.ops_for(ndim)
    block = dict(ops=ops, growth_rate=growth_rate, num_layers=layers_per_block, dropout=dropout)

    inputs = L.image_input(input_shape)
    x = L.normalize_input(inputs, ndim)
    x = ops.conv(base_filters, 3, padding="same", kernel_initializer="he_normal", name="stem_conv")(x)

    skips = []
    for level in range(depth):
        x = _dense_block(x, name=f"enc{level}", **block)
        skips.append(x)
        x = L.normalization(x, "batch", name=f"enc{level}_down_bn")
        x = keras.layers.ReLU(name=f"enc{level}_down_relu")(x)
        kept = max(1, int(x.shape[-1] * compression))
        x = ops.conv(kept, 1, kernel_initializer="he_normal", name=f"enc{level}_down_conv")(x)
        x = ops.max_pool(2, name=f"enc{level}_pool")(x)

    x = _dense_block(x, name="bottleneck", **block)

    for level in reversed(range(depth)):
        x = ops.conv_transpose(
            base_filters * 2**level, 2, strides=2, padding="same", name=f"dec{level}_up"
        )(x)
        x = keras.layers.Concatenate(name=f"dec{level}_concat")([skips[level], x])
        x = _dense_block(x, name=f"dec{level}", **block)

    x = L.normalization(x, "batch", name="head_bn")
    x = keras.layers.ReLU(name="head_relu")(x)
    logits = L.segmentation_head(x, num_classes, ops=ops)
    return keras.Model(inputs, L.probabilities(logits, num_classes), name=name)


def _dense_block(
    x, *, ops: L.SpatialOps, growth_rate: int, num_layers: int, dropout: float, name: str
):
    """Returns the concatenation of the block input and every layer's ``growth_rate`` new maps."""
    for i in range(1, num_layers + 1):
        y = L.normalization(x, "batch", name=f"{name}_bn{i}")
        y = keras.layers.ReLU(name=f"{name}_relu{i}")(y)
        y = ops.conv(
            growth_rate, 3, padding="same", kernel_initializer="he_normal", name=f"{name}_conv{i}"
        )(y)
        if dropout > 0:
            y = ops.spatial_dropout(dropout, name=f"{name}_dropout{i}")(y)
        x = keras.layers.Concatenate(name=f"{name}_concat{i}")([x, y])
    return x
