"""Export a fit run as a TF Serving SavedModel with pre- and post-processing in the graph.

Layout written (TF Serving's: one numbered directory per version, the highest is served)::

    EXPORT_BASE/
      models.config                 model_config_list entry per exported NAME (base_path /models/NAME)
      NAME/
        README.md                   docker command, REST and gRPC request examples, signatures
        VERSION/                    saved_model.pb, variables/, assets.extra/tfseg.json

Signatures of a 2D model (all outputs batch-major, B = number of inputs):

* ``serving_default(image_bytes: string (B,))``: JPEG/PNG/GIF/BMP bytes, grayscale or colour,
  any size, different sizes in one batch allowed. Each image is decoded (converted to the
  model's channels), resized to the training size, run through the model; the probabilities are
  resized back to that image's size and thresholded (binary) or arg-maxed.
* ``predict_masks_png(image_bytes: string (B,))``: ``serving_default`` with only
  ``mask_png_bytes``, ``height`` and ``width``: TF Serving's REST API cannot filter outputs, and
  ``probabilities`` and the padded ``mask`` as JSON numbers are megabytes per image (21 classes
  at 512x512: about 50 MB); ``tfseg predict --server`` uses this one.
* ``predict_images(images: uint8 (B, H, W, C))``: the same from decoded images (one size per batch).
* ``predict_examples(examples: string (B,))``: serialized tf.Example in tfseg's record format
  (:mod:`tfseg.schema`); adds ``source_id``.

Outputs, the same for the three 2D signatures:

* ``mask``: uint8 (B, Hmax, Wmax) class ids at each input's original size, zero-padded at the
  bottom/right to the largest input of the batch (a dense tensor: TF Serving has no ragged
  outputs); ``height`` and ``width`` int32 (B,) give each image's own size.
* ``mask_png_bytes``: string (B,) single-channel PNG of the mask at the original size. The name
  ends in ``_bytes`` because TF Serving's REST API base64-encodes exactly those outputs.
* ``probabilities``: float32 (B, h, w, K) at the model's input size (h, w) = ``image_size``
  (K = 1, the foreground probability, for binary models): resizing K channels back to every
  input's size would multiply the response size by K for little use. A tiled export
  (``--tile``) has them at each image's own size, zero-padded like ``mask``.

Inference options (recorded in ``assets.extra/tfseg.json`` under ``inference`` and in the README),
the same :class:`tfseg.inference.InferenceOptions` that ``tfseg evaluate`` scores with:
``--tile`` tiles the full-resolution image with training-size windows
(:func:`tfseg.inference.sliding_window_tf`, the one sliding window evaluation uses too) instead of
resizing it; ``--tta`` averages over the flips the model was trained with. ``--precision``
(``precision`` in tfseg.json) is the dtype policy the graph computes in: float32 by default,
whatever trained the model (:func:`with_precision`).

A 3D model gets ``serving_default(volume: float32 (D, H, W, C))``, one z-scored volume (as
conversion normalizes it), tiled in the graph with Gaussian-weighted overlapping patches like
:func:`tfseg.inference.predict_volume` -> ``mask`` uint8 (D, H, W), ``probabilities`` float32
(D, H, W, K); ``predict_examples(example: string ())``, one tfseg 3D record; and
``predict_ras_volume(volume: float32 (X, Y, Z, C))``, a NIfTI volume as read after
reorientation to RAS+ (nibabel ``as_closest_canonical``), to which the graph applies the run's
volume record (channel order, model axes, z-score; :mod:`tfseg.volumes`) -> ``mask`` uint8
(X, Y, Z) in the same axes.

Bad inputs (an empty string, bytes that are no JPEG/PNG/GIF/BMP, an image above ``max_pixels``
judged from its header before decoding) fail the request with InvalidArgument.
"""

from __future__ import annotations

import json
import logging
import os
import re


from tfseg import outputs, preprocess, rundir, runtime
from tfseg.errors import TfsegError
from tfseg.outputs import atomic_write_text

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = preprocess.DEFAULT_MAX_PIXELS
# Keras dtype policies an export may compute in; float32 by default whatever trained the model.
PRECISIONS = runtime.POLICIES
DEFAULT_PRECISION = "float32"
MODELS_CONFIG = "models.config"
METADATA = os.path.join("assets.extra", "tfseg.json")


