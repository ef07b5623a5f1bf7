"""TensorFlow's start-up noise, hidden unless ``tfseg -v``.

Importing TensorFlow writes lines from C++ straight to file descriptor 2 before any setting can
stop them (absl's "All log messages before absl::InitializeLog() is called ...", oneDNN's
"custom operations are on", cudart's "Could not find cuda drivers"); ``TF_CPP_MIN_LOG_LEVEL=3``
silences the later ones (cuInit, cpu_feature_guard) but not these. :func:`import_tensorflow`
imports TensorFlow with fd 2 captured (:func:`tfseg.runtime.filtered_stderr`) and writes back every
line that is not such noise, so real warnings and errors still reach the user.
"""

from __future__ import annotations

import os
import sys

from tfseg import runtime

# Substrings of the start-up lines hidden by default.
NOISE = (
    "All log messages before absl::InitializeLog",
    "oneDNN custom operations are on",
    "cudart_stub.cc",
    "Could not find cuda drivers",
    "failed call to cuInit",
    "cpu_feature_guard",
    "This TensorFlow binary is optimized",
    "rebuild TensorFlow with the appropriate compiler flags",
    "Unable to register cuDNN factory",
    "Unable to register cuFFT factory",
    "Unable to register cuBLAS factory",
    "computation_placer.cc",
    "TF-TRT Warning",
)


def is_noise(line: str) -> bool:
    return any(n in line for n in NOISE)


def quiet_environment() -> None:
    """TF_CPP_MIN_LOG_LEVEL=3 (errors from TensorFlow's C++ logging still surface as Python
    exceptions) unless the user set it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def import_tensorflow() -> None:
    """Imports TensorFlow with its start-up lines on fd 2 filtered out (see module doc)."""
    if "tensorflow" in sys.modules:
        return
    with runtime.filtered_stderr(is_noise):
        import tensorflow

        # The GPU platform starts on the first device listing, whenever a command makes it: its
        # "failed call to cuInit" (an ERROR-level line on machines without a GPU driver) comes here.
        tensorflow.config.list_physical_devices("GPU")
