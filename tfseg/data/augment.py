"""Mask-consistent augmentation for tf.data, run on the CPU.

Every random draw is a stateless op keyed by a per-example seed (a ``(2,)`` int64 tensor), so a
pipeline built with the same ``seed`` replays the same augmentations.

2D keys of the ``augment`` dict (all optional; missing or zero means off):

==============  ==========================================================================
``hflip``       probability of a left-right flip (``true`` means 0.5)
``vflip``       probability of an up-down flip (``true`` means 0.5)
``rotate``      maximum rotation in degrees; the angle is uniform in [-rotate, rotate]
``shift``       maximum translation as a fraction of height/width, uniform per axis
``scale``       zoom range ``[lo, hi]`` (or ``a`` for [1-a, 1+a]); > 1 magnifies the content
``brightness``  maximum additive change as a fraction of 255, uniform in [-b, b]
``contrast``    contrast factor uniform in [1-c, 1+c] around each channel's mean
``hue``         maximum hue shift (fraction of the colour wheel, <= 0.5); RGB only
``saturation``  saturation factor uniform in [1-s, 1+s]; RGB only
``noise``       maximum Gaussian noise std in 0..255 units; the std is uniform in [0, noise],
                one draw per pixel shared by the channels
``blur``        probability of an averaging (box) blur of ``blur_kernel`` pixels (default 3)
``crop``        ``[h, w]`` (or ``"hxw"``): train on random h x w windows of the example at the
                model's size (``image_size``) instead of the whole of it, so a training step costs
                the crop's pixels while the model learns the scale it runs at in validation,
                evaluation and serving (a fully convolutional model takes both sizes)
==============  ==========================================================================

Flips, rotation, shift, zoom and the resize to the model's size are one affine map, applied with
``ImageProjectiveTransformV3`` (bilinear for the image, nearest for the mask) so the image is
interpolated once and the mask gets exactly the same geometry. Pixels that the transform pulls
from outside the source are filled with 0 in the image and with the dataset's ignore index in the
mask; a dataset without an ignore index gets class 0 (background) there, because the losses only
know how to skip pixels when an ignore index exists, and a black border is background-like.

3D keys (patches, see :mod:`tfseg.data.patches`):

===================  =====================================================================
``flip3d``           probability of a flip along each of D, H, W independently (``true``: 0.5)
``rot90``            probability of a rotation by a random multiple of 90 degrees in the H-W
                     plane (``true``: 0.5); only 180 degrees when the patch is not square in H-W
``intensity``        shorthand for ``intensity_scale`` and ``intensity_shift`` of the same value
``intensity_scale``  per-channel factor uniform in [1-a, 1+a]
``intensity_shift``  per-channel offset uniform in [-a, a] (z-score units)
``noise``            maximum Gaussian noise std (z-score units), shared by the channels
===================  =====================================================================
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from tfseg.config import StageConfig, coerce_field, setting
from tfseg.errors import TfsegError


def _probability(value):
    """``true`` means 0.5 for the probabilities of a flip, a rotation or a blur."""
    return (0.5 if value else 0.0) if isinstance(value, bool) else value


def _scale(value) -> tuple:
    """``[lo, hi]``, or ``a`` for ``[1 - a, 1 + a]`` (0 or 1: no zoom)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise TfsegError(f"expected [lo, hi], got {value!r}")
        lo, hi = (coerce_field("scale", v, float, what="augment") for v in value)
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 1e-3 or lo > hi:
            raise TfsegError(f"expected 0.001 <= lo <= hi, got {value!r}")
        return lo, hi
    a = coerce_field("scale", value, float, what="augment")
    if a in (0.0, 1.0):
        return 1.0, 1.0
    if not 0 < a <= 0.999:
        raise TfsegError(f"expected a in (0, 0.999] for [1 - a, 1 + a], or [lo, hi]; got {value!r}")
    return 1.0 - a, 1.0 + a


def _crop(value) -> tuple:
    from tfseg.config import parse_size

    try:
        return parse_size(value, 2)
    except (TfsegError, ValueError, TypeError):
        raise TfsegError(f"expected [h, w] or \"hxw\", got {value!r}") from None


