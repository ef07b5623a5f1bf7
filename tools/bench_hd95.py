"""HD95 on real BraTS label maps: tfseg.scoring.hd95 (bounding-box crop) against the same
computation on the whole 240x240x155 volume, in one process.

    python tools/bench_hd95.py [--data ../shared/data] [--repeat 3]

Two model segmentations of the same BraTS case (shared/data/brats, BraTS-Toolkit) stand in for
truth and prediction; prints per-region HD95 from both paths (they must agree) and the timings.
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import numpy as np

from tfseg import scoring

REGIONS = {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}  # BraTS source labels


def whole_volume_hd95(t, p, spacing):
    """The baseline: surfaces and distance transforms over the whole volume, no crop."""
    st, sp = scoring.surface(t), scoring.surface(p)
    d1 = scoring._directed_surface_distances(st, sp, spacing)
    d2 = scoring._directed_surface_distances(sp, st, spacing)
    return float(max(np.percentile(d1, 95), np.percentile(d2, 95)))


def main(argv=None):
    import nibabel as nib

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    pattern = os.path.join(args.data, "brats", "BraTS-Toolkit", "data", "*", "*", "segmentation", "*.nii.gz")
    segs = sorted(glob.glob(pattern))
    if len(segs) < 2:
        raise SystemExit(f"no BraTS segmentations under {args.data}")
    a_img, b_img = nib.load(segs[0]), nib.load(segs[1])
    a, b = np.asarray(a_img.dataobj), np.asarray(b_img.dataobj)
    spacing = tuple(float(s) for s in a_img.header.get_zooms()[:3])
    print(f"{os.path.basename(segs[0])} vs {os.path.basename(segs[1])}: shape {a.shape}, spacing {spacing}")
    t_crop = t_full = 0.0
    for name, ids in REGIONS.items():
        t, p = np.isin(a, ids), np.isin(b, ids)
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            h_crop = scoring.hd95(t, p, spacing)
        t1 = time.perf_counter()
        for _ in range(args.repeat):
            h_full = whole_volume_hd95(t, p, spacing)
        t2 = time.perf_counter()
        t_crop += (t1 - t0) / args.repeat
        t_full += (t2 - t1) / args.repeat
        print(f"{name}: dice {scoring.mask_dice(t, p):.4f} hd95 {h_crop:.3f} mm (whole volume {h_full:.3f} mm)")
        assert abs(h_crop - h_full) < 1e-9
    print(f"per case, 3 regions: cropped {t_crop * 1000:.0f} ms, whole volume {t_full * 1000:.0f} ms, "
          f"speed-up {t_full / t_crop:.1f}x")


if __name__ == "__main__":
    main()
