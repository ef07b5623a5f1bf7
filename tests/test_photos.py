"""Photos as displayed (issue 32 item 1): EXIF orientation applied once, the same way, by convert
and predict, against references turned here by hand from the EXIF specification's definitions."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from tfseg import photos, schema
from tfseg.convert.pipeline import run_convert

H, W = 4, 6  # not square: a turn by 90 degrees changes the shape


def displayed_by_hand(stored: np.ndarray, orientation: int) -> np.ndarray:
    """What a viewer shows for ``stored`` pixels with EXIF ``orientation`` (TIFF/EXIF spec: the
    row and column the stored image's 0th row and column become), written index by index."""
    h, w = stored.shape[:2]
    if orientation in (1, 2, 3, 4):
        out = np.empty_like(stored)
        for i in range(h):
            for j in range(w):
                src = {1: (i, j), 2: (i, w - 1 - j), 3: (h - 1 - i, w - 1 - j), 4: (h - 1 - i, j)}[orientation]
                out[i, j] = stored[src]
        return out
    out = np.empty((w, h) + stored.shape[2:], stored.dtype)
    for i in range(w):
        for j in range(h):
            # 5: transpose; 6: turned 90 degrees clockwise; 7: transverse; 8: 90 degrees counter-clockwise.
            src = {5: (j, i), 6: (h - 1 - j, i), 7: (h - 1 - j, w - 1 - i), 8: (j, w - 1 - i)}[orientation]
            out[i, j] = stored[src]
    return out


def with_orientation(pixels: np.ndarray, orientation: int, fmt: str = "PNG") -> bytes:
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[photos.ORIENTATION_TAG] = orientation
    buf = io.BytesIO()
    img.save(buf, format=fmt, exif=exif, **({"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_hand_rule_itself():  # the reference above, on the one case a person can check at a glance
    a = np.array([[1, 2, 3], [4, 5, 6]])
    assert displayed_by_hand(a, 6).tolist() == [[4, 1], [5, 2], [6, 3]]  # turned clockwise
    assert displayed_by_hand(a, 8).tolist() == [[3, 6], [2, 5], [1, 4]]  # turned counter-clockwise


@pytest.mark.parametrize("orientation", range(1, 9))
def test_oriented_and_as_displayed_match_the_hand_rule(orientation):
    stored = np.arange(H * W * 3, dtype=np.uint8).reshape(H, W, 3)
    data = with_orientation(stored, orientation)
    expected = displayed_by_hand(stored, orientation)
    with Image.open(io.BytesIO(data)) as img:
        turned, applied = photos.oriented(img)
        assert applied == orientation
        np.testing.assert_array_equal(np.asarray(turned), expected)
        assert photos.displayed_size(img) == (expected.shape[1], expected.shape[0])
    np.testing.assert_array_equal(photos.orient_array(stored, orientation), expected)
    out, applied = photos.as_displayed(data)
    assert applied == orientation and (out is data) == (orientation == 1)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(out))), expected)


def test_bad_or_absent_tags_read_as_stored():
    stored = np.zeros((2, 3, 3), np.uint8)
    for value in (0, 9, 65535):
        with Image.open(io.BytesIO(with_orientation(stored, value))) as img:
            assert photos.orientation(img) == 1
    assert photos.as_displayed(b"not an image") == (b"not an image", 1)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_the_graph_decoder_turns_like_the_photo_readers(fmt):
    """The serving signature's decoder (TensorFlow ignores EXIF) reads the tag itself: the same
    orientation as PIL and the pixels turned by the hand rule, for all eight values."""
    import tensorflow as tf

    from tfseg import preprocess

    stored = np.arange(H * W * 3, dtype=np.uint8).reshape(H, W, 3)
    for value in range(1, 9):
        data = with_orientation(stored, value, fmt)
        with Image.open(io.BytesIO(data)) as img:
            assert int(preprocess.exif_orientation(tf.constant(data))) == photos.orientation(img) == value
        as_stored = tf.io.decode_image(data, channels=3).numpy()  # TensorFlow's own decode, no turn
        np.testing.assert_array_equal(preprocess.decode_image(tf.constant(data), 3, 10**6).numpy(),
                                      displayed_by_hand(as_stored, value))


def _tiff(value: int, little: bool, kind: int = 3, tag: int = photos.ORIENTATION_TAG) -> bytes:
    """A TIFF block by hand (EXIF 2.32 section 4.6): header, IFD0 with two entries, no next IFD."""
    import struct

    e = "<" if little else ">"
    field = struct.pack(e + "H", value) + b"\0\0" if kind == 3 else struct.pack(e + "I", value)
    entries = struct.pack(e + "HHI", 0x010F, 2, 4) + b"Cam\0" + struct.pack(e + "HHI", tag, kind, 1) + field
    return (b"II" if little else b"MM") + struct.pack(e + "HI", 42, 8) + struct.pack(e + "H", 2) + entries + b"\0" * 4


def _jpeg_with_segments(*segments: tuple[int, bytes]) -> bytes:
    """A real JPEG with APPn segments inserted after SOI (as cameras order them)."""
    import struct

    buf = io.BytesIO()
    Image.fromarray(np.arange(H * W * 3, dtype=np.uint8).reshape(H, W, 3)).save(buf, "JPEG")
    body = buf.getvalue()
    inserted = b"".join(struct.pack(">BBH", 0xFF, m, len(p) + 2) + p for m, p in segments)
    assert body[:2] == b"\xff\xd8" and body[2:4] == b"\xff\xe0"  # PIL's JFIF APP0 stays first
    return body[:2] + inserted + body[2:]


@pytest.mark.parametrize("segments,expected", [
    ([(0xE1, b"Exif\0\0" + _tiff(6, little=False))], 6),  # big-endian ("MM"), as many cameras write
    ([(0xE1, b"Exif\0\0" + _tiff(8, little=True, kind=4))], 8),  # LONG instead of SHORT
    ([(0xE2, b"ICC_PROFILE\0" + b"\1" * 300), (0xE1, b"Exif\0\0" + _tiff(3, little=False))], 3),  # after another APPn
    ([(0xE1, b"Exif\0\0" + _tiff(6, little=True, tag=0x0110))], 1),  # no orientation tag
    ([(0xE1, b"Exif\0\0" + _tiff(9, little=True))], 1),  # out of range
    ([(0xE1, b"Exif\0\0" + b"XX" + _tiff(6, little=True)[2:])], 1),  # neither II nor MM
    ([(0xE1, b"http://ns.adobe.com/xap/1.0/\0<x/>")], 1),  # XMP, not EXIF
])
def test_the_graph_reads_orientation_as_pil_does_from_hand_built_files(segments, expected):
    import tensorflow as tf

    from tfseg import preprocess

    data = _jpeg_with_segments(*segments)
    with Image.open(io.BytesIO(data)) as img:
        assert photos.orientation(img) == expected
    assert int(preprocess.exif_orientation(tf.constant(data))) == expected
    decoded = preprocess.decode_image(tf.constant(data), 3, 10**6).numpy()
    assert decoded.shape[:2] == ((W, H) if expected >= 5 else (H, W))


def _blocks(h, w, rng):
    """A photo of flat 8x8 blocks (JPEG keeps them to within a few levels) and its 3-class mask."""
    classes = rng.integers(0, 3, (h // 8, w // 8))
    mask = np.kron(classes, np.ones((8, 8), np.int64)).astype(np.uint8)
    colours = np.array([[20, 200, 40], [230, 30, 30], [40, 40, 220]], np.uint8)
    return colours[mask], mask


@pytest.mark.parametrize("orientation", range(1, 9))
def test_convert_stores_phone_jpegs_as_displayed_with_their_masks(tmp_path, orientation):
    """A phone JPEG (pixels as the sensor read them + the Orientation tag) annotated by a tool that
    showed it turned: the record holds the displayed photo, aligned with the mask."""
    rng = np.random.default_rng(orientation)
    shown, mask = _blocks(48, 64, rng)  # what the annotator saw and drew on
    inverse = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}[orientation]
    sensor = displayed_by_hand(shown, inverse)  # the stored pixels a viewer turns back into `shown`
    np.testing.assert_array_equal(displayed_by_hand(sensor, orientation), shown)
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "masks").mkdir()
    (raw / "images" / "phone.jpg").write_bytes(with_orientation(sensor, orientation, "JPEG"))
    Image.fromarray(mask).save(raw / "masks" / "phone.png")
    out = str(tmp_path / "out")
    run_convert("folder", str(raw), out, layout_options={"num_classes": 3}, split="train=1")
    info = schema.load_dataset_info(out)
    import tensorflow as tf

    (record,) = list(tf.data.TFRecordDataset(info.split_files("train", out)))
    d = schema.decode_2d(record, 3)
    image, stored_mask = d["image"].numpy(), d["mask"].numpy()[..., 0]
    np.testing.assert_array_equal(stored_mask, mask)
    assert image.shape == shown.shape
    assert np.abs(image.astype(int) - shown).max() <= 12  # JPEG at quality 100 on flat blocks
    assert info.exif_oriented == ({} if orientation == 1 else {"train": 1})
    with open(os.path.join(out, schema.DATASET_JSON)) as f:
        assert json.load(f)["exif_oriented"] == info.exif_oriented


def test_predict_writes_masks_in_the_displayed_orientation(tmp_path):
    """predict on a photo with orientation 6: the mask has the displayed shape and follows the
    displayed content (an oracle model whose class is the brightest colour channel)."""
    from helpers import oracle_model, write_run

    from tfseg.predict import run_predict

    rng = np.random.default_rng(0)
    shown, mask = _blocks(32, 48, rng)
    sensor = displayed_by_hand(shown, 8)  # orientation 6 turns it back clockwise
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "phone.jpg").write_bytes(with_orientation(sensor, 6, "JPEG"))
    run = str(tmp_path / "run")
    write_run(run, oracle_model(2, 3, 3), ndim=2, channels=3, class_names=["g", "r", "b"], size=(32, 48))
    out = str(tmp_path / "out")
    run_predict(run, str(tmp_path / "in"), out)
    predicted = np.asarray(Image.open(os.path.join(out, "phone.png")))
    assert predicted.shape == mask.shape
    # class = argmax channel: green 0, red 1, blue 2 in the oracle's channel order
    expected = np.argmax(shown.astype(int), axis=-1)
    assert (predicted == expected).mean() > 0.98


