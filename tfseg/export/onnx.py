"""ONNX export of a 2D fit run: ``tfseg export --format onnx``.

Layout written (the other formats', one numbered directory per version)::

    EXPORT_BASE/
      NAME/
        README.md                      how to call it (ONNX Runtime, OpenVINO); the classes
        VERSION/
          model.onnx                   written last: its presence means the version is complete
          assets.extra/tfseg.json      the SavedModel export's facts + ``onnx`` (see below)

The graph (ONNX opset :data:`OPSET`) has the LiteRT export's contract with a free batch:

* input ``image``: uint8 (N, h, w, C), pixels 0..255 as they are, at the model's input size
  (h, w) = tfseg.json's ``image_size`` (normalization is inside the graph);
* outputs ``mask``: uint8 (N, h, w) class ids (binary models: foreground probability > 0.5, else
  arg-max) and ``probabilities``: float32 (N, h, w, K) (K = 1 for binary models).

The resize to (h, w) and back is the caller's, as for LiteRT: tfseg's resize is TensorFlow's
(antialiased for convert's ``--image-size``, half-pixel bilinear to the model size), and ONNX's
``Resize`` has no antialiasing before opset 18 nor a guarantee that every runtime rounds the same
way; a caller that resizes in numpy/OpenCV/PIL knows what it gets.
:class:`tfseg.predict.onnx.OnnxPredictor` resizes with the functions evaluation uses, so
``tfseg evaluate --model`` scores what ONNX Runtime computes.

tfseg's facts travel inside the file too, as ONNX ``metadata_props``: ``tfseg`` (the whole of
tfseg.json but this section), and ``class_names``, ``class_colors`` (JSON), ``image_size``
(``HxW``), ``channels``, ``head``, ``input`` (what the input holds).

The converter is ``tf2onnx`` on the frozen signature (:func:`tfseg.export.graph.model_size_signature`).
Keras 3's own ``model.export(path, format="onnx")`` (tf2onnx underneath) converts every tfseg
architecture too, but only the bare Keras model: a float32 input and the probabilities, with no
place for the uint8 input and the mask output; converting the signature gives both in one graph.

3D models are refused (:func:`check_exportable`), as for LiteRT: a volume is predicted by a
Gaussian-weighted sliding window with flips and tfseg's volume record (RAS+, z-score), outside any
single model call.
"""

from __future__ import annotations

import json
import logging

from tfseg import rundir
from tfseg.errors import TfsegError, first_line
from tfseg.export.graph import model_size_signature
from tfseg.export.readme import caller_steps
from tfseg.export.versions import ONNX_MODEL, publish_model_file

logger = logging.getLogger(__name__)

MODEL_FILE = ONNX_MODEL
INPUT = "image"
OUTPUTS = ("mask", "probabilities")
OPSET = 17  # ONNX Runtime 1.17+ and OpenVINO 2023+ run it; tf2onnx 1.17's tested default


def check_exportable(run: rundir.RunInfo, *, tile: bool = False, tta: bool = False, precision: str = "float32",
                     quantize: str = "none") -> None:
    """Refuses what an ONNX export cannot hold, in one line each.

    Raises:
      TfsegError: a 3D run, ``tile``/``tta``, a mixed ``precision`` or a ``quantize``.
    """
    if run.ndim != 2:
        raise TfsegError("--format onnx: 3D models are not exported to ONNX (their volumes are predicted by a "
                         "Gaussian-weighted sliding window and the RAS+/z-score volume record, outside any single "
                         "model call); export a SavedModel instead")
    if tile or tta:
        raise TfsegError("--format onnx: --tile/--tta are not in an ONNX export (it takes images at the model's "
                         "size); score tiling or TTA with `tfseg evaluate --run`")
    if precision != "float32":
        raise TfsegError(f"--format onnx: --precision {precision} is for SavedModels; the ONNX graph is float32")
    if quantize != "none":
        raise TfsegError("--format onnx: --quantize is for LiteRT; quantize an ONNX file with ONNX Runtime's "
                         "tools (BENCHMARKS.md measures what int8 costs)")


def convert(model, run: rundir.RunInfo):
    """The ONNX ``ModelProto`` of ``model`` with the signature in the module doc.

    Raises:
      TfsegError: tf2onnx is not installed, or the conversion fails (its first line).
    """
    try:
        import tf2onnx
    except ImportError:
        raise TfsegError("--format onnx needs tf2onnx: pip install 'tfseg[onnx]'") from None
    function = model_size_signature(model, run, batch=None, input_name=INPUT)
    try:
        proto, _ = tf2onnx.convert.from_function(function, input_signature=function.input_signature,
                                                 opset=OPSET, output_path=None)
    except Exception as e:  # noqa: BLE001  tf2onnx raises whatever its handlers raise
        raise TfsegError(f"ONNX conversion failed: {first_line(e)}") from None
    names = [o.name for o in proto.graph.output]
    if sorted(names) != sorted(OUTPUTS):
        raise TfsegError(f"ONNX conversion: outputs {names}, expected {list(OUTPUTS)}")
    return proto


