"""LiteRT (formerly TensorFlow Lite) export of a 2D fit run: ``tfseg export --format litert``.

Layout written (the SavedModel export's, one numbered directory per version)::

    EXPORT_BASE/
      NAME/
        README.md                      how to call it from Python and Kotlin; the classes
        VERSION/
          model.tflite                 written last: its presence means the version is complete
          assets.extra/tfseg.json      the SavedModel export's facts + ``litert`` (see below)

The model file has one signature, ``serving_default``:

* input ``image``: uint8 (1, h, w, C), pixels 0..255 as they are, at the model's input size
  (h, w) = tfseg.json's ``image_size``; C = ``channels`` (RGB or gray);
* outputs ``mask``: uint8 (1, h, w) class ids (binary models: foreground probability > 0.5, else
  arg-max), and ``probabilities``: float32 (1, h, w, K) (K = 1, the foreground probability, for
  binary models).

A phone has no ``tf.image``: the resize to (h, w) and back happens outside the model. The
recorded preprocessing (:mod:`tfseg.preprocess`) says how; :class:`tfseg.predict.litert.LiteRtPredictor`
does it with the same functions evaluation uses (``source_resize`` + ``to_model_size``, the
bilinear values rounded to uint8 because the input is uint8; ``resize_back`` of the
probabilities, then threshold/arg-max), so ``tfseg evaluate --model`` and ``tfseg predict --model``
score and run exactly what a device runs.

Quantization (``--quantize``):

* ``none``: float32 weights and activations;
* ``float16``: float16 weights (half the file), dequantized to float32 when loaded on CPU;
* ``int8``: post-training full-integer quantization calibrated on ``--calibration-records``
  training records of the run's dataset, brought to the model size as the predictor brings
  images, with the int8 op set (``TFLITE_BUILTINS_INT8``). The converter may still leave an op
  in float between a dequantize and a quantize (Improved U-Net's instance-norm ``NEG`` and
  ``SQUARE``); where the int8 op set refuses an op outright the conversion is redone with float
  kernels allowed. Either way tfseg.json's ``litert.float_ops`` lists the float ops, read from
  the .tflite file (:func:`op_summary`), and ``litert.full_integer`` says whether there are none. The input stays uint8 pixels as they are (quantization
  scale 1, zero point 0, pinned by a fake-quant range on the input); ``probabilities`` come
  out dequantized to float32.

The converter is TensorFlow's own ``tf.lite.TFLiteConverter`` (of the TensorFlow tfseg pins):
``ai-edge-litert`` ships the LiteRT runtime and interpreter but no converter for TensorFlow or
Keras models (Google's ``ai-edge-torch`` converts PyTorch); TensorFlow's converter is the
maintained path for them. The model's variables are frozen into constants, the signature written
as a SavedModel in a temporary folder and converted from it. The interpreter is
``ai_edge_litert.interpreter``: ``tf.lite.Interpreter`` is deprecated in its favour.

3D models are refused (:func:`check_exportable`): a volume is predicted by a Gaussian-weighted
sliding window over patches, with flips, outside any single model call, and tfseg's volume
record (RAS+ reorientation, z-score) has no on-device counterpart; a patch-level ``.tflite``
would leave all of that to each app.
"""

from __future__ import annotations

import logging
import os
import tempfile

import numpy as np

from tfseg import preprocess, rundir, runtime
from tfseg.errors import TfsegError, first_line
from tfseg.export.config import QUANTIZATIONS
from tfseg.export.graph import model_size_signature
from tfseg.export.readme import caller_steps
from tfseg.export.versions import LITERT_MODEL, publish_model_file
from tfseg.io import fs

logger = logging.getLogger(__name__)

MODEL_FILE = LITERT_MODEL
DEFAULT_CALIBRATION_RECORDS = 200
SIGNATURE = "serving_default"
INPUT = "image"
# What the model computes in, by --quantize (tfseg.json's "precision", evaluate's metrics.json).
PRECISION = {"none": "float32", "float16": "float16", "int8": "int8"}
# Ops at the int8 model's edges that are float by design (the dequantized probabilities).
_BOUNDARY_OPS = ("QUANTIZE", "DEQUANTIZE")
_QUANTIZER_LINE = "fully_quantize:"  # the int8 quantizer's settings, printed from C++ to fd 2