def test_predict_writes_its_settings_as_predict_json_and_checks_them(tmp_path):
    """predict has a typed config like the other stages: predict.json beside the masks, and a bad
    setting is one line naming it before anything is read."""
    from helpers import oracle_model, write_run

    from tfseg.errors import TfsegError
    from tfseg.predict import CONFIG_JSON, PredictConfig, run_predict

    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "in" / "a.png")
    run = str(tmp_path / "run")
    write_run(run, oracle_model(2, 3, 3), ndim=2, channels=3, class_names=["g", "r", "b"], size=(8, 8))
    out = str(tmp_path / "out")
    run_predict(run, str(tmp_path / "in"), out, batch_size=2, overlay=True)
    with open(os.path.join(out, CONFIG_JSON)) as f:
        written = json.load(f)
    assert written == PredictConfig(run, str(tmp_path / "in"), out, batch_size=2, overlay=True).to_json()
    assert written["batch_size"] == 2 and written["overlay"] is True and written["server"] is None
    with pytest.raises(TfsegError, match="predict config: batch_size must be >= 1, got 0"):
        run_predict(run, str(tmp_path / "in"), str(tmp_path / "o2"), batch_size=0)
    with pytest.raises(TfsegError, match="predict config: unknown key 'batchsize'"):
        run_predict(run, str(tmp_path / "in"), str(tmp_path / "o3"), batchsize=2)
    with pytest.raises(TfsegError, match="--grpc needs --server"):
        run_predict(run, str(tmp_path / "in"), str(tmp_path / "o4"), grpc=True)
    assert not any(os.path.exists(tmp_path / o) for o in ("o2", "o3", "o4"))
