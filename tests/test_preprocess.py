"""What is evaluated is what is served: one preprocessing record from conversion to inference.

2D: ``convert --image-size`` records its resize (tfseg.preprocess); the export graph, given an
original image, computes exactly what evaluation computes on the converted record.
3D: dataset.json records orientation, channel order and normalization (tfseg.volumes);
``tfseg predict`` on an MSD-layout NIfTI sees the record's volume and predicts its mask.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import fit, tiny_fit_config
from PIL import Image

from tfseg import inference, preprocess, rundir, schema
from tfseg.convert import samples
from tfseg.convert.pipeline import run_convert


def _records(data_dir, split="train"):
    from tfseg.data import read_examples

    return {ex["source_id"].numpy().decode(): ex for ex in read_examples(data_dir, split)}


def test_source_resize_matches_a_numpy_antialiased_bilinear():
    """Shrinking by 2 with antialiasing averages each 2x2 block with a triangle filter over 4x4:
    weights (1, 3, 3, 1)/8 per axis, edges renormalized; computed here independently."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 6, 1)).astype(np.float64)
    w = np.array([1, 3, 3, 1], np.float64)

    def shrink_axis(a, axis):
        n = a.shape[axis] // 2
        out = []
        for i in range(n):
            idx = np.arange(2 * i - 1, 2 * i + 3)
            ok = (idx >= 0) & (idx < a.shape[axis])
            vals = np.take(a, idx[ok], axis=axis)
            ww = w[ok] / w[ok].sum()
            out.append(np.tensordot(vals, ww, axes=([axis], [0])))
        return np.stack(out, axis=axis)

    expected = np.clip(np.round(shrink_axis(shrink_axis(image, 0), 1)), 0, 255)
    got = preprocess.source_resize(image.astype(np.uint8), preprocess.resize_record((4, 3))).numpy()
    np.testing.assert_array_equal(got, expected)
    # At the recorded size (a record) it changes nothing.
    same = preprocess.source_resize(image.astype(np.uint8), preprocess.resize_record((8, 6))).numpy()
    np.testing.assert_array_equal(same, image)


@pytest.mark.slow
def test_served_graph_of_an_original_equals_evaluation_on_its_record(tmp_path):
    import tensorflow as tf

    from tfseg import export

    raw, data = str(tmp_path / "raw"), str(tmp_path / "data")
    samples.write("isic", raw, 4, seed=3, image_size=(48, 64))
    run_convert("isic", raw, data, split="train=1", image_size=(24, 32))
    info = schema.load_dataset_info(data)
    assert info.preprocessing == {"resize": {"size": [24, 32], "method": "bilinear", "antialias": True,
                                             "dtype": "uint8", "format": "png"}}
    records = _records(data)
    img_dir = os.path.join(raw, "ISIC2018_Task1-2_Training_Input")
    originals = {os.path.splitext(f)[0]: os.path.join(img_dir, f) for f in sorted(os.listdir(img_dir))}
    # The record holds exactly the recorded resize of the original (lossless PNG), decoded as the
    # served graph decodes it (TensorFlow's JPEG decoder; PIL's gives other pixels).
    for case_id, ex in records.items():
        original = tf.io.decode_image(open(originals[case_id], "rb").read(), channels=3).numpy()
        assert np.abs(original.astype(int) - np.asarray(Image.open(originals[case_id])).astype(int)).max() > 0
        expected, _ = preprocess.convert_resize(original, None, (24, 32))
        np.testing.assert_array_equal(ex["image"].numpy(), expected)

    run = fit(tiny_fit_config(data, str(tmp_path / "run"), image_size="24x32", epochs=1))
    assert rundir.load_run_info(run).preprocessing == info.preprocessing
    base = str(tmp_path / "exports")
    version_dir = export.run_export(run, base, "isic")
    assert json.load(open(os.path.join(version_dir, export.METADATA)))["preprocessing"] == info.preprocessing
    serve = tf.saved_model.load(version_dir).signatures["serving_default"]
    model = export.with_precision(rundir.load_model(run), "float32")

    old_way_apart = 0.0
    for case_id, ex in records.items():
        data_bytes = open(originals[case_id], "rb").read()
        out = serve(image_bytes=tf.constant([data_bytes]))
        served_probs = out["probabilities"].numpy()[0]
        # evaluate's prediction on the converted record (tfseg.inference, as evaluate runs it).
        probs = inference.predict_image(model, ex["image"].numpy(), size=(24, 32))
        np.testing.assert_allclose(served_probs, probs, atol=1e-5)
        back = preprocess.resize_back(probs, (48, 64)).numpy()
        np.testing.assert_array_equal(out["mask"].numpy()[0], inference.probs_to_mask(back, True))
        # Without the recorded resize (the old graph: plain bilinear from the original) the
        # model sees other pixels: the test above would fail.
        decoded = tf.io.decode_image(data_bytes, channels=3, expand_animations=False)
        plain = tf.image.resize(tf.cast(decoded, tf.float32), (24, 32), method="bilinear").numpy()
        old_way_apart = max(old_way_apart, float(np.abs(model(plain[None]).numpy()[0] - probs).max()))
    assert old_way_apart > 1e-3


