"""The serving graph of an export: a fit run's model as TF Serving signatures, with pre- and
post-processing in the graph.

Layout written (TF Serving's: one numbered directory per version, the highest is served)::

    EXPORT_BASE/
      models.config                 model_config_list entry per exported NAME (base_path /models/NAME)
      NAME/
        README.md                   docker command, REST and gRPC request examples, signatures
        VERSION/                    saved_model.pb, variables/, assets.extra/tfseg.json and export.json

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

import logging

from tfseg import preprocess, rundir, runtime
from tfseg.errors import TfsegError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = preprocess.DEFAULT_MAX_PIXELS
# Keras dtype policies an export may compute in; float32 by default whatever trained the model.
PRECISIONS = runtime.POLICIES
DEFAULT_PRECISION = "float32"


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
    # Not archive.track(model): the endpoints track every variable they use already (as the
    # underlying tf.Variables), and tracking the model adds its Keras variables as a second
    # set of objects, so the SavedModel stored each weight twice (variables/ and _all_variables/).
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


def model_size_signature(model, run, *, batch: int | None, float_input: bool = False, input_name: str = "image"):
    """The model-size signature of the LiteRT and ONNX exports, its variables frozen into constants.

    Input ``input_name``: uint8 (batch, h, w, C) pixels as they are at the model's size (h, w) =
    ``run.size`` (``batch`` None: any batch); outputs ``mask``: uint8 (batch, h, w) class ids
    (binary: foreground probability > 0.5, else arg-max) and ``probabilities``: float32
    (batch, h, w, K). The resize to the model's size and back is the caller's
    (:func:`tfseg.preprocess.uint8_model_input`).

    Args:
      model: a float32 2D tfseg Keras model.
      run: its :class:`~tfseg.rundir.RunInfo` (size, channels, head).
      batch: the batch dimension, or None.
      float_input: a float32 input holding pixel values, pinned to [0, 255] by a fake-quant: the
        LiteRT int8 converter turns it into a uint8 input (a uint8 input cast inside would leave
        the cast outside the quantized graph).
      input_name: the input's name.

    Returns:
      A ``tf.function`` with that input signature.
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    size, channels, binary = tuple(run.size), run.channels, run.binary

    def serve(image):
        x = tf.cast(image, tf.float32)
        if float_input:
            # Pins the input's quantization to scale 1, zero point 0: the uint8 input is the pixel
            # value itself, whatever range the calibration images happened to cover.
            x = tf.quantization.fake_quant_with_min_max_args(x, min=0.0, max=255.0, num_bits=8)
        probs = tf.cast(model(x, training=False), tf.float32)
        if binary:
            mask = tf.cast(probs[..., 0] > 0.5, tf.uint8)
        else:
            mask = tf.cast(tf.argmax(probs, axis=-1), tf.uint8)
        return {"mask": mask, "probabilities": probs}

    spec = tf.TensorSpec((batch,) + size + (channels,), tf.float32 if float_input else tf.uint8, name=input_name)
    traced = tf.function(serve).get_concrete_function(spec)
    # Frozen before conversion: Keras 3's variables would otherwise stay READ_VARIABLE ops (that
    # nothing initializes on a device), and converting the frozen graph is 3-5x faster than
    # letting a converter freeze a Keras SavedModel (MobileNetV2-U-Net: 4 s instead of 21 s).
    frozen = convert_variables_to_constants_v2(traced)

    @tf.function(input_signature=[spec])
    def signature(image):
        # The frozen function returns a flat list; give the outputs their names back.
        return tf.nest.pack_sequence_as(traced.structured_outputs, frozen(image))

    return signature
