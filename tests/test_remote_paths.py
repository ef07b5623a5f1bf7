"""User paths on a filesystem that is not the local disk, one reader at a time: TF's in-memory
``ram://`` goes through the same ``tf.io.gfile`` layer as gs://, so an os call or a library that
opens local files only finds nothing there (tests/test_storage.py runs the stages end to end)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from helpers import copy_to_filesystem


def _put(local: str, remote: str) -> str:
    tf.io.gfile.makedirs(remote.rsplit("/", 1)[0])
    tf.io.gfile.copy(local, remote, overwrite=True)
    return remote


def test_a_plan_or_pipeline_file_on_a_remote_folder_loads(tmp_path, monkeypatch):
    """`tfseg plan --output gs://.../plan.yaml` then `tfseg fit --config` it, or `tfseg run` it."""
    from tfseg.config import load_config
    from tfseg.pipeline import load_pipeline

    monkeypatch.chdir(tmp_path)  # a stray os call would look for ./ram:/...
    (tmp_path / "plan.yaml").write_text("fit:\n  epochs: 3\n  model: unet\n")
    remote = _put(str(tmp_path / "plan.yaml"), "ram://tfseg-remote-paths/plan.yaml")
    assert load_config(remote) == {"fit": {"epochs": 3, "model": "unet"}}
    (tmp_path / "p.yaml").write_text("dataset: carvana\nfit:\n  epochs: 2\n")
    cfg = load_pipeline(_put(str(tmp_path / "p.yaml"), "ram://tfseg-remote-paths/p.yaml"))
    assert cfg["dataset"] == "carvana" and cfg["fit"]["epochs"] == 2
    from tfseg.errors import TfsegError

    with pytest.raises(TfsegError, match="ram://tfseg-remote-paths/none.yaml: config file not found"):
        load_config("ram://tfseg-remote-paths/none.yaml")


def test_a_remote_nifti_reads_as_the_local_file_does(tmp_path):
    import nibabel as nib

    from tfseg import volumes

    rng = np.random.default_rng(0)
    affine = np.diag([-1.0, 1.0, 2.0, 1.0])  # not canonical: predict writes back in this orientation
    nib.save(nib.Nifti1Image(rng.normal(size=(6, 5, 4, 2)).astype(np.float32), affine), tmp_path / "v.nii.gz")
    local_volume, local_img = volumes.read_volume(str(tmp_path / "v.nii.gz"), 2)
    remote = _put(str(tmp_path / "v.nii.gz"), "ram://tfseg-remote-paths/v.nii.gz")
    volume, img = volumes.read_volume(remote, 2)
    np.testing.assert_array_equal(volume, local_volume)
    np.testing.assert_array_equal(img.affine, local_img.affine)
    # The mask written back "like" it needs the image after the temporary copy is gone.
    volumes.write_mask(str(tmp_path / "m.nii.gz"), (volume[..., 0] > 0).astype(np.uint8), img)
    volumes.write_mask(str(tmp_path / "m2.nii.gz"), (volume[..., 0] > 0).astype(np.uint8), local_img)
    np.testing.assert_array_equal(nib.load(tmp_path / "m.nii.gz").get_fdata(), nib.load(tmp_path / "m2.nii.gz").get_fdata())


def test_run_colors_read_a_remote_dataset_json(tmp_path):
    from tfseg.visualize import default_colors, run_colors

    colors = [[10, 20, 30], [200, 100, 0], [1, 2, 3]]
    (tmp_path / "dataset.json").write_text(json.dumps({"num_classes": 3, "class_colors": colors}))
    data = copy_to_filesystem(str(tmp_path), "ram://tfseg-remote-paths/colors-data")
    got = run_colors({"num_classes": 3, "data_dir": data})
    np.testing.assert_array_equal(got[:3], np.array(colors, dtype=got.dtype))
    assert not np.array_equal(default_colors(3)[:3], got[:3])  # the dataset's, not the fixed map


def test_litert_and_onnx_exports_predict_from_a_remote_folder(trained_squares, tmp_path):
    """`tfseg predict --model gs://EXPORTS/NAME` for LiteRT and ONNX exports (their runtimes open
    local files only): the same probabilities as from the local folder."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("ai_edge_litert")
    from tfseg.export import run_export
    from tfseg.predict import make_predictor

    exports = str(tmp_path / "exports")
    image = np.random.default_rng(3).integers(0, 256, (40, 36, 3)).astype(np.uint8)
    for fmt in ("litert", "onnx"):
        version = run_export(trained_squares["run"], exports, fmt, format=fmt)
        remote = copy_to_filesystem(os.path.dirname(version), f"ram://tfseg-remote-paths/exports/{fmt}")
        want = make_predictor(os.path.dirname(version)).probabilities(image)
        got = make_predictor(remote).probabilities(image)
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=fmt)


def test_the_folder_layouts_option_files_read_from_a_remote_folder(tmp_path):
    """`tfseg convert --dataset folder --input gs://... --palette gs://.../palette.json`."""
    from tfseg.convert.folder import FolderLayout, load_class_names
    from tfseg.errors import TfsegError

    (tmp_path / "palette.json").write_text(json.dumps({"0,0,0": 0, "255,0,0": {"id": 1, "name": "car"}}))
    (tmp_path / "names.txt").write_text("background\ncar\n")
    remote = copy_to_filesystem(str(tmp_path), "ram://tfseg-remote-paths/options")
    assert load_class_names(f"{remote}/names.txt") == ["background", "car"]
    layout = FolderLayout(palette=f"{remote}/palette.json")
    assert layout.palette == {(0, 0, 0): 0, (255, 0, 0): 1}
    with pytest.raises(TfsegError, match=r"^ram://tfseg-remote-paths/options/none.json: cannot read palette \("):
        FolderLayout(palette=f"{remote}/none.json")
