"""The tf.data input pipeline: converted shards in, model-sized batches out.

2D::

    shards -> shuffle files -> interleave(TFRecordDataset) -> decode -> [cache] -> shuffle -> repeat
      -> augment + resize to image_size (one affine warp) -> batch -> prefetch

3D::

    shards -> shuffle files -> interleave -> decode -> [cache -> shuffle volumes] -> repeat
      -> n patches per volume (foreground oversampling) -> unbatch -> shuffle patches
      -> augment -> batch -> prefetch

Shuffling, augmentation and patch placement only happen when ``training``. Every random choice
is a stateless op keyed by a per-example seed drawn from ``tf.data.Dataset.random(seed)``, which
draws new values on every pass over the data (so epochs differ) but the same sequence each time
a pipeline is built with the same seed; with ``deterministic=True`` the element order is fixed
too, so two pipelines built alike yield identical batches.

Records without a mask (unlabelled cases) are skipped.
"""

from __future__ import annotations

import logging
import os
import re

import tensorflow as tf

from tfseg import schema
from tfseg.config import parse_size
from tfseg.data import augment as aug
from tfseg.data import patches
from tfseg.errors import TfsegError

logger = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
DEFAULT_PATCH_SIZE = (64, 64, 64)


def mask_fill_value(info: schema.DatasetInfo) -> int:
    """The class id written into padded pixels: the ignore index, or 0 (background) without one."""
    return int(info.ignore_index) if info.ignore_index is not None else 0


def _shard_files(info: schema.DatasetInfo, data_dir: str, split: str) -> list[str]:
    files = info.split_files(split, data_dir)
    if not files:
        raise TfsegError(f"{os.path.join(data_dir, schema.DATASET_JSON)}: split {split!r} has no files")
    for f in files:
        if not tf.io.gfile.exists(f):
            raise TfsegError(f"{f}: shard listed in dataset.json is missing")
    return files


def _records(files, info, *, shuffle: bool, seed, deterministic: bool):
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle and len(files) > 1:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    # 3D records are tens of MB each: read fewer shards at once to bound the buffered bytes.
    cycle = min(len(files), 8 if info.ndim == 2 else 4)
    return ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type=info.compression or ""),
        cycle_length=cycle,
        block_length=1,
        num_parallel_calls=AUTOTUNE,
        deterministic=deterministic,
    )


def _decoded(files, info, *, shuffle, seed, deterministic):
    decode = schema.decode_2d if info.ndim == 2 else schema.decode_3d
    ds = _records(files, info, shuffle=shuffle, seed=seed, deterministic=deterministic)
    ds = ds.map(lambda r: decode(r, info.channels), num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    ds = ds.filter(lambda e: e["has_mask"])
    # Masks stay uint8 until the last per-example step: a quarter of the bytes in a cache.
    return ds.map(lambda e: (e["image"], e["mask"]))


def _seeds(seed):
    """An endless stream of (2,) int64 seeds, new values on every pass, reproducible from ``seed``."""
    return tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)


def _cache(ds, cache):
    if cache is True:
        return ds.cache()
    if isinstance(cache, str) and cache:
        return ds.cache(cache)
    return ds


def _static_2d_size(info, split, image_size, batch_size):
    if image_size is not None:
        return tuple(image_size)
    summary = info.size_summary.get(split, {})
    h, w = summary.get("height", {}), summary.get("width", {})
    if h and w and h.get("min") == h.get("max") and w.get("min") == w.get("max"):
        return int(h["min"]), int(w["min"])
    if h and w and batch_size > 1:
        raise TfsegError(
            f"split {split!r} has images from {h.get('min')}x{w.get('min')} to {h.get('max')}x{w.get('max')}: "
            "set image_size (HxW) to batch them"
        )
    return None


