"""The convert stage: raw dataset layouts -> sharded TFRecords + dataset.json (Apache Beam)."""

from __future__ import annotations

import importlib

from tfseg.errors import TfsegError

# layout name -> "module:Class"; modules are imported on use so listing names stays cheap.
LAYOUTS = {
    "carvana": "tfseg.convert.carvana:CarvanaLayout",
    "isic": "tfseg.convert.isic:IsicLayout",
    "voc": "tfseg.convert.voc:VocLayout",
    "ccp": "tfseg.convert.ccp:CcpLayout",
    "folder": "tfseg.convert.folder:FolderLayout",
    "msd-brain": "tfseg.convert.brats:MsdBrainLayout",
    "brats": "tfseg.convert.brats:BratsLayout",
    "coco": "tfseg.convert.coco:CocoLayout",
    "cityscapes": "tfseg.convert.cityscapes:CityscapesLayout",
    "ade20k": "tfseg.convert.ade20k:Ade20kLayout",
    "labelme": "tfseg.convert.labelme:LabelmeLayout",
    "cvat-mask": "tfseg.convert.cvat_mask:CvatMaskLayout",
}


def get_layout_class(name: str):
    """The Layout class registered under ``name``.

    Raises:
      TfsegError: unknown layout name.
    """
    if name not in LAYOUTS:
        raise TfsegError(f"unknown dataset layout {name!r}; choose from {', '.join(sorted(LAYOUTS))}")
    module, _, cls = LAYOUTS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
