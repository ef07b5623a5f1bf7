"""Sample data in the brats layout's original file formats (``tfseg sample``, the demo and the tests)."""

from __future__ import annotations

import json
import os

import numpy as np

from tfseg.convert.brats import MODALITIES


def write_msd_brain(output: str, count: int, seed: int = 0) -> None:
    """Writes ``count`` synthetic MSD cases: 4D NIfTI (32, 32, 24, 4) + labels + dataset.json."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(os.path.join(output, sub), exist_ok=True)
    training = []
    for i in range(count):
        name = f"BRATS_{i + 1:03d}.nii.gz"
        volumes, regions = _synthetic_brain(rng)
        label = np.zeros(regions["edema"].shape, np.uint8)
        label[regions["edema"]] = 1
        label[regions["enhancing"]] = 3
        label[regions["core"]] = 2
        image = np.stack([volumes[m] for m in MODALITIES], -1).astype(np.float32)
        affine = np.diag([1.0, 1.0, 1.5, 1.0])
        nib.save(nib.Nifti1Image(image, affine), os.path.join(output, "imagesTr", name))
        nib.save(nib.Nifti1Image(label, affine), os.path.join(output, "labelsTr", name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": "BRATS", "description": "tfseg synthetic sample in the MSD Task01 layout",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": count, "numTest": 0, "training": training, "test": [],
    }
    with open(os.path.join(output, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=2)


def write_brats(output: str, count: int, seed: int = 0) -> None:
    """Writes ``count`` synthetic BraTS 2021 case folders, 3D NIfTI (32, 32, 24) int16 + seg."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    affine = np.diag([1.0, 1.0, 1.5, 1.0])
    for i in range(count):
        case_id = f"BraTS2021_{i:05d}"
        folder = os.path.join(output, case_id)
        os.makedirs(folder, exist_ok=True)
        volumes, regions = _synthetic_brain(rng)
        for mod in MODALITIES:
            data = np.round(volumes[mod] * 100).astype(np.int16)
            nib.save(nib.Nifti1Image(data, affine), os.path.join(folder, f"{case_id}_{mod}.nii.gz"))
        seg = np.zeros(regions["edema"].shape, np.uint8)
        seg[regions["edema"]] = 2
        seg[regions["enhancing"]] = 4
        seg[regions["core"]] = 1
        nib.save(nib.Nifti1Image(seg, affine), os.path.join(folder, f"{case_id}_seg.nii.gz"))


def _synthetic_brain(rng: np.random.Generator, shape=(32, 32, 24)):
    """Four synthetic modalities of an ellipsoid brain with a nested tumour.

    Returns:
      ({modality: (X, Y, Z) float32 raw intensities, 0 outside the brain},
       {"edema", "enhancing", "core": nested (X, Y, Z) bool masks, disjoint}).
    """
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), -1)
    centre = np.array(shape, np.float32) / 2
    brain = (((grid - centre) / (centre * 0.85)) ** 2).sum(-1) <= 1
    c = centre + rng.uniform(-3, 3, 3)
    r = rng.uniform(4.5, 7.0)
    dist = np.sqrt(((grid - c) ** 2).sum(-1))
    core = dist <= 0.4 * r
    enhancing = (dist <= 0.65 * r) & ~core
    edema = (dist <= r) & ~core & ~enhancing & brain
    # Tissue intensities: (brain, edema, enhancing, core) per modality, like real contrasts.
    contrast = {"flair": (3.0, 6.0, 5.0, 4.0), "t1": (5.0, 4.0, 4.5, 2.0),
                "t1ce": (5.0, 4.5, 9.0, 2.0), "t2": (4.0, 7.0, 6.0, 8.0)}
    volumes = {}
    for mod, (b, e, en, co) in contrast.items():
        v = np.where(brain, b, 0.0) + np.where(edema, e - b, 0) + np.where(enhancing, en - b, 0)
        v = v + np.where(core, co - b, 0)
        v = v + brain * rng.normal(0, 0.3, shape)
        volumes[mod] = np.where(brain, np.maximum(v, 0.1), 0).astype(np.float32)
    return volumes, {"edema": edema, "enhancing": enhancing & brain, "core": core & brain}