def make_dataset(
    data_dir: str,
    split: str,
    *,
    batch_size: int,
    training: bool,
    image_size=None,
    patch_size=None,
    augment: dict | None = None,
    seed: int | None = None,
    deterministic: bool = False,
    cache: bool | str = False,
    repeat: int | None = None,
    shuffle_buffer: int = 256,
    patches_per_volume: int = 4,
    foreground_fraction: float = 0.33,
) -> tf.data.Dataset:
    """Builds the batched input pipeline of one split of a converted dataset.

    Args:
      data_dir: a ``tfseg convert`` output directory (shards + dataset.json).
      split: split name in dataset.json, e.g. ``"train"``.
      batch_size: global batch size. Training batches drop the remainder so shapes are static
        (what tf.distribute wants); evaluation keeps the last partial batch.
      training: shuffle, augment and (3D) sample random patches; otherwise a single
        deterministic view per example.
      image_size: 2D (H, W) or ``"HxW"`` that images and masks are resized to (bilinear /
        nearest), in training and evaluation; None keeps the stored size (it must then be the
        same for all images of the split when ``batch_size > 1``).
      patch_size: 3D (D, H, W) or ``"DxHxW"``; default 64^3.
      augment: augmentation dict (keys in :mod:`tfseg.data.augment`), used only when
        ``training``.
      seed: makes shuffling, augmentation and patch placement reproducible.
      deterministic: fixed element order (parallel stages keep their order); with no seed,
        seed 0 is used.
      cache: True to cache decoded examples in memory, a path to cache them in a file, False to
        stream (3D: memory then does not grow with the number of cases).
      repeat: None for one pass per iteration (Keras re-iterates each epoch), n for n passes,
        -1 for an endless dataset.
      shuffle_buffer: 2D examples / 3D patches held for shuffling (3D: each patch is
        prod(patch_size) * (C + 1) * 4 bytes).
      patches_per_volume: 3D training patches drawn from each decoded volume.
      foreground_fraction: 3D training probability that a patch is centred on a labelled voxel.

    Returns:
      Dataset of ``(images, masks)``: 2D images (B, H, W, C) float32 in 0..255 and masks
      (B, H, W, 1) int32; 3D images (B, D, H, W, C) float32 z-scored and masks
      (B, D, H, W, 1) int32. Masks keep the ignore index; padding is filled with it (0 when the
      dataset has none).

    Raises:
      TfsegError: missing dataset.json or shards, an unknown split, an option that does not fit
        the dataset's dimensionality, bad augmentation keys or sizes.
    """
    info = schema.load_dataset_info(data_dir)
    files = _shard_files(info, data_dir, split)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise TfsegError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if deterministic and seed is None:
        seed = 0
    cfg = aug.parse_augment(augment, ndim=info.ndim, channels=info.channels) if training else None
    fill = mask_fill_value(info)
    s_files, s_examples, s_aug, s_patch = (None,) * 4 if seed is None else (seed, seed + 1, seed + 2, seed + 3)

    ds = _decoded(files, info, shuffle=training, seed=s_files, deterministic=deterministic)
    ds = _cache(ds, cache)

    if info.ndim == 2:
        if patch_size is not None:
            raise TfsegError(f"{data_dir}: patch_size is for 3D data; this dataset is 2D (use image_size)")
        size = parse_size(image_size, 2) if image_size is not None else None
        static = _static_2d_size(info, split, size, batch_size)
        shape = static
        if cfg is not None and cfg.crop:
            if static is not None and (cfg.crop[0] > static[0] or cfg.crop[1] > static[1]):
                raise TfsegError(f"augment.crop {cfg.crop[0]}x{cfg.crop[1]} is larger than image_size "
                                 f"{static[0]}x{static[1]}; a crop is a window of the example at image_size")
            shape = cfg.crop
        if training:
            ds = ds.shuffle(shuffle_buffer, seed=s_examples, reshuffle_each_iteration=True)
        ds = _repeat(ds, repeat)
        if cfg is not None:
            ds = tf.data.Dataset.zip((ds, _seeds(s_aug)))

            def fn(example, s):
                image, mask = example
                out_hw = static if static is not None else tf.shape(image)[:2]
                return aug.augment_2d(image, mask, s, cfg, out_hw, fill)

        else:

            def fn(image, mask):
                if static is None:
                    return tf.cast(image, tf.float32), tf.cast(mask, tf.int32)
                return aug.resize(image, mask, static)

        def shaped(*args):
            image, mask = fn(*args)
            if shape is not None:
                image.set_shape([shape[0], shape[1], info.channels])
                mask.set_shape([shape[0], shape[1], 1])
            return image, mask

        ds = ds.map(shaped, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    else:
        if image_size is not None:
            raise TfsegError(f"{data_dir}: image_size is for 2D data; this dataset is 3D (use patch_size)")
        psize = parse_size(patch_size, 3) if patch_size is not None else DEFAULT_PATCH_SIZE
        if patches_per_volume < 1:
            raise TfsegError(f"patches_per_volume: expected >= 1, got {patches_per_volume}")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise TfsegError(f"foreground_fraction: expected a value in [0, 1], got {foreground_fraction}")
        if training:
            if cache:
                # Cached volumes are references, so a buffer over all of them costs no memory.
                count = int(info.splits.get(split, {}).get("count", 0)) or 64
                ds = ds.shuffle(count, seed=s_examples, reshuffle_each_iteration=True)
            ds = _repeat(ds, repeat)
            ds = tf.data.Dataset.zip((ds, _seeds(s_patch)))
            ds = ds.map(
                lambda ex, s: _int32_mask(*patches.sample_patches(
                    ex[0], ex[1], s, patch_size=psize, count=patches_per_volume,
                    foreground_fraction=foreground_fraction, ignore_index=info.ignore_index, mask_fill=fill,
                )),
                num_parallel_calls=AUTOTUNE,
                deterministic=deterministic,
            )
            ds = ds.unbatch()
            ds = ds.shuffle(shuffle_buffer, seed=s_examples, reshuffle_each_iteration=True)
            if cfg is not None:
                ds = tf.data.Dataset.zip((ds, _seeds(s_aug)))
                ds = ds.map(
                    lambda ex, s: aug.augment_3d(ex[0], ex[1], s, cfg),
                    num_parallel_calls=AUTOTUNE,
                    deterministic=deterministic,
                )
        else:
            ds = _repeat(ds, repeat)
            ds = ds.map(
                lambda i, m: _int32_mask(*patches.validation_patch(
                    i, m, patch_size=psize, ignore_index=info.ignore_index, mask_fill=fill
                )),
                num_parallel_calls=AUTOTUNE,
                deterministic=deterministic,
            )

    logger.debug(
        "%s/%s: %d shard(s), %dD, batch %d, training=%s, augment=%s, seed=%s, deterministic=%s, cache=%s",
        data_dir, split, len(files), info.ndim, batch_size, training, cfg, seed, deterministic, bool(cache),
    )
    ds = ds.batch(batch_size, drop_remainder=training)
    ds = ds.prefetch(AUTOTUNE)
    return ds.with_options(_options(deterministic, autotune=training))


def _int32_mask(image, mask):
    return image, tf.cast(mask, tf.int32)


def _repeat(ds, repeat):
    if repeat is None:
        return ds
    if repeat == -1:
        return ds.repeat()
    if not isinstance(repeat, int) or repeat < 1:
        raise TfsegError(f"repeat: expected None, -1 or a positive integer, got {repeat!r}")
    return ds.repeat(repeat)


def shard_across_workers(ds: tf.data.Dataset) -> tf.data.Dataset:
    """A dataset that each worker of a multi-worker run reads whole, keeping its share of the
    batches: a split has few shard files (often fewer than workers), and sharding by file would
    hand workers unequal numbers of batches, which stalls their collectives."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def _options(deterministic: bool, *, autotune: bool = True) -> tf.data.Options:
    opts = tf.data.Options()
    opts.deterministic = deterministic
    # Evaluation pipelines run without tf.data's autotuning thread: Keras destroys the validation
    # iterator before every validation pass, and the destructor waits for that thread's current
    # optimization round, seconds on busy cores (7 s of an 84 s ccp epoch). AUTOTUNE then means
    # one parallel call per core and an adaptive prefetch buffer, as fast for these pipelines.
    opts.autotune.enabled = autotune
    return opts


def read_examples(data_dir: str, split: str) -> tf.data.Dataset:
    """Decoded examples of a split at their stored size, in shard order, for evaluation.

    Args:
      data_dir: a converted dataset directory.
      split: split name.

    Returns:
      Unbatched dataset of the dicts of :func:`tfseg.schema.decode_2d` (``image`` (H, W, C)
      uint8, ``mask`` (H, W, 1) uint8, ``has_mask``, ``source_id``) or
      :func:`tfseg.schema.decode_3d` (``image`` (D, H, W, C) float32, ``mask`` (D, H, W, 1)
      uint8, ``has_mask``, ``spacing``, ``source_id``); unlabelled records included.

    Raises:
      TfsegError: missing dataset.json or shards, unknown split.
    """
    info = schema.load_dataset_info(data_dir)
    files = _shard_files(info, data_dir, split)
    decode = schema.decode_2d if info.ndim == 2 else schema.decode_3d
    ds = tf.data.TFRecordDataset(files, compression_type=info.compression or "")
    return ds.map(lambda r: decode(r, info.channels), num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(2)


def steps_per_epoch(
    data_dir: str, split: str, *, batch_size: int, training: bool, patches_per_volume: int = 4
) -> int:
    """Batches in one pass of :func:`make_dataset`, from the split's count in dataset.json.

    Training drops the last partial batch; 3D training yields ``patches_per_volume`` patches per
    volume. Counts include unlabelled records, which the pipeline skips, so this is an upper bound
    for splits that have them.
    """
    info = schema.load_dataset_info(data_dir)
    if split not in info.splits:
        info.split_files(split, data_dir)  # raises the one-line error
    n = int(info.splits[split].get("count", 0))
    if training and info.ndim == 3:
        n *= patches_per_volume
    return n // batch_size if training else -(-n // batch_size)


def find_bad_shard(data_dir: str, splits) -> TfsegError | None:
    """Reads every record of the splits' shards and names the first one that cannot be read.

    Called after a read error (tf.errors.DataLossError and friends name no file): the error the
    user sees then names the shard and what is wrong with it.
    """
    info = schema.load_dataset_info(data_dir)
    for split in splits:
        if not split or split not in info.splits:
            continue
        for path in info.split_files(split, data_dir):
            try:
                for _ in tf.data.TFRecordDataset(path, compression_type=info.compression or ""):
                    pass
            except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
                found = re.search(r"(truncated|corrupted) record at (\d+)", e.message or "")
                reason = (f"{found.group(1)} record at byte {found.group(2)}" if found
                          else re.sub(r"\{\{.*?\}\}|\[Op:.*", "", e.message or type(e).__name__).strip()[:120])
                return TfsegError(f"{path}: corrupt or truncated TFRecord shard ({reason}); re-run `tfseg convert`")
    return None
