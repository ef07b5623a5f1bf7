"""The convert stage's settings: :class:`ConvertConfig`, checked from its annotations
(:func:`tfseg.config.config_from_mapping`) and written beside dataset.json as ``convert.json``."""

from __future__ import annotations

import dataclasses

from tfseg.config import StageConfig

CONFIG_JSON = "convert.json"


@dataclasses.dataclass(frozen=True)
class ConvertConfig(StageConfig):
    """Every setting of ``tfseg convert`` (the fields keep :func:`run_convert`'s argument order).

    Attributes:
      layout_name: a name in :data:`tfseg.convert.LAYOUTS`.
      input_dir: the dataset's root in its original layout.
      output_dir: where the converted dataset is published (atomically).
      layout_options: layout constructor options (``image_dir``, ``num_classes``, ...).
      split: ``NAME=FRACTION,...`` for layouts without an official split.
      image_size: (H, W) to resize 2D images (bilinear) and masks (nearest) to.
      num_shards: shards per split; default from the data size (~150 MB a shard).
      compression: ``""`` or ``"gzip"``.
      strict: any rejected case fails the conversion (nothing is published).
      overwrite: replace an existing complete output.
      beam_args: Beam PipelineOptions arguments (``--runner``, ``--direct_num_workers``, ...).
      threads: conversion threads per Beam worker (default: the machine's cores, at most 8).
    """

    WHAT = "convert config"

    layout_name: str
    input_dir: str
    output_dir: str
    layout_options: dict | None = None
    split: str = "train=0.8,val=0.1,test=0.1"
    image_size: tuple[int, ...] | None = None
    num_shards: int | None = None
    compression: str = ""
    strict: bool = False
    overwrite: bool = False
    beam_args: tuple[str, ...] = ()
    threads: int | None = None