def check_exportable(run: rundir.RunInfo, *, quantize: str, tile: bool = False, tta: bool = False,
                     precision: str = "float32") -> None:
    """Refuses what a LiteRT export cannot hold, in one line each.

    Raises:
      TfsegError: a 3D run, an unknown ``quantize``, ``tile``/``tta``, or a mixed ``precision``.
    """
    if quantize not in QUANTIZATIONS:
        raise TfsegError(f"--quantize {quantize!r}: choose from {', '.join(QUANTIZATIONS)}")
    if run.ndim != 2:
        raise TfsegError("--format litert: 3D models are not exported to LiteRT (their volumes are predicted by "
                         "a Gaussian-weighted sliding window and the RAS+/z-score volume record, outside any single "
                         "model call); export a SavedModel instead")
    if tile or tta:
        raise TfsegError("--format litert: --tile/--tta are not in a LiteRT export (it takes one image at the "
                         "model's size per call); score tiling or TTA with `tfseg evaluate --run`")
    if precision != "float32":
        raise TfsegError(f"--format litert: --precision {precision} is for SavedModels; use --quantize float16|int8")


# --------------------------------------------------------------------------------------------
# Conversion.
# --------------------------------------------------------------------------------------------


def convert(model, run: rundir.RunInfo, quantize: str = "none", representative: np.ndarray | None = None
            ) -> tuple[bytes, dict]:
    """The .tflite bytes of ``model`` with tfseg's signature, and what the conversion did.

    Args:
      model: a float32 2D tfseg Keras model.
      run: the run's facts (size, channels, head).
      quantize: ``none``, ``float16`` or ``int8``.
      representative: int8 only: (N, h, w, C) uint8 calibration images at the model's size.

    Returns:
      ``(tflite_bytes, info)``; info has ``full_integer`` (int8: every op but the output's
      dequantize runs in integers), ``float_ops`` (the ops computing in float, int8 only),
      ``op_counts`` and ``input_quantization``.

    Raises:
      TfsegError: int8 without calibration images, or a conversion error (its first line).
    """
    import tensorflow as tf

    if quantize not in QUANTIZATIONS:
        raise TfsegError(f"--quantize {quantize!r}: choose from {', '.join(QUANTIZATIONS)}")
    int8 = quantize == "int8"
    if int8 and (representative is None or len(representative) == 0):
        raise TfsegError("--quantize int8 needs calibration images (the run's training records)")
    with tempfile.TemporaryDirectory(prefix="tfseg-litert-") as tmp:
        # Through a (scratch) SavedModel: the converter's path that keeps the signature's names.
        tf.saved_model.save(tf.Module(), tmp, signatures={SIGNATURE: model_size_signature(model, run, batch=1, float_input=int8, input_name=INPUT).get_concrete_function()})

        def converter(ops):
            c = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=[SIGNATURE])
            if quantize == "float16":
                c.optimizations = [tf.lite.Optimize.DEFAULT]
                c.target_spec.supported_types = [tf.float16]
            elif int8:
                c.optimizations = [tf.lite.Optimize.DEFAULT]
                c.representative_dataset = lambda: ([x[None].astype(np.float32)] for x in representative)
                c.target_spec.supported_ops = ops
                c.inference_input_type = tf.uint8
            return c

        try:
            if not int8:
                data = converter(None).convert()
            else:
                try:
                    # The quantizer prints its settings from C++ ("fully_quantize: 0, ...").
                    with runtime.filtered_stderr(lambda line: line.startswith(_QUANTIZER_LINE)):
                        data = converter([tf.lite.OpsSet.TFLITE_BUILTINS_INT8]).convert()
                except Exception as e:  # noqa: BLE001  the converter raises ConverterError and others
                    # Some op has no int8 kernel: keep float kernels for those ops only.
                    logger.warning("full-integer conversion failed (%s); converting with float fallback ops",
                                   first_line(e))
                    with runtime.filtered_stderr(lambda line: line.startswith(_QUANTIZER_LINE)):
                        data = converter([tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                          tf.lite.OpsSet.TFLITE_BUILTINS]).convert()
        except TfsegError:
            raise
        except Exception as e:  # noqa: BLE001
            raise TfsegError(f"LiteRT conversion ({quantize}) failed: {first_line(e)}") from None
    info = op_summary(data)
    if int8:
        info["full_integer"] = not info["float_ops"]
        scale, zero = info["input_quantization"]
        if (scale, zero) != (1.0, 0):
            raise TfsegError(f"LiteRT int8 conversion: input quantization {scale}, {zero} instead of 1.0, 0 "
                             "(the input would not be pixels as they are)")
    return data, info




