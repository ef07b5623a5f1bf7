"""Synthetic sample data in each layout's original file formats: ``tfseg sample``, the demo and the
tests write raw folders here that convert reads like the real ones (photos with shapes a model
can learn, masks or annotations as the layout's tools write them).

The writers live apart from the readers (:mod:`tfseg.convert`): a reader never depends on them.
"""

from __future__ import annotations

import importlib

from tfseg.errors import TfsegError

# layout name -> "module:function"; imported on use, like the layouts.
SAMPLES = {
    "carvana": "tfseg.convert.samples.carvana:write",
    "isic": "tfseg.convert.samples.isic:write",
    "voc": "tfseg.convert.samples.voc:write",
    "ccp": "tfseg.convert.samples.ccp:write",
    "folder": "tfseg.convert.samples.folder:write",
    "msd-brain": "tfseg.convert.samples.brats:write_msd_brain",
    "brats": "tfseg.convert.samples.brats:write_brats",
    "coco": "tfseg.convert.samples.coco:write",
    "cityscapes": "tfseg.convert.samples.cityscapes:write",
    "ade20k": "tfseg.convert.samples.ade20k:write",
    "labelme": "tfseg.convert.samples.labelme:write",
    "cvat-mask": "tfseg.convert.samples.cvat_mask:write",
}


def writer(layout: str):
    """The sample writer of ``layout``: ``f(output, count, seed=0, **options)``.

    Raises:
      TfsegError: a layout without one.
    """
    if layout not in SAMPLES:
        raise TfsegError(f"unknown dataset layout {layout!r}; choose from {', '.join(sorted(SAMPLES))}")
    module, _, name = SAMPLES[layout].partition(":")
    return getattr(importlib.import_module(module), name)


def write(layout: str, output: str, count: int, seed: int = 0, **options) -> None:
    """Writes ``count`` synthetic cases of ``layout`` into ``output`` (``options``: the writer's own,
    e.g. ``image_size``)."""
    writer(layout)(output, count, seed, **options)
