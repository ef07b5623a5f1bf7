"""3D preprocessing, one record from conversion to inference (no dataset layout's code).

Conversion (the brain tumour layouts today) turns a NIfTI volume into a record by:

1. reorienting to the closest canonical orientation, RAS+ (nibabel ``as_closest_canonical``);
2. ordering the channels as the dataset's ``modalities`` (``source_channels[i]`` is the source
   file's channel of modality i: MSD's task dataset.json may list them in another order);
3. transposing to tfseg's model axes (D, H, W, C) = (inferior->superior, anterior->posterior,
   left->right, channel): :func:`ras_to_model_axes`;
4. cropping to the bounding box of nonzero voxels (records only: inference keeps the whole
   volume and writes the mask back in the source's orientation and affine);
5. z-scoring each channel over its own nonzero voxels, the background left at 0
   (:func:`zscore_nonzero`).

:func:`volume_record` is that list as dataset.json's ``preprocessing``; fit copies it into
run.json and export into tfseg.json (:class:`tfseg.rundir.RunInfo`), and
:func:`read_volume` applies it to a NIfTI file for ``tfseg predict``, so a volume is predicted
exactly as the records the model was evaluated on were made.
"""

from __future__ import annotations

import numpy as np

ORIENTATION = "RAS+"
AXES = "D=inferior->superior, H=anterior->posterior, W=left->right, C=channel"
NORMALIZATION = "zscore_nonzero_per_channel"


def volume_record(channels, source_channels=None) -> dict:
    """dataset.json's ``preprocessing`` for 3D records.

    Args:
      channels: the record's channel names, in order.
      source_channels: for each of them, its channel index in a source file holding all of
        them (a 4D NIfTI); None when they are in that order.
    """
    n = len(channels)
    order = list(range(n)) if source_channels is None else [int(i) for i in source_channels]
    if sorted(order) != list(range(n)):
        raise ValueError(f"source_channels {order} is not a permutation of 0..{n - 1}")
    return {"orientation": ORIENTATION, "axes": AXES, "channels": list(channels),
            "source_channels": order, "crop": "nonzero bounding box (records only)",
            "normalization": NORMALIZATION}


def ras_to_model_axes(array: np.ndarray) -> np.ndarray:
    """RAS+ (x, y, z, ...) -> tfseg's (D, H, W, ...) = (z, flipped y, x, ...); trailing axes kept."""
    axes = (2, 1, 0, *range(3, array.ndim))
    return array.transpose(axes)[:, ::-1]


def model_axes_to_ras(array: np.ndarray) -> np.ndarray:
    """The inverse of :func:`ras_to_model_axes`."""
    axes = (2, 1, 0, *range(3, array.ndim))
    return array[:, ::-1].transpose(axes)


def zscore_nonzero(volume: np.ndarray) -> np.ndarray:
    """Z-scores each channel of (..., C) over its own nonzero voxels, in place; 0 stays 0."""
    for c in range(volume.shape[-1]):
        channel = volume[..., c]
        inside = channel != 0
        if not inside.any():
            continue
        values = channel[inside].astype(np.float64)
        std = values.std()
        channel[inside] = (values - values.mean()) / (std if std > 1e-8 else 1.0)
    return volume


def apply_record(ras: np.ndarray, record: dict | None) -> np.ndarray:
    """A canonical (RAS+) (X, Y, Z, C) array as the model takes it: channel order, model axes,
    normalization (no crop). An empty record means the defaults above with channels in order."""
    record = record or {}
    order = record.get("source_channels")
    if order is not None:
        if len(order) != ras.shape[-1]:
            raise ValueError(f"the volume has {ras.shape[-1]} channels, the record {len(order)}")
        ras = ras[..., list(order)]
    volume = np.array(ras_to_model_axes(ras), dtype=np.float32)  # a contiguous copy
    normalization = record.get("normalization", NORMALIZATION)
    if normalization == NORMALIZATION:
        zscore_nonzero(volume)
    elif normalization not in (None, "", "none"):
        raise ValueError(f"unknown normalization {normalization!r}")
    return volume


