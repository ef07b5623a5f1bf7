"""The predict stage's settings: :class:`PredictConfig`, checked from its annotations
(:func:`tfseg.config.config_from_mapping`) and written beside the masks as ``predict.json``."""

from __future__ import annotations

import dataclasses

from tfseg.config import StageConfig, setting
from tfseg.errors import TfsegError

CONFIG_JSON = "predict.json"


@dataclasses.dataclass(frozen=True)
class PredictConfig(StageConfig):
    """Every setting of ``tfseg predict`` (the fields keep :func:`run_predict`'s argument order).

    Attributes:
      model_path: an export (version or NAME folder, SavedModel or LiteRT) or a fit RUN_DIR; with
        ``server``, the served model's NAME (a path's last component).
      input_dir: a folder of images and/or NIfTI volumes.
      output_dir: published whole; refused when it exists unless ``overwrite``.
      batch_size: images per model call (per request with ``server``).
      server: ``HOST:PORT`` of a running TF Serving server (REST port, or gRPC port with ``grpc``).
      grpc: with ``server``: use gRPC.
      model_version: the served version (default: the server's latest).
      runner: a Beam runner name to run the job as a Beam pipeline; None for the local job.
      beam_args: extra Beam pipeline options.
      tile, tta, overlap: sliding-window / flip-TTA inference (RUN_DIR only).
      overwrite: replace an earlier complete output.
      overlay: also write ``overlays/STEM.jpg|png`` (the input with its mask and a legend).
    """

    WHAT = "predict config"

    model_path: str
    input_dir: str
    output_dir: str
    batch_size: int = setting(8, at_least=1)
    server: str | None = None
    grpc: bool = False
    model_version: int | None = None
    runner: str | None = None
    beam_args: tuple = ()
    tile: bool = False
    tta: bool = False
    overlap: float | None = setting(None, at_least=0, below=1)
    overwrite: bool = False
    overlay: bool = False

    def validate(self) -> None:
        """Raises: TfsegError: gRPC or a model version without a server."""
        if self.grpc and not self.server:
            raise TfsegError("--grpc needs --server HOST:PORT")
        if self.model_version is not None and not self.server:
            raise TfsegError("--model-version needs --server HOST:PORT")
