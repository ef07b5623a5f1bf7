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
from tfseg.data.config import InputConfig
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
    return ds.map(lambda e: (e["image"], _checked_labels(e["mask"], info)))


# Marks the assertion that a label is below dataset.json's class count (see data_error).
_LABEL_CHECK = "tfseg-label-check"


def _checked_labels(mask, info):
    """``mask``, asserting that every label is a class of dataset.json (or its ignore index): a
    dataset.json edited to fewer classes would otherwise train on labels the loss cannot take."""
    bad = mask >= info.num_classes
    if info.ignore_index is not None and info.ignore_index >= info.num_classes:
        bad = bad & (mask != info.ignore_index)
    check = tf.debugging.assert_equal(tf.reduce_any(bad), False, message=_LABEL_CHECK)
    with tf.control_dependencies([check]):
        return tf.identity(mask)


def data_error(e: Exception, data_dir: str, splits) -> Exception:
    """The one-line error for a tf.data failure while reading a converted dataset: a label that
    dataset.json's class count does not allow, or a corrupt shard (:func:`find_bad_shard`); else
    ``e`` itself."""
    if _LABEL_CHECK in (getattr(e, "message", None) or str(e)):
        info = schema.load_dataset_info(data_dir)
        allowed = f"0..{info.num_classes - 1}" + (f" and {info.ignore_index}" if info.ignore_index is not None else "")
        return TfsegError(f"{os.path.join(data_dir, schema.DATASET_JSON)}: says {info.num_classes} classes, but the "
                          f"records hold labels outside {allowed}; re-run `tfseg convert` (or correct dataset.json)")
    return find_bad_shard(data_dir, splits) or e


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


def make_dataset(*args, **kwargs) -> tf.data.Dataset:
    """Builds the batched input pipeline of one split of a converted dataset.

    Args:
      *args, **kwargs: an :class:`~tfseg.data.config.InputConfig` (or a mapping of its keys), or
        its fields themselves: ``make_dataset(data_dir, split, batch_size=..., training=...,
        image_size=None, patch_size=None, augment=None, seed=None, deterministic=False,
        cache=False, repeat=None, shuffle_buffer=256, patches_per_volume=4,
        foreground_fraction=0.33)``.

    Returns:
      Dataset of ``(images, masks)``: 2D images (B, H, W, C) float32 in 0..255 and masks
      (B, H, W, 1) int32; 3D images (B, D, H, W, C) float32 z-scored and masks
      (B, D, H, W, 1) int32. Masks keep the ignore index; padding is filled with it (0 when the
      dataset has none).

    Raises:
      TfsegError: missing dataset.json or shards, an unknown split, an option that does not fit
        the dataset's dimensionality, bad augmentation keys or sizes, a value of the wrong type.
    """
    cfg = InputConfig.from_call(args, kwargs)
    info = schema.load_dataset_info(cfg.data_dir)
    files = _shard_files(info, cfg.data_dir, cfg.split)
    if cfg.batch_size < 1:
        raise TfsegError(f"batch_size: expected a positive integer, got {cfg.batch_size!r}")
    seed = 0 if cfg.deterministic and cfg.seed is None else cfg.seed
    augment = aug.parse_augment(cfg.augment, ndim=info.ndim, channels=info.channels) if cfg.training else None
    # Seeds of the file order, the example (or patch) order, the augmentation, the patch placement.
    seeds = (None,) * 4 if seed is None else (seed, seed + 1, seed + 2, seed + 3)
    ds = _decoded(files, info, shuffle=cfg.training, seed=seeds[0], deterministic=cfg.deterministic)
    ds = _cache(ds, cfg.cache)
    ds = (_examples_2d if info.ndim == 2 else _patches_3d)(ds, cfg, info, augment, seeds)
    logger.debug(
        "%s/%s: %d shard(s), %dD, batch %d, training=%s, augment=%s, seed=%s, deterministic=%s, cache=%s",
        cfg.data_dir, cfg.split, len(files), info.ndim, cfg.batch_size, cfg.training, augment, seed,
        cfg.deterministic, bool(cfg.cache),
    )
    ds = ds.batch(cfg.batch_size, drop_remainder=cfg.training)
    ds = ds.prefetch(AUTOTUNE)
    return ds.with_options(_options(cfg.deterministic, autotune=cfg.training))


