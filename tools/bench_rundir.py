"""Disk cost of a run directory (issue 31 item 6): what a default 2D and a default 3D fit leave
on disk, file by file, and the folder's real size (a hard link counted once, as `du` counts it).

    python tools/bench_rundir.py --workdir W

Runs, through the CLI: `tfseg sample` + `tfseg convert` of a Carvana-layout (2D) and an
MSD-layout (3D) sample, then `tfseg fit --model unet --epochs 1` with every other setting at its
default (3D: --patch-size 16x16x16, the patch the issue measured). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def tfseg(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "tfseg.cli", *args], check=True, stdout=subprocess.DEVNULL)


def sizes(run: str) -> tuple[dict[str, int], int]:
    """{relative file: bytes} of the large files, and the folder's bytes with each inode once."""
    files, seen, total = {}, set(), 0
    for root, _, names in os.walk(run):
        for n in names:
            p = os.path.join(root, n)
            st = os.lstat(p)
            if st.st_size > 1 << 16:
                files[os.path.relpath(p, run)] = st.st_size
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return files, total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    args = ap.parse_args(argv)
    w = args.workdir
    os.makedirs(w, exist_ok=True)
    cases = {"2D (carvana sample, unet defaults)": ("carvana", ["--epochs", "1"]),
             "3D (msd-brain sample, unet defaults, 16^3 patches)": ("msd-brain",
                                                                   ["--epochs", "1", "--patch-size", "16x16x16"])}
    print("| fit | file | MB |")
    print("|---|---|---|")
    for title, (layout, fit_args) in cases.items():
        raw, data, run = (os.path.join(w, f"{layout}-{k}") for k in ("raw", "data", "run"))
        if not os.path.isdir(raw):
            tfseg("sample", "--dataset", layout, "--output", raw, "--count", "40")
        if not os.path.isdir(data):
            tfseg("convert", "--dataset", layout, "--input", raw, "--output", data)
        if not os.path.isdir(run):
            tfseg("fit", "--data", data, "--model", "unet", "--output", run, "--set", "tensorboard=false", *fit_args)
        files, total = sizes(run)
        for name, n in sorted(files.items()):
            print(f"| {title} | {name} | {n / 1e6:.1f} |")
        print(f"| {title} | **the folder, each file once** | **{total / 1e6:.1f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
