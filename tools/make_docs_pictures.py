"""Makes the README's pictures in docs/ from a tiny run on generated VOC-layout data.

    python tools/make_docs_pictures.py [--workdir /tmp/tfseg-docs] [--epochs 30]   # ~3-5 min on 2 cores

Steps: `samples.write("voc", ...)` (100 images of 256x320, objects in class-specific colours and
shapes), `tfseg convert --dataset voc`, `tfseg fit` (U-Net depth 3, 16 filters, 64x80, CE loss),
`tfseg export`, then `tfseg predict --overlay` on the val images. Writes

    docs/predict_mask.png      a mask exactly as `tfseg predict` writes it (palette PNG, VOC colours)
    docs/predict_overlay.png   the same image's overlay from `--overlay` (mask over the photo, legend)
    docs/tensorboard.png       the last `val_predictions` picture from RUN/logs/predictions, the PNG
                               bytes exactly as stored in the TensorBoard event file

and prints the evaluate table of the run on val, for the README's caption.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")
SHOWN = "2007_000003"  # the val image shown in the README


def tfseg(*args: str) -> str:
    cmd = [sys.executable, "-m", "tfseg.cli", *args]
    print("$ tfseg " + " ".join(args), flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    print(out.stdout + out.stderr[-2000:], flush=True)
    return out.stdout


def last_tensorboard_png(log_dir: str) -> bytes:
    import tensorflow as tf

    from tfseg.fit import tb_images

    best = (-1, b"")
    for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                if v.tag == tb_images.TAG and event.step > best[0]:
                    best = (event.step, tf.make_ndarray(v.tensor)[2])
    if best[0] < 0:
        raise SystemExit(f"{log_dir}: no {tb_images.TAG} picture")
    print(f"TensorBoard picture of epoch {best[0]}")
    return best[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/tfseg-docs")
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args(argv)
    work = args.workdir
    if os.path.exists(work):
        raise SystemExit(f"{work}: exists; give a new --workdir")

    raw = os.path.join(work, "raw")
    from tfseg.convert import samples

    samples.write("voc", raw, 100, seed=0, image_size=(256, 320))
    data, run, exports = (os.path.join(work, n) for n in ("data", "run", "exports"))
    tfseg("convert", "--dataset", "voc", "--input", raw, "--output", data)
    tfseg("fit", "--data", data, "--model", "unet", "--output", run, "--image-size", "64x80",
          "--epochs", str(args.epochs), "--batch-size", "8", "--loss", "ce", "--learning-rate", "0.003",
          "--set", "model_kwargs.depth=3", "--set", "model_kwargs.base_filters=16", "--set", "verbose=2",
          "--set", "seed=0")
    tfseg("evaluate", "--run", run, "--data", data, "--split", "val", "--output", os.path.join(work, "eval"))
    tfseg("export", "--run", run, "--output", exports, "--name", "voc")
    photos = os.path.join(work, "photos")
    os.makedirs(photos)
    with open(os.path.join(raw, "VOCdevkit", "VOC2012", "ImageSets", "Segmentation", "val.txt")) as f:
        for stem in f.read().split():
            shutil.copy(os.path.join(raw, "VOCdevkit", "VOC2012", "JPEGImages", stem + ".jpg"), photos)
    masks = os.path.join(work, "masks")
    tfseg("predict", "--model", os.path.join(exports, "voc"), "--input", photos, "--output", masks, "--overlay")

    os.makedirs(DOCS, exist_ok=True)
    shutil.copy(os.path.join(masks, SHOWN + ".png"), os.path.join(DOCS, "predict_mask.png"))
    # The overlay of a .jpg input is a JPEG; the README's copy is stored as PNG, pixels unchanged.
    from PIL import Image

    Image.open(os.path.join(masks, "overlays", SHOWN + ".jpg")).save(os.path.join(DOCS, "predict_overlay.png"))
    with open(os.path.join(DOCS, "tensorboard.png"), "wb") as f:
        f.write(last_tensorboard_png(os.path.join(run, "logs", "predictions")))
    for name in ("predict_mask.png", "predict_overlay.png", "tensorboard.png"):
        print(f"docs/{name}: {os.path.getsize(os.path.join(DOCS, name)) // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
