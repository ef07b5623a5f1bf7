"""Improved U-Net of Isensee et al. 2018 ("Brain Tumor Segmentation and Radiomics Survival
Prediction", arXiv 1802.10508), 2D or 3D from the input rank; the ISIC seed's model.

Context pathway: at each level a 3x3 convolution (stride 2 below the top level) feeds a
pre-activation residual context module (IN -> LReLU -> conv -> dropout -> IN -> LReLU -> conv)
whose output is added to its input. Localization pathway: upsampling modules (2x upsample, 3x3
conv halving the filters), concatenation with the context output, localization modules (3x3 conv,
1x1 conv halving the filters). Deep supervision: 1x1 segmentation layers on the two localization
levels above the output are upsampled and summed into the final segmentation layer before the
softmax/sigmoid. Instance normalization is ``GroupNormalization(groups=-1)``; leaky ReLU slope 0.01.

Spatial sizes must be divisible by ``2 ** (depth - 1)``.
"""

from __future__ import annotations

import functools

import keras

from tfseg.models import layers as L

NDIMS = (2, 3)
_ACT = "leaky_relu"


def min_divisor(depth: int = 5, **_) -> int:
    return 2 ** (depth - 1)


def build_improved_unet(
    input_shape,
    num_classes: int,
    *,
    depth: int = 5,
    base_filters: int = 16,
    dropout: float = 0.3,
    deep_supervision: bool = True,
    name: str = "improved_unet",
) -> keras.Model:
    """Builds the Improved U-Net.

    Args:
      input_shape: (H, W, C) or (D, H, W, C); spatial dims may be None.
      num_classes: classes including background; 2 gives one sigmoid channel.
      depth: number of resolution levels (the paper: 5, i.e. 4 downsamplings).
      base_filters: filters of the top level (the paper: 16), doubled at each level down.
      dropout: spatial dropout rate inside the context modules (the paper: 0.3).
      deep_supervision: sum the upsampled segmentation layers of the two levels above the output
        into the final segmentation (as the paper); False uses only the top level.

    Returns:
      A functional model: float32 (B, *spatial, C) -> float32 probabilities (B, *spatial, 1 or K).
    """
    if depth < 2:
        raise ValueError(f"improved_unet needs depth >= 2, got {depth}")
    ndim = len(input_shape) - 1
    ops = L.ops_for(ndim)

    inputs = L.image_input(input_shape)
    x = L.normalize_input(inputs, ndim)

    skips = []
    for level in range(depth):
        filters = base_filters * 2**level
        x = ops.conv(
            filters, 3, strides=1 if level == 0 else 2, padding="same", name=f"enc{level}_conv0"
        )(x)
        x = _context_module(x, filters, ops=ops, dropout=dropout, name=f"enc{level}")
        skips.append(x)

    # x is the bottom level's context output; climb back up.
    seg_levels = set(range(1, min(3, depth - 1)))  # deep-supervision levels (paper: 1 and 2)
    seg = None
    conv = functools.partial(L.conv_norm_act, ops=ops, norm="instance", activation=_ACT)
    for level in reversed(range(depth - 1)):
        filters = base_filters * 2**level
        x = ops.upsampling(2, name=f"dec{level}_upsample")(x)
        x = conv(x, filters, name=f"dec{level}_up")
        x = keras.layers.Concatenate(name=f"dec{level}_concat")([skips[level], x])
        x = conv(x, 2 * filters, name=f"dec{level}", index=1)
        if level > 0:  # localization module; the top level keeps its 3x3 conv only (as the paper)
            x = conv(x, filters, kernel_size=1, name=f"dec{level}", index=2)
        if level in seg_levels and deep_supervision:
            s = L.segmentation_head(x, num_classes, ops=ops, name=f"dec{level}_seg")
            if seg is not None:
                s = keras.layers.Add(dtype=L.HEAD_DTYPE, name=f"dec{level}_seg_sum")([seg, s])
            seg = ops.upsampling(2, dtype=L.HEAD_DTYPE, name=f"dec{level}_seg_up")(s)

    logits = L.segmentation_head(x, num_classes, ops=ops)
    if seg is not None:
        logits = keras.layers.Add(dtype=L.HEAD_DTYPE, name="logits_sum")([seg, logits])
    return keras.Model(inputs, L.probabilities(logits, num_classes), name=name)


def _context_module(x, filters: int, *, ops: L.SpatialOps, dropout: float, name: str):
    """Pre-activation residual block: x + conv(act(IN(drop(conv(act(IN(x))))))."""
    shortcut = x
    for i in (1, 2):
        x = L.normalization(x, "instance", name=f"{name}_in{i}")
        x = L.activation_layer(_ACT, name=f"{name}_{_ACT}{i}")(x)
        x = ops.conv(filters, 3, padding="same", name=f"{name}_conv{i}")(x)
        if i == 1 and dropout > 0:
            x = ops.spatial_dropout(dropout, name=f"{name}_dropout")(x)
    return keras.layers.Add(name=f"{name}_add")([shortcut, x])
