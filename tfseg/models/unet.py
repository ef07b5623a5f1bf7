"""U-Net (Ronneberger et al. 2015, arXiv 1505.04597), 2D or 3D from the input rank.

``same`` padding keeps the output the size of the input; the seeds' "simple 3D U-Net" (BraTS/MSD)
is the 3D instance. Spatial sizes must be divisible by ``2 ** depth``.
"""

from __future__ import annotations

import keras

from tfseg.models import layers as L

NDIMS = (2, 3)
# nnU-Net's cap on a 3D U-Net's filters (320): doubling 64 to 1024 at depth 4 made the bare 3D
# default 90 M parameters and each of its saved states 1.08 GB; capped, deeper levels stay at 320.
MAX_FILTERS_3D = 320


def min_divisor(depth: int = 4, **_) -> int:
    return 2**depth


def build_unet(
    input_shape,
    num_classes: int,
    *,
    depth: int = 4,
    base_filters: int = 64,
    batch_norm: bool = True,
    dropout: float = 0.0,
    upsampling: str = "transpose",
    max_filters: int | None = None,
    name: str = "unet",
) -> keras.Model:
    """Builds a U-Net.

    Args:
      input_shape: (H, W, C) or (D, H, W, C); spatial dims may be None.
      num_classes: classes including background; 2 gives one sigmoid channel.
      depth: number of 2x downsamplings.
      base_filters: filters of the first level, doubled at each level down.
      batch_norm: BatchNormalization after each convolution.
      dropout: spatial dropout rate after the deepest encoder level and the bottleneck
        (Ronneberger's "drop-out layers at the end of the contracting path").
      upsampling: ``"transpose"`` (2x2 transposed convolution) or ``"nearest"`` (upsampling then
        a 2x2 convolution).
      max_filters: no level has more filters than this; None: :data:`MAX_FILTERS_3D` in 3D (as
        nnU-Net), no cap in 2D (Ronneberger's doubling, which every 2D recipe here was tuned with).

    Returns:
      A functional model: float32 (B, *spatial, C) in the source range -> float32 probabilities
      (B, *spatial, 1 or K).
    """
    if upsampling not in ("transpose", "nearest"):
        raise ValueError(f"upsampling must be 'transpose' or 'nearest', got {upsampling!r}")
    ndim = len(input_shape) - 1
    ops = L.ops_for(ndim)
    norm = "batch" if batch_norm else None
    cap = max_filters if max_filters is not None else (MAX_FILTERS_3D if ndim == 3 else None)

    def width(level: int) -> int:
        return base_filters * 2**level if cap is None else min(base_filters * 2**level, cap)

    inputs = L.image_input(input_shape)
    x = L.normalize_input(inputs, ndim)

    skips = []
    for level in range(depth):
        filters = width(level)
        for i in (1, 2):
            x = L.conv_norm_act(x, filters, ops=ops, norm=norm, name=f"enc{level}", index=i)
        if dropout > 0 and level == depth - 1:
            x = ops.spatial_dropout(dropout, name=f"enc{level}_dropout")(x)
        skips.append(x)
        x = ops.max_pool(2, name=f"enc{level}_pool")(x)

    filters = width(depth)
    for i in (1, 2):
        x = L.conv_norm_act(x, filters, ops=ops, norm=norm, name="bottleneck", index=i)
    if dropout > 0:
        x = ops.spatial_dropout(dropout, name="bottleneck_dropout")(x)

    for level in reversed(range(depth)):
        filters = width(level)
        if upsampling == "transpose":
            x = ops.conv_transpose(filters, 2, strides=2, padding="same", name=f"dec{level}_up")(x)
        else:
            x = ops.upsampling(2, name=f"dec{level}_upsample")(x)
            x = ops.conv(filters, 2, padding="same", name=f"dec{level}_up")(x)
        x = keras.layers.Concatenate(name=f"dec{level}_concat")([skips[level], x])
        for i in (1, 2):
            x = L.conv_norm_act(x, filters, ops=ops, norm=norm, name=f"dec{level}", index=i)

    logits = L.segmentation_head(x, num_classes, ops=ops)
    return keras.Model(inputs, L.probabilities(logits, num_classes), name=name)