def _examples_2d(ds: tf.data.Dataset, cfg: InputConfig, info: schema.DatasetInfo, augment, seeds) -> tf.data.Dataset:
    """2D: shuffle, repeat, then augment and resize each example to ``image_size`` (one warp)."""
    if cfg.patch_size is not None:
        raise TfsegError(f"{cfg.data_dir}: patch_size is for 3D data; this dataset is 2D (use image_size)")
    fill = mask_fill_value(info)
    size = parse_size(cfg.image_size, 2) if cfg.image_size is not None else None
    static = _static_2d_size(info, cfg.split, size, cfg.batch_size)
    shape = static
    if augment is not None and augment.crop:
        if static is not None and (augment.crop[0] > static[0] or augment.crop[1] > static[1]):
            raise TfsegError(f"augment.crop {augment.crop[0]}x{augment.crop[1]} is larger than image_size "
                             f"{static[0]}x{static[1]}; a crop is a window of the example at image_size")
        shape = augment.crop
    if cfg.training:
        ds = ds.shuffle(cfg.shuffle_buffer, seed=seeds[1], reshuffle_each_iteration=True)
    ds = _repeat(ds, cfg.repeat)
    if augment is not None:
        ds = tf.data.Dataset.zip((ds, _seeds(seeds[2])))

        def fn(example, s):
            image, mask = example
            out_hw = static if static is not None else tf.shape(image)[:2]
            return aug.augment_2d(image, mask, s, augment, out_hw, fill)

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

    return ds.map(shaped, num_parallel_calls=AUTOTUNE, deterministic=cfg.deterministic)


def _patches_3d(ds: tf.data.Dataset, cfg: InputConfig, info: schema.DatasetInfo, augment, seeds) -> tf.data.Dataset:
    """3D: training draws ``patches_per_volume`` patches a volume (foreground oversampling),
    shuffles and augments them; otherwise one centred validation patch a volume."""
    if cfg.image_size is not None:
        raise TfsegError(f"{cfg.data_dir}: image_size is for 2D data; this dataset is 3D (use patch_size)")
    fill = mask_fill_value(info)
    psize = parse_size(cfg.patch_size, 3) if cfg.patch_size is not None else DEFAULT_PATCH_SIZE
    if cfg.patches_per_volume < 1:
        raise TfsegError(f"patches_per_volume: expected >= 1, got {cfg.patches_per_volume}")
    if not 0.0 <= cfg.foreground_fraction <= 1.0:
        raise TfsegError(f"foreground_fraction: expected a value in [0, 1], got {cfg.foreground_fraction}")
    if not cfg.training:
        ds = _repeat(ds, cfg.repeat)
        return ds.map(
            lambda i, m: _int32_mask(*patches.validation_patch(
                i, m, patch_size=psize, ignore_index=info.ignore_index, mask_fill=fill
            )),
            num_parallel_calls=AUTOTUNE,
            deterministic=cfg.deterministic,
        )
    if cfg.cache:
        # Cached volumes are references, so a buffer over all of them costs no memory.
        count = int(info.splits.get(cfg.split, {}).get("count", 0)) or 64
        ds = ds.shuffle(count, seed=seeds[1], reshuffle_each_iteration=True)
    ds = _repeat(ds, cfg.repeat)
    ds = tf.data.Dataset.zip((ds, _seeds(seeds[3])))
    ds = ds.map(
        lambda ex, s: _int32_mask(*patches.sample_patches(
            ex[0], ex[1], s, patch_size=psize, count=cfg.patches_per_volume,
            foreground_fraction=cfg.foreground_fraction, ignore_index=info.ignore_index, mask_fill=fill,
        )),
        num_parallel_calls=AUTOTUNE,
        deterministic=cfg.deterministic,
    )
    ds = ds.unbatch()
    ds = ds.shuffle(cfg.shuffle_buffer, seed=seeds[1], reshuffle_each_iteration=True)
    if augment is not None:
        ds = tf.data.Dataset.zip((ds, _seeds(seeds[2])))
        ds = ds.map(
            lambda ex, s: aug.augment_3d(ex[0], ex[1], s, augment),
            num_parallel_calls=AUTOTUNE,
            deterministic=cfg.deterministic,
        )
    return ds


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
