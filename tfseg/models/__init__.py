"""tfseg's segmentation models: a registry of builders and :func:`build_model`.

Every model is a functional ``keras.Model`` following the I/O contract of :mod:`tfseg.rundir`:
float32 input in the source value range (2D 0..255, 3D z-scored) with normalization inside the
model; float32 probabilities out, (B, *spatial, 1) sigmoid when ``num_classes == 2`` else
(B, *spatial, K) softmax. The logits layer and everything after it run in float32, so the models
can be built under a mixed precision policy.

Importing this package also registers tfseg's custom losses and metrics for ``.keras`` loading.

Example::

    model = build_model("unet", input_shape=(256, 256, 3), num_classes=2, base_filters=32)
"""

from __future__ import annotations

import dataclasses
from typing import Callable

# padding too: its layers wrap any model whose size the network cannot take, and must be known
# when a .keras file is loaded in a process that built no model.
from tfseg.models import dense_unet, improved_unet, mobilenetv2_unet, padding, unet


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered architecture.

    Attributes:
      build: ``build(input_shape, num_classes, **kwargs) -> keras.Model``.
      min_divisor: ``min_divisor(**kwargs) -> int``, the factor spatial sizes must be divisible by.
      ndims: the spatial ranks the architecture supports (2, 3).
    """

    build: Callable
    min_divisor: Callable
    ndims: tuple


MODELS: dict[str, ModelSpec] = {
    "unet": ModelSpec(unet.build_unet, unet.min_divisor, unet.NDIMS),
    "improved_unet": ModelSpec(
        improved_unet.build_improved_unet, improved_unet.min_divisor, improved_unet.NDIMS
    ),
    "mobilenetv2_unet": ModelSpec(
        mobilenetv2_unet.build_mobilenetv2_unet, mobilenetv2_unet.min_divisor, mobilenetv2_unet.NDIMS
    ),
    "dense_unet": ModelSpec(dense_unet.build_dense_unet, dense_unet.min_divisor, dense_unet.NDIMS),
}


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[name]


def min_divisor(name: str, **kwargs) -> int:
    """The factor every spatial size must be divisible by, for model ``name`` built with ``kwargs``.

    Raises:
      ValueError: unknown model name.
    """
    return int(_spec(name).min_divisor(**kwargs))


def check_input_shape(name: str, input_shape, **kwargs) -> None:
    """Raises ValueError when model ``name`` cannot take ``input_shape`` ((H, W, C) or (D, H, W, C)).

    Checks the rank against the architecture, the channel count and that each known spatial size
    is positive; sizes that are not multiples of :func:`min_divisor` are padded inside the model
    (:func:`network_shape`). None sizes are left to run time.
    """
    spec = _spec(name)
    input_shape = tuple(input_shape)
    ndim = len(input_shape) - 1
    if ndim not in spec.ndims:
        dims = " or ".join(f"{d}D" for d in spec.ndims)
        raise ValueError(f"model {name} takes {dims} inputs, got input_shape {input_shape} ({ndim}D)")
    if input_shape[-1] is None:
        raise ValueError(f"model {name}: the channel count of input_shape {input_shape} must be known")
    for size in input_shape[:-1]:
        if size is not None and int(size) <= 0:
            raise ValueError(f"model {name} cannot take spatial size {size} (input_shape {input_shape})")


def network_shape(name: str, input_shape, **kwargs) -> tuple:
    """The spatial size the network of model ``name`` runs at for ``input_shape``'s spatial size.

    Each known size rounded up to a multiple of :func:`min_divisor`; :func:`build_model` pads
    inputs of other sizes up to it inside the model and crops the output back
    (:mod:`tfseg.models.padding`).
    """
    from tfseg.models.padding import padded_size

    divisor = min_divisor(name, **kwargs)
    return tuple(padded_size(s, divisor) for s in tuple(input_shape)[:-1])


def build_model(name: str, *, input_shape, num_classes: int, **kwargs):
    """Builds a registered model.

    Args:
      name: one of :data:`MODELS` (``unet``, ``improved_unet``, ``mobilenetv2_unet``, ``dense_unet``).
      input_shape: (H, W, C) for 2D or (D, H, W, C) for 3D; spatial sizes may be None.
      num_classes: classes including background (2 for binary tasks: one sigmoid channel).
      **kwargs: the builder's options (``depth``, ``base_filters``, ...); see each module.

    Returns:
      A functional ``keras.Model`` built under the current dtype policy.

    Raises:
      ValueError: unknown name, unsupported rank, a non-positive spatial size, or
        ``num_classes < 2``. A spatial size not divisible by :func:`min_divisor` is padded up to
        the next multiple inside the model and the output cropped back to it
        (:mod:`tfseg.models.padding`): the model takes and returns exactly ``input_shape``'s size.
    """
    check_input_shape(name, input_shape, **kwargs)
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}")

    spec = _spec(name)
    return padding.wrap(lambda shape: spec.build(shape, int(num_classes), **kwargs), tuple(input_shape),
                        min_divisor(name, **kwargs))


# Registers the custom Keras objects so models compiled with them load from .keras files.
from tfseg import losses as _losses  # noqa: E402,F401
from tfseg import metrics as _metrics  # noqa: E402,F401

__all__ = ["MODELS", "ModelSpec", "build_model", "check_input_shape", "min_divisor", "network_shape"]
