"""Any input size for any model: pad up to a size the network takes, crop the output back.

A U-Net of depth d halves its feature maps d times, so it takes only sizes divisible by 2**d
(:func:`tfseg.models.min_divisor`). Instead of refusing other sizes, :func:`tfseg.models.build_model`
builds the network at the next multiple and wraps it::

    image (H, W, C) -> SpatialPad -> network (H', W', C) -> SpatialCrop -> probabilities (H, W, K)

with ``H' = ceil(H / m) * m``. The padding is split evenly between both sides of each axis (the
network sees the image centred, as nnU-Net centres its padded patches) and filled with 0: black
for 2D images (the value :func:`tfseg.inference.sliding_window` pads with), the mean of a z-scored
3D volume. Only the cropped output reaches the loss, so the padded border costs compute
(at most ``(m - 1) / H`` more per axis) and nothing else.

Why inside the model rather than in the input pipeline or by rounding the training size: the
saved model then takes exactly the size run.json records, so fit, evaluate (resize and tile),
export and the served graph need no change, and a dataset stored at 360x480 trains at 360x480
without resampling its masks. Both layers are registered, so ``model.keras`` loads anywhere tfseg
is imported.
"""

from __future__ import annotations

import math

import keras


def padded_size(size: int | None, multiple: int) -> int | None:
    """The smallest multiple of ``multiple`` >= ``size`` (None stays None)."""
    if size is None:
        return None
    return int(math.ceil(int(size) / multiple) * multiple)


def split_padding(size: int, target: int) -> tuple[int, int]:
    """(before, after) amounts that take ``size`` to ``target``, the odd pixel after."""
    total = int(target) - int(size)
    return total // 2, total - total // 2


@keras.saving.register_keras_serializable(package="tfseg")
class SpatialPad(keras.layers.Layer):
    """Pads the spatial axes of (B, *spatial, C) by ``padding`` = ((before, after), ...) with 0."""

    def __init__(self, padding, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.padding = tuple((int(a), int(b)) for a, b in padding)

    def call(self, x):
        return keras.ops.pad(x, ((0, 0),) + self.padding + ((0, 0),))

    def compute_output_shape(self, input_shape):
        spatial = [None if s is None else s + a + b for s, (a, b) in zip(input_shape[1:-1], self.padding)]
        return (input_shape[0], *spatial, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "padding": [list(p) for p in self.padding]}


@keras.saving.register_keras_serializable(package="tfseg")
class SpatialCrop(keras.layers.Layer):
    """Removes ``cropping`` = ((before, after), ...) from the spatial axes of (B, *spatial, C)."""

    def __init__(self, cropping, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.cropping = tuple((int(a), int(b)) for a, b in cropping)

    def call(self, x):
        index = [slice(None)]
        for a, b in self.cropping:
            index.append(slice(a, -b if b else None))
        index.append(slice(None))
        return x[tuple(index)]

    def compute_output_shape(self, input_shape):
        spatial = [None if s is None else s - a - b for s, (a, b) in zip(input_shape[1:-1], self.cropping)]
        return (input_shape[0], *spatial, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "cropping": [list(p) for p in self.cropping]}


def wrap(build, input_shape, multiple: int):
    """``build(shape)`` at the padded size, wrapped to take and return ``input_shape``'s size.

    Returns the plain ``build(input_shape)`` when every known spatial size is already a multiple.
    """
    spatial = tuple(input_shape[:-1])
    target = tuple(padded_size(s, multiple) for s in spatial)
    if target == spatial:
        return build(tuple(input_shape))
    inner = build(target + (input_shape[-1],))
    pads = tuple((0, 0) if s is None else split_padding(s, t) for s, t in zip(spatial, target))
    inputs = keras.Input(shape=tuple(input_shape), dtype="float32", name="image")
    x = SpatialPad(pads, name="fit_pad")(inputs)
    x = inner(x)
    out = SpatialCrop(pads, name="fit_crop")(x)
    return keras.Model(inputs, out, name=f"{inner.name}_padded")
