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
    """One tiny U-Net trained once per test session: 8 epochs on 48 'squares' (foreground IoU
    about 1 on val). Returns {"data", "run"}; tests only read them and write their exports and
    evaluations elsewhere. Under pytest-xdist the workers share it: the first to ask trains it
    (holding a lock in the session's common temporary folder), the others wait and reuse it."""
    import fcntl

    from tests import helpers

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    root = shared / "trained_squares"
    done = shared / "trained_squares.done"
    with open(shared / "trained_squares.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the worker dies
        if not done.exists():
            if root.exists():  # a worker died while training: start over
                import shutil

                shutil.rmtree(root)
            data = helpers.write_2d_dataset(str(root / "data"), {"train": 48, "val": 8}, size=32)
            helpers.fit(helpers.tiny_fit_config(data, str(root / "run"), epochs=8, learning_rate=0.01))
            done.write_text("trained\n")
    return {"data": str(root / "data"), "run": str(root / "run")}
