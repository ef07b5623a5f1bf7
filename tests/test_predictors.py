"""The predictor interface (tfseg.predict.base.Predictor): every model predict runs implements it,
and the predict job asks nothing else of a model. Fake predictors (numpy, no TensorFlow model)
stand in for the real ones here; tests/test_predict.py runs the real ones."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from tfseg import visualize
from tfseg.predict import base, run
from tfseg.predict.base import NEEDS_3D, ModelFacts, Predictor
from tfseg.predict.predictors import KerasPredictor, SavedModelPredictor, model_facts
from tfseg.predict.serving import GrpcClient, RestClient


def test_every_predictor_implements_the_interface():
    for cls in (SavedModelPredictor, KerasPredictor, RestClient, GrpcClient):
        assert issubclass(cls, Predictor), cls

    class ImagesOnly(Predictor):
        def predict_images(self, images):
            return []

    with pytest.raises(TypeError):  # predict_volume is part of the interface
        ImagesOnly()


def test_a_served_model_is_a_2d_predictor_with_its_facts_as_attributes():
    client = RestClient("127.0.0.1:1", "carvana", version=3)
    assert client.url == "http://127.0.0.1:1/v1/models/carvana/versions/3:predict"
    facts = model_facts("carvana", server="127.0.0.1:1")
    for name in ("ndim", "channels", "class_names", "ignore_index", "preprocessing"):
        assert getattr(client, name) == getattr(facts, name), name
    assert (client.ndim, client.channels, client.class_names, client.ignore_index, client.preprocessing) == (
        2, None, None, None, {})
    np.testing.assert_array_equal(client.colors, visualize.default_colors(256))
    np.testing.assert_array_equal(facts.colors, client.colors)
    with pytest.raises(ValueError, match="volumes need a 3D model"):
        client.predict_volume(np.zeros((4, 4, 4, 1), np.float32))


class Threshold(Predictor):
    """Class 1 where the gray value is >= 128; a batch with an undecodable image fails whole, as
    the export's graph does. ``ndim=3``: class 1 where the first channel is above 5."""

    def __init__(self, ndim=2, preprocessing=None):
        self.ndim, self.channels, self.class_names = ndim, 1, ["background", "thing"]
        self.colors, self.ignore_index, self.preprocessing = visualize.default_colors(2), None, preprocessing or {}
        self.calls = []

    def predict_images(self, images):
        self.calls.append(len(images))
        try:
            grays = [np.array(Image.open(io.BytesIO(b)).convert("L")) for b in images]
        except OSError:
            raise ValueError("not an image") from None
        return [(g >= 128).astype(np.uint8) for g in grays]

    def predict_volume(self, volume):
        return (volume[..., 0] > 5).astype(np.uint8)


def test_the_job_asks_nothing_of_a_model_but_the_interface(tmp_path, monkeypatch):
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(0)
    inp = tmp_path / "in"
    inp.mkdir()
    grays = {stem: rng.integers(0, 256, (9, 13), dtype=np.uint8) for stem in ("a", "b", "c")}
    for stem, g in grays.items():
        Image.fromarray(g).save(inp / f"{stem}.png")
    (inp / "broken.png").write_bytes(b"\x89PNG not really")
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.float32), np.eye(4)), str(inp / "vol.nii.gz"))
    fake = Threshold()
    monkeypatch.setattr(run, "make_predictor", lambda model_path, **kw: fake)

    summary = run.run_predict("any", str(inp), str(tmp_path / "out"), batch_size=4)

    assert fake.calls == [4, 1, 1, 1, 1]  # the batch failed on broken.png, then one by one
    assert summary["written"] == 3
    assert sorted((os.path.basename(f["input"]), f["error"]) for f in summary["failed"]) == [
        ("broken.png", "not an image"), ("vol.nii.gz", NEEDS_3D)]
    for stem, g in grays.items():
        np.testing.assert_array_equal(np.array(Image.open(tmp_path / "out" / f"{stem}.png")), g >= 128)


def test_volumes_go_through_predict_volume_and_keep_the_inputs_affine(tmp_path, monkeypatch):
    nib = pytest.importorskip("nibabel")
    inp = tmp_path / "in"
    inp.mkdir()
    data = np.zeros((6, 5, 4), np.float32)
    data[1:4, 2:, 0:2] = 7.0
    data[0, 0, 0] = 3.0  # under the threshold; z-scored, 7.0 would become 0 and fall under it
    affine = np.diag([-1.0, 2.0, 3.0, 1.0])  # a flipped axis: the mask must come back in the input's
    nib.save(nib.Nifti1Image(data, affine), str(inp / "vol.nii.gz"))
    # The predictor's own preprocessing reaches the reader: no z-score, raw values.
    fake = Threshold(ndim=3, preprocessing={"normalization": "none"})
    monkeypatch.setattr(run, "make_predictor", lambda model_path, **kw: fake)

    summary = run.run_predict("any", str(inp), str(tmp_path / "out"), overlay=True)

    assert summary["written"] == 1 and not summary["failed"]
    out = nib.load(str(tmp_path / "out" / "vol.nii.gz"))
    np.testing.assert_array_equal(np.asarray(out.dataobj), data > 5)
    np.testing.assert_array_equal(out.affine, affine)
    assert os.path.isfile(tmp_path / "out" / "overlays" / "vol.png")


def test_model_facts_is_a_frozen_description():
    facts = ModelFacts(ndim=2, channels=3, class_names=None, colors=np.zeros((2, 3), np.uint8), ignore_index=None,
                       preprocessing={})
    with pytest.raises(AttributeError):
        facts.ndim = 3
    assert base.ModelFacts is ModelFacts
