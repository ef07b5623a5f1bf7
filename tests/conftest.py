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


@pytest.fixture(scope="session")
def trained_squares(tmp_path_factory):
    """One tiny U-Net trained once per test process: 8 epochs on 48 'squares' (foreground IoU about
    1 on val). Returns {"data", "run"}; tests write their exports and evaluations elsewhere."""
    from tests import helpers

    root = tmp_path_factory.mktemp("trained_squares")
    data = helpers.write_2d_dataset(str(root / "data"), {"train": 48, "val": 8}, size=32)
    run = helpers.fit(helpers.tiny_fit_config(data, str(root / "run"), epochs=8, learning_rate=0.01))
    return {"data": data, "run": run}