def op_summary(tflite: bytes) -> dict:
    """The ops of a .tflite flatbuffer: ``op_counts`` by name, ``float_ops`` (ops other than the
    edge QUANTIZE/DEQUANTIZE with a float32 input or output; int8 models' fallback list), the
    ``input_quantization`` (scale, zero point) of the input."""
    from ai_edge_litert import schema_py_generated as fb

    names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    model = fb.Model.GetRootAs(tflite, 0)
    g = model.Subgraphs(0)
    counts: dict[str, int] = {}
    float_ops: dict[str, int] = {}
    for i in range(g.OperatorsLength()):
        op = g.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        name = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")
        counts[name] = counts.get(name, 0) + 1
        tensors = [op.Inputs(j) for j in range(op.InputsLength())] + [op.Outputs(j) for j in range(op.OutputsLength())]
        is_float = any(t >= 0 and g.Tensors(t).Type() == fb.TensorType.FLOAT32 and g.Tensors(t).Buffer() >= 0
                       and not _is_constant(model, g.Tensors(t)) for t in tensors)
        if is_float and name not in _BOUNDARY_OPS:
            float_ops[name] = float_ops.get(name, 0) + 1
    inp = g.Tensors(g.Inputs(0))
    q = inp.Quantization()
    quant = (float(q.Scale(0)), int(q.ZeroPoint(0))) if q is not None and q.ScaleLength() else (0.0, 0)
    return {"op_counts": dict(sorted(counts.items())), "float_ops": dict(sorted(float_ops.items())),
            "input_quantization": quant}


def _is_constant(model, tensor) -> bool:
    buf = model.Buffers(tensor.Buffer())
    return buf is not None and (buf.DataLength() > 0 or buf.Size() > 0)


# --------------------------------------------------------------------------------------------
# Calibration images.
# --------------------------------------------------------------------------------------------


def calibration_images(data_dir: str, run: rundir.RunInfo, count: int, split: str = "train") -> np.ndarray:
    """The first ``count`` images of ``data_dir``'s ``split`` as the model takes them:
    (N, h, w, C) uint8 (:func:`model_input`).

    Raises:
      TfsegError: no dataset there, no such split, or a dataset that does not fit the run.
    """
    from tfseg import data, schema

    if count < 1:
        raise TfsegError(f"--calibration-records {count}: must be >= 1")
    if not data_dir or not fs.isfile(os.path.join(data_dir, schema.DATASET_JSON)):
        raise TfsegError(f"{data_dir or '(run.json has no data_dir)'}: no {schema.DATASET_JSON}; int8 calibration "
                         "reads the run's training records (pass --calibration-data DATASET_DIR)")
    info = schema.load_dataset_info(data_dir)
    if info.ndim != 2 or info.channels != run.channels:
        raise TfsegError(f"{data_dir}: a {info.ndim}D dataset with {info.channels} channels cannot calibrate a "
                         f"model taking {run.channels} channels")
    if split not in info.splits:
        raise TfsegError(f"{os.path.join(data_dir, schema.DATASET_JSON)}: no split {split!r} to calibrate on")
    out = []
    for ex in data.read_examples(data_dir, split).take(count).as_numpy_iterator():
        out.append(preprocess.uint8_model_input(ex["image"], run.size, None))  # records: convert's resize is done
    if not out:
        raise TfsegError(f"{data_dir}: split {split!r} has no records to calibrate on")
    return np.stack(out)


