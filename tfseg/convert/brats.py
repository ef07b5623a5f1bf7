"""Brain tumour MRI: MSD Task01_BrainTumour (``msd-brain``) and BraTS case folders (``brats``).

Layouts::

    msd-brain  ROOT/dataset.json, ROOT/imagesTr/NAME.nii.gz (X, Y, Z, 4), ROOT/labelsTr/NAME.nii.gz,
               optional ROOT/imagesTs/NAME.nii.gz (unlabelled); ROOT may also hold one Task01_* folder.
               Labels 0 background, 1 edema, 2 non-enhancing tumour, 3 enhancing tumour.
    brats      any folder tree of cases, each in one of three namings:
               2018-2021  CASE_flair / CASE_t1 / CASE_t1ce / CASE_t2 [/ CASE_seg] .nii.gz
               2023       CASE-t2f / CASE-t1n / CASE-t1c / CASE-t2w [/ CASE-seg] .nii.gz
               BraTS-Toolkit skull-stripped  CASE_brainles/raw_bet/CASE_{fla,t1,t1c,t2}_bet.nii.gz,
               label CASE_brainles/fusion/simple.nii.gz (layout option ``toolkit_label``). These
               labels are the toolkit's fusion of model outputs (majority vote of the BraTS 2020
               algorithms), not manual ground truth; ``simple`` is its default fusion.
               Labels 0, 1 NCR/NET, 2 edema, 4 enhancing (BraTS 2023 writes enhancing as 3: both
               are accepted, not in one file).

Both layouts give the channels in one order, :data:`MODALITIES` (flair, t1, t1ce, t2), and
contiguous class ids 0..3 (BraTS 4 -> 3); ``regions`` gives WT/TC/ET in class ids for each
convention (MSD: TC = non-enhancing + enhancing; BraTS: TC = NCR/NET + enhancing).

Each worker loads a case with nibabel and applies :mod:`tfseg.volumes`' record (written to
dataset.json as ``preprocessing``, reproduced by ``tfseg predict``): reorientation to RAS+, the
channel order above, (D, H, W, C) model axes (D indexes axial slices, each slice nose-up;
spacing is the header zooms in the same order, z, y, x), a crop to the bounding box of voxels
nonzero in any modality (or labelled), which drops about 60 % of a BraTS volume, and a z-score
of each modality over its own nonzero (brain) voxels.

Unreadable NIfTI, a missing modality or label, shapes that differ between modalities and label,
and label values outside the convention raise BadCase. Cases without a label (MSD imagesTs,
BraTS validation sets) are kept with no label and the official split ``"unlabelled"``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re

import numpy as np

from tfseg.convert.base import BadCase, Case, Layout, LayoutInfo, Loaded3D
from tfseg.errors import TfsegError
from tfseg.volumes import ras_to_model_axes, volume_record, zscore_nonzero

log = logging.getLogger(__name__)

MODALITIES = ("flair", "t1", "t1ce", "t2")
UNLABELLED_SPLIT = "unlabelled"

MSD_CLASSES = ("background", "edema", "non-enhancing tumour", "enhancing tumour")
MSD_TABLE = {0: 0, 1: 1, 2: 2, 3: 3}
MSD_REGIONS = {"WT": [1, 2, 3], "TC": [2, 3], "ET": [3]}

BRATS_CLASSES = ("background", "necrotic/non-enhancing core", "edema", "enhancing tumour")
BRATS_TABLE = {0: 0, 1: 1, 2: 2, 3: 3, 4: 3}
BRATS_REGIONS = {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}
BRATS_SOURCE_NAMES = {
    0: "background", 1: "NCR/NET (necrotic and non-enhancing tumour core)",
    2: "ED (peritumoral edema)", 3: "ET (enhancing tumour, BraTS 2023 value)",
    4: "ET (enhancing tumour, BraTS 2017-2021 value)",
}

# MSD dataset.json "modality" names -> ours.
_MSD_MODALITY_NAMES = {"flair": "flair", "t1w": "t1", "t1": "t1", "t1gd": "t1ce", "t1ce": "t1ce",
                       "t2w": "t2", "t2": "t2"}

_NII = r"\.nii(?:\.gz)?$"
# naming -> (file name regex, source modality name -> ours).
_BRATS_NAMINGS = {
    "2021": (re.compile(r"^(?P<case>.+)_(?P<mod>flair|t1|t1ce|t2|seg)" + _NII),
             {"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2", "seg": "seg"}),
    "2023": (re.compile(r"^(?P<case>.+)-(?P<mod>t2f|t1n|t1c|t2w|seg)" + _NII),
             {"t2f": "flair", "t1n": "t1", "t1c": "t1ce", "t2w": "t2", "seg": "seg"}),
    "toolkit": (re.compile(r"^(?P<case>.+)_(?P<mod>fla|t1|t1c|t2)_bet" + _NII),
                {"fla": "flair", "t1": "t1", "t1c": "t1ce", "t2": "t2"}),
}


# The largest NIfTI file convert reads (all values: D x H x W x modalities): 2**28, ~1 GB as
# float32; a BraTS case is 240 x 240 x 155 x 4 = 36M values.
MAX_VOXELS = 2**28


class _TooLarge(Exception):
    pass


class _BrainLayout(Layout):
    """Shared loading and normalization of the two brain tumour layouts."""

    table: dict = {}
    source_channels: tuple | None = None  # MSD: set by list_cases from the task's dataset.json

    def preprocessing(self) -> dict:
        return volume_record(MODALITIES, self.source_channels)

    def load_case(self, case: Case) -> Loaded3D:
        """Loads, reorients, crops and normalizes one case.

        Returns:
          Loaded3D with ``volume`` (D, H, W, 4) float32 z-scored per modality over its nonzero
          voxels (0 outside), ``label`` (D, H, W) uint8 class ids or None, ``spacing`` in mm
          along D, H, W.

        Raises:
          BadCase: see the module docstring.
        """
        paths = case.paths
        if "image" in paths:  # MSD: one 4D file
            arr, zooms = _read_nifti(paths["image"], ndim=4)
            if arr.shape[3] != len(MODALITIES):
                raise BadCase(paths["image"], f"expected {len(MODALITIES)} modalities, got shape {arr.shape}")
            # dataset.json sits beside imagesTr/ and imagesTs/; list_cases has validated it.
            task_dir = os.path.dirname(os.path.dirname(os.path.abspath(paths["image"])))
            order = _msd_channel_order(os.path.join(task_dir, "dataset.json"))
            channels = [arr[..., i] for i in order]
            shape_source = paths["image"]
        else:
            channels = []
            zooms = None
            for mod in MODALITIES:
                path = paths.get(mod)
                if path is None:
                    raise BadCase(case.main_path, f"missing {mod} modality of case {case.case_id}")
                a, z = _read_nifti(path, ndim=3)
                if channels and a.shape != channels[0].shape:
                    raise BadCase(path, f"shape {a.shape} != {MODALITIES[0]} {channels[0].shape}")
                channels.append(a)
                zooms = zooms or z
            shape_source = paths[MODALITIES[0]]
        volume = np.stack(channels, axis=-1)
        label = None
        if "label" in paths:
            label_path = paths["label"]
            raw, _ = _read_nifti(label_path, ndim=3, integer=True)
            if raw.shape != volume.shape[:3]:
                raise BadCase(label_path, f"label shape {raw.shape} != image {volume.shape[:3]} ({shape_source})")
            label = self._map_labels(raw, label_path)
        volume = ras_to_model_axes(volume)
        spacing = (float(zooms[2]), float(zooms[1]), float(zooms[0]))
        if label is not None:
            label = ras_to_model_axes(label)
        return Loaded3D(*_crop_and_normalize(volume, label, shape_source), spacing=spacing)

    def _map_labels(self, raw: np.ndarray, path: str) -> np.ndarray:
        values = [int(v) for v in np.unique(raw)]
        bad = [v for v in values if v not in self.table]
        if bad:
            raise BadCase(path, f"label values {bad} outside {sorted(self.table)}")
        if 3 in values and 4 in values and self.table.get(3) == self.table.get(4):
            raise BadCase(path, "labels 3 and 4 both present: mixed BraTS 2023 and 2017-2021 conventions")
        lut = np.zeros(max(self.table) + 1, np.uint8)
        for src, dst in self.table.items():
            lut[src] = dst
        return lut[raw.astype(np.int64)]


class MsdBrainLayout(_BrainLayout):
    """Medical Segmentation Decathlon Task01_BrainTumour (4D NIfTI + dataset.json)."""

    name = "msd-brain"
    table = MSD_TABLE

    def info(self) -> LayoutInfo:
        return LayoutInfo(
            name=self.name, ndim=3, channels=len(MODALITIES), class_names=MSD_CLASSES,
            label_mapping={"source_names": {0: "background", 1: "edema", 2: "non-enhancing tumor",
                                            3: "enhancing tumour"}, "table": dict(MSD_TABLE)},
            regions={k: list(v) for k, v in MSD_REGIONS.items()},
            label_convention="msd", modalities=MODALITIES,
        )

    def list_cases(self, root: str) -> list[Case]:
        root = _msd_task_dir(root)
        # Fails early on a bad dataset.json; the order goes into dataset.json's preprocessing.
        self.source_channels = _msd_channel_order(os.path.join(root, "dataset.json"))
        cases = []
        for sub, labelled in (("imagesTr", True), ("imagesTs", False)):
            folder = os.path.join(root, sub)
            if not os.path.isdir(folder):
                continue
            # MSD's tarballs carry macOS "._NAME" resource forks: skip hidden files.
            for f in sorted(f for f in os.listdir(folder) if re.search(_NII, f) and not f.startswith(".")):
                case_id = re.sub(_NII, "", f)
                files = [("image", os.path.join(folder, f))]
                if labelled:
                    # A missing label is kept so the job rejects the case by name.
                    files.append(("label", os.path.join(root, "labelsTr", f)))
                cases.append(Case(case_id=case_id, files=tuple(files), group=case_id,
                                  split=None if labelled else UNLABELLED_SPLIT))
        if not cases:
            raise TfsegError(f"{root}: no imagesTr/*.nii.gz or imagesTs/*.nii.gz (not an MSD brain task)")
        log.info("msd-brain: %d cases in %s", len(cases), root)
        return cases


class BratsLayout(_BrainLayout):
    """BraTS case folders (2018-2021, 2023 and BraTS-Toolkit skull-stripped namings).

    Args:
      toolkit_label: label file of a BraTS-Toolkit case, relative to its ``CASE_brainles``
        folder (default ``fusion/simple.nii.gz``); cases without it are unlabelled.
    """

    name = "brats"
    table = BRATS_TABLE

    def __init__(self, toolkit_label: str = "fusion/simple.nii.gz"):
        self.toolkit_label = toolkit_label

    def info(self) -> LayoutInfo:
        return LayoutInfo(
            name=self.name, ndim=3, channels=len(MODALITIES), class_names=BRATS_CLASSES,
            label_mapping={"source_names": dict(BRATS_SOURCE_NAMES), "table": dict(BRATS_TABLE)},
            regions={k: list(v) for k, v in BRATS_REGIONS.items()},
            label_convention="brats", modalities=MODALITIES,
        )

    def list_cases(self, root: str) -> list[Case]:
        if not os.path.isdir(root):
            raise TfsegError(f"{root}: not a directory")
        found: dict[tuple[str, str], dict[str, str]] = {}
        naming_of: dict[tuple[str, str], str] = {}
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for f in sorted(filenames):
                if f.startswith("."):
                    continue
                for naming, (pattern, mods) in _BRATS_NAMINGS.items():
                    m = pattern.match(f)
                    if m:
                        key = (dirpath, m.group("case"))
                        found.setdefault(key, {})[mods[m.group("mod")]] = os.path.join(dirpath, f)
                        naming_of[key] = naming
                        break
        cases, seen = [], {}
        for (dirpath, case_id), files in sorted(found.items()):
            if not any(m in files for m in MODALITIES):
                continue  # a lone *_seg file is not a case
            if case_id in seen:
                raise TfsegError(f"{root}: case {case_id} found twice ({seen[case_id]} and {dirpath})")
            seen[case_id] = dirpath
            label = files.pop("seg", None)
            if naming_of[(dirpath, case_id)] == "toolkit":
                candidate = os.path.join(os.path.dirname(dirpath), self.toolkit_label)
                label = candidate if os.path.isfile(candidate) else None
            entries = [(m, files[m]) for m in MODALITIES if m in files]
            if label:
                entries.append(("label", label))
            # BraTS 2023 ids end in a timepoint (-000, -001): keep a patient's scans together.
            group = re.sub(r"-\d{3}$", "", case_id) if naming_of[(dirpath, case_id)] == "2023" else case_id
            cases.append(Case(case_id=case_id, files=tuple(entries), group=group,
                              split=None if label else UNLABELLED_SPLIT))
        if not cases:
            raise TfsegError(f"{root}: no BraTS cases (CASE_flair.nii.gz, CASE-t2f.nii.gz or CASE_fla_bet.nii.gz files)")
        log.info("brats: %d cases in %s (%d labelled)", len(cases), root,
                 sum(c.split is None for c in cases))
        return cases


def _msd_task_dir(root: str) -> str:
    if os.path.isdir(os.path.join(root, "imagesTr")) or os.path.isdir(os.path.join(root, "imagesTs")):
        return root
    if os.path.isdir(root):
        tasks = sorted(d for d in os.listdir(root) if d.startswith("Task01"))
        if len(tasks) == 1:
            return os.path.join(root, tasks[0])
    raise TfsegError(f"{root}: not an MSD brain tumour task (no imagesTr/ folder or one Task01_* folder)")


@functools.lru_cache(maxsize=8)
def _msd_channel_order(path: str) -> tuple[int, ...]:
    """Source channel index of each of MODALITIES, from dataset.json's "modality" (default 0..3)."""
    default = tuple(range(len(MODALITIES)))
    if not os.path.isfile(path):
        log.info("msd-brain: no %s; assuming channels %s", path, ", ".join(MODALITIES))
        return default
    try:
        with open(path) as f:
            modality = json.load(f).get("modality") or {}
        ours = {_MSD_MODALITY_NAMES[str(name).lower()]: int(idx) for idx, name in modality.items()}
    except (ValueError, KeyError, AttributeError) as e:
        raise TfsegError(f"{path}: unexpected 'modality' entry ({type(e).__name__}: {e})") from None
    if not ours:
        return default
    if sorted(ours) != sorted(MODALITIES):
        raise TfsegError(f"{path}: modalities {sorted(ours)} are not {', '.join(MODALITIES)}")
    return tuple(ours[m] for m in MODALITIES)


