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
handler on the exported SavedModel (:mod:`tfseg.predict.beam`); it writes the same files as the
local job. For a distributed runner, input and output must be on storage every worker can reach::

    tfseg predict --model models/carvana --input photos/ --output masks/ --runner DirectRunner \
        --beam-arg=--direct_num_workers=2

One job a module, in the order a prediction runs them:
  inputs      the input folder's images and volumes; which kind of model a --model path is;
  base        Predictor, the one interface of every model predict runs, and ModelFacts;
  predictors  the export (SavedModel) and fit-run (Keras) predictors; make_predictor, model_facts;
  serving     the TF Serving REST and gRPC clients (Predictors) and their request/response format;
  writers     the files written for one input: mask PNG / NIfTI, overlay picture;
  config      PredictConfig: the stage's settings, checked from their annotations (predict.json);
  run         run_predict: the job, local or as a Beam pipeline;
  beam        the Beam pipeline: RunInference handlers, read, write.
"""

from tfseg.predict.base import ModelFacts, Predictor
from tfseg.predict.config import CONFIG_JSON, PredictConfig
from tfseg.predict.inputs import IMAGE_EXTS, VOLUME_EXTS, list_inputs, resolve_model
from tfseg.predict.predictors import KerasPredictor, SavedModelPredictor, make_predictor, model_facts
from tfseg.predict.run import SUMMARY_JSON, run_predict
from tfseg.predict.serving import (
                                   SERVER_SIGNATURE,
                                   GrpcClient,
                                   RestClient,
                                   build_rest_request,
                                   decode_png,
                                   encode_png,
                                   parse_rest_response,
)

__all__ = [
    "CONFIG_JSON", "IMAGE_EXTS", "PredictConfig", "SERVER_SIGNATURE", "SUMMARY_JSON", "VOLUME_EXTS", "GrpcClient", "KerasPredictor", "ModelFacts",
    "Predictor", "RestClient", "SavedModelPredictor", "build_rest_request", "decode_png", "encode_png",
    "list_inputs", "make_predictor", "model_facts", "parse_rest_response", "resolve_model", "run_predict",
]