@dataclasses.dataclass(frozen=True)
class Augment2D(StageConfig):
    """Validated 2D augmentation settings (see the module docstring for meanings)."""

    WHAT = "augment"

    hflip: float = setting(0.0, at_least=0, at_most=1, parse=_probability)
    vflip: float = setting(0.0, at_least=0, at_most=1, parse=_probability)
    rotate: float = setting(0.0, at_least=0, at_most=180)
    shift: float = setting(0.0, at_least=0, at_most=1)
    scale: tuple[float, float] = setting((1.0, 1.0), parse=_scale)
    brightness: float = setting(0.0, at_least=0, at_most=1)
    contrast: float = setting(0.0, at_least=0, at_most=1)
    hue: float = setting(0.0, at_least=0, at_most=0.5)
    saturation: float = setting(0.0, at_least=0, at_most=1)
    noise: float = setting(0.0, at_least=0, at_most=255)
    blur: float = setting(0.0, at_least=0, at_most=1, parse=_probability)
    blur_kernel: int = setting(3, at_least=3, at_most=63, note="odd")
    crop: tuple[int, int] | None = setting(None, parse=_crop)

    def validate(self) -> None:
        if self.blur_kernel % 2 == 0:
            raise TfsegError(f"augment: blur_kernel must be odd, got {self.blur_kernel}")

    @property
    def geometric(self) -> bool:
        return bool(self.hflip or self.vflip or self.rotate or self.shift or self.scale != (1.0, 1.0)
                    or self.crop)


@dataclasses.dataclass(frozen=True)
class Augment3D(StageConfig):
    """Validated 3D augmentation settings (see the module docstring for meanings)."""

    WHAT = "augment"

    flip3d: float = setting(0.0, at_least=0, at_most=1, parse=_probability)
    rot90: float = setting(0.0, at_least=0, at_most=1, parse=_probability)
    intensity_scale: float = setting(0.0, at_least=0, at_most=1)
    intensity_shift: float = setting(0.0, at_least=0)
    noise: float = setting(0.0, at_least=0)


_KEYS_2D = [f.name for f in dataclasses.fields(Augment2D)]
_KEYS_3D = [f.name for f in dataclasses.fields(Augment3D)] + ["intensity"]


def parse_augment(augment: dict | None, *, ndim: int, channels: int) -> Augment2D | Augment3D | None:
    """Validates an ``augment`` dict from a config.

    Args:
      augment: the mapping (keys in the module docstring) or None / {} for no augmentation.
      ndim: 2 or 3, from dataset.json.
      channels: image channels, from dataset.json (hue and saturation need 3).

    Returns:
      Augment2D or Augment3D, or None when nothing is switched on.

    Raises:
      TfsegError: an unknown key, a key of the other dimensionality, or a value out of range.
    """
    if not augment:
        return None
    if not isinstance(augment, dict):
        raise TfsegError(f"augment: expected a mapping of options, got {type(augment).__name__}")
    valid = _KEYS_2D if ndim == 2 else _KEYS_3D
    for key in augment:
        if key not in valid:
            raise TfsegError(f"augment.{key}: not a {ndim}D augmentation (valid keys: {', '.join(valid)})")
    if ndim == 3:
        a = dict(augment)
        both = a.pop("intensity", None)
        if both is not None:
            a.setdefault("intensity_scale", both)
            a.setdefault("intensity_shift", both)
        out3 = Augment3D.from_dict(a)
        return out3 if out3 != Augment3D() else None
    out = Augment2D.from_dict(dict(augment))
    if (out.hue or out.saturation) and channels != 3:
        raise TfsegError(f"augment.hue/saturation: need RGB images, this dataset has {channels} channel(s)")
    return out if out != Augment2D(blur_kernel=out.blur_kernel) else None


# --------------------------------------------------------------------------------------------
# 2D geometry
# --------------------------------------------------------------------------------------------


def affine_transform(
    in_hw, out_hw, *, flip_x=1.0, flip_y=1.0, angle=0.0, zoom=1.0, shift_x=0.0, shift_y=0.0, base_hw=None
):
    """The ``ImageProjectiveTransformV3`` row for augment-then-resize, as one map.

    The augmentation acts on the source image about its centre (in source pixels, so a rotation
    is a true rotation even when the resize changes the aspect ratio): flip, zoom, rotate, then
    shift; the arithmetic is :func:`tfseg.preprocess.affine_row`.

    Args:
      in_hw: (2,) source height and width (int or float tensor / sequence).
      out_hw: (2,) output height and width.
      flip_x, flip_y: -1.0 to flip along width / height, 1.0 otherwise.
      angle: rotation in radians.
      zoom: magnification (> 1 enlarges the content).
      shift_x, shift_y: translation in source pixels.
      base_hw: the size the source is resized to when the output is a window of it (a crop);
        None: ``out_hw`` (the whole image). The window is centred; shifts move it.

    Returns:
      (8,) float32: output pixel (x, y) samples source pixel
      (a0 x + a1 y + a2, b0 x + b1 y + b2).
    """
    from tfseg.preprocess import affine_row

    f32 = lambda v: tf.cast(v, tf.float32)  # noqa: E731
    base = None if base_hw is None else (f32(base_hw[0]), f32(base_hw[1]))
    angle, zoom = f32(angle), f32(zoom)
    row = affine_row((f32(in_hw[0]), f32(in_hw[1])), (f32(out_hw[0]), f32(out_hw[1])), flip_x=f32(flip_x),
                     flip_y=f32(flip_y), cos=tf.cos(angle), sin=tf.sin(angle), zoom=zoom,
                     shift_x=f32(shift_x), shift_y=f32(shift_y), base_hw=base)
    zero = tf.zeros_like(row[0])
    return tf.stack([*row, zero, zero])


