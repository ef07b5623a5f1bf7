"""The README written beside an export (``EXPORT_BASE/NAME/README.md``): the docker command, REST and
gRPC request examples, the signatures, the class colours and what the graph computes."""

from __future__ import annotations

from tfseg.io import fs


def class_colors(cfg: dict) -> list[list[int]]:
    """The run's class colours (:func:`tfseg.visualize.run_colors`) as JSON-ready lists."""
    from tfseg.visualize import run_colors

    return run_colors(cfg).tolist()


def colour_table(cfg: dict) -> str:
    from tfseg.visualize import class_names_or_default, hex_color

    colors = class_colors(cfg)
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


def caller_steps(meta: dict, binary: bool, antialias_note: str = "") -> str:
    """The numbered steps a LiteRT or ONNX caller takes around a model that takes decoded pixels
    at its input size (the SavedModel's graph does them itself)."""
    h, w = meta["image_size"]
    rule = "foreground probability > 0.5" if binary else "arg-max over the classes"
    steps = ["Turn the photo as it is displayed (EXIF orientation: PIL's `ImageOps.exif_transpose`, "
             "Android's `ExifInterface`); the model was trained on photos as displayed."]
    resize = (meta.get("preprocessing") or {}).get("resize")
    if resize:
        steps.append("Resize the original image as `tfseg convert --image-size` stored the training records: "
                     f"{resize.get('method')} with antialiasing to {'x'.join(map(str, resize.get('size') or []))}, "
                     "rounded to uint8.")
    steps.append(f"Resize to {h}x{w} (height x width), bilinear without antialiasing{antialias_note}, round to uint8.")
    steps.append("Run the model; to get the mask at the image's size, resize `probabilities` back\n"
                 f"   bilinearly and take the {rule} (or resize `mask` with nearest neighbour, slightly coarser).")
    return "\n".join(f"{n}. {text}" for n, text in enumerate(steps, 1)) + "\n"


def readme_text(name: str, export_base: str, cfg: dict, max_pixels: int, meta: dict | None = None) -> str:
    base = fs.normalize(export_base)
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

{colour_table(cfg)}
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