# --------------------------------------------------------------------------------------------
# The export.
# --------------------------------------------------------------------------------------------


def write_export(model, run: rundir.RunInfo, meta: dict, final: str, *, overwrite: bool, quantize: str,
                 calibration_records: int = DEFAULT_CALIBRATION_RECORDS, calibration_data: str | None = None,
                 config: dict | None = None) -> dict:
    """Converts ``model`` and publishes EXPORT_BASE/NAME/VERSION (``final``) through
    :func:`tfseg.io.publish.publish_dir`: tfseg.json first, model.tflite last.

    Args:
      model: the run's Keras model, float32.
      run: its facts.
      meta: the SavedModel export's tfseg.json facts (run facts, name, version, colours, ...).
      final: the version directory to publish.
      overwrite: replace an existing version.
      quantize: ``none``, ``float16``, ``int8``.
      calibration_records: int8: how many training records calibrate.
      calibration_data: int8: the dataset to calibrate on (the run's ``data_dir``).
      config: the export's settings, written beside tfseg.json (assets.extra/export.json).

    Returns:
      The tfseg.json written.
    """
    representative, calibration = None, None
    if quantize == "int8":
        data_dir = calibration_data or ""
        representative = calibration_images(data_dir, run, int(calibration_records))
        calibration = {"data_dir": fs.normalize(data_dir), "split": "train", "records": int(len(representative))}
        logger.info("calibrating int8 on %d training records of %s", len(representative), data_dir)
    data, info = convert(model, run, quantize, representative)
    if quantize == "int8" and info["float_ops"]:
        logger.warning("int8 export: ops left in float: %s", ", ".join(f"{k} x{v}" for k, v in info["float_ops"].items()))
    import tensorflow as tf

    h, w = run.size
    k = 1 if run.binary else run.num_classes
    meta = dict(meta)
    meta.update({
        "format": "litert", "precision": PRECISION[quantize],
        "litert": {
            "file": MODEL_FILE, "quantize": quantize, "signature": SIGNATURE,
            "input": {"name": INPUT, "dtype": "uint8", "shape": [1, h, w, run.channels],
                      "values": "pixels 0..255 as they are"},
            "outputs": {"mask": {"dtype": "uint8", "shape": [1, h, w]},
                        "probabilities": {"dtype": "float32", "shape": [1, h, w, k]}},
            "converter": f"tf.lite.TFLiteConverter (TensorFlow {tf.__version__})",
            "calibration": calibration, "bytes": len(data), **info,
            "input_quantization": list(info["input_quantization"]),
        },
    })
    publish_model_file(final, MODEL_FILE, data, meta, config, overwrite=overwrite)
    return meta


