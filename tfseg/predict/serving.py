"""Predictors for a model on a running TF Serving server: REST (:class:`RestClient`, urllib, no
extra dependency) and gRPC (:class:`GrpcClient`, needs tensorflow-serving-api and grpcio).

Both call the export's ``predict_masks_png`` signature (``serving_default`` less the probabilities
and the padded mask, which are megabytes of JSON) with each image's original bytes, and read back
PNG-encoded masks at the images' sizes. A served model is 2D only, and its classes and channels
are unknown to the client (:func:`served_model_facts`).
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from typing import Sequence

import numpy as np

from tfseg.errors import TfsegError
from tfseg.predict.base import NEEDS_3D, ModelFacts, Predictor

SERVER_SIGNATURE = "predict_masks_png"


def encode_png(mask: np.ndarray) -> bytes:
    """A (H, W) uint8 mask as a grayscale PNG, the way the served signature returns masks."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="L").save(buf, "PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(io.BytesIO(data)))


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


def served_model_facts() -> ModelFacts:
    """What a client knows of a served model: 2D; its channels (images are sent as their original
    bytes) and classes unknown; masks written in tfseg's default colours."""
    from tfseg import visualize

    return ModelFacts(ndim=2, channels=None, class_names=None, colors=visualize.default_colors(256),
                      ignore_index=None, preprocessing={})


class _ServedModel(Predictor):
    """The part of a TF Serving client that is not the wire: the model's facts, and no volumes."""

    def __init__(self):
        facts = served_model_facts()
        self.ndim, self.channels, self.class_names = facts.ndim, facts.channels, facts.class_names
        self.colors, self.ignore_index, self.preprocessing = facts.colors, facts.ignore_index, facts.preprocessing

    def predict_volume(self, volume: np.ndarray) -> np.ndarray:
        raise ValueError(NEEDS_3D)


class RestClient(_ServedModel):
    """Calls a model on a running TF Serving server over REST (urllib, no extra dependency)."""

    def __init__(self, server: str, model_name: str, *, version: int | None = None,
                 signature_name: str = SERVER_SIGNATURE, timeout: float = 60.0):
        super().__init__()
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


class GrpcClient(_ServedModel):
    """Calls a model on TF Serving over gRPC (needs tensorflow-serving-api and grpcio)."""

    def __init__(self, server: str, model_name: str, *, version: int | None = None,
                 signature_name: str = SERVER_SIGNATURE, timeout: float = 60.0):
        try:
            import grpc
            from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
        except ImportError:
            raise TfsegError("--grpc needs `pip install tensorflow-serving-api grpcio`") from None
        super().__init__()
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
