"""3D patch sampling with foreground oversampling, as tf.data graph code.

Training draws ``n`` patches from each decoded volume, so one decode pays for several patches. A
patch is centred on a random labelled voxel (a class id > 0 that is not the ignore index) with
probability ``foreground_fraction`` and placed uniformly otherwise; a volume without labelled
voxels gets uniform patches only. Centred patches are shifted inwards at the volume's borders
so they never leave it.

Validation takes one deterministic patch per volume, centred on the centre of the bounding box
of the labelled voxels (the volume's centre when it has none): validation loss and Dice then
watch the tumour rather than empty brain. Whole-volume scores come from sliding-window inference
at the evaluate stage, not from this patch.

Volumes smaller than the patch along an axis are padded evenly on both sides, the image with 0
(the mean of a z-scored volume) and the mask with the fill class (ignore index, or 0).
"""

from __future__ import annotations

import tensorflow as tf


def pad_to_patch(image, mask, patch_size, mask_fill: int):
    """Pads a volume so every axis is at least the patch size.

    Args:
      image: (D, H, W, C) float32.
      mask: (D, H, W, 1) uint8 (or any integer type).
      patch_size: (pd, ph, pw) Python ints.
      mask_fill: class id for padded voxels.

    Returns:
      image (D', H', W', C) and mask (D', H', W', 1), D' = max(D, pd) and so on.
    """
    shape = tf.shape(mask)[:3]
    need = tf.maximum(tf.constant(patch_size, tf.int32) - shape, 0)
    before = need // 2
    pads = tf.concat([tf.stack([before, need - before], axis=1), [[0, 0]]], axis=0)
    channels = image.shape[-1]
    image = tf.pad(image, pads, constant_values=0.0)
    mask = tf.pad(mask, pads, constant_values=mask_fill)
    image.set_shape([None, None, None, channels])
    return image, mask


def _foreground(mask, ignore_index):
    labelled = mask[..., 0] > 0
    if ignore_index is not None:
        labelled &= mask[..., 0] != ignore_index
    return tf.cast(tf.where(labelled), tf.int32)  # (N, 3) voxel coordinates


def _start_around(centre, shape, patch):
    return tf.clip_by_value(centre - patch // 2, 0, shape - patch)


def _slice(image, mask, start, patch_size):
    begin = tf.concat([start, [0]], axis=0)
    size = list(patch_size) + [-1]
    img = tf.slice(image, begin, size)
    msk = tf.slice(mask, begin, size)
    img.set_shape(list(patch_size) + [image.shape[-1]])
    msk.set_shape(list(patch_size) + [1])
    return img, msk


def sample_patches(image, mask, seed, *, patch_size, count, foreground_fraction, ignore_index, mask_fill):
    """Draws ``count`` training patches from one volume.

    Args:
      image: (D, H, W, C) float32 z-scored volume.
      mask: (D, H, W, 1) integer class ids.
      seed: (2,) int64, this volume's seed.
      patch_size: (pd, ph, pw) Python ints.
      count: patches per volume (Python int).
      foreground_fraction: probability that a patch is centred on a labelled voxel.
      ignore_index: the dataset's ignore index or None (ignored voxels are not foreground).
      mask_fill: class id for padding.

    Returns:
      images (count, pd, ph, pw, C) float32 and masks (count, pd, ph, pw, 1) of the mask's dtype.
    """
    image, mask = pad_to_patch(image, mask, patch_size, mask_fill)
    shape = tf.shape(mask)[:3]
    patch = tf.constant(patch_size, tf.int32)
    fg = _foreground(mask, ignore_index)
    n_fg = tf.shape(fg)[0]
    images, masks = [], []
    for s in tf.unstack(tf.random.experimental.stateless_split(seed, num=count)):
        s_coin, s_pick, s_uni = tf.unstack(tf.random.experimental.stateless_split(s, num=3))
        want_fg = tf.random.stateless_uniform((), s_coin) < foreground_fraction
        room = shape - patch + 1  # possible start positions per axis
        u = tf.random.stateless_uniform((3,), s_uni)
        uniform_start = tf.minimum(tf.cast(u * tf.cast(room, tf.float32), tf.int32), room - 1)

        def centred():
            i = tf.random.stateless_uniform((), s_pick, minval=0, maxval=n_fg, dtype=tf.int32)
            return _start_around(fg[i], shape, patch)

        start = tf.cond(want_fg & (n_fg > 0), centred, lambda: uniform_start)
        img, msk = _slice(image, mask, start, patch_size)
        images.append(img)
        masks.append(msk)
    return tf.stack(images), tf.stack(masks)


def validation_patch(image, mask, *, patch_size, ignore_index, mask_fill):
    """The deterministic validation patch: centred on the labelled voxels' bounding box.

    Args and shapes as :func:`sample_patches`, without the randomness.

    Returns:
      image (pd, ph, pw, C) float32 and mask (pd, ph, pw, 1) of the mask's dtype.
    """
    image, mask = pad_to_patch(image, mask, patch_size, mask_fill)
    shape = tf.shape(mask)[:3]
    patch = tf.constant(patch_size, tf.int32)
    fg = _foreground(mask, ignore_index)
    centre = tf.cond(
        tf.shape(fg)[0] > 0,
        lambda: (tf.reduce_min(fg, axis=0) + tf.reduce_max(fg, axis=0) + 1) // 2,
        lambda: shape // 2,
    )
    return _slice(image, mask, _start_around(centre, shape, patch), patch_size)