@pytest.fixture
def msd_case(tmp_path):
    """One MSD Task01 case whose modalities are stored in another order than tfseg's (the task's
    dataset.json says which), in a non-canonical orientation, every voxel nonzero (no crop)."""
    import nibabel as nib

    root = tmp_path / "Task01_BrainTumour"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(5)
    shape = (18, 16, 12)
    # Stored order: T2w, FLAIR, T1w, t1gd; each modality has its own intensity range.
    image = np.stack([rng.uniform(lo, lo + 50, shape) for lo in (300, 10, 120, 700)], -1).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[4:10, 5:12, 3:8] = 1
    label[6:9, 7:10, 4:6] = 3
    image[label > 0, 1] += 60  # the lesion is bright in FLAIR
    affine = np.array([[-1.0, 0, 0, 20], [0, 1.0, 0, -8], [0, 0, 1.5, 4], [0, 0, 0, 1]])  # LAS
    for i in range(2):
        nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / f"BRATS_00{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / f"BRATS_00{i}.nii.gz"))
    meta = {"modality": {"0": "T2w", "1": "FLAIR", "2": "T1w", "3": "t1gd"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}}
    (root / "dataset.json").write_text(json.dumps(meta))
    return str(root), image


@pytest.mark.slow
def test_predict_applies_the_volume_record_of_an_msd_conversion(tmp_path, msd_case):
    import nibabel as nib

    from tfseg import predict, volumes

    root, image = msd_case
    data = str(tmp_path / "data")
    run_convert("msd-brain", root, data, split="train=1")
    info = schema.load_dataset_info(data)
    assert info.preprocessing["channels"] == ["flair", "t1", "t1ce", "t2"]
    assert info.preprocessing["source_channels"] == [1, 2, 3, 0]
    assert info.preprocessing["orientation"] == "RAS+"
    record = _records(data)["BRATS_000"]["image"].numpy()

    # The volume predict builds from the original file is the record's (float16 in records).
    path = os.path.join(root, "imagesTr", "BRATS_000.nii.gz")
    volume, _ = volumes.read_volume(path, 4, info.preprocessing)
    np.testing.assert_allclose(volume, record, atol=2e-2, rtol=2e-3)
    # Independently: FLAIR (stored channel 1) x flipped to RAS, then (z, flipped y, x), z-scored.
    flair = image[::-1, :, :, 1].transpose(2, 1, 0)[:, ::-1]
    np.testing.assert_allclose(record[..., 0], (flair - flair.mean()) / flair.std(), atol=2e-2, rtol=2e-3)
    # Without the record's channel order the volume would be another one.
    unordered, _ = volumes.read_volume(path, 4, dict(info.preprocessing, source_channels=[0, 1, 2, 3]))
    assert np.abs(unordered - record).max() > 1.0

    run = fit(tiny_fit_config(data, str(tmp_path / "run"), image_size=None, patch_size="16x16x16", epochs=1,
                              validation_split=None))
    assert rundir.load_run_info(run).preprocessing == info.preprocessing
    out = str(tmp_path / "pred")
    summary = predict.run_predict(run, os.path.dirname(path), out)
    assert summary["written"] == 2, summary
    got = nib.load(os.path.join(out, "BRATS_000.nii.gz"))
    got_model_axes = volumes.ras_to_model_axes(np.asarray(nib.as_closest_canonical(got).dataobj))
    # tfseg.inference in float32 (as evaluate runs it) on the volume the record gives: the same
    # mask. On the record itself (stored in float16) a one-epoch model's near-ties may flip a few
    # voxels, so that comparison is looser.
    from tfseg.export import with_precision

    model = with_precision(rundir.load_model(run), "float32")
    expected = inference.probs_to_mask(inference.predict_volume(model, volume, patch_size=(16, 16, 16)), False)
    assert (got_model_axes == expected).mean() > 0.9999
    on_record = inference.probs_to_mask(inference.predict_volume(model, record, patch_size=(16, 16, 16)), False)
    assert (got_model_axes == on_record).mean() > 0.99

    # The export applies the same record in its graph: predict_ras_volume on the canonical volume.
    import tensorflow as tf

    from tfseg import export

    version_dir = export.run_export(run, str(tmp_path / "exports"), "msd")
    serve = tf.saved_model.load(version_dir).signatures["predict_ras_volume"]
    canonical = np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj, np.float32)
    served = serve(volume=tf.constant(canonical))["mask"].numpy()
    predicted = np.asarray(nib.as_closest_canonical(got).dataobj)
    assert served.shape == canonical.shape[:3]
    assert (served == predicted).mean() > 0.999


def test_volume_record_in_tensorflow_equals_numpy():
    from tfseg import volumes

    rng = np.random.default_rng(1)
    ras = rng.normal(50, 10, (7, 6, 5, 3)).astype(np.float32)
    ras[:2, :, :, 1] = 0  # outside the brain in one channel
    record = volumes.volume_record(["a", "b", "c"], [2, 0, 1])
    got = volumes.apply_record_tf(ras, record).numpy()
    np.testing.assert_allclose(got, volumes.apply_record(ras, record), atol=1e-5)
    assert got.shape == (5, 6, 7, 3)
    np.testing.assert_array_equal(volumes.model_axes_to_ras_tf(got[..., 0]).numpy(), volumes.model_axes_to_ras(got[..., 0]))
