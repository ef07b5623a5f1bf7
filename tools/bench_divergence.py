"""Issue 20: how often the default fit diverges, and what the bfloat16 fix costs.

    python tools/bench_divergence.py                          # 30 seeds x 4 arms (~45 min on 2 shared cores)
    python tools/bench_divergence.py --seeds 10 --arms 3d-bf16 --without-fix   # the "before" count
    python tools/bench_divergence.py --only speed             # cost of the fix, interleaved rounds
    python tools/bench_divergence.py --only brats --brats ../shared/data/brats  # bf16 vs float32 curves

1. divergence (default): for each arm and seed, ``tfseg fit``'s own code path (:func:`run_fit`
   with the CLI's defaults: auto precision unless the arm says float32, TensorBoard on, seed set)
   on tfseg's sample data, converted like the issue does (``tfseg sample``/``tfseg convert``):

   * 3d: ``msd-brain`` (6 cases), ``--model unet --epochs 1 --batch-size 2 --patch-size 16x16x16``;
   * 2d: ``carvana`` (16 cases: train 8, val 4), ``--model unet --epochs 1 --batch-size 2 --image-size 32x32``.

   Each fit runs in a fresh Python process, as a user's ``tfseg fit`` does: the bug behind issue 20
   reads uninitialized memory, so whether a wrong gradient is harmless or 1e33 depends on what the
   process's allocator held before (in one long process, 0 of 8 fits without the fix diverged;
   ``--in-process`` runs them that way). A fit counts as diverged when fit's health guard stops it
   (non-finite loss or weights) or its validation loss is not finite. To keep 120 fits affordable, each fit stops after the first
   epoch's training steps, the batch-norm statistics re-estimate and the validation pass (every
   computation that can go non-finite) and skips what follows them (checkpoint writes, the
   end-of-fit health check, publishing); ``--full`` runs the fits to the end.
   ``--without-fix`` turns :func:`tfseg.models.layers.bf16_conv3d_filter_grad_is_wrong` off, so the
   3D U-Net's depth-2 level takes TensorFlow's bfloat16 kernel gradient again: the code as it was.

   ``--only repro`` is the deterministic part: the default 3D U-Net (seed 0, 16^3, batch 2, the
   first batch of the seeded sample pipeline), one training step in mixed_bfloat16 with and
   without the fix; for each convolution at depth 2, the kernel gradient against numpy's float64
   kernel gradient from the layer's own input and output gradient. Without the fix the error is
   ~100% on every run (its size, up to 1e33, varies with the allocator); with it, bf16 rounding.

2. speed: train steps/s of the default 3D U-Net (batch 2) at 16^3 and 32^3 patches in
   mixed_bfloat16 with the fix over without it (the layers at depth 2 convolve a zero-padded input
   with "valid" padding),
   interleaved rounds in one process, median of rounds; plus float32 over bfloat16 for scale.

3. brats: the shared BraTS volumes (converted here), ``--epochs`` (5) epochs of the default 3D
   U-Net at 32^3 patches, batch 2, in mixed_bfloat16 and float32, two seeds each; reports the
   per-epoch training loss of each run and the largest |bf16 - float32| gap of the seed means
   against the float32 seed-to-seed spread.

Seeds fix the weights, the sampling and the augmentation; oneDNN's threaded kernels and tf.data's
parallel order still vary between runs of one seed, so a count is a rate over runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ARMS = {
    # name: (sample layout, sample cases, size key, size, precision)
    "3d-bf16": ("msd-brain", 6, "patch_size", "16x16x16", "auto"),
    "3d-f32": ("msd-brain", 6, "patch_size", "16x16x16", "float32"),
    "2d-bf16": ("carvana", 16, "image_size", "32x32", "auto"),
    "2d-f32": ("carvana", 16, "image_size", "32x32", "float32"),
}


def _tfseg(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "tfseg.cli", *args], check=True, stdout=subprocess.DEVNULL)


def sample_data(work: str, layout: str, count: int = 6) -> str:
    """``tfseg sample`` + ``tfseg convert`` (the issue's commands) into WORK/LAYOUT-data."""
    data = os.path.join(work, f"{layout}-data")
    if not os.path.isfile(os.path.join(data, "dataset.json")):
        raw = os.path.join(work, f"{layout}-raw")
        _tfseg("sample", "--dataset", layout, "--output", raw, "--count", str(count))
        _tfseg("convert", "--dataset", layout, "--input", raw, "--output", data)
    return data


@contextlib.contextmanager
def without_fix(active: bool):
    """Turns the issue-20 rule off (the code as it was before the fix) while active."""
    from tfseg.models import layers

    saved = layers.bf16_conv3d_filter_grad_is_wrong
    if active:
        layers.bf16_conv3d_filter_grad_is_wrong = lambda *a, **k: False
    try:
        yield
    finally:
        layers.bf16_conv3d_filter_grad_is_wrong = saved


class _Stop(Exception):
    """Raised after the first epoch's validation pass (see the module docstring)."""


def _stopper():
    import keras

    class StopAfterValidation(keras.callbacks.Callback):
        def on_test_end(self, logs=None):
            self.val_loss = float((logs or {}).get("loss", float("nan")))
            raise _Stop()

    return StopAfterValidation()


def one_fit(data: str, out: str, seed: int, size_key: str, size: str, precision: str, full: bool) -> dict:
    """One ``tfseg fit`` (run_fit, CLI defaults) -> {"diverged": bool, "why": str, "seconds": float}."""
    from tfseg.errors import TfsegError
    from tfseg.fit import run_fit
    from tfseg.rundir import first_non_finite_weight

    shutil.rmtree(out, ignore_errors=True)
    config = {"data": data, "model": "unet", "output": out, "epochs": 1, "batch_size": 2, size_key: size,
              "seed": seed, "precision": precision, "verbose": 0}
    stop = None if full else _stopper()
    started = time.time()
    why = ""
    try:
        run_fit(config, callbacks=None if full else [stop])
    except _Stop:
        if not math.isfinite(stop.val_loss):
            why = f"val_loss {stop.val_loss}"
        elif (bad := first_non_finite_weight(stop.model)) is not None:
            why = f"non-finite weights in {bad}"
    except TfsegError as e:
        if "diverged" not in str(e):
            raise
        why = str(e).split("training diverged (", 1)[-1].split(")", 1)[0]
    shutil.rmtree(out, ignore_errors=True)
    return {"diverged": bool(why), "why": why, "seconds": round(time.time() - started, 1)}


def _fit_in_child(job: dict) -> dict:
    """:func:`one_fit` in a fresh process (``--child``)."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"fit child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def _child(job: dict) -> None:
    with without_fix(not job.pop("fix")):
        print(json.dumps(one_fit(**job)), flush=True)


def bench_divergence(work: str, arms: list[str], seeds: int, first_seed: int, fix: bool, full: bool,
                     in_process: bool = False) -> dict:
    import keras

    result = {}
    for arm in arms:
        layout, count, size_key, size, precision = ARMS[arm]
        data = sample_data(work, layout, count)
        runs = []
        for seed in range(first_seed, first_seed + seeds):
            job = dict(data=data, out=os.path.join(work, f"run-{arm}"), seed=seed, size_key=size_key, size=size,
                       precision=precision, full=full)
            if in_process:
                with without_fix(not fix):
                    r = one_fit(**job)
                keras.backend.clear_session()
            else:
                r = _fit_in_child({**job, "fix": fix})
            runs.append({"seed": seed, **r})
            print(f"{arm} seed {seed}: {'DIVERGED ' + r['why'] if r['diverged'] else 'ok'} ({r['seconds']} s)",
                  flush=True)
        result[arm] = {
            "diverged": sum(r["diverged"] for r in runs), "runs": len(runs),
            "diverged_seeds": [r["seed"] for r in runs if r["diverged"]],
            "why": sorted({r["why"] for r in runs if r["diverged"]}),
            "seconds_per_fit": round(statistics.median(r["seconds"] for r in runs), 1),
        }
    from tfseg import runtime

    return {"fix": fix, "full_fits": full, "in_process": in_process, "auto_precision": runtime.resolve_precision("auto", num_gpus=0),
            "arms": result}


def _np_filter_grad(x, dy, kernel_shape):
    """float64 numpy kernel gradient of a stride-1 "same" 3D convolution (NDHWC)."""
    import numpy as np

    k = kernel_shape[:3]
    xp = np.pad(x, [(0, 0)] + [((kk - 1) // 2, kk - 1 - (kk - 1) // 2) for kk in k] + [(0, 0)])
    d, h, w = x.shape[1:4]
    dk = np.zeros(kernel_shape)
    for a in range(k[0]):
        for b in range(k[1]):
            for c in range(k[2]):
                dk[a, b, c] = np.einsum("nzyxi,nzyxo->io", xp[:, a:a + d, b:b + h, c:c + w], dy)
    return dk


def bench_repro(work: str, seed: int = 0) -> dict:
    """The wrong kernel gradients of one seeded training step, without and with the fix."""
    import keras
    import numpy as np
    import tensorflow as tf

    from tfseg import runtime
    from tfseg.fit.checks import check_against_dataset
    from tfseg.fit.config import FitConfig
    from tfseg.fit.inputs import make_datasets
    from tfseg.losses import get_loss
    from tfseg.models import build_model
    from tfseg.models import layers as L
    from tfseg.schema import load_dataset_info

    data = sample_data(work, "msd-brain", 6)
    cfg = FitConfig.from_dict(dict(data=data, model="unet", output=os.path.join(work, "unused"), epochs=1,
                                   batch_size=2, patch_size="16x16x16", seed=seed, deterministic=True))
    info = load_dataset_info(data)
    plan = check_against_dataset(cfg, info)
    x, y = next(iter(make_datasets(cfg, plan, 2, False, (1, 2))[0]))
    bf16 = lambda t: tf.cast(tf.cast(t, tf.bfloat16), tf.float64).numpy()  # noqa: E731
    out = {}
    affected = L.bf16_conv3d_filter_grad_is_wrong  # the rule itself, also while without_fix is on
    old = runtime.set_precision("mixed_bfloat16")
    try:
        for fix in (False, True):
            with without_fix(not fix):
                keras.utils.set_random_seed(seed)
                model = build_model("unet", input_shape=tuple(plan.size) + (info.channels,),
                                    num_classes=info.num_classes)
                convs = [c for c in model._flatten_layers() if isinstance(c, L.Conv3D) and c.compute_dtype == "bfloat16"
                         and affected(c.input.shape[1], c.kernel_size[0], c.padding)]
                probe = keras.Model(model.inputs[0], [c.input for c in convs] + [c.output for c in convs]
                                    + list(model.outputs))
                loss = get_loss(plan.loss, num_classes=info.num_classes)
                with tf.GradientTape() as tape:
                    outs = probe(x, training=True)
                    value = loss(y, outs[-1])
                assert len(outs) == 2 * len(convs) + 1 and convs
                n = len(convs)
                grads = tape.gradient(value, list(outs[n:2 * n]) + [c.kernel.value for c in convs])
            rows = {}
            for i, c in enumerate(convs):
                ref = _np_filter_grad(bf16(outs[i]), bf16(grads[i]), tuple(c.kernel.shape))
                got = grads[n + i].numpy().astype(np.float64)
                err = float(np.abs(got - ref).max() / np.abs(ref).max()) if np.isfinite(got).all() else float("inf")
                rows[c.name] = {"rel_err": float(f"{err:.3g}"), "max_abs_grad": float(f"{np.abs(got).max():.3g}"),
                                "reference_max_abs": float(f"{np.abs(ref).max():.3g}")}
            out["with_fix" if fix else "without_fix"] = rows
    finally:
        runtime.set_precision(old)
    return {"setup": f"unet defaults, msd-brain sample, 16^3, batch 2, seed {seed}, loss {plan.loss}, step 1",
            **out}


def bench_speed(steps: int = 6, rounds: int = 3) -> dict:
    """Train steps/s of the default 3D U-Net with and without the fix (interleaved rounds)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from tfseg import runtime
    from tfseg.losses import get_loss
    from tfseg.models import build_model

    out = {}
    for patch in (16, 32):
        rng = np.random.default_rng(0)
        x = tf.constant(rng.standard_normal((2, patch, patch, patch, 4)).astype("float32"))
        y = tf.constant(rng.integers(0, 4, (2, patch, patch, patch, 1)).astype("float32"))
        steps_fn = {}
        for name, policy, fix in (("bf16_fix", "mixed_bfloat16", True), ("bf16_nofix", "mixed_bfloat16", False),
                                  ("float32", "float32", True)):
            old = runtime.set_precision(policy)
            try:
                with without_fix(not fix):
                    keras.utils.set_random_seed(0)
                    model = build_model("unet", input_shape=(patch,) * 3 + (4,), num_classes=4)
                    model.compile(keras.optimizers.Adam(1e-3), get_loss("ce_dice", num_classes=4))
                    model.train_on_batch(x, y)  # traces (the rule is read when the layers are traced)
            finally:
                runtime.set_precision(old)
            steps_fn[name] = model
        samples = {name: [] for name in steps_fn}
        for _ in range(rounds):
            for name, model in steps_fn.items():
                t = time.perf_counter()
                for _ in range(steps):
                    model.train_on_batch(x, y)
                samples[name].append(steps / (time.perf_counter() - t))
        med = {k: statistics.median(v) for k, v in samples.items()}
        out[f"{patch}^3"] = {
            "steps_per_s_median": {k: round(v, 3) for k, v in med.items()},
            "steps_per_s_rounds": {k: [round(s, 3) for s in v] for k, v in samples.items()},
            "fix_over_nofix": round(med["bf16_fix"] / med["bf16_nofix"], 3),
            "float32_over_bf16_fix": round(med["float32"] / med["bf16_fix"], 3),
        }
        keras.backend.clear_session()
    return out


def bench_brats(work: str, source: str, epochs: int, seeds: int, patch: str) -> dict:
    """bf16 and float32 training-loss curves on the shared BraTS volumes (full fits)."""
    import csv

    from tfseg.fit import run_fit

    data = os.path.join(work, "brats-data")
    if not os.path.isfile(os.path.join(data, "dataset.json")):
        _tfseg("convert", "--dataset", "brats", "--input", source, "--output", data)
    curves = {}
    for precision in ("mixed_bfloat16", "float32"):
        for seed in range(seeds):
            out = os.path.join(work, f"brats-{precision}-{seed}")
            shutil.rmtree(out, ignore_errors=True)
            started = time.time()
            run_fit({"data": data, "model": "unet", "output": out, "epochs": epochs, "batch_size": 2,
                     "patch_size": patch, "seed": seed, "precision": precision, "verbose": 0})
            with open(os.path.join(out, "history.csv")) as f:
                curve = [float(row["loss"]) for row in csv.DictReader(f)]
            curves[f"{precision}/seed{seed}"] = [round(v, 4) for v in curve]
            print(f"brats {precision} seed {seed}: {curves[f'{precision}/seed{seed}']} "
                  f"({time.time() - started:.0f} s)", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    mean = {p: [statistics.mean(curves[f"{p}/seed{s}"][e] for s in range(seeds)) for e in range(epochs)]
            for p in ("mixed_bfloat16", "float32")}
    gap = [abs(a - b) for a, b in zip(mean["mixed_bfloat16"], mean["float32"])]
    spread = [max(curves[f"float32/seed{s}"][e] for s in range(seeds)) -
              min(curves[f"float32/seed{s}"][e] for s in range(seeds)) for e in range(epochs)]
    rel = [g / m for g, m in zip(gap, mean["float32"])]
    return {
        "setup": f"brats (shared), unet defaults, patch {patch}, batch 2, {epochs} epochs, seeds 0..{seeds - 1}",
        "curves": curves,
        "mean_bf16": [round(v, 4) for v in mean["mixed_bfloat16"]],
        "mean_float32": [round(v, 4) for v in mean["float32"]],
        "abs_gap_per_epoch": [round(v, 4) for v in gap],
        "rel_gap_per_epoch": [round(v, 4) for v in rel],
        "float32_seed_spread_per_epoch": [round(v, 4) for v in spread],
        "max_rel_gap": round(max(rel), 4),
        "all_finite": all(math.isfinite(v) for c in curves.values() for v in c),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["divergence", "repro", "speed", "brats"], action="append")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--without-fix", action="store_true", help="the code before the issue-20 fix")
    parser.add_argument("--full", action="store_true", help="run every fit to the end (slower)")
    parser.add_argument("--in-process", action="store_true", help="all fits in this process (see 1.)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--brats", default=os.path.join("..", "shared", "data", "brats"))
    parser.add_argument("--epochs", type=int, default=5, help="brats: epochs per run")
    parser.add_argument("--brats-seeds", type=int, default=2)
    parser.add_argument("--brats-patch", default="32x32x32")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.child:
        return _child(json.loads(args.child))
    only = args.only or ["divergence"]
    work = args.work or tempfile.mkdtemp(prefix="tfseg-bench-divergence-")
    os.makedirs(work, exist_ok=True)
    results = {"command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])}
    if "divergence" in only:
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        unknown = [a for a in arms if a not in ARMS]
        if unknown:
            parser.error(f"unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
        results["divergence"] = bench_divergence(work, arms, args.seeds, args.first_seed, not args.without_fix,
                                                 args.full, args.in_process)
    if "repro" in only:
        results["repro"] = bench_repro(work)
    if "speed" in only:
        results["speed"] = bench_speed()
    if "brats" in only:
        if not os.path.isdir(args.brats):
            parser.error(f"--brats {args.brats}: no such folder")
        results["brats"] = bench_brats(work, args.brats, args.epochs, args.brats_seeds, args.brats_patch)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
