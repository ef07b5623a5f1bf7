"""The on-disk contract between the convert stage and every later stage.

One module owns the TFRecord feature keys and the ``dataset.json`` sidecar, so the Beam writer
(:mod:`tfseg.convert.encode`) and the tf.data reader (:mod:`tfseg.data`) cannot drift apart.

2D examples use TF Model Garden's semantic segmentation keys, so tfseg records can be read by
Model Garden's ``official/vision`` segmentation decoder and vice versa::

    image/encoded                      JPEG or PNG bytes (the original file's bytes when not resized)
    image/format                       b"jpeg" | b"png"
    image/height, image/width          int64
    image/channels                     int64 (1 or 3)
    image/segmentation/class/encoded   single-channel PNG of class ids (ignore pixels = ignore_index)
    image/segmentation/class/format    b"png"
    image/source_id                    the case id (e.g. the original file stem)

3D examples store the normalized volume and its labels as serialized ``TensorProto`` bytes
(``tf.io.parse_tensor`` reads them back)::

    volume/encoded       TensorProto, (D, H, W, C) float16
    volume/shape         int64 x4: D, H, W, C
    volume/spacing       float x3: voxel spacing in mm along D, H, W
    label/encoded        TensorProto, (D, H, W) uint8; empty bytes for unlabelled cases
    volume/source_id     the case id

Encoding functions here need only numpy and the TF protobuf classes; decoding functions are
TensorFlow graph code for tf.data.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

DATASET_JSON = "dataset.json"
# The label value of pixels to ignore (VOC's void border, Cityscapes' unlabelled classes) in every
# layout that has such pixels; dataset.json's ``ignore_index`` records it per dataset.
IGNORE_INDEX = 255
REJECTED_JSONL = "rejected.jsonl"
SCHEMA_VERSION = 1

# 2D keys (TF Model Garden names).
IMAGE_ENCODED = "image/encoded"
IMAGE_FORMAT = "image/format"
IMAGE_HEIGHT = "image/height"
IMAGE_WIDTH = "image/width"
IMAGE_CHANNELS = "image/channels"
MASK_ENCODED = "image/segmentation/class/encoded"
MASK_FORMAT = "image/segmentation/class/format"
SOURCE_ID = "image/source_id"

# 3D keys.
VOLUME_ENCODED = "volume/encoded"
VOLUME_SHAPE = "volume/shape"
VOLUME_SPACING = "volume/spacing"
LABEL_ENCODED = "label/encoded"
VOLUME_SOURCE_ID = "volume/source_id"


# --------------------------------------------------------------------------------------------
# Encoding (numpy -> serialized tf.train.Example), used by the Beam workers.
# --------------------------------------------------------------------------------------------


def _features():
    # Imported lazily: the protobuf classes pull in TensorFlow.
    import tensorflow as tf

    def b(v: bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def i(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=list(np.atleast_1d(v).astype(int))))

    def f(v):
        return tf.train.Feature(float_list=tf.train.FloatList(value=list(np.atleast_1d(v).astype(float))))

    return tf, b, i, f


def _serialize(tf, feature: dict) -> bytes:
    """A tf.train.Example's bytes, the same in every process and on every machine.

    ``Features.feature`` is a protobuf map, which serializes in hash-table order (it changes with
    the process) unless asked for deterministic output, which sorts the keys.
    """
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def encode_example_2d(
    *,
    image_bytes: bytes,
    image_format: str,
    height: int,
    width: int,
    channels: int,
    mask_png: bytes | None,
    source_id: str,
) -> bytes:
    """Serializes one 2D example.

    Args:
      image_bytes: encoded JPEG or PNG bytes of the image.
      image_format: ``"jpeg"`` or ``"png"``.
      height, width, channels: the decoded image's shape.
      mask_png: single-channel PNG of class ids, same height and width; None for unlabelled cases.
      source_id: the case id.

    Returns:
      The serialized ``tf.train.Example``.
    """
    tf, b, i, _ = _features()
    feature = {
        IMAGE_ENCODED: b(image_bytes),
        IMAGE_FORMAT: b(image_format.encode()),
        IMAGE_HEIGHT: i(height),
        IMAGE_WIDTH: i(width),
        IMAGE_CHANNELS: i(channels),
        SOURCE_ID: b(source_id.encode()),
    }
    if mask_png is not None:
        feature[MASK_ENCODED] = b(mask_png)
        feature[MASK_FORMAT] = b(b"png")
    return _serialize(tf, feature)


def encode_example_3d(
    *,
    volume: np.ndarray,
    label: np.ndarray | None,
    spacing: tuple[float, float, float],
    source_id: str,
) -> bytes:
    """Serializes one 3D example.

    Args:
      volume: (D, H, W, C) normalized intensities; stored as float16.
      label: (D, H, W) uint8 class ids, or None for unlabelled cases.
      spacing: voxel spacing in mm along D, H, W.
      source_id: the case id.
    """
    tf, b, i, f = _features()
    if volume.ndim != 4:
        raise ValueError(f"volume must be (D, H, W, C), got shape {volume.shape}")
    vol = tf.make_tensor_proto(np.ascontiguousarray(volume, dtype=np.float16)).SerializeToString()
    lab = b""
    if label is not None:
        if label.shape != volume.shape[:3]:
            raise ValueError(f"label shape {label.shape} does not match volume {volume.shape[:3]}")
        lab = tf.make_tensor_proto(np.ascontiguousarray(label, dtype=np.uint8)).SerializeToString()
    feature = {
        VOLUME_ENCODED: b(vol),
        VOLUME_SHAPE: i(volume.shape),
        VOLUME_SPACING: f(spacing),
        LABEL_ENCODED: b(lab),
        VOLUME_SOURCE_ID: b(source_id.encode()),
    }
    return _serialize(tf, feature)


# --------------------------------------------------------------------------------------------
# Decoding (TensorFlow graph code for tf.data).
# --------------------------------------------------------------------------------------------


def feature_spec_2d() -> dict:
    import tensorflow as tf

    return {
        IMAGE_ENCODED: tf.io.FixedLenFeature([], tf.string),
        IMAGE_FORMAT: tf.io.FixedLenFeature([], tf.string, default_value="jpeg"),
        IMAGE_HEIGHT: tf.io.FixedLenFeature([], tf.int64),
        IMAGE_WIDTH: tf.io.FixedLenFeature([], tf.int64),
        IMAGE_CHANNELS: tf.io.FixedLenFeature([], tf.int64, default_value=3),
        MASK_ENCODED: tf.io.FixedLenFeature([], tf.string, default_value=""),
        MASK_FORMAT: tf.io.FixedLenFeature([], tf.string, default_value="png"),
        SOURCE_ID: tf.io.FixedLenFeature([], tf.string, default_value=""),
    }


def feature_spec_3d() -> dict:
    import tensorflow as tf

    return {
        VOLUME_ENCODED: tf.io.FixedLenFeature([], tf.string),
        VOLUME_SHAPE: tf.io.FixedLenFeature([4], tf.int64),
        VOLUME_SPACING: tf.io.FixedLenFeature([3], tf.float32, default_value=[1.0, 1.0, 1.0]),
        LABEL_ENCODED: tf.io.FixedLenFeature([], tf.string, default_value=""),
        VOLUME_SOURCE_ID: tf.io.FixedLenFeature([], tf.string, default_value=""),
    }


def decode_2d(serialized, channels: int):
    """Parses and decodes one 2D record.

    Args:
      serialized: scalar tf.string, a serialized tf.train.Example.
      channels: the dataset's image channels (from dataset.json), so shapes are static.

    Returns:
      dict with ``image`` (H, W, channels) uint8, ``mask`` (H, W, 1) uint8 (all zeros with
      ``has_mask`` False for unlabelled records) and ``source_id`` tf.string.
    """
    import tensorflow as tf

    ex = tf.io.parse_single_example(serialized, feature_spec_2d())
    image = tf.io.decode_image(ex[IMAGE_ENCODED], channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])
    has_mask = tf.strings.length(ex[MASK_ENCODED]) > 0
    mask = tf.cond(
        has_mask,
        lambda: tf.io.decode_png(ex[MASK_ENCODED], channels=1),
        lambda: tf.zeros_like(image[..., :1]),
    )
    mask.set_shape([None, None, 1])
    return {"image": image, "mask": mask, "has_mask": has_mask, "source_id": ex[SOURCE_ID]}


def decode_3d(serialized, channels: int):
    """Parses and decodes one 3D record.

    Returns:
      dict with ``image`` (D, H, W, channels) float32, ``mask`` (D, H, W, 1) uint8,
      ``has_mask``, ``spacing`` (3,) float32 and ``source_id``.
    """
    import tensorflow as tf

    ex = tf.io.parse_single_example(serialized, feature_spec_3d())
    volume = tf.cast(tf.io.parse_tensor(ex[VOLUME_ENCODED], tf.float16), tf.float32)
    volume = tf.reshape(volume, tf.cast(ex[VOLUME_SHAPE], tf.int32))
    volume.set_shape([None, None, None, channels])
    has_mask = tf.strings.length(ex[LABEL_ENCODED]) > 0
    mask = tf.cond(
        has_mask,
        lambda: tf.io.parse_tensor(ex[LABEL_ENCODED], tf.uint8),
        lambda: tf.zeros(tf.shape(volume)[:3], tf.uint8),
    )
    mask = tf.reshape(mask, tf.shape(volume)[:3])[..., None]
    return {
        "image": volume,
        "mask": mask,
        "has_mask": has_mask,
        "spacing": ex[VOLUME_SPACING],
        "source_id": ex[VOLUME_SOURCE_ID],
    }


# --------------------------------------------------------------------------------------------
# dataset.json
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DatasetInfo:
    """The ``dataset.json`` sidecar written last by the convert stage.

    Attributes:
      name: layout name (``carvana``, ``ccp``, ...).
      ndim: 2 or 3.
      channels: image channels (3 for RGB, 4 for the BraTS modalities, ...).
      num_classes: number of classes including background; 2 for binary tasks.
      class_names: one name per class id.
      ignore_index: the label value that marks pixels to ignore (VOC's 255), or None.
      class_colors: [R, G, B] per class when the layout defines them (else the palette in
        label_mapping, VOC's map or tfseg's fixed map: :func:`tfseg.visualize.dataset_colors`).
      label_mapping: the mapping applied from the source labels, e.g. CCP's 59 -> 14
        (``{"source_names": [...], "table": {source_id: target_id}}``), or {}.
      splits: ``{"train": {"count": N, "files": [...]}, ...}``; files are relative to the json.
      class_pixel_counts: ``{split: [count per class]}``, ignore pixels excluded.
      size_summary: ``{split: {"height": {"min":..,"max":..,"mean":..}, "width": ...}}`` (and
        ``depth`` in 3D).
      exif_oriented: ``{split: N}``, the photos stored turned by their EXIF orientation, as they
        are displayed and were annotated (:mod:`tfseg.photos`); splits with none are left out.
      duplicates: ``{"images": N, "annotation_files": M}``: cases whose image is byte-identical to
        another's (kept in one split) and annotation files left out as copies; zeros left out.
      regions: named unions of class ids, e.g. BraTS ``{"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}``.
      label_convention: free-form note (``"brats"``, ``"msd"``) describing the source labels.
      modalities: 3D channel names in order, e.g. ``["flair", "t1", "t1ce", "t2"]``.
      image_format: ``"jpeg"`` / ``"png"`` for 2D.
      compression: ``""`` or ``"GZIP"``.
      tfseg_version: the version that wrote it.
      conversion_args: the arguments the convert stage ran with.
      preprocessing: what conversion did to the source images, for later stages to reproduce on
        originals: 2D ``{"resize": {"size": [h, w], "method": "bilinear", "antialias": true,
        "dtype": "uint8", "format": "png"}}`` after ``--image-size`` (:mod:`tfseg.preprocess`),
        else {}; 3D the volume record of :mod:`tfseg.volumes` (orientation, axes, channel order,
        crop, normalization).
    """

    name: str
    ndim: int
    channels: int
    num_classes: int
    class_names: list[str]
    ignore_index: int | None = None
    label_mapping: dict = dataclasses.field(default_factory=dict)
    class_colors: list | None = None
    splits: dict = dataclasses.field(default_factory=dict)
    class_pixel_counts: dict = dataclasses.field(default_factory=dict)
    size_summary: dict = dataclasses.field(default_factory=dict)
    exif_oriented: dict = dataclasses.field(default_factory=dict)
    duplicates: dict = dataclasses.field(default_factory=dict)
    regions: dict = dataclasses.field(default_factory=dict)
    label_convention: str | None = None
    modalities: list[str] = dataclasses.field(default_factory=list)
    image_format: str | None = None
    compression: str = ""
    tfseg_version: str = ""
    conversion_args: dict = dataclasses.field(default_factory=dict)
    preprocessing: dict = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def binary(self) -> bool:
        """True for two-class tasks, which the models solve with one sigmoid channel."""
        return self.num_classes == 2

    def split_files(self, split: str, root: str) -> list[str]:
        """Absolute shard paths of a split.

        Raises:
          TfsegError: the split does not exist.
        """
        from tfseg.errors import TfsegError

        if split not in self.splits:
            raise TfsegError(
                f"{os.path.join(root, DATASET_JSON)}: no split {split!r} (has {sorted(self.splits)})"
            )
        return [os.path.join(root, f) for f in self.splits[split]["files"]]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetInfo":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _type_errors(d: dict) -> tuple[str, str, Any] | None:
    """The first key of a dataset.json dict with a wrong type: (key, expected, value), or None."""

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_str_list(v):
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    checks = [
        ("name", "a string", lambda v: isinstance(v, str)),
        ("ndim", "2 or 3", lambda v: is_int(v) and v in (2, 3)),
        ("channels", "a positive integer", lambda v: is_int(v) and v >= 1),
        ("num_classes", "an integer from 1 to 256", lambda v: is_int(v) and 1 <= v <= 256),
        ("class_names", "a list of strings", is_str_list),
    ]
    for key, what, ok in checks:
        if key not in d:
            return key, what + " (missing)", None
        if not ok(d[key]):
            return key, what, d[key]
    optional = [
        ("ignore_index", "an integer 0..255 or null", lambda v: v is None or (is_int(v) and 0 <= v <= 255)),
        ("label_mapping", "an object", lambda v: isinstance(v, dict)),
        ("splits", "an object", lambda v: isinstance(v, dict)),
        ("class_pixel_counts", "an object", lambda v: isinstance(v, dict)),
        ("size_summary", "an object", lambda v: isinstance(v, dict)),
        ("exif_oriented", "an object", lambda v: isinstance(v, dict)),
        ("duplicates", "an object", lambda v: isinstance(v, dict)),
        ("regions", "an object", lambda v: isinstance(v, dict)),
        ("label_convention", "a string or null", lambda v: v is None or isinstance(v, str)),
        ("modalities", "a list of strings", is_str_list),
        ("image_format", "a string or null", lambda v: v is None or isinstance(v, str)),
        ("compression", '"" or "GZIP"', lambda v: v in ("", "GZIP")),
        ("tfseg_version", "a string", lambda v: isinstance(v, str)),
        ("conversion_args", "an object", lambda v: isinstance(v, dict)),
        ("preprocessing", "an object", lambda v: isinstance(v, dict)),
        ("schema_version", f"an integer up to {SCHEMA_VERSION}", lambda v: is_int(v) and 1 <= v <= SCHEMA_VERSION),
    ]
    for key, what, ok in optional:
        if key in d and not ok(d[key]):
            return key, what, d[key]
    if len(d["class_names"]) != d["num_classes"]:
        return "class_names", f"{d['num_classes']} names (num_classes)", d["class_names"]
    for split, entry in d.get("splits", {}).items():
        if not (isinstance(entry, dict) and is_int(entry.get("count")) and entry["count"] >= 0
                and is_str_list(entry.get("files"))):
            return f"splits.{split}", 'an object {"count": int >= 0, "files": [str, ...]}', entry
        for name in entry["files"]:
            if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
                return f"splits.{split}.files", "file names relative to dataset.json, inside its folder", name
    return None


def load_dataset_info(data_dir: str) -> DatasetInfo:
    """Reads and validates ``DATA_DIR/dataset.json``.

    Raises:
      TfsegError: the directory has no dataset.json (the conversion did not complete), it is not
        valid JSON, or a key has the wrong type (one line naming the file and the key).
    """
    from tfseg.errors import TfsegError
    from tfseg.io import fs

    path = os.path.join(data_dir, DATASET_JSON)
    if not fs.isfile(path):
        raise TfsegError(
            f"{data_dir}: no {DATASET_JSON} here; is this the output of a completed `tfseg convert`?"
        )
    try:
        d = json.loads(fs.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f", line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise TfsegError(f"{path}: not a valid tfseg dataset.json ({getattr(e, 'msg', 'not UTF-8')}{where})") from None
    except OSError as e:
        raise TfsegError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(d, dict):
        raise TfsegError(f"{path}: not a valid tfseg dataset.json (expected a JSON object, got {type(d).__name__})")
    bad = _type_errors(d)
    if bad is not None:
        key, what, value = bad
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        got = "" if value is None and "missing" in what else f", got {shown}"
        raise TfsegError(f"{path}: key {key!r} must be {what}{got}")
    return DatasetInfo.from_dict(d)
