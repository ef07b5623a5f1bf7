"""MobileNetV2 encoder with a pix2pix-style decoder (the Pascal VOC seed), 2D RGB only.

The encoder is ``keras.applications.MobileNetV2(include_top=False)``; skips are taken from its
expanded ReLU layers at strides 2, 4, 8 and 16 and from ``block_16_project`` at stride 32. Each
decoder step is a 3x3 transposed convolution (stride 2) -> BatchNorm -> ReLU, concatenated with
the next skip; a last transposed convolution returns to the input resolution. Inputs are 0..255
RGB, mapped to MobileNetV2's [-1, 1] inside the model. Spatial sizes must be divisible by 32.
"""

from __future__ import annotations

import os

import keras

from tfseg.models import layers as L
from tfseg.models.norm import FusedBatchNorm, fuse_batch_norm

NDIMS = (2,)
SKIP_LAYERS = (
    "block_1_expand_relu",  # stride 2
    "block_3_expand_relu",  # stride 4
    "block_6_expand_relu",  # stride 8
    "block_13_expand_relu",  # stride 16
    "block_16_project",  # stride 32
)


def min_divisor(**_) -> int:
    return 32


def build_mobilenetv2_unet(
    input_shape,
    num_classes: int,
    *,
    weights: str | None = None,
    alpha: float = 1.0,
    decoder_filters=(512, 256, 128, 64),
    trainable_encoder: bool = True,
    name: str = "mobilenetv2_unet",
) -> keras.Model:
    """Builds the MobileNetV2 U-Net.

    Args:
      input_shape: (H, W, 3); H and W may be None (only with ``weights`` None or a file).
      num_classes: classes including background; 2 gives one sigmoid channel.
      weights: None (random init), a local ``.h5``/``.weights.h5`` file of MobileNetV2 (no top)
        weights, or ``"imagenet"`` (downloads; needs internet).
      alpha: MobileNetV2 width multiplier.
      decoder_filters: filters of the four decoder steps, from stride 16 up to stride 2.
      trainable_encoder: False freezes the encoder (transfer learning's first phase).

    Returns:
      A functional model: float32 (B, H, W, 3) in 0..255 -> float32 probabilities (B, H, W, 1 or K).

    Raises:
      ValueError: not a 2D RGB input, a missing weights file, or a wrong ``decoder_filters``.
    """
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(
            f"mobilenetv2_unet takes 2D RGB inputs (H, W, 3), got input_shape {input_shape}"
        )
    if weights not in (None, "imagenet") and not os.path.isfile(weights):
        raise ValueError(f"mobilenetv2_unet: weights file {weights} not found")
    decoder_filters = tuple(int(f) for f in decoder_filters)
    if len(decoder_filters) != len(SKIP_LAYERS) - 1:
        raise ValueError(f"decoder_filters needs {len(SKIP_LAYERS) - 1} values, got {decoder_filters}")

    base = keras.applications.MobileNetV2(
        input_shape=input_shape, alpha=alpha, include_top=False, weights=weights
    )
    # The encoder's Keras BatchNormalization layers become FusedBatchNorm (same weights, same rule).
    base = fuse_batch_norm(base)
    encoder = keras.Model(
        base.input, [base.get_layer(n).output for n in SKIP_LAYERS], name="mobilenetv2_encoder"
    )
    encoder.trainable = trainable_encoder

    inputs = L.image_input(input_shape)
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalize")(inputs)
    *skips, x = encoder(x)

    for step, (filters, skip) in enumerate(zip(decoder_filters, reversed(skips))):
        x = keras.layers.Conv2DTranspose(
            filters, 3, strides=2, padding="same", use_bias=False, name=f"dec{step}_up"
        )(x)
        x = FusedBatchNorm(name=f"dec{step}_bn")(x)
        x = keras.layers.ReLU(name=f"dec{step}_relu")(x)
        x = keras.layers.Concatenate(name=f"dec{step}_concat")([x, skip])

    logits = keras.layers.Conv2DTranspose(
        L.output_channels(num_classes), 3, strides=2, padding="same", dtype=L.HEAD_DTYPE, name="logits"
    )(x)
    return keras.Model(inputs, L.probabilities(logits, num_classes), name=name)