# --------------------------------------------------------------------------------------------
# Export directory helpers (also used by tfseg.predict).
# --------------------------------------------------------------------------------------------


def list_versions(model_dir: str) -> list[int]:
    """Numbered version subdirectories holding a saved_model.pb (or a LiteRT model.tflite), ascending."""
    if not outputs.isdir(model_dir):
        return []
    out = []
    for entry in outputs.listdir(model_dir):
        if entry.isdigit() and any(outputs.isfile(os.path.join(model_dir, entry, f))
                                   for f in ("saved_model.pb", "model.tflite")):
            out.append(int(entry))
    return sorted(out)


def find_version(model_path: str) -> tuple[str, str] | None:
    """``(kind, version_dir)`` for an export version or an export NAME folder (its highest
    version), kind ``"export"`` (a SavedModel) or ``"litert"`` (:mod:`tfseg.litert`); None for
    anything else."""
    from tfseg.litert import is_litert_version

    if outputs.isfile(os.path.join(model_path, "saved_model.pb")):
        return "export", model_path
    if is_litert_version(model_path):
        return "litert", model_path
    versions = list_versions(model_path)
    if not versions:
        return None
    path = os.path.join(model_path, str(versions[-1]))
    return ("litert" if is_litert_version(path) else "export"), path


def read_metadata(version_dir: str) -> dict:
    """The tfseg facts (ndim, channels, binary, sizes, class names) stored with an export."""
    path = os.path.join(version_dir, METADATA)
    if not outputs.isfile(path):
        raise TfsegError(f"{version_dir}: no {METADATA}; not a tfseg export")
    return json.loads(outputs.read_text(path))


# --------------------------------------------------------------------------------------------
# Precision.
# --------------------------------------------------------------------------------------------


def model_precision(model) -> str:
    """The mixed policy most of ``model``'s layers compute in, or ``"float32"``."""
    names = [getattr(layer.dtype_policy, "name", "float32") for layer in _all_layers(model)]
    mixed = [n for n in names if n.startswith("mixed_")]
    return max(set(mixed), key=mixed.count) if mixed else "float32"


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def _with_policy(config, old: str, new: str):
    """``config`` (a Keras model config) with every ``old`` dtype policy replaced by ``new``."""
    if isinstance(config, dict):
        if config.get("class_name") in ("DTypePolicy", "FloatDTypePolicy") and \
                (config.get("config") or {}).get("name") == old:
            return {**config, "config": {**config["config"], "name": new}}
        return {k: _with_policy(v, old, new) for k, v in config.items()}
    if isinstance(config, list):
        return [_with_policy(v, old, new) for v in config]
    return config


