"""The input pipeline's settings: :class:`InputConfig`, what :func:`tfseg.data.make_dataset`
takes, checked from its annotations (:func:`tfseg.config.config_from_mapping`)."""

from __future__ import annotations

import dataclasses

from tfseg.config import StageConfig


@dataclasses.dataclass(frozen=True)
class InputConfig(StageConfig):
    """One split's batched input pipeline.

    Attributes:
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
    """

    WHAT = "input config"

    data_dir: str
    split: str
    batch_size: int
    training: bool
    image_size: tuple[int, ...] | str | None = None
    patch_size: tuple[int, ...] | str | None = None
    augment: dict | None = None
    seed: int | None = None
    deterministic: bool = False
    cache: bool | str = False
    repeat: int | None = None
    shuffle_buffer: int = 256
    patches_per_volume: int = 4
    foreground_fraction: float = 0.33