def _metadata_props(meta: dict) -> dict[str, str]:
    h, w = meta["image_size"]
    return {
        "tfseg": json.dumps({k: v for k, v in meta.items() if k != "onnx"}, sort_keys=True),
        "class_names": json.dumps(meta.get("class_names")),
        "class_colors": json.dumps(meta.get("class_colors")),
        "image_size": f"{h}x{w}",
        "channels": str(meta["channels"]),
        "head": str(meta.get("head")),
        "input": "uint8 pixels 0..255 as they are, NHWC at image_size; normalization is in the graph",
    }


def write_export(model, run: rundir.RunInfo, meta: dict, final: str, *, overwrite: bool,
                 config: dict | None = None) -> dict:
    """Converts ``model`` and publishes EXPORT_BASE/NAME/VERSION (``final``) through
    :func:`tfseg.io.publish.publish_dir`: tfseg.json first, model.onnx last.

    Args:
      model: the run's Keras model, float32.
      run: its facts.
      meta: the SavedModel export's tfseg.json facts (run facts, name, version, colours, ...).
      final: the version directory to publish.
      overwrite: replace an existing version.
      config: the export's settings, written beside tfseg.json (assets.extra/export.json).

    Returns:
      The tfseg.json written.
    """
    import onnx
    import tensorflow as tf
    import tf2onnx

    proto = convert(model, run)
    h, w = run.size
    k = 1 if run.binary else run.num_classes
    meta = dict(meta)
    meta.update({"format": "onnx", "precision": "float32"})
    meta["onnx"] = {
        "file": MODEL_FILE, "opset": OPSET,
        "input": {"name": INPUT, "dtype": "uint8", "shape": ["N", h, w, run.channels],
                  "values": "pixels 0..255 as they are"},
        "outputs": {"mask": {"dtype": "uint8", "shape": ["N", h, w]},
                    "probabilities": {"dtype": "float32", "shape": ["N", h, w, k]}},
        "converter": f"tf2onnx {tf2onnx.__version__} (TensorFlow {tf.__version__}, onnx {onnx.__version__})",
    }
    onnx.helper.set_model_props(proto, _metadata_props(meta))
    data = proto.SerializeToString()
    meta["onnx"]["bytes"] = len(data)
    publish_model_file(final, MODEL_FILE, data, meta, config, overwrite=overwrite)
    return meta


def readme(name: str, meta: dict, colour_table: str) -> str:
    """EXPORT_BASE/NAME/README.md of an ONNX export."""
    spec = meta["onnx"]
    h, w = meta["image_size"]
    c = meta["channels"]
    k = spec["outputs"]["probabilities"]["shape"][-1]
    binary = meta.get("head") == "sigmoid"
    rule = "foreground probability > 0.5" if binary else "arg-max over the classes"
    return f"""# {name}: tfseg segmentation model for ONNX runtimes

Exported by `tfseg export --format onnx` from a `{meta.get('model', '?')}` run, float32, ONNX opset
{spec['opset']} ({spec['converter']}). Each numbered directory is a version: `VERSION/model.onnx`,
with the run's facts in `VERSION/assets.extra/tfseg.json` and inside the file as metadata
properties (`tfseg`, `class_names`, `class_colors`, `image_size`, `channels`, `head`).

`tfseg evaluate --model {name}/VERSION --data DATA --output EVAL` scores this file through ONNX
Runtime; `tfseg predict --model {name}/VERSION --input DIR --output DIR` runs it on images.

## Graph

- input `{spec['input']['name']}`: uint8 (N, {h}, {w}, {c}), pixels 0..255 as they are ({'RGB' if c == 3 else 'gray'}), any batch N
- output `mask`: uint8 (N, {h}, {w}) class ids ({rule})
- output `probabilities`: float32 (N, {h}, {w}, {k}){' (the foreground probability)' if binary else ''}

The model takes images at its input size; the caller resizes:

{caller_steps(meta, binary, ' (half-pixel centres)')}
## Classes

{colour_table}
## Python (pip install onnxruntime)

```python
import numpy as np, onnxruntime as ort
from PIL import Image, ImageOps

session = ort.InferenceSession("{name}/VERSION/model.onnx", providers=["CPUExecutionProvider"])
image = ImageOps.exif_transpose(Image.open("photo.jpg")).convert("{'RGB' if c == 3 else 'L'}")
# PIL's bilinear antialiases when shrinking, as `tfseg convert --image-size` does; the exact
# reference of the steps above is tfseg.preprocess.uint8_model_input(image, size, preprocessing).
x = np.asarray(image.resize(({w}, {h}), Image.BILINEAR), np.uint8).reshape(1, {h}, {w}, {c})
mask, probabilities = session.run(["mask", "probabilities"], {{"{spec['input']['name']}": x}})
mask = Image.fromarray(mask[0]).resize(image.size, Image.NEAREST)
```

OpenVINO reads the same file: `openvino.Core().compile_model("{name}/VERSION/model.onnx", "CPU")`.
"""
