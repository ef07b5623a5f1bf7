import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED_DATA = os.environ.get(
    "TFSEG_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
)


@pytest.fixture
def shared_data():
    """Path of ../shared/data (or $TFSEG_DATA); skips the test where it is absent."""
    path = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(path):
        pytest.skip(f"real data not found at {path} (set TFSEG_DATA)")
    return path
