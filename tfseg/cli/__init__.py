"""The ``tfseg`` command line: thin click commands, each building a config and calling one stage.

  app        the group: logging, one-line errors and exit codes, ``tfseg env``;
  stages     sample, convert, fit, plan, evaluate, export, predict;
  pipelines  run and demo;
  show       the tables and summaries printed at the end;
  quiet      TensorFlow's start-up noise kept off the terminal unless ``-v``.
"""

from tfseg.cli import pipelines, stages  # noqa: F401  (importing them registers their commands)
from tfseg.cli.app import cli, main

__all__ = ["cli", "main"]
