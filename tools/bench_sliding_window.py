"""The one sliding window (TensorFlow, :func:`tfseg.inference.sliding_window_tf`) against the
numpy implementation it replaced, loaded from git history, in one process.

    python tools/bench_sliding_window.py [--baseline 4b6079f] [--repeats 3]

Times :func:`predict_volume` (3D U-Net, 70x60x50x2 volume, 32^3 patches) and tiled
:func:`predict_image` with left-right TTA (2D U-Net, 600x800 image, 128x128 tiles) both ways
and prints the ratios and the largest probability difference (the outputs must agree).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def _baseline(commit: str):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.run(["git", "show", f"{commit}:tfseg/inference.py"], cwd=root, capture_output=True,
                         check=True).stdout
    path = os.path.join(tempfile.mkdtemp(prefix="bench_sw-"), "numpy_inference.py")
    with open(path, "wb") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("numpy_inference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _median_s(fn, repeats):
    fn()  # warm-up (tracing)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default="4b6079f", help="a commit whose tfseg/inference.py is the numpy one")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from tfseg import inference
    from tfseg.models import build_model

    old = _baseline(args.baseline)
    rng = np.random.default_rng(0)
    m3 = build_model("unet", input_shape=(32, 32, 32, 2), num_classes=4, base_filters=4, depth=2)
    vol = rng.normal(size=(70, 60, 50, 2)).astype(np.float32)
    m2 = build_model("unet", input_shape=(None, None, 3), num_classes=5, base_filters=8, depth=3)
    img = rng.integers(0, 256, (600, 800, 3)).astype(np.uint8)
    cases = {
        "3D 70x60x50, 32^3 patches": lambda mod: mod.predict_volume(m3, vol, patch_size=(32, 32, 32)),
        "2D 600x800, 128x128 tiles, hflip TTA": lambda mod: mod.predict_image(m2, img, size=(128, 128), mode="tile",
                                                                            tta=(1,)),
    }
    for name, run in cases.items():
        t_old = _median_s(lambda: run(old), args.repeats)
        t_new = _median_s(lambda: run(inference), args.repeats)
        diff = float(np.abs(run(old) - run(inference)).max())
        print(f"{name}: numpy {t_old * 1000:.0f} ms, tf {t_new * 1000:.0f} ms, tf/numpy {t_new / t_old:.2f}x, "
              f"max |prob diff| {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