def read_volume(path: str, channels: int, record: dict | None = None):
    """A 4D (or single-channel 3D) NIfTI as the model takes it, and the image to write back to.

    Returns:
      ((D, H, W, C) float32, the nibabel image as loaded).

    Raises:
      ValueError: unreadable file or a shape the model cannot take.
    """
    import nibabel as nib

    from tfseg.io import fs

    try:
        with fs.local_copy(path) as local:  # nibabel reads local files
            img = nib.load(local)
            data = np.asarray(nib.as_closest_canonical(img).dataobj, dtype=np.float32)
            if local != path:  # the copy goes on exit: the image keeps its array, not the file
                img = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)
    except Exception as e:  # nibabel raises many types for broken files
        raise ValueError(f"cannot read NIfTI ({type(e).__name__}: {e})") from None
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4 or data.shape[-1] != channels:
        raise ValueError(f"volume shape {data.shape}: the model needs (X, Y, Z, {channels})")
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        # A NaN reaches every statistic and the z-score: the mask came out all background.
        raise ValueError(f"{bad} of {data.size} voxels are NaN or infinite; tfseg does not guess values for them "
                         "(replace them, e.g. by 0 outside the brain, and predict again)")
    return apply_record(data, record), img


def write_mask(path: str, mask: np.ndarray, like) -> None:
    """Writes a (D, H, W) mask in model axes as NIfTI in ``like``'s orientation and affine."""
    import nibabel as nib
    from nibabel import orientations as ornt

    canonical = nib.as_closest_canonical(like)
    out = nib.Nifti1Image(np.ascontiguousarray(model_axes_to_ras(mask.astype(np.uint8))), canonical.affine)
    out = out.as_reoriented(ornt.ornt_transform(ornt.io_orientation(canonical.affine), ornt.io_orientation(like.affine)))
    out = nib.Nifti1Image(np.asarray(out.dataobj), like.affine)
    out.set_qform(like.affine)
    out.set_sform(like.affine)
    nib.save(out, path)


def apply_record_tf(ras, record: dict | None):
    """:func:`apply_record` as TensorFlow ops, for the export graph: a canonical (X, Y, Z, C)
    float32 tensor -> the (D, H, W, C) volume the model takes (statistics in float64, as numpy)."""
    import tensorflow as tf

    record = record or {}
    ras = tf.convert_to_tensor(ras, tf.float32)
    order = record.get("source_channels")
    if order is not None:
        ras = tf.gather(ras, list(order), axis=-1)
    volume = tf.reverse(tf.transpose(ras, [2, 1, 0, 3]), axis=[1])
    normalization = record.get("normalization", NORMALIZATION)
    if normalization in (None, "", "none"):
        return volume
    if normalization != NORMALIZATION:
        raise ValueError(f"unknown normalization {normalization!r}")
    x = tf.cast(volume, tf.float64)
    inside = tf.cast(tf.not_equal(x, 0.0), tf.float64)
    count = tf.reduce_sum(inside, axis=[0, 1, 2])
    mean = tf.math.divide_no_nan(tf.reduce_sum(x * inside, axis=[0, 1, 2]), count)
    var = tf.math.divide_no_nan(tf.reduce_sum(tf.square((x - mean) * inside), axis=[0, 1, 2]), count)
    std = tf.sqrt(var)
    std = tf.where(std > 1e-8, std, tf.ones_like(std))
    return tf.cast(tf.where(inside > 0, (x - mean) / std, tf.zeros_like(x)), tf.float32)


def model_axes_to_ras_tf(array):
    """:func:`model_axes_to_ras` for a (D, H, W, ...) tensor."""
    import tensorflow as tf

    array = tf.convert_to_tensor(array)
    rank = array.shape.rank
    return tf.transpose(tf.reverse(array, axis=[1]), [2, 1, 0, *range(3, rank)])
