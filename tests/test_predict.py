"""tfseg predict: local run / export / Beam paths, NIfTI affine, and the REST client against a stub."""

import base64
import http.server
import io
import json
import os
import threading

import numpy as np
import pytest

keras = pytest.importorskip("keras")
nib = pytest.importorskip("nibabel")
from click.testing import CliRunner  # noqa: E402
from helpers import make_run  # noqa: E402
from PIL import Image  # noqa: E402

from tfseg import export, inference, predict  # noqa: E402
from tfseg.cli import cli  # noqa: E402
from tfseg.errors import TfsegError  # noqa: E402


def write_image(path, array):
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def setup2d(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict2d")
    run, model = make_run(root / "run", num_classes=3)
    base = str(root / "models")
    export.run_export(run, base, "tiny")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    arrays = {"a": rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
              "b": rng.integers(0, 256, (40, 17, 3), dtype=np.uint8),
              "c": rng.integers(0, 256, (16, 16), dtype=np.uint8)}
    write_image(images / "a.png", arrays["a"])
    write_image(images / "b.bmp", arrays["b"])
    write_image(images / "c.png", arrays["c"])
    (images / "notes.txt").write_text("ignored: not an image extension")
    return {"root": root, "run": run, "model": model, "base": base, "images": str(images), "arrays": arrays}


def expected_mask(model, array):
    rgb = np.repeat(array[..., None], 3, -1) if array.ndim == 2 else array
    return inference.probs_to_mask(inference.predict_image(model, rgb, size=(16, 16)), False)


def listing(folder):
    """The files predict wrote, without the output-ownership marker (a dot file)."""
    return sorted(n for n in os.listdir(folder) if not n.startswith("."))


def read_png(path):
    return np.array(Image.open(path))


def test_run_dir_and_export_dir_write_same_masks(setup2d, tmp_path):
    s = setup2d
    out_run = str(tmp_path / "from_run")
    summary = predict.run_predict(s["run"], s["images"], out_run, batch_size=2)
    assert summary["written"] == 3 and summary["failed"] == []
    assert listing(out_run) == ["a.png", "b.png", "c.png", predict.CONFIG_JSON, predict.SUMMARY_JSON]
    for stem, array in s["arrays"].items():
        np.testing.assert_array_equal(read_png(os.path.join(out_run, stem + ".png")), expected_mask(s["model"], array))
    # The export NAME directory resolves to its latest version and runs the SavedModel.
    out_exp = str(tmp_path / "from_export")
    done = []
    predict.run_predict(os.path.join(s["base"], "tiny"), s["images"], out_exp, batch_size=2, progress=done.append)
    assert sum(done) == 3
    for stem, array in s["arrays"].items():
        got = read_png(os.path.join(out_exp, stem + ".png"))
        assert got.shape == array.shape[:2]
        np.testing.assert_array_equal(got, expected_mask(s["model"], array))
    with pytest.raises(TfsegError, match="exists"):
        predict.run_predict(s["run"], s["images"], out_run)


def test_bad_file_is_reported_and_others_written(setup2d, tmp_path):
    s = setup2d
    inp = tmp_path / "in"
    inp.mkdir()
    write_image(inp / "good1.png", s["arrays"]["a"])
    (inp / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    write_image(inp / "good2.png", s["arrays"]["b"])
    for model_path in (s["base"] + "/tiny", s["run"]):
        out = tmp_path / ("out_" + os.path.basename(model_path))
        summary = predict.run_predict(model_path, str(inp), str(out), batch_size=8)
        assert summary["written"] == 2
        assert [os.path.basename(f["input"]) for f in summary["failed"]] == ["broken.jpg"]
        assert listing(out) == ["good1.png", "good2.png", predict.CONFIG_JSON, predict.SUMMARY_JSON]


def test_inputs_and_model_resolution_errors(setup2d, tmp_path):
    with pytest.raises(TfsegError, match="no images"):
        predict.list_inputs(str(tmp_path))
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(TfsegError, match="both write"):
        predict.list_inputs(str(tmp_path))
    with pytest.raises(TfsegError, match="not an export version"):
        predict.resolve_model(str(tmp_path))
    assert predict.resolve_model(setup2d["base"] + "/tiny") == ("savedmodel", setup2d["base"] + "/tiny/1")
    assert predict.resolve_model(setup2d["run"]) == ("run", setup2d["run"])


def test_volumes_keep_affine(tmp_path):
    run, model = make_run(tmp_path / "run", ndim=3, num_classes=3, channels=2, size=(8, 8, 8))
    base = str(tmp_path / "models")
    export.run_export(run, base, "vol")
    inp = tmp_path / "vols"
    inp.mkdir()
    rng = np.random.default_rng(0)
    data = rng.normal(100, 20, (9, 10, 11, 2)).astype(np.float32)
    data[:2] = 0  # background, excluded from the z-score
    affine = np.array([[1.5, 0, 0, -10], [0, 2.0, 0, 5], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), str(inp / "case1.nii.gz"))
    fg = data[..., 0] != 0
    z = np.zeros_like(data)
    for c in range(2):
        v = data[..., c]
        z[..., c] = np.where(fg, (v - v[fg].mean()) / v[fg].std(), 0)
    # The affine is already RAS+, so only the model axis order applies (tfseg.volumes).
    from tfseg.volumes import model_axes_to_ras, ras_to_model_axes

    probs = inference.predict_volume(model, np.ascontiguousarray(ras_to_model_axes(z)), patch_size=(8, 8, 8))
    expected = model_axes_to_ras(inference.probs_to_mask(probs, False))
    for model_path in (run, base + "/vol"):
        out = tmp_path / ("out_" + os.path.basename(model_path))
        summary = predict.run_predict(model_path, str(inp), str(out))
        assert summary["written"] == 1, summary
        img = nib.load(str(out / "case1.nii.gz"))
        np.testing.assert_allclose(img.affine, affine)
        got = np.asarray(img.dataobj)
        assert got.dtype == np.uint8 and got.shape == (9, 10, 11)
        assert (got == expected).mean() > 0.99
    # Beam's RunInference on the export writes the same volume.
    pytest.importorskip("apache_beam")
    out = tmp_path / "beam_vol"
    summary = predict.run_predict(base + "/vol", str(inp), str(out), runner="DirectRunner", overlay=True)
    assert summary["written"] == 1, summary
    img = nib.load(str(out / "case1.nii.gz"))
    np.testing.assert_allclose(img.affine, affine)
    local = nib.load(str(tmp_path / "out_vol" / "case1.nii.gz"))
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(local.dataobj))
    with Image.open(out / "overlays" / "case1.png") as ov:  # the middle axial slice (model axes D, H, W)
        assert ov.size == (9, 10)  # (D, H, W) = (Z, Y, X): an axial slice is Y rows by X columns


class RestStub(http.server.BaseHTTPRequestHandler):
    """A local stand-in answering in TF Serving's documented REST format (it is NOT TF Serving).

    It thresholds each posted image's gray value at 128 and returns the row-format response.
    """

    requests = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        RestStub.requests.append((self.path, body))
        if body["instances"][0]["b64"] == base64.b64encode(b"boom").decode():
            self._reply(400, {"error": "Invalid argument: input is not a JPEG, PNG, GIF or BMP image"})
            return
        predictions = []
        for inst in body["instances"]:
            gray = np.array(Image.open(io.BytesIO(base64.b64decode(inst["b64"]))).convert("L"))
            mask = (gray >= 128).astype(np.uint8)
            predictions.append({"mask_png_bytes": {"b64": base64.b64encode(predict.encode_png(mask)).decode()},
                                "height": mask.shape[0], "width": mask.shape[1]})
        self._reply(200, {"predictions": predictions})

    def _reply(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def rest_stub():
    RestStub.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RestStub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_rest_request_body_matches_documented_format():
    body = predict.build_rest_request([b"\x89PNG abc", b"\xff\xd8\xff"], "serving_default")
    assert body == {"signature_name": "serving_default",
                    "instances": [{"b64": "iVBORyBhYmM="}, {"b64": "/9j/"}]}
    json.dumps(body)  # must be JSON-serializable as is


def test_rest_response_parsing_row_and_columnar():
    mask = np.array([[0, 1], [2, 1]], np.uint8)
    png = {"b64": base64.b64encode(predict.encode_png(mask)).decode()}
    for body in ({"predictions": [{"mask_png_bytes": png, "height": 2}]}, {"outputs": {"mask_png_bytes": [png]}}):
        (got,) = predict.parse_rest_response(body, 1)
        np.testing.assert_array_equal(got, mask)
    with pytest.raises(ValueError, match="server error"):
        predict.parse_rest_response({"error": "bad"}, 1)
    with pytest.raises(ValueError, match="mask_png_bytes"):
        predict.parse_rest_response({"predictions": [{"mask": [[0]]}]}, 1)


def test_server_mode_posts_to_rest_stub(setup2d, rest_stub, tmp_path):
    s = setup2d
    out = tmp_path / "out"
    summary = predict.run_predict("tiny", s["images"], str(out), batch_size=2, server=rest_stub, model_version=3)
    assert summary["written"] == 3
    paths = [p for p, _ in RestStub.requests]
    assert paths == ["/v1/models/tiny/versions/3:predict"] * 2  # 3 images in batches of 2
    sent = [base64.b64decode(i["b64"]) for _, b in RestStub.requests for i in b["instances"]]
    assert sent[0] == open(os.path.join(s["images"], "a.png"), "rb").read()  # original bytes, untouched
    assert all(b["signature_name"] == "predict_masks_png" for _, b in RestStub.requests)
    assert all(set(b) == {"signature_name", "instances"} for _, b in RestStub.requests)
    for stem, array in s["arrays"].items():
        gray = np.array(Image.fromarray(array).convert("L"))
        np.testing.assert_array_equal(read_png(out / f"{stem}.png"), (gray >= 128).astype(np.uint8))
    # An error response fails that input only.
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "bad.png").write_bytes(b"boom")
    write_image(inp / "good.png", s["arrays"]["a"])
    summary = predict.run_predict("tiny", str(inp), str(tmp_path / "out2"), server=rest_stub, batch_size=1)
    assert summary["written"] == 1 and "not a JPEG" in summary["failed"][0]["error"]
    with pytest.raises(TfsegError, match="cannot reach"):
        predict.run_predict("tiny", str(inp), str(tmp_path / "out3"), server="127.0.0.1:1")


def test_beam_run_inference_writes_what_the_local_predictor_writes(setup2d, tmp_path, monkeypatch):
    pytest.importorskip("apache_beam")
    from tfseg.predict import beam as beam_inference

    s = setup2d
    inp = tmp_path / "in"
    inp.mkdir()
    for stem, array in s["arrays"].items():
        write_image(inp / f"{stem}.png", array)
    (inp / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    loaded = []
    for cls in (beam_inference.SavedModelHandler, beam_inference.PredictorHandler):
        real = cls.load_model
        monkeypatch.setattr(cls, "load_model", lambda self, real=real, cls=cls: loaded.append(cls.__name__) or real(self))
    for model_path, handler in ((s["base"] + "/tiny", "SavedModelHandler"), (s["run"], "PredictorHandler")):
        name = os.path.basename(model_path)
        out_local, out_beam = tmp_path / f"local_{name}", tmp_path / f"beam_{name}"
        local = predict.run_predict(model_path, str(inp), str(out_local), batch_size=2, overlay=True)
        loaded.clear()
        beam = predict.run_predict(model_path, str(inp), str(out_beam), runner="DirectRunner", batch_size=2,
                                   overlay=True)
        assert loaded and set(loaded) == {handler}  # Beam's RunInference loaded the model
        assert beam["written"] == local["written"] == 3
        assert beam["failed"] == local["failed"] and [os.path.basename(f["input"]) for f in beam["failed"]] == [
            "broken.jpg"]
        assert listing(out_beam) == listing(out_local)
        assert sorted(os.listdir(out_beam / "overlays")) == sorted(os.listdir(out_local / "overlays"))
        for rel in [f"{stem}.png" for stem in s["arrays"]] + [f"overlays/{stem}.png" for stem in s["arrays"]]:
            assert (out_beam / rel).read_bytes() == (out_local / rel).read_bytes(), rel


def test_cli_export_and_predict(setup2d, tmp_path):
    s = setup2d
    runner = CliRunner()
    base = str(tmp_path / "models")
    r = runner.invoke(cli, ["export", "--run", s["run"], "--output", base, "--name", "m", "--version", "4"])
    assert r.exit_code == 0, r.output
    assert os.path.isfile(os.path.join(base, "m", "4", "saved_model.pb")) and "version 4" in r.output
    out = str(tmp_path / "masks")
    r = runner.invoke(cli, ["predict", "--model", os.path.join(base, "m"), "--input", s["images"], "--output", out])
    assert r.exit_code == 0, r.output
    assert "3 masks written, 0 failed" in r.output
    assert "predicting: 3/3 inputs" in r.output  # one plain progress line: CliRunner is no terminal
    assert "\r" not in r.output
    r = runner.invoke(cli, ["export", "--run", str(tmp_path), "--output", base, "--name", "m"])
    assert r.exit_code == 2 and "error:" in r.output and "run.json" in r.output


@pytest.mark.realdata
def test_real_isic_jpegs_through_export(setup2d, shared_data, tmp_path):
    """Real dermoscopy JPEGs (up to 3024x2016) through the SavedModel: one mask per image at its
    original size, in batches of mixed sizes."""
    images = os.path.join(shared_data, "isic", "data", "example_image")
    if not os.path.isdir(images):
        pytest.skip(f"{images} not found")
    out = tmp_path / "isic"
    summary = predict.run_predict(setup2d["base"] + "/tiny", images, str(out), batch_size=4)
    names = sorted(n for n in os.listdir(images) if n.endswith(".jpg"))
    assert summary["written"] == len(names) and not summary["failed"]
    for name in names[:6]:
        with Image.open(os.path.join(images, name)) as im:
            size = im.size
        mask = Image.open(out / name.replace(".jpg", ".png"))
        assert mask.size == size and mask.mode == "P"
        assert set(np.unique(np.array(mask))) <= {0, 1, 2}


def test_volume_axes_round_trip_in_the_inputs_orientation(tmp_path):
    """A voxelwise 'model' on read_volume's output, written back, lines up with the input voxels."""
    import nibabel as nib

    from tfseg.volumes import read_volume
    from tfseg.volumes import write_mask as write_volume_mask

    rng = np.random.default_rng(0)
    data = rng.uniform(1, 10, (6, 7, 5, 2)).astype(np.float32)
    data[0] = 0  # background
    affine = np.diag([-1.2, -1.0, 2.0, 1.0])  # LPS-like: not the canonical orientation
    affine[:3, 3] = [5, 6, -7]
    path = str(tmp_path / "v.nii.gz")
    nib.save(nib.Nifti1Image(data, affine), path)

    volume, img = read_volume(path, channels=2)
    assert volume.shape == (5, 7, 6, 2)  # (z, y, x)
    write_volume_mask(str(tmp_path / "m.nii.gz"), (volume[..., 0] > 0).astype(np.uint8), img)

    out = nib.load(str(tmp_path / "m.nii.gz"))
    np.testing.assert_allclose(out.affine, affine)
    brain = data[..., 0] != 0
    expected = brain & (data[..., 0] > data[..., 0][brain].mean())
    np.testing.assert_array_equal(np.asarray(out.dataobj).astype(bool), expected)


def test_masks_are_palette_pngs_and_overlays_keep_the_input_size(setup2d, tmp_path):
    s = setup2d
    inp = tmp_path / "photos"
    inp.mkdir()
    rng = np.random.default_rng(5)
    arrays = {"big": rng.integers(0, 256, (96, 128, 3), dtype=np.uint8),
              "gray": rng.integers(0, 256, (80, 90), dtype=np.uint8)}
    Image.fromarray(arrays["big"]).save(inp / "big.jpg", quality=95)
    write_image(inp / "gray.png", arrays["gray"])
    import tensorflow as tf

    # The model sees TensorFlow's JPEG decoding (the export's decoder), which differs from PIL's.
    decoded = {"big": tf.io.decode_jpeg((inp / "big.jpg").read_bytes()).numpy(), "gray": arrays["gray"]}
    out = tmp_path / "masks"
    summary = predict.run_predict(s["run"], str(inp), str(out), overlay=True)
    assert summary["written"] == 2
    # Kelly's colours after black: make_run's dataset is not VOC and records none.
    kelly = [[0, 0, 0], [243, 195, 0], [135, 86, 146]]
    for stem, array in decoded.items():
        want = expected_mask(s["model"], array)
        with Image.open(out / f"{stem}.png") as im:
            assert im.mode == "P"
            np.testing.assert_array_equal(np.array(im), want)  # loaders read the class ids
            assert np.array(im.getpalette()[:9]).reshape(3, 3).tolist() == kelly
        ext = ".jpg" if stem == "big" else ".png"
        with Image.open(out / "overlays" / f"{stem}{ext}") as ov:
            assert ov.size == (array.shape[1], array.shape[0]) and ov.mode == "RGB"
            ov = np.array(ov).astype(int)
        # Away from the legend (top-left), each pixel is half image, half class colour; run.json's
        # class 0 is "c0", not background, so it is painted too. JPEG: within its error.
        rgb = np.repeat(array[..., None], 3, -1) if array.ndim == 2 else array
        blend = (rgb.astype(int) + np.array(kelly)[want]) // 2
        region = (slice(array.shape[0] // 2, None), slice(array.shape[1] // 2, None))
        err = np.abs(ov[region] - blend[region]).mean()
        assert err < (12 if ext == ".jpg" else 0.01), err  # random noise pixels: JPEG's worst case
        assert np.abs(ov[region] - rgb[region]).mean() > 3 * max(err, 5)  # the mask is visible
    assert sorted(os.listdir(out / "overlays")) == ["big.jpg", "gray.png"]
