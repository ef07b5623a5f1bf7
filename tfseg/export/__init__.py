"""The export stage: a fit run as a TF Serving SavedModel (or a LiteRT model) with pre- and
post-processing in the graph.

One job a module:
  config    ExportConfig: the stage's settings, checked from their annotations (export.json);
  graph     the serving signatures (build_archive) and the precision they compute in;
  versions  the export folder: NAME/VERSION numbering, models.config, the stored tfseg.json;
  readme    the README written beside NAME/;
  run       run_export: the stage from RUN_DIR to a published EXPORT_BASE/NAME/VERSION.

Command line::

    tfseg export --run RUN_DIR --output EXPORT_BASE --name NAME [--tile] [--tta] [--precision P]
"""

from tfseg.export.config import ExportConfig  # noqa: F401
from tfseg.export.graph import (  # noqa: F401
    DEFAULT_MAX_PIXELS,
    DEFAULT_PRECISION,
    PRECISIONS,
    build_archive,
    model_precision,
    with_precision,
)
from tfseg.export.run import run_export  # noqa: F401
from tfseg.export.versions import CONFIG_JSON, METADATA, MODELS_CONFIG, find_version, list_versions, read_metadata  # noqa: F401