def readme(name: str, meta: dict, colour_table: str) -> str:
    """EXPORT_BASE/NAME/README.md of a LiteRT export."""
    lit = meta["litert"]
    h, w = meta["image_size"]
    c = meta["channels"]
    k = lit["outputs"]["probabilities"]["shape"][-1]
    if lit["quantize"] == "int8":
        calib = lit.get("calibration") or {}
        quant = (f"int8 post-training quantization calibrated on {calib.get('records')} training records; "
                 + ("every op runs in integers (full-integer), the probabilities are dequantized at the end."
                    if lit.get("full_integer") else
                    "ops the converter left in float: "
                    + ", ".join(f"`{o}` x{n}" for o, n in (lit.get("float_ops") or {}).items()) + "."))
    elif lit["quantize"] == "float16":
        quant = "float16 weights (half the size), computed in float32 on CPUs."
    else:
        quant = "float32 weights and activations."
    binary = meta.get("head") == "sigmoid"
    rule = "foreground probability > 0.5" if binary else "arg-max over the classes"
    return f"""# {name}: tfseg segmentation model for LiteRT (TensorFlow Lite)

Exported by `tfseg export --format litert` from a `{meta.get('model', '?')}` run; {quant}
Each numbered directory is a version: `VERSION/model.tflite`, with the run's facts in
`VERSION/assets.extra/tfseg.json` (classes, colours, input size, preprocessing; `litert` there
lists the ops and the quantization). Converted with TensorFlow's `tf.lite.TFLiteConverter` (the
maintained converter for TensorFlow/Keras models: `ai-edge-litert` ships the runtime, not a
TensorFlow converter); run with the LiteRT runtime (`ai-edge-litert` in Python, `com.google.ai.edge.litert`
on Android).

`tfseg evaluate --model {name}/VERSION --data DATA --output EVAL` scores this file through the
LiteRT interpreter; `tfseg predict --model {name}/VERSION --input DIR --output DIR` runs it on images.

## Signature `{lit['signature']}`

- input `{lit['input']['name']}`: uint8 (1, {h}, {w}, {c}), pixels 0..255 as they are ({'RGB' if c == 3 else 'gray'})
- output `mask`: uint8 (1, {h}, {w}) class ids ({rule})
- output `probabilities`: float32 (1, {h}, {w}, {k}){' (the foreground probability)' if binary else ''}

The model takes one image at its input size; the app resizes:

{caller_steps(meta, binary)}
## Classes

{colour_table}
## Python (pip install ai-edge-litert)

```python
import numpy as np
from PIL import Image, ImageOps
from ai_edge_litert.interpreter import Interpreter

runner = Interpreter(model_path="{name}/VERSION/model.tflite").get_signature_runner("{lit['signature']}")
image = ImageOps.exif_transpose(Image.open("photo.jpg")).convert("{'RGB' if c == 3 else 'L'}")
# PIL's bilinear antialiases when shrinking, as `tfseg convert --image-size` does; the exact
# reference of the steps above is tfseg.preprocess.uint8_model_input(image, size, preprocessing).
x = np.asarray(image.resize(({w}, {h}), Image.BILINEAR), np.uint8).reshape(1, {h}, {w}, {c})
out = runner({lit['input']['name']}=x)
mask = Image.fromarray(out["mask"][0]).resize(image.size, Image.NEAREST)
```

## Kotlin (Android, LiteRT: implementation "com.google.ai.edge.litert:litert:+")

```kotlin
import android.graphics.Bitmap
import org.tensorflow.lite.Interpreter
import java.nio.ByteBuffer
import java.nio.ByteOrder

// loadModelFile: the asset memory-mapped (FileChannel.map), as in LiteRT's Android samples
val interpreter = Interpreter(loadModelFile(context, "model.tflite"), Interpreter.Options().setNumThreads(4))
val scaled = Bitmap.createScaledBitmap(bitmap, {w}, {h}, true)
val input = ByteBuffer.allocateDirect({h} * {w} * {c}).order(ByteOrder.nativeOrder())
val pixels = IntArray({h} * {w}).also {{ scaled.getPixels(it, 0, {w}, 0, 0, {w}, {h}) }}
for (p in pixels) {{ {"input.put((p shr 16 and 0xFF).toByte()); input.put((p shr 8 and 0xFF).toByte()); input.put((p and 0xFF).toByte())" if c == 3 else "input.put(((p shr 16 and 0xFF) * 299 / 1000 + (p shr 8 and 0xFF) * 587 / 1000 + (p and 0xFF) * 114 / 1000).toByte())"} }}
val mask = ByteBuffer.allocateDirect({h} * {w}).order(ByteOrder.nativeOrder())
val probabilities = ByteBuffer.allocateDirect({h} * {w} * {k} * 4).order(ByteOrder.nativeOrder())
interpreter.runSignature(mapOf("{lit['input']['name']}" to input), mapOf("mask" to mask, "probabilities" to probabilities),
                         "{lit['signature']}")
// mask: {h} x {w} class ids, row-major
```
"""
