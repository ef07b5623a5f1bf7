"""Batch prediction: a directory of images or NIfTI volumes in, a directory of masks out.

The model is one of

* an export version directory (EXPORT_BASE/NAME/VERSION, has saved_model.pb),
* an export NAME directory (its highest version is used, as TF Serving would),
* a fit RUN_DIR (run.json + model.keras; runs :mod:`tfseg.inference`, optionally tiled),
* with ``server="HOST:PORT"``: the NAME of a model served by a running TF Serving server, called
  over its REST API (or gRPC with ``grpc=True`` and tensorflow-serving-api installed).

Images (``.jpg .jpeg .png .gif .bmp``) give ``STEM.png`` masks at the input's size: palette PNGs
(mode ``P``) whose pixel values are the class ids, so loaders read the ids unchanged
(``np.array(Image.open(path))``) and image viewers show each class in its colour (the dataset's:
VOC's colour map, the folder layout's ``--palette``, else a fixed distinct map; see
:mod:`tfseg.visualize`). With ``overlay=True`` each input also gets ``overlays/STEM.jpg`` (``.png``
for non-JPEG inputs): the input with the mask blended over it and a legend naming the classes
present (3D: the middle axial slice). Volumes (``.nii``, ``.nii.gz``, channels last when 4D) give ``STEM.nii.gz`` uint8
masks carrying the input's affine. Files that fail (unreadable, wrong channels, rejected by the
model) are listed in the summary and skipped; the rest are still written. The output directory
is published atomically with ``predict_summary.json``.

``runner="DirectRunner"`` (or any Beam runner, with ``beam_args`` passed to PipelineOptions)
runs the same job as a Beam pipeline built on Beam's ``RunInference`` with its TensorFlow model
handler on the exported SavedModel (:mod:`tfseg.beam_inference`); it writes the same files as the
local job. For a distributed runner, input and output must be on storage every worker can reach::

    tfseg predict --model models/carvana --input photos/ --output masks/ --runner DirectRunner \
        --beam-arg=--direct_num_workers=2
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import time
import urllib.error
import urllib.request
from typing import Callable, Iterable, Sequence

import numpy as np

from tfseg import outputs, rundir
from tfseg import volumes as volume_io
from tfseg.errors import TfsegError

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
VOLUME_EXTS = (".nii.gz", ".nii")
SUMMARY_JSON = "predict_summary.json"
# serving_default's outputs minus the probabilities and padded mask, which are megabytes of JSON.
SERVER_SIGNATURE = "predict_masks_png"


# --------------------------------------------------------------------------------------------
# Inputs and model resolution.
# --------------------------------------------------------------------------------------------


def _stem_kind(name: str) -> tuple[str, str] | None:
    low = name.lower()
    for ext in VOLUME_EXTS:
        if low.endswith(ext):
            return name[: -len(ext)], "volume"
    for ext in IMAGE_EXTS:
        if low.endswith(ext):
            return name[: -len(ext)], "image"
    return None


def list_inputs(input_dir: str) -> list[tuple[str, str, str]]:
    """(path, kind, stem) of the images and volumes directly in ``input_dir``, sorted by name.

    Raises:
      TfsegError: missing directory, no inputs, or two inputs that would write the same mask.
    """
    if not outputs.isdir(input_dir):
        raise TfsegError(f"{input_dir}: input directory not found")
    out, seen = [], {}
    for name in outputs.listdir(input_dir):
        sk = _stem_kind(name)
        if sk is None or name.startswith("."):
            continue
        stem, kind = sk
        path = os.path.join(input_dir, name)
        if outputs.is_remote(path):
            if outputs.isdir(path):
                logger.warning("%s: skipped, a folder", path)
                continue
        elif not os.path.isfile(path) or not os.access(path, os.R_OK):
            # A dangling link, a folder named like an image, an unreadable file: skip, say so.
            why = "a dangling link" if os.path.islink(path) and not os.path.exists(path) else (
                "a folder" if os.path.isdir(path) else "not a readable file")
            logger.warning("%s: skipped, %s", path, why)
            continue
        if stem in seen:
            raise TfsegError(f"{input_dir}: {seen[stem]} and {name} would both write the mask {stem!r}")
        seen[stem] = name
        out.append((os.path.join(input_dir, name), kind, stem))
    if not out:
        raise TfsegError(f"{input_dir}: no images ({', '.join(IMAGE_EXTS)}) or volumes (.nii, .nii.gz)")
    return out


def resolve_model(model_path: str) -> tuple[str, str]:
    """Classifies ``model_path`` as ``("export", version_dir)`` or ``("run", run_dir)``.

    Raises:
      TfsegError: none of an export version, an export NAME directory, or a finished run.
    """
    from tfseg.export import list_versions

    if outputs.isfile(os.path.join(model_path, "saved_model.pb")):
        return "export", model_path
    versions = list_versions(model_path)
    if versions:
        return "export", os.path.join(model_path, str(versions[-1]))
    if outputs.isfile(os.path.join(model_path, rundir.RUN_JSON)):
        return "run", model_path
    raise TfsegError(
        f"{model_path}: not an export version (saved_model.pb), an export NAME directory or a run directory (run.json)"
    )


# --------------------------------------------------------------------------------------------
# File IO.
# --------------------------------------------------------------------------------------------


def encode_png(mask: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="L").save(buf, "PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(io.BytesIO(data)))


# --------------------------------------------------------------------------------------------
# REST / gRPC clients for TF Serving.
# --------------------------------------------------------------------------------------------


def build_rest_request(images: Sequence[bytes], signature_name: str = "serving_default") -> dict:
    """The JSON body of a TF Serving REST predict request in the row ("instances") format.

    Binary inputs are sent as ``{"b64": ...}`` objects, which TF Serving decodes to tf.string.
    """
    return {
        "signature_name": signature_name,
        "instances": [{"b64": base64.b64encode(b).decode("ascii")} for b in images],
    }


def parse_rest_response(body: dict, count: int) -> list[np.ndarray]:
    """Masks from a TF Serving REST predict response of the 2D ``serving_default`` signature.

    Accepts the row format (``{"predictions": [{"mask_png_bytes": {"b64": ...}, ...}, ...]}``)
    and the columnar one (``{"outputs": {"mask_png_bytes": [{"b64": ...}, ...], ...}}``).

    Raises:
      ValueError: an error response or a response without the expected outputs.
    """
    if "error" in body:
        raise ValueError(f"server error: {body['error']}")
    if "predictions" in body:
        pngs = [p.get("mask_png_bytes") if isinstance(p, dict) else None for p in body["predictions"]]
    elif "outputs" in body and isinstance(body["outputs"], dict):
        pngs = body["outputs"].get("mask_png_bytes")
    else:
        raise ValueError(f"unexpected response keys {sorted(body)}")
    if not isinstance(pngs, list) or len(pngs) != count or any(not isinstance(p, dict) or "b64" not in p for p in pngs):
        raise ValueError(f"response has no mask_png_bytes for each of the {count} images")
    return [decode_png(base64.b64decode(p["b64"])) for p in pngs]


class RestClient:
    """Calls a model on a running TF Serving server over REST (urllib, no extra dependency)."""

    def __init__(self, server: str, model_name: str, *, version: int | None = None,
                 signature_name: str = SERVER_SIGNATURE, timeout: float = 60.0):
        host = server if "://" in server else f"http://{server}"
        path = f"/v1/models/{model_name}" + (f"/versions/{version}" if version else "") + ":predict"
        self.url = host.rstrip("/") + path
        self.signature_name = signature_name
        self.timeout = timeout

    def predict_images(self, images: Sequence[bytes]) -> list[np.ndarray]:
        data = json.dumps(build_rest_request(images, self.signature_name)).encode()
        req = urllib.request.Request(self.url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", "replace")
            try:
                body = json.loads(text)
            except json.JSONDecodeError:
                raise ValueError(f"HTTP {e.code} from {self.url}: {text[:200]}") from None
        except (urllib.error.URLError, OSError) as e:
            raise TfsegError(f"--server: cannot reach {self.url} ({e})") from None
        return parse_rest_response(body, len(images))


class GrpcClient:
    """Calls a model on TF Serving over gRPC (needs tensorflow-serving-api and grpcio)."""

    def __init__(self, server: str, model_name: str, *, version: int | None = None,
                 signature_name: str = SERVER_SIGNATURE, timeout: float = 60.0):
        try:
            import grpc
            from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
        except ImportError:
            raise TfsegError("--grpc needs `pip install tensorflow-serving-api grpcio`") from None
        self._predict_pb2 = predict_pb2
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(server))
        self.model_name, self.version, self.signature_name, self.timeout = model_name, version, signature_name, timeout

    def predict_images(self, images: Sequence[bytes]) -> list[np.ndarray]:
        import tensorflow as tf

        request = self._predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = self.signature_name
        if self.version:
            request.model_spec.version.value = int(self.version)
        request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(list(images), dtype=tf.string))
        request.output_filter.append("mask_png_bytes")
        response = self._stub.Predict(request, self.timeout)
        return [decode_png(b) for b in response.outputs["mask_png_bytes"].string_val]


# --------------------------------------------------------------------------------------------
# Local predictors: one interface for the SavedModel and the Keras run.
# --------------------------------------------------------------------------------------------


def _graph_error_line(message: str) -> str:
    """The informative line of a TensorFlow graph error (the assertion or the decoder's message)."""
    skip = ("Graph execution error", "Detected at node", "<stack traces unavailable>")
    for line in message.splitlines():
        line = line.strip()
        if line and not line.startswith(skip) and not line.startswith("[["):
            return line.replace("assertion failed: ", "").split(" [Condition")[0]
    return message.strip().splitlines()[0] if message.strip() else "invalid input"


class SavedModelPredictor:
    """Runs an export's signatures in-process (the same graph TF Serving runs)."""

    def __init__(self, version_dir: str):
        import tensorflow as tf

        from tfseg import visualize
        from tfseg.export import METADATA, read_metadata

        self.meta = read_metadata(version_dir)
        run = rundir.RunInfo.from_json(self.meta, os.path.join(version_dir, METADATA))
        self.channels, self.ndim = run.channels, run.ndim
        self.class_names = list(run.class_names)
        self.colors = visualize.dataset_colors({"num_classes": run.num_classes,
                                                "class_colors": self.meta.get("class_colors")})
        self.ignore_index = run.ignore_index
        self.preprocessing = run.preprocessing  # 3D: applied here before the graph (tfseg.volumes)
        self._loaded = tf.saved_model.load(version_dir)
        self._serve = self._loaded.signatures["serving_default"]

    def predict_images(self, images: Sequence[bytes]) -> list[np.ndarray]:
        import tensorflow as tf

        if self.ndim != 2:
            raise ValueError("this export is a 3D model; give it volumes")
        try:
            out = self._serve(image_bytes=tf.constant(list(images), dtype=tf.string))
        except tf.errors.InvalidArgumentError as e:
            raise ValueError(_graph_error_line(e.message)) from None
        masks, hs, ws = out["mask"].numpy(), out["height"].numpy(), out["width"].numpy()
        return [masks[k, : hs[k], : ws[k]] for k in range(len(images))]

    def predict_volume(self, volume: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        if self.ndim != 3:
            raise ValueError("this export is a 2D model; give it images")
        return self._serve(volume=tf.constant(volume, tf.float32))["mask"].numpy()


class KerasPredictor:
    """Runs a fit run's Keras model through :mod:`tfseg.inference` (resize or tiled)."""

    def __init__(self, run_dir: str, *, tile: bool = False, tta: bool = False, overlap: float | None = None,
                 batch_size: int = 8):
        from tfseg import visualize

        from tfseg.export import with_precision

        self.cfg = rundir.load_run_config(run_dir)
        self.run = rundir.RunInfo.from_json(self.cfg, os.path.join(run_dir, rundir.RUN_JSON))
        # float32 whatever trained it, as evaluate scores it and export serves it by default.
        self.model = with_precision(rundir.load_model(run_dir), "float32")
        self.channels, self.ndim = self.run.channels, self.run.ndim
        self.class_names = list(self.run.class_names)
        self.colors = visualize.run_colors(self.cfg)
        self.ignore_index = self.run.ignore_index
        self.binary = self.run.binary
        self.preprocessing = self.run.preprocessing
        self.tta = rundir.test_time_flips(run_dir, self.run, tta)
        self.tile, self.overlap, self.batch_size = tile, overlap, batch_size

    def predict_images(self, images: Sequence[bytes]) -> list[np.ndarray]:
        import tensorflow as tf

        from tfseg import inference, preprocess

        if self.ndim != 2:
            raise ValueError("this run is a 3D model; give it volumes")
        out = []
        for data in images:
            # The export's decoder, run eagerly: same pixels and same input checks as serving.
            try:
                arr = preprocess.decode_image(tf.constant(data), self.channels, preprocess.DEFAULT_MAX_PIXELS).numpy()
            except tf.errors.InvalidArgumentError as e:
                raise ValueError(_graph_error_line(e.message)) from None
            probs = inference.predict_image(
                self.model, arr, size=self.run.size, mode="tile" if self.tile else "resize",
                overlap=0.25 if self.overlap is None else self.overlap, batch_size=self.batch_size, tta=self.tta,
                preprocessing=self.preprocessing,
            )
            out.append(inference.probs_to_mask(probs, self.binary))
        return out

    def predict_volume(self, volume: np.ndarray) -> np.ndarray:
        from tfseg import inference

        if self.ndim != 3:
            raise ValueError("this run is a 2D model; give it images")
        probs = inference.predict_volume(
            self.model, volume, patch_size=self.run.size,
            overlap=0.5 if self.overlap is None else self.overlap, batch_size=2, tta=self.tta,
        )
        return inference.probs_to_mask(probs, self.binary)


def make_predictor(model_path: str, *, server: str | None = None, grpc: bool = False, tile: bool = False,
                   tta: bool = False, overlap: float | None = None, batch_size: int = 8,
                   model_version: int | None = None):
    """The predictor for ``model_path`` (see the module docstring)."""
    if server:
        cls = GrpcClient if grpc else RestClient
        client = cls(server, os.path.basename(os.path.normpath(model_path)), version=model_version)
        # A served model's channels are unknown here; images are sent as their original bytes.
        client.channels, client.ndim, client.preprocessing = None, 2, {}
        return client
    kind, path = resolve_model(model_path)
    if kind == "export":
        if tile or tta:
            raise TfsegError(f"{model_path}: --tile/--tta are an export's own (its graph runs them); "
                             "export with `tfseg export --tile/--tta`, or predict from the run directory")
        return SavedModelPredictor(path)
    return KerasPredictor(path, tile=tile, tta=tta, overlap=overlap, batch_size=batch_size)


# --------------------------------------------------------------------------------------------
# The job.
# --------------------------------------------------------------------------------------------


OVERLAY_DIR = "overlays"


def _class_facts(predictor) -> tuple[list[str] | None, np.ndarray, int | None]:
    """(class names or None, colours, ignore index) of a predictor; a served model's are unknown."""
    from tfseg import visualize

    colors = getattr(predictor, "colors", None)
    if colors is None:
        colors = visualize.default_colors(256)
    return getattr(predictor, "class_names", None), colors, getattr(predictor, "ignore_index", None)


def _legend_names(names: list[str] | None, colors: np.ndarray) -> list[str]:
    return list(names) if names else [f"class_{c}" for c in range(len(colors))]


def _write_image_outputs(predictor, path: str, data: bytes, stem: str, mask: np.ndarray, output_dir: str,
                         overlay: bool) -> dict:
    """Writes STEM.png (palette PNG of class ids) and, with ``overlay``, overlays/STEM.(jpg|png)."""
    from PIL import Image

    from tfseg import visualize

    names, colors, ignore = _class_facts(predictor)
    with open(os.path.join(output_dir, stem + ".png"), "wb") as f:
        f.write(visualize.encode_palette_png(mask, colors, ignore))
    record = {"input": path, "output": stem + ".png", "shape": list(mask.shape)}
    if overlay:
        try:
            with Image.open(io.BytesIO(data)) as im:
                rgb = np.asarray(im.convert("RGB"))
            picture = visualize.overlay_with_legend(rgb, mask, _legend_names(names, colors), colors,
                                                    ignore_index=ignore)
        except (OSError, ValueError) as e:  # the mask is written; only its picture is missing
            logger.warning("%s: no overlay (%s)", path, e)
            return record
        ext = ".jpg" if path.lower().endswith((".jpg", ".jpeg")) else ".png"
        rel = os.path.join(OVERLAY_DIR, stem + ext)
        os.makedirs(os.path.join(output_dir, OVERLAY_DIR), exist_ok=True)
        visualize.write_image(os.path.join(output_dir, rel), picture)
        record["overlay"] = rel
    return record


def _write_volume_overlay(predictor, volume: np.ndarray, mask: np.ndarray, stem: str, output_dir: str) -> str:
    """overlays/STEM.png: the middle axial slice (first channel) with the mask over it."""
    from tfseg import visualize

    names, colors, ignore = _class_facts(predictor)
    mid = mask.shape[0] // 2
    picture = visualize.overlay_with_legend(volume[mid, ..., :1], mask[mid], _legend_names(names, colors), colors,
                                            ignore_index=ignore)
    rel = os.path.join(OVERLAY_DIR, stem + ".png")
    os.makedirs(os.path.join(output_dir, OVERLAY_DIR), exist_ok=True)
    visualize.write_image(os.path.join(output_dir, rel), picture)
    return rel


def _predict_batch(predictor, batch: Sequence[tuple[str, str, str]], output_dir: str,
                   overlay: bool = False) -> list[dict]:
    """Predicts and writes one batch of inputs; returns a result record per input."""
    results = []
    images = [item for item in batch if item[1] == "image"]
    volumes = [item for item in batch if item[1] == "volume"]
    if images:
        datas = []
        for path, _, _ in images:
            datas.append(outputs.read_bytes(path))
        try:
            masks = predictor.predict_images(datas)
        except ValueError as e:
            masks = None
            if len(images) == 1:
                results.append({"input": images[0][0], "error": str(e)})
            else:
                # One bad image fails the whole batch in the graph; find it by going one by one.
                for item in images:
                    results.extend(_predict_batch(predictor, [item], output_dir, overlay))
        for (path, _, stem), data, mask in zip(images, datas, masks or []):
            results.append(_write_image_outputs(predictor, path, data, stem, mask, output_dir, overlay))
    for path, _, stem in volumes:
        try:
            if getattr(predictor, "ndim", 2) != 3:
                raise ValueError("volumes need a 3D model (a local run or export directory)")
            volume, img = volume_io.read_volume(path, predictor.channels, predictor.preprocessing)
            mask = predictor.predict_volume(volume)
            volume_io.write_mask(os.path.join(output_dir, stem + ".nii.gz"), mask, img)
            record = {"input": path, "output": stem + ".nii.gz", "shape": list(mask.shape)}
            if overlay:
                record["overlay"] = _write_volume_overlay(predictor, volume, mask, stem, output_dir)
            results.append(record)
        except ValueError as e:
            results.append({"input": path, "error": str(e)})
    return results


def model_facts(model_path: str, server: str | None = None):
    """What writing a model's masks needs, without loading it: ``class_names`` (None for a served
    model), ``colors``, ``ignore_index``, ``ndim`` and ``channels`` (None for a served model)."""
    from types import SimpleNamespace

    from tfseg import visualize

    if server:
        return SimpleNamespace(class_names=None, colors=visualize.default_colors(256), ignore_index=None,
                               ndim=2, channels=None, preprocessing={})
    kind, path = resolve_model(model_path)
    if kind == "export":
        from tfseg.export import read_metadata

        meta = read_metadata(path)
        k = int(meta.get("num_classes") or len(meta.get("class_names") or []))
        colors = visualize.dataset_colors({"num_classes": k, "class_colors": meta.get("class_colors")})
    else:
        meta = rundir.load_run_config(path)
        k = int(meta.get("num_classes") or len(meta.get("class_names") or []))
        colors = visualize.run_colors(meta)
    return SimpleNamespace(class_names=visualize.class_names_or_default(meta.get("class_names"), k), colors=colors,
                           ignore_index=meta.get("ignore_index"), ndim=int(meta["ndim"]),
                           channels=int(meta["channels"]), preprocessing=dict(meta.get("preprocessing") or {}))


def _beam_predict(model_path, items, output_dir, *, runner, beam_args, batch_size, predictor_kwargs,
                  overlay: bool = False) -> list[dict]:
    """The job as a Beam pipeline with RunInference (:mod:`tfseg.beam_inference`)."""
    from tfseg import beam_inference

    facts = model_facts(model_path, predictor_kwargs.get("server"))
    return beam_inference.run_pipeline(model_path, items, output_dir, runner=runner, beam_args=beam_args,
                                       batch_size=batch_size, predictor_kwargs=predictor_kwargs, facts=facts,
                                       overlay=overlay)


def run_predict(
    model_path: str,
    input_dir: str,
    output_dir: str,
    *,
    batch_size: int = 8,
    server: str | None = None,
    grpc: bool = False,
    model_version: int | None = None,
    runner: str | None = None,
    beam_args: Iterable[str] = (),
    tile: bool = False,
    tta: bool = False,
    overlap: float | None = None,
    overwrite: bool = False,
    overlay: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Writes a mask for every image and volume in ``input_dir`` to ``output_dir``.

    Args:
      model_path: export version dir, export NAME dir, or RUN_DIR; with ``server``, the served
        model's NAME (a path's last component is used).
      input_dir: directory of images and/or NIfTI volumes.
      output_dir: published atomically; refused when it exists unless ``overwrite``.
      batch_size: images per model call (per request with ``server``).
      server: ``HOST:PORT`` of a running TF Serving server (REST port, or gRPC port with ``grpc``).
      model_version: the served version (default: the server's latest).
      runner: a Beam runner name to run the job as a Beam pipeline.
      beam_args: extra Beam pipeline options.
      tile, tta, overlap: sliding-window / flip-TTA inference (RUN_DIR only).
      overlay: also write ``overlays/STEM.jpg|png``: the input with its mask blended over it and a
        legend of the classes present (volumes: the middle axial slice).
      progress: called with the number of inputs finished after each batch.

    Returns:
      Summary dict: ``written``, ``failed`` (list of {input, error}), ``output``, ``seconds``,
      ``model``; also written as ``predict_summary.json``.
    """
    if batch_size < 1:
        raise TfsegError(f"--batch-size {batch_size}: must be >= 1")
    items = list_inputs(input_dir)
    start = time.time()
    predictor_kwargs = dict(server=server, grpc=grpc, tile=tile, tta=tta, overlap=overlap,
                            batch_size=batch_size, model_version=model_version)
    owned = dict(complete_marker=SUMMARY_JSON, overwrite=overwrite,
                 inputs=[("--input", input_dir)] + ([] if server else [("--model", model_path)]))
    outputs.claim(output_dir, "predict", **owned)
    with outputs.publish_dir(output_dir, "predict", **owned) as tmp:
        if runner:
            if not server:
                resolve_model(model_path)  # fail on a bad path before starting the pipeline
            results = _beam_predict(model_path, items, tmp, runner=runner, beam_args=beam_args,
                                    batch_size=batch_size, predictor_kwargs=predictor_kwargs, overlay=overlay)
            if progress:
                progress(len(items))
        else:
            predictor = make_predictor(model_path, **predictor_kwargs)
            results = []
            for i in range(0, len(items), batch_size):
                batch = items[i : i + batch_size]
                results.extend(_predict_batch(predictor, batch, tmp, overlay))
                if progress:
                    progress(len(batch))
        failed = [r for r in results if "error" in r]
        for r in failed:
            logger.warning("%s: %s", r["input"], r["error"])
        summary = {
            "model": model_path if server else outputs.normalize(model_path),
            "server": server,
            "input": outputs.normalize(input_dir),
            "output": outputs.normalize(output_dir),
            "written": len(results) - len(failed),
            "failed": failed,
            "seconds": round(time.time() - start, 3),
        }
        if not summary["written"]:
            raise TfsegError(f"{input_dir}: none of the {len(results)} inputs could be predicted; "
                             f"first: {failed[0]['input']}: {failed[0]['error']}")
        with open(os.path.join(tmp, SUMMARY_JSON), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
