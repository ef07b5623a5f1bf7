"""The ``tfseg`` command line: thin click commands, each building a config and calling one stage.

TensorFlow and Beam are imported inside the commands, so ``tfseg --help`` answers at once.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from tfseg.errors import TfsegError


class _Group(click.Group):
    """Turns TfsegError (and a few well-known user errors) into one line and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TfsegError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


def _setup_logging(verbose: bool) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("apache_beam", "absl", "tensorflow", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="tfseg")
def cli(verbose: bool) -> None:
    """tfseg: semantic segmentation, 2D and 3D, from raw files to a TF Serving model.

    Stages: sample -> convert -> fit -> evaluate -> export -> predict; `tfseg run` chains them
    for a pipeline, `tfseg demo` runs the Carvana demo end to end on generated data.
    """
    _setup_logging(verbose)


# --- sample/convert commands (owned by the sample/convert stage) ---

# --- fit commands (owned by the fit stage) ---

# --- evaluate commands (owned by the evaluate stage) ---

# --- export/predict commands (owned by the export/predict stage) ---

# --- run/demo commands (owned by the run/demo stage) ---


def main() -> None:
    cli(prog_name="tfseg")


if __name__ == "__main__":
    main()
