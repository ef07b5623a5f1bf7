"""The brain tumour layouts (msd-brain, brats): real BraTS files, samples, label remaps, bad NIfTI, end to end."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from tfseg.convert import brats, samples
from tfseg.convert.base import BadCase
from tfseg.errors import TfsegError


def _expected(paths, label_path, table):
    """Independent reference: reorient, transpose, crop, z-score, all with plain numpy."""
    imgs = [nib.as_closest_canonical(nib.load(p)) for p in paths]
    vol = np.stack([np.asarray(i.dataobj, np.float64) for i in imgs], -1).transpose(2, 1, 0, 3)[:, ::-1]
    lab = None
    if label_path:
        raw = np.asarray(nib.as_closest_canonical(nib.load(label_path)).dataobj).transpose(2, 1, 0)[:, ::-1]
        lab = np.vectorize(table.get)(raw)
    fg = (vol != 0).any(-1) | (lab > 0 if lab is not None else False)
    idx = [np.nonzero(fg.any(axis=tuple(a for a in range(3) if a != k)))[0] for k in range(3)]
    box = tuple(slice(i[0], i[-1] + 1) for i in idx)
    vol = vol[box]
    for c in range(vol.shape[-1]):
        m = vol[..., c] != 0
        vol[..., c][m] = (vol[..., c][m] - vol[..., c][m].mean()) / vol[..., c][m].std()
    return vol, (lab[box] if lab is not None else None)


def test_real_brats_cases(shared_data):
    root = os.path.join(shared_data, "brats")
    if not os.path.isdir(root):
        pytest.skip(f"no BraTS data at {root}")
    layout = brats.BratsLayout()
    cases = {c.case_id: c for c in layout.list_cases(root)}
    assert set(cases) == {"TCGA-DU-7294", "OtherEXampleFromTCIA", "BraTS-GLI-00001-000"}
    assert cases["BraTS-GLI-00001-000"].split == brats.UNLABELLED_SPLIT
    assert cases["BraTS-GLI-00001-000"].group == "BraTS-GLI-00001"
    case = cases["OtherEXampleFromTCIA"]
    assert case.paths["label"].endswith(os.path.join("fusion", "simple.nii.gz"))
    assert case.paths["flair"].endswith("_fla_bet.nii.gz") and case.paths["t1ce"].endswith("_t1c_bet.nii.gz")
    loaded = layout.load_case(case)
    vol, lab = _expected([case.paths[m] for m in brats.MODALITIES], case.paths["label"], brats.BRATS_TABLE)
    assert loaded.volume.shape == vol.shape and loaded.volume.shape[-1] == 4
    assert all(n < 240 for n in loaded.volume.shape[:3])  # cropped from 155 x 240 x 240
    assert loaded.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_allclose(loaded.volume, vol, atol=1e-4)
    np.testing.assert_array_equal(loaded.label, lab)
    raw = np.asarray(nib.load(case.paths["label"]).dataobj)
    for src, dst in ((1, 1), (2, 2), (4, 3)):  # voxel counts survive the remap (crop keeps labels)
        assert (loaded.label == dst).sum() == (raw == src).sum() > 0
    for c in range(4):
        brain = loaded.volume[..., c][loaded.volume[..., c] != 0]
        assert abs(brain.mean()) < 1e-3 and abs(brain.std() - 1) < 1e-3
    unlabelled = layout.load_case(cases["BraTS-GLI-00001-000"])
    assert unlabelled.label is None and unlabelled.volume.shape[-1] == 4


def _write(path, data, zooms=(1.0, 1.0, 1.5)):
    nib.save(nib.Nifti1Image(data, np.diag(list(zooms) + [1.0])), path)


def test_brats_sample_and_2023_naming(tmp_path):
    samples.write("brats", str(tmp_path / "s"), 2)
    layout = brats.BratsLayout()
    cases = layout.list_cases(str(tmp_path / "s"))
    assert [c.case_id for c in cases] == ["BraTS2021_00000", "BraTS2021_00001"]
    case = cases[0]
    loaded = layout.load_case(case)
    vol, lab = _expected([case.paths[m] for m in brats.MODALITIES], case.paths["label"], brats.BRATS_TABLE)
    np.testing.assert_allclose(loaded.volume, vol, atol=1e-4)
    np.testing.assert_array_equal(loaded.label, lab)
    assert set(np.unique(loaded.label)) == {0, 1, 2, 3}
    assert loaded.spacing == (1.5, 1.0, 1.0)  # header zooms (1, 1, 1.5) in D, H, W order
    assert loaded.volume.shape[0] <= 24 and loaded.volume.shape[1] <= 32
    # The same files under BraTS 2023 names, seg relabelled 4 -> 3, give the same case.
    d = tmp_path / "g" / "BraTS-GLI-00002-001"
    d.mkdir(parents=True)
    for src, dst in (("flair", "t2f"), ("t1", "t1n"), ("t1ce", "t1c"), ("t2", "t2w")):
        os.link(case.paths[src], d / f"BraTS-GLI-00002-001-{dst}.nii.gz")
    seg = np.asarray(nib.load(case.paths["label"]).dataobj).copy()
    seg[seg == 4] = 3
    _write(str(d / "BraTS-GLI-00002-001-seg.nii.gz"), seg)
    (c2023,) = layout.list_cases(str(tmp_path / "g"))
    assert c2023.group == "BraTS-GLI-00002" and c2023.split is None
    again = layout.load_case(c2023)
    np.testing.assert_array_equal(again.volume, loaded.volume)
    np.testing.assert_array_equal(again.label, loaded.label)
    info = layout.info()
    assert info.regions == {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]} and info.label_convention == "brats"


def test_msd_sample_matches_brats_sample_and_honours_modality_order(tmp_path):
    samples.write("msd-brain", str(tmp_path / "msd"), 2, seed=3)
    samples.write("brats", str(tmp_path / "b"), 2, seed=3)
    msd = brats.MsdBrainLayout()
    cases = msd.list_cases(str(tmp_path / "msd"))
    loaded = msd.load_case(cases[0])
    img = nib.load(cases[0].paths["image"])
    assert img.shape == (32, 32, 24, 4)
    # The MSD label convention (1 edema, 2 non-enhancing, 3 enhancing) maps to itself.
    raw = np.asarray(nib.load(cases[0].paths["label"]).dataobj)
    for v in range(4):
        assert (loaded.label == v).sum() == (raw == v).sum() - (v == 0) * (raw.size - loaded.label.size)
    # Same synthetic brain as the BraTS sample (same seed): same regions, different class ids.
    b = brats.BratsLayout()
    bl = b.load_case(b.list_cases(str(tmp_path / "b"))[0])
    assert bl.label.shape == loaded.label.shape
    msd_wt = np.isin(loaded.label, brats.MSD_REGIONS["WT"])
    np.testing.assert_array_equal(msd_wt, np.isin(bl.label, brats.BRATS_REGIONS["WT"]))
    np.testing.assert_array_equal(np.isin(loaded.label, brats.MSD_REGIONS["TC"]),
                                  np.isin(bl.label, brats.BRATS_REGIONS["TC"]))
    np.testing.assert_array_equal(loaded.label == 3, bl.label == 3)
    np.testing.assert_allclose(loaded.volume, bl.volume, atol=0.05)  # BraTS sample is int16-rounded
    # A dataset.json listing the channels in another order is honoured.
    root = tmp_path / "perm"
    (root / "imagesTr").mkdir(parents=True)
    data = np.asarray(img.dataobj)
    _write(str(root / "imagesTr" / "X.nii.gz"), data[..., [3, 2, 1, 0]])
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "T2w", "1": "t1gd", "2": "T1w", "3": "FLAIR"}}))
    (root / "labelsTr").mkdir()
    os.link(cases[0].paths["label"], root / "labelsTr" / "X.nii.gz")
    (perm,) = msd.list_cases(str(root))
    np.testing.assert_allclose(msd.load_case(perm).volume, loaded.volume, atol=1e-5)


def test_msd_unlabelled_and_missing_label(tmp_path):
    samples.write("msd-brain", str(tmp_path), 1)
    os.rename(tmp_path / "imagesTr" / "BRATS_001.nii.gz", tmp_path / "imagesTs" / "BRATS_900.nii.gz")
    samples.write("msd-brain", str(tmp_path / "x"), 1)
    os.rename(tmp_path / "x" / "imagesTr" / "BRATS_001.nii.gz", tmp_path / "imagesTr" / "BRATS_002.nii.gz")
    (tmp_path / "imagesTr" / "._BRATS_002.nii.gz").write_bytes(b"macOS resource fork")
    layout = brats.MsdBrainLayout()
    cases = {c.case_id: c for c in layout.list_cases(str(tmp_path))}
    assert set(cases) == {"BRATS_002", "BRATS_900"}
    assert cases["BRATS_900"].split == brats.UNLABELLED_SPLIT
    assert layout.load_case(cases["BRATS_900"]).label is None
    with pytest.raises(BadCase, match="missing file"):
        layout.load_case(cases["BRATS_002"])


def _brats_case(tmp_path):
    samples.write("brats", str(tmp_path), 1)
    layout = brats.BratsLayout()
    return layout, layout.list_cases(str(tmp_path))[0]


def test_bad_nifti_inputs_are_bad_cases(tmp_path):
    layout, case = _brats_case(tmp_path)
    good_seg = np.asarray(nib.load(case.paths["label"]).dataobj).copy()
    data = open(case.paths["t2"], "rb").read()
    open(case.paths["t2"], "wb").write(data[: len(data) // 2])
    with pytest.raises(BadCase, match="unreadable NIfTI") as e:
        layout.load_case(case)
    assert e.value.path == case.paths["t2"]
    _write(case.paths["t2"], np.ones((32, 32, 20), np.int16))
    with pytest.raises(BadCase, match=r"shape \(32, 32, 20\) != flair"):
        layout.load_case(case)
    _write(case.paths["t2"], np.ones((32, 32, 24), np.int16))
    seg = good_seg.copy()
    seg[0, 0, 0] = 5
    _write(case.paths["label"], seg)
    with pytest.raises(BadCase, match=r"label values \[5\] outside"):
        layout.load_case(case)
    _write(case.paths["label"], good_seg[:, :, :-1])
    with pytest.raises(BadCase, match="label shape"):
        layout.load_case(case)
    seg = good_seg.copy()
    seg[0, 0, 0] = 3
    _write(case.paths["label"], seg)
    with pytest.raises(BadCase, match="mixed BraTS"):
        layout.load_case(case)
    os.remove(case.paths["t1"])
    (only,) = layout.list_cases(str(tmp_path))
    with pytest.raises(BadCase, match="missing t1 modality"):
        layout.load_case(only)


def test_wrong_folders_are_user_errors(tmp_path):
    with pytest.raises(TfsegError, match="no BraTS cases"):
        brats.BratsLayout().list_cases(str(tmp_path))
    with pytest.raises(TfsegError, match="not an MSD brain tumour task"):
        brats.MsdBrainLayout().list_cases(str(tmp_path))


@pytest.mark.parametrize("name", ["brats", "msd-brain"])
def test_sample_converts_end_to_end(tmp_path, name):
    import tensorflow as tf

    from tfseg import schema
    from tfseg.convert import get_layout_class
    from tfseg.convert.pipeline import run_convert

    cls = get_layout_class(name)
    samples.write(name, str(tmp_path / "raw"), 3)
    run_convert(name, str(tmp_path / "raw"), str(tmp_path / "out"), split="train=0.5,val=0.5")
    info = schema.load_dataset_info(str(tmp_path / "out"))
    assert info.ndim == 3 and info.channels == 4 and info.num_classes == 4
    assert info.modalities == list(brats.MODALITIES) and info.regions["TC"] == list(cls().info().regions["TC"])
    layout = cls()
    expected = {c.case_id: layout.load_case(c) for c in layout.list_cases(str(tmp_path / "raw"))}
    got = 0
    for split in info.splits:
        for record in tf.data.TFRecordDataset(info.split_files(split, str(tmp_path / "out"))):
            ex = schema.decode_3d(record, channels=4)
            want = expected[ex["source_id"].numpy().decode()]
            np.testing.assert_array_equal(ex["mask"].numpy()[..., 0], want.label)
            np.testing.assert_allclose(ex["image"].numpy(), want.volume, rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(ex["spacing"].numpy(), want.spacing)
            got += 1
    assert got == 3