def _read_nifti(path: str, *, ndim: int, integer: bool = False) -> tuple[np.ndarray, tuple]:
    """A NIfTI file reoriented to RAS+, as float32 (or its integer labels), and its zooms.

    Raises:
      BadCase: missing, unreadable or truncated file, wrong rank, non-finite or non-integer
        values where integers are expected.
    """
    import nibabel as nib

    if not os.path.isfile(path):
        raise BadCase(path, "missing file")
    try:
        img = nib.load(path)
        shape = tuple(int(n) for n in img.header.get_data_shape())
        if int(np.prod(shape, dtype=np.float64)) > MAX_VOXELS:  # checked before any voxel is read
            raise _TooLarge(shape)
        img = nib.as_closest_canonical(img)
        data = np.asanyarray(img.dataobj)
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    except _TooLarge as e:
        shape = "x".join(map(str, e.args[0]))
        raise BadCase(path, f"volume {shape} exceeds tfseg's limit of {MAX_VOXELS} values (2**28)") from None
    except Exception as e:  # nibabel, gzip and zlib raise many types for bad files
        raise BadCase(path, f"unreadable NIfTI ({type(e).__name__}: {e})") from None
    if data.ndim != ndim:
        raise BadCase(path, f"expected a {ndim}D volume, got shape {data.shape}")
    if integer:
        if not np.issubdtype(data.dtype, np.integer):
            if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
                raise BadCase(path, "label volume has non-integer values")
            data = data.astype(np.int64)
        if data.size and data.min() < 0:
            raise BadCase(path, f"label values {sorted(int(v) for v in np.unique(data[data < 0]))} are negative")
        return data, zooms
    data = data.astype(np.float32, copy=False)
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise BadCase(path, f"{bad} of {data.size} voxels are NaN or infinite")
    return data, zooms


def _crop_and_normalize(volume: np.ndarray, label: np.ndarray | None, path: str):
    """Crops (D, H, W, C) to the nonzero box and z-scores each channel over its nonzero voxels."""
    foreground = np.any(volume != 0, axis=-1)
    if label is not None:
        foreground |= label > 0
    if not foreground.any():
        raise BadCase(path, "all modalities are zero")
    box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(foreground))
    volume = zscore_nonzero(np.array(volume[box], dtype=np.float32))  # a contiguous copy
    if label is not None:
        label = np.ascontiguousarray(label[box], dtype=np.uint8)
    return volume, label