def warp(image, mask, transform, out_hw, mask_fill: int):
    """Applies one transform row to an image (bilinear, fill 0) and its mask (nearest).

    Args:
      image: (H, W, C) float32.
      mask: (H, W, 1) uint8 or int32.
      transform: (8,) float32 from :func:`affine_transform`.
      out_hw: (2,) int32 output height and width.
      mask_fill: the class id written where the source has no pixel.

    Returns:
      image (h, w, C) float32 and mask (h, w, 1) of the mask's dtype.
    """
    out_hw = tf.cast(out_hw, tf.int32)
    row = tf.reshape(tf.cast(transform, tf.float32), [1, 8])
    img = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=row, output_shape=out_hw, fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT",
    )[0]
    msk = tf.raw_ops.ImageProjectiveTransformV3(
        images=mask[None], transforms=row, output_shape=out_hw, fill_value=float(mask_fill),
        interpolation="NEAREST", fill_mode="CONSTANT",
    )[0]
    return img, msk


def _uniform(seed, lo, hi, shape=()):
    return tf.random.stateless_uniform(shape, seed=seed, minval=lo, maxval=hi)


def augment_2d(image, mask, seed, cfg: Augment2D, out_hw, mask_fill: int):
    """Augments one 2D example and resizes it to ``out_hw``.

    Args:
      image: (H, W, C) uint8 or float32 in 0..255.
      mask: (H, W, 1) uint8 or int32 class ids.
      seed: (2,) int64, this example's seed.
      cfg: the settings.
      out_hw: (2,) output height and width (the model size, or the input size); with
        ``cfg.crop`` the size the crop is taken from, and the output is the crop.
      mask_fill: class id for pixels with no source (the ignore index, or 0).

    Returns:
      image (h, w, C) float32 clipped to 0..255 and mask (h, w, 1) int32.
    """
    seeds = tf.random.experimental.stateless_split(seed, num=12)
    image = tf.cast(image, tf.float32)
    in_hw = tf.shape(image)[:2]
    if cfg.geometric:
        sign = lambda p, s: tf.where(_uniform(s, 0.0, 1.0) < p, -1.0, 1.0)  # noqa: E731
        lo, hi = cfg.scale
        base_hw = None
        crop_x = crop_y = 0.0
        if cfg.crop:
            # A window of the example at out_hw: a shift of up to half the margin, in source pixels.
            base_hw, out_hw = out_hw, tf.constant(cfg.crop, tf.int32)
            margin = tf.cast(base_hw, tf.float32) - tf.cast(out_hw, tf.float32)
            scale_hw = tf.cast(in_hw, tf.float32) / tf.cast(base_hw, tf.float32)
            crop_seed = tf.random.experimental.stateless_fold_in(seed, 12)  # the 12 draws above keep theirs
            crop_y, crop_x = tf.unstack(
                tf.random.stateless_uniform([2], seed=crop_seed, minval=-0.5, maxval=0.5) * margin * scale_hw)
        transform = affine_transform(
            in_hw, out_hw,
            flip_x=sign(cfg.hflip, seeds[0]),
            flip_y=sign(cfg.vflip, seeds[1]),
            angle=_uniform(seeds[2], -cfg.rotate, cfg.rotate) * (math.pi / 180.0),
            # Log-uniform so a range like [0.5, 2] zooms in and out equally often.
            zoom=tf.exp(_uniform(seeds[3], math.log(lo), math.log(hi) + 1e-12)),
            shift_x=_uniform(seeds[4], -cfg.shift, cfg.shift) * tf.cast(in_hw[1], tf.float32) + crop_x,
            shift_y=_uniform(seeds[5], -cfg.shift, cfg.shift) * tf.cast(in_hw[0], tf.float32) + crop_y,
            base_hw=base_hw,
        )
        image, mask = warp(image, mask, transform, out_hw, mask_fill)
    else:
        image, mask = resize(image, mask, out_hw)

    if cfg.brightness:
        image = image + _uniform(seeds[6], -cfg.brightness, cfg.brightness) * 255.0
    if cfg.contrast:
        mean = tf.reduce_mean(image, axis=[0, 1], keepdims=True)
        image = (image - mean) * _uniform(seeds[7], 1.0 - cfg.contrast, 1.0 + cfg.contrast) + mean
    if cfg.hue or cfg.saturation:
        rgb = tf.clip_by_value(image, 0.0, 255.0) / 255.0
        if cfg.hue:
            rgb = tf.image.adjust_hue(rgb, _uniform(seeds[8], -cfg.hue, cfg.hue))
        if cfg.saturation:
            rgb = tf.image.adjust_saturation(rgb, _uniform(seeds[9], 1.0 - cfg.saturation, 1.0 + cfg.saturation))
        image = rgb * 255.0
    image = tf.clip_by_value(image, 0.0, 255.0)
    if cfg.blur:
        k = cfg.blur_kernel
        # avg_pool with SAME padding averages only the valid pixels, so edges do not darken.
        image = tf.cond(
            _uniform(seeds[10], 0.0, 1.0) < cfg.blur,
            lambda: tf.nn.avg_pool2d(image[None], k, 1, "SAME")[0],
            lambda: image,
        )
    if cfg.noise:
        s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seeds[11], num=2))
        std = _uniform(s1, 0.0, cfg.noise)
        # One draw per pixel, shared by the channels (imgaug's default): a third of the cost.
        noise = tf.random.stateless_normal(tf.shape(image[..., :1]), s2) * std
        image = tf.clip_by_value(image + noise, 0.0, 255.0)
    return image, tf.cast(mask, tf.int32)