def with_precision(model, precision: str):
    """``model`` computing under the Keras dtype policy ``precision`` (a copy when it differs).

    The model is rebuilt from its config with the trained policy (``mixed_bfloat16``, ...)
    replaced by ``precision`` and the trained weights copied in; variables of mixed policies are
    float32 already, so no weight is rounded. Layers the model forced to another policy (a
    float32 softmax in a mixed model) keep theirs.
    """
    import keras

    if precision not in PRECISIONS:
        raise TfsegError(f"--precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    trained = model_precision(model)
    if trained == precision:
        return model
    import tfseg.models  # noqa: F401  registers tfseg's custom layers

    config = _with_policy(keras.saving.serialize_keras_object(model), trained, precision)
    clone = keras.saving.deserialize_keras_object(config)
    clone.set_weights(model.get_weights())
    logger.info("computing in %s (the model trained in %s)", precision, trained)
    return clone


# --------------------------------------------------------------------------------------------
# Graph pieces.
# --------------------------------------------------------------------------------------------


class _Graphs:
    """The tf.functions of one export; closes over the model, the run's facts and the inference
    options (:class:`Inference`)."""

    def __init__(self, model, run: rundir.RunInfo, max_pixels: int, options):
        self.model = model
        self.channels = run.channels
        self.binary = run.binary
        self.max_pixels = int(max_pixels)
        self.options = options
        self.size = run.size
        self.preprocessing = run.preprocessing  # what convert did to the originals (tfseg.preprocess)

    def _forward(self, x):
        import tensorflow as tf

        return tf.cast(self.model(x, training=False), tf.float32)

    def _probs(self, x):
        """Model probabilities of a (B, *size, C) batch, flip-averaged over the export's TTA flips."""
        from tfseg.inference import flip_average

        return flip_average(self._forward, x, self.options.tta_flip_axes)

    def _tile(self, image):
        """Tiled probabilities (*spatial, K) of one (*spatial, C) image or volume at its own size."""
        import tensorflow as tf

        from tfseg.inference import sliding_window_tf

        return sliding_window_tf(self._forward, tf.cast(image, tf.float32), self.size,
                                 overlap=self.options.overlap, batch_size=self.options.batch_size,
                                 tta=self.options.tta_flip_axes)

    def _to_mask(self, probs):
        import tensorflow as tf

        if self.binary:
            return tf.cast(probs[..., 0] > 0.5, tf.uint8)
        return tf.cast(tf.argmax(probs, axis=-1), tf.uint8)

    def _decode_resize(self, data):
        import tensorflow as tf

        image = preprocess.decode_image(data, self.channels, self.max_pixels)
        shape = tf.shape(image)
        return preprocess.model_input(image, self.size, self.preprocessing), shape[0], shape[1]

    def _pngs(self, masks, heights, widths):
        import tensorflow as tf

        def png_one(args):
            mask, h, w = args
            # Fastest zlib level: about 30% quicker than the default, masks still small.
            return tf.io.encode_png(mask[:h, :w, None], compression=1)

        return tf.map_fn(png_one, (masks, heights, widths), fn_output_signature=tf.TensorSpec([], tf.string))

    def _run(self, x, heights, widths):
        """Model on (B, h, w, C) resized float images; masks back at each (height, width)."""
        import tensorflow as tf

        probs = self._probs(x)
        h_max = tf.reduce_max(tf.concat([heights, [0]], 0))
        w_max = tf.reduce_max(tf.concat([widths, [0]], 0))

        def back_one(args):
            p, h, w = args
            mask = self._to_mask(preprocess.resize_back(p, tf.stack([h, w])))
            return tf.pad(mask, [[0, h_max - h], [0, w_max - w]])

        def back_each():
            return tf.map_fn(back_one, (probs, heights, widths), fn_output_signature=tf.TensorSpec([None, None], tf.uint8))

        def back_batch():
            # One batched resize when all inputs share a size (the common case): no per-image loop.
            return self._to_mask(preprocess.resize_back(probs, tf.stack([h_max, w_max])))

        same_size = tf.reduce_all(tf.equal(heights, h_max)) & tf.reduce_all(tf.equal(widths, w_max))
        masks = tf.cond(same_size, back_batch, back_each)
        return {"mask": masks, "mask_png_bytes": self._pngs(masks, heights, widths), "height": heights,
                "width": widths, "probabilities": probs}

    def _run_tiled(self, count, image_at):
        """Tiled at full resolution: ``image_at(i)`` is the i-th (H, W, C) image of ``count``.

        ``probabilities`` are at each image's own size here (zero-padded like ``mask``).
        """
        import tensorflow as tf

        def body(i, probs_ta, hs, ws):
            image = image_at(i)
            shape = tf.shape(image)
            probs = self._tile(preprocess.source_resize(image, self.preprocessing))
            if preprocess.source_size(self.preprocessing) is not None:
                probs = preprocess.resize_back(probs, shape[:2])
            return (i + 1, probs_ta.write(i, probs), hs.write(i, shape[0]), ws.write(i, shape[1]))

        ta = tf.TensorArray(tf.float32, size=count, infer_shape=False, element_shape=tf.TensorShape([None, None, None]))
        hs = tf.TensorArray(tf.int32, size=count)
        ws = tf.TensorArray(tf.int32, size=count)
        _, ta, hs, ws = tf.while_loop(lambda i, *_: i < count, body, (0, ta, hs, ws))
        heights, widths = hs.stack(), ws.stack()
        h_max = tf.reduce_max(tf.concat([heights, [0]], 0))
        w_max = tf.reduce_max(tf.concat([widths, [0]], 0))
        k = int(self.model.output_shape[-1])

        def pad_one(i):
            p = ta.read(i)
            return tf.pad(p, [[0, h_max - heights[i]], [0, w_max - widths[i]], [0, 0]])

        probs = tf.map_fn(pad_one, tf.range(count), fn_output_signature=tf.TensorSpec([None, None, k], tf.float32))
        valid = (tf.range(h_max)[None, :, None] < heights[:, None, None]) & \
                (tf.range(w_max)[None, None, :] < widths[:, None, None])
        masks = tf.where(valid, self._to_mask(probs), tf.zeros([], tf.uint8))
        return {"mask": masks, "mask_png_bytes": self._pngs(masks, heights, widths), "height": heights,
                "width": widths, "probabilities": probs}

    def serve_bytes(self, image_bytes):
        import tensorflow as tf

        if self.options.tile:
            return self._run_tiled(
                tf.shape(image_bytes)[0],
                lambda i: preprocess.decode_image(image_bytes[i], self.channels, self.max_pixels))
        x, heights, widths = tf.map_fn(
            self._decode_resize,
            image_bytes,
            fn_output_signature=(
                tf.TensorSpec(self.size + (self.channels,), tf.float32),
                tf.TensorSpec([], tf.int32),
                tf.TensorSpec([], tf.int32),
            ),
        )
        return self._run(x, heights, widths)

    def serve_bytes_png(self, image_bytes):
        out = self.serve_bytes(image_bytes)
        return {k: out[k] for k in ("mask_png_bytes", "height", "width")}

    def serve_images(self, images):
        import tensorflow as tf

        shape = tf.shape(images)
        ok = tf.debugging.assert_less_equal(
            tf.cast(shape[1], tf.int64) * tf.cast(shape[2], tf.int64), tf.constant(self.max_pixels, tf.int64),
            message=f"image larger than the export's limit of {self.max_pixels} pixels",
        )
        if self.options.tile:
            with tf.control_dependencies([ok]):
                return self._run_tiled(shape[0], lambda i: images[i])
        with tf.control_dependencies([ok]):
            x = preprocess.model_input(images, self.size, self.preprocessing)
        heights = tf.fill([shape[0]], shape[1])
        widths = tf.fill([shape[0]], shape[2])
        return self._run(x, heights, widths)

    def serve_examples_2d(self, examples):
        import tensorflow as tf

        from tfseg import schema

        spec = schema.feature_spec_2d()
        parsed = tf.io.parse_example(examples, {k: spec[k] for k in (schema.IMAGE_ENCODED, schema.SOURCE_ID)})
        out = self.serve_bytes(parsed[schema.IMAGE_ENCODED])
        out["source_id"] = parsed[schema.SOURCE_ID]
        return out

    # --- 3D ---

    def serve_volume(self, volume):
        probs = self._tile(volume)
        return {"mask": self._to_mask(probs), "probabilities": probs}

    def serve_ras_volume(self, volume):
        """A canonical (RAS+) (X, Y, Z, C) volume as read from NIfTI: the run's volume record
        (channel order, model axes, normalization; :mod:`tfseg.volumes`) applied in the graph;
        the mask comes back in the same (X, Y, Z) axes."""
        from tfseg import volumes

        probs = self._tile(volumes.apply_record_tf(volume, self.preprocessing))
        return {"mask": volumes.model_axes_to_ras_tf(self._to_mask(probs))}

    def serve_example_3d(self, example):
        import tensorflow as tf

        from tfseg import schema

        ex = tf.io.parse_single_example(example, schema.feature_spec_3d())
        volume = tf.cast(tf.io.parse_tensor(ex[schema.VOLUME_ENCODED], tf.float16), tf.float32)
        volume = tf.reshape(volume, tf.cast(ex[schema.VOLUME_SHAPE], tf.int32))
        volume = tf.ensure_shape(volume, [None, None, None, self.channels])
        out = self.serve_volume(volume)
        out["source_id"] = ex[schema.VOLUME_SOURCE_ID]
        return out


def build_archive(model, cfg, max_pixels: int = DEFAULT_MAX_PIXELS, options=None):
    """A ``keras.export.ExportArchive`` with tfseg's signatures for ``model`` (see module doc).

    Args:
      model: the trained Keras model.
      cfg: the run's facts: a :class:`tfseg.rundir.RunInfo` or run.json's dict.
      max_pixels: the largest image (height x width) a 2D signature accepts.
      options: a :class:`tfseg.inference.InferenceOptions` (tiling, TTA flips); None = resize
        (2D) or sliding window (3D), no flips.
    """
    import keras
    import tensorflow as tf

    from tfseg.inference import InferenceOptions

    run = cfg if isinstance(cfg, rundir.RunInfo) else rundir.RunInfo.from_json(cfg)
    g = _Graphs(model, run, max_pixels, options or InferenceOptions.make(run.ndim))
    archive = keras.export.ExportArchive()
    archive.track(model)
    c = g.channels
    if run.ndim == 2:
        # The first endpoint added becomes serving_default as well; name it explicitly anyway.
        archive.add_endpoint("serving_default", tf.function(g.serve_bytes),
                             [tf.TensorSpec([None], tf.string, name="image_bytes")])
        archive.add_endpoint("predict_masks_png", tf.function(g.serve_bytes_png),
                             [tf.TensorSpec([None], tf.string, name="image_bytes")])
        archive.add_endpoint("predict_images", tf.function(g.serve_images),
                             [tf.TensorSpec([None, None, None, c], tf.uint8, name="images")])
        archive.add_endpoint("predict_examples", tf.function(g.serve_examples_2d),
                             [tf.TensorSpec([None], tf.string, name="examples")])
    elif run.ndim == 3:
        archive.add_endpoint("serving_default", tf.function(g.serve_volume),
                             [tf.TensorSpec([None, None, None, c], tf.float32, name="volume")])
        archive.add_endpoint("predict_examples", tf.function(g.serve_example_3d),
                             [tf.TensorSpec([], tf.string, name="example")])
        archive.add_endpoint("predict_ras_volume", tf.function(g.serve_ras_volume),
                             [tf.TensorSpec([None, None, None, c], tf.float32, name="volume")])
    else:
        raise TfsegError(f"run.json: ndim must be 2 or 3, got {cfg['ndim']!r}")
    return archive


# --------------------------------------------------------------------------------------------
# models.config and README.
# --------------------------------------------------------------------------------------------


_CONFIG_ENTRY = re.compile(r"config\s*\{\s*name:\s*'([^']*)'.*?\}", re.S)


def _update_models_config(export_base: str, name: str) -> None:
    """Adds (or keeps) NAME in EXPORT_BASE/models.config, keeping the other models' entries."""
    path = os.path.join(export_base, MODELS_CONFIG)
    names = []
    if outputs.isfile(path):
        names = _CONFIG_ENTRY.findall(outputs.read_text(path))
    if name not in names:
        names.append(name)
    entries = "".join(
        f"  config {{\n    name: '{n}'\n    base_path: '/models/{n}'\n    model_platform: 'tensorflow'\n  }}\n"
        for n in names
    )
    atomic_write_text(
        path,
        "# TF Serving --model_config_file, written by `tfseg export`; paths are inside the container\n"
        "# (mount EXPORT_BASE at /models).\n"
        f"model_config_list {{\n{entries}}}\n",
    )


def _class_colors(cfg: dict) -> list[list[int]]:
    """The run's class colours (:func:`tfseg.visualize.run_colors`) as JSON-ready lists."""
    from tfseg.visualize import run_colors

    return run_colors(cfg).tolist()


def _colour_table(cfg: dict) -> str:
    from tfseg.visualize import class_names_or_default, hex_color

    colors = _class_colors(cfg)
    names = class_names_or_default(cfg.get("class_names"), len(colors))
    rows = "".join(f"| {c} | {n} | `{hex_color(rgb)}` | {', '.join(map(str, rgb))} |\n"
                   for c, (n, rgb) in enumerate(zip(names, colors)))
    return "| id | class | colour | R, G, B |\n|---|---|---|---|\n" + rows


def _inference_lines(meta: dict) -> str:
    """The README's account of what the graph computes: precision, resize or tiles, TTA flips."""
    inf = meta.get("inference") or {}
    axis_names = ("vertical (up-down)", "horizontal (left-right)") if meta.get("ndim") == 2 else ("D", "H", "W")
    flips = inf.get("tta_flip_axes") or []
    if inf.get("mode") == "tile":
        how = (f"tiles of the training size {'x'.join(map(str, meta.get('image_size') or []))} over the image at "
               f"its full resolution, overlap {inf.get('overlap')}, Gaussian-blended")
    elif inf.get("mode") == "sliding_window":
        how = (f"{'x'.join(map(str, meta.get('patch_size') or []))} patches, overlap {inf.get('overlap')}, "
               "Gaussian-blended")
    else:
        how = f"the image resized to the training size {'x'.join(map(str, meta.get('image_size') or []))} and back"
    tta = ("flip test-time augmentation over " + ", ".join(axis_names[a] for a in flips) +
           " (the flips the model was trained with)") if flips else "no test-time augmentation"
    pre = meta.get("preprocessing") or {}
    source = ""
    if meta.get("ndim") == 2 and pre.get("resize"):
        r = pre["resize"]
        source = (f" Images are first resized as `tfseg convert --image-size` stored the training records: "
                  f"{r.get('method')} (antialias {str(r.get('antialias')).lower()}) to "
                  f"{'x'.join(map(str, r.get('size') or []))}, rounded to uint8; masks come back at the "
                  f"original size.")
    elif meta.get("ndim") == 3 and pre:
        source = (f" The volume must arrive as conversion made the records (tfseg.json `preprocessing`): "
                  f"{pre.get('orientation')}, axes {pre.get('axes')}, channels {pre.get('channels')}, "
                  f"{pre.get('normalization')}; `tfseg predict` applies this to NIfTI files.")
    return (f"Computes in **{meta.get('precision')}** (trained in {meta.get('trained_precision')}); "
            f"predicts from {how}; {tta}.{source} `tfseg evaluate --model` scores exactly this graph.\n")


def _readme(name: str, export_base: str, cfg: dict, max_pixels: int, meta: dict | None = None) -> str:
    base = outputs.normalize(export_base)
    if int(cfg["ndim"]) == 2:
        # Shell quoting: close the single quotes around the JSON so $(base64 ...) expands.
        rest_body = """{"signature_name": "serving_default", "instances": [{"b64": "'"$(base64 -w0 image.jpg)"'"}]}"""
        sig = (
            "- `serving_default`: `image_bytes` string (B,), JPEG/PNG/GIF/BMP, any size\n"
            "- `predict_masks_png`: the same input, only `mask_png_bytes`, `height`, `width` (small REST responses)\n"
            "- `predict_images`: `images` uint8 (B, H, W, C)\n"
            "- `predict_examples`: `examples` string (B,), serialized tfseg tf.Example records\n\n"
            "Outputs: `mask` uint8 (B, Hmax, Wmax) zero-padded, with `height`/`width` int32 (B,) giving each\n"
            "image's size; `mask_png_bytes` PNG of each mask at its original size (base64 in REST responses);\n"
            + ("`probabilities` float32 (B, Hmax, Wmax, K) at each image's size (tiled export), zero-padded.\n"
               if ((meta or {}).get("inference") or {}).get("mode") == "tile" else
               f"`probabilities` float32 (B, {cfg['image_size'][0]}, {cfg['image_size'][1]}, K) at the model size.\n")
            + 
            f"Images above {max_pixels} pixels, empty strings and non-images fail with INVALID_ARGUMENT.\n"
        )
        grpc_input = (
            'request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([open("image.jpg", "rb").read()]))\n'
            'png = response.outputs["mask_png_bytes"].string_val[0]'
        )
    else:
        rest_body = '{"signature_name": "serving_default", "inputs": {"volume": [[[[0.0]]]]}}'
        sig = (
            "- `serving_default`: `volume` float32 (D, H, W, C), one z-scored volume, tiled in the graph\n"
            "- `predict_examples`: `example` string (), one serialized tfseg 3D record\n\n"
            "Outputs: `mask` uint8 (D, H, W), `probabilities` float32 (D, H, W, K).\n"
        )
        grpc_input = (
            'request.inputs["volume"].CopyFrom(tf.make_tensor_proto(volume.astype("float32")))\n'
            'mask = tf.make_ndarray(response.outputs["mask"])'
        )
    return f"""# {name}: tfseg segmentation model for TF Serving

Exported by `tfseg export` from a `{cfg.get('model', '?')}` run; classes: {cfg.get('class_names')}.
Each numbered directory is a version; TF Serving serves the highest.

{_inference_lines(meta or {})}
## Classes

`mask` holds the class ids; `tfseg predict` writes them as palette PNGs in these colours (also in
`assets.extra/tfseg.json` as `class_colors`):

{_colour_table(cfg)}
## Signatures

{sig}
## Serve

```
docker run -p 8501:8501 -p 8500:8500 -v {base}/{name}:/models/{name} -e MODEL_NAME={name} tensorflow/serving
```

Several exported models at once (EXPORT_BASE/models.config):

```
docker run -p 8501:8501 -p 8500:8500 -v {base}:/models tensorflow/serving --model_config_file=/models/models.config
```

## REST

```
curl -d '{rest_body}' localhost:8501/v1/models/{name}:predict
```

The response holds every output as JSON numbers; use `"signature_name": "predict_masks_png"` to get only
the base64 PNG masks. `tfseg predict --server localhost:8501 --model {name} --input DIR --output DIR`
does that for a directory of images.

## gRPC (pip install tensorflow-serving-api)

```python
import grpc, tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel("localhost:8500"))
request = predict_pb2.PredictRequest()
request.model_spec.name = "{name}"
request.model_spec.signature_name = "serving_default"
{grpc_input.split(chr(10))[0]}
response = stub.Predict(request, 30.0)
{grpc_input.split(chr(10))[1]}
```
"""


# --------------------------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------------------------


@outputs.holding_locks
def run_export(
    run_dir: str,
    export_base: str,
    name: str,
    version: int | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    overwrite: bool = False,
    precision: str = DEFAULT_PRECISION,
    tta: bool = False,
    tile: bool = False,
    format: str = "savedmodel",
    quantize: str = "none",
    calibration_records: int | None = None,
    calibration_data: str | None = None,
) -> str:
    """Exports RUN_DIR's model as EXPORT_BASE/NAME/VERSION for TF Serving (or LiteRT).

    Args:
      run_dir: a completed `tfseg fit` run directory.
      export_base: the directory holding exported models (and models.config).
      name: the model name TF Serving serves it under.
      version: the version number; None = highest existing + 1 (1 for the first export).
      max_pixels: largest height x width a 2D signature accepts.
      overwrite: replace an existing VERSION directory.
      precision: the Keras dtype policy the served graph computes in: float32 (default, whatever
        trained the model: bfloat16 is slow on CPUs without native support, float16 on any
        CPU), or ``mixed_bfloat16`` / ``mixed_float16`` for servers that run them fast.
      tta: average over the flips the model was trained with, in the graph (as
        ``tfseg evaluate --tta`` scores it).
      tile: 2D: tile at the training size over the full-resolution image instead of resizing
        it (as ``tfseg evaluate --tile``); 3D volumes are always tiled.
      format: ``savedmodel`` (TF Serving) or ``litert`` (VERSION/model.tflite, :mod:`tfseg.litert`;
        2D only, no tile/TTA/precision; not added to models.config).
      quantize, calibration_records, calibration_data: LiteRT only (:func:`tfseg.litert.write_export`).

    Returns:
      The version directory written.

    Raises:
      TfsegError: bad run directory, bad name or version, or an existing version without
        ``overwrite``.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name or ""):
        raise TfsegError(f"--name {name!r}: use letters, digits, '_', '.', '-' (it becomes a directory and URL part)")
    if precision not in PRECISIONS:
        raise TfsegError(f"--precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    cfg = rundir.load_run_config(run_dir)
    run = rundir.RunInfo.from_json(cfg, os.path.join(run_dir, rundir.RUN_JSON))
    from tfseg import litert
    from tfseg.inference import InferenceOptions

    if format not in litert.FORMATS:
        raise TfsegError(f"--format {format!r}: choose from {', '.join(litert.FORMATS)}")
    if format == "litert":
        litert.check_exportable(run, quantize=quantize, tile=tile, tta=tta, precision=precision)
    elif quantize != "none" or calibration_records or calibration_data:
        raise TfsegError("--quantize/--calibration-records/--calibration-data: for --format litert only")

    options = InferenceOptions.make(run.ndim, tile=tile, flips=rundir.test_time_flips(run_dir, run, tta))
    # EXPORT_BASE collects every export (NAME/VERSION/ + models.config): it must be new, empty,
    # or an earlier `tfseg export` output; it never overlaps the run it exports.
    outputs.claim(export_base, "export", complete_marker=None, overwrite=True, inputs=[("--run", run_dir)],
                  lock=False)
    model = rundir.load_model(run_dir)  # a broken model fails before EXPORT_BASE is created
    outputs.claim_container(export_base, "export", inputs=[("--run", run_dir)])
    model_dir = os.path.join(export_base, name)
    # One writer per model name: a version number is allocated and published under this lock,
    # so two exports never hand out (or replace) the same version.
    outputs.acquire_lock(model_dir, "export", option="--name")
    if version is None:
        existing = list_versions(model_dir)
        version = (existing[-1] + 1) if existing else 1
    if int(version) < 1:
        raise TfsegError(f"--version {version}: must be a positive integer")
    litert.check_one_format(model_dir, format)
    final = os.path.join(model_dir, str(int(version)))
    if outputs.exists(final) and not overwrite:
        raise TfsegError(f"{final}: version {version} already exists; pass --overwrite or another --version")

    trained_precision = model_precision(model)
    # The run's facts (rundir.RunInfo's keys, so RunInfo.from_json reads tfseg.json back);
    # "precision" is what the served graph computes in.
    meta = run.to_json()
    meta.update({"precision": precision, "trained_precision": trained_precision, "inference": options.to_json()})
    meta.update({"max_pixels": int(max_pixels), "run_dir": outputs.normalize(run_dir), "name": name,
                 "version": int(version), "class_colors": _class_colors(cfg)})
    if format == "litert":
        meta = litert.write_export(
            with_precision(model, "float32"), run, meta, final, overwrite=overwrite, quantize=quantize,
            calibration_records=calibration_records or litert.DEFAULT_CALIBRATION_RECORDS,
            calibration_data=calibration_data or cfg.get("data_dir"))
        atomic_write_text(os.path.join(model_dir, "README.md"), litert.readme(name, meta, _colour_table(cfg)))
        logger.info("exported %s version %s (LiteRT, %s) to %s", name, version, quantize, final)
        return final
    archive = build_archive(with_precision(model, precision), run, max_pixels, options)
    # TF Serving watches NAME/ and would load a half-written version: write beside it (a
    # dot-prefixed, non-numeric name it ignores) and rename.
    with outputs.publish_dir(final, "export", complete_marker="saved_model.pb", overwrite=overwrite,
                             option="--version") as tmp:
        archive.write_out(tmp, verbose=False)
        os.makedirs(os.path.join(tmp, "assets.extra"), exist_ok=True)
        with open(os.path.join(tmp, METADATA), "w") as f:
            json.dump(meta, f, indent=2)
    atomic_write_text(os.path.join(model_dir, "README.md"), _readme(name, export_base, cfg, max_pixels, meta))
    _update_models_config(export_base, name)
    logger.info("exported %s version %s to %s", name, version, final)
    return final