def resize(image, mask, out_hw):
    """Resizes an image (bilinear) and its mask (nearest) to ``out_hw``; a no-op at equal size.

    Args:
      image: (H, W, C) uint8 or float32.
      mask: (H, W, 1) uint8 or int32.
      out_hw: (2,) int sequence or tensor.

    Returns:
      image (h, w, C) float32 and mask (h, w, 1) int32.
    """
    from tfseg import preprocess  # the one 2D resize definition (evaluation, inference, serving)

    return preprocess.to_model_size(image, out_hw), tf.cast(preprocess.resize_mask(mask, out_hw), tf.int32)


# --------------------------------------------------------------------------------------------
# 3D
# --------------------------------------------------------------------------------------------


def augment_3d(image, mask, seed, cfg: Augment3D):
    """Augments one 3D patch: flips, 90-degree H-W rotations, intensity scale/shift, noise.

    Args:
      image: (D, H, W, C) float32 z-scored, static shape.
      mask: (D, H, W, 1) integer class ids.
      seed: (2,) int64.
      cfg: the settings.

    Returns:
      image and mask of the same shapes.
    """
    seeds = tf.random.experimental.stateless_split(seed, num=8)
    if cfg.flip3d:
        for axis in range(3):
            flip = _uniform(seeds[axis], 0.0, 1.0) < cfg.flip3d
            image, mask = tf.cond(
                flip,
                lambda: (tf.reverse(image, [axis]), tf.reverse(mask, [axis])),
                lambda: (image, mask),
            )
    if cfg.rot90:
        h, w = image.shape[1], image.shape[2]
        if h is not None and h == w:
            k = tf.random.stateless_uniform((), seeds[4], minval=1, maxval=4, dtype=tf.int32)
        else:
            k = tf.constant(2, tf.int32)  # a quarter turn would change the patch shape
        k = tf.where(_uniform(seeds[3], 0.0, 1.0) < cfg.rot90, k, 0)
        # rot90 turns dims 1, 2 of a 4D tensor: D acts as the batch here.
        shape_i, shape_m = image.shape, mask.shape
        image = tf.image.rot90(image, k)
        mask = tf.image.rot90(mask, k)
        # Square H-W or a half turn: the shape is unchanged, which rot90 cannot know from a tensor k.
        image.set_shape(shape_i)
        mask.set_shape(shape_m)
    channels = tf.shape(image)[-1:]
    if cfg.intensity_scale:
        a = cfg.intensity_scale
        image = image * _uniform(seeds[5], 1.0 - a, 1.0 + a, channels)
    if cfg.intensity_shift:
        a = cfg.intensity_shift
        image = image + _uniform(seeds[6], -a, a, channels)
    if cfg.noise:
        s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seeds[7], num=2))
        image = image + tf.random.stateless_normal(tf.shape(image[..., :1]), s2) * _uniform(s1, 0.0, cfg.noise)
    return image, mask
