"""``tfseg plan``: a dataset fingerprint and rules that turn it into a training recipe.

nnU-Net's idea (Isensee et al., Nature Methods 2021), rewritten for tfseg: measure what matters
about a converted dataset, then derive every choice from it with a few fixed rules, instead of
hand-tuning each dataset. Nothing here is copied from nnU-Net; the rules are ours, and each one
prints the reason it chose what it chose.

The fingerprint (:func:`tfseg.plan.fingerprint.fingerprint`) reads dataset.json and a sample of the training records:

* cases, splits, channels, image size distribution (median, min/max, aspect) and, in 3D, spacing
  and anisotropy;
* intensity statistics per channel (mean, std, 0.5/99.5 percentiles);
* per-class pixel frequency (dataset.json's counts) and how many images contain each class;
* typical object size per class: connected components of each class in the sampled masks; the
  pixel-weighted median of their equivalent diameters (sqrt(area), cbrt(volume)), i.e. the size
  of the object a typical pixel of that class belongs to (speckle counts for little);
* where each class sits (its pixels' mean position along each axis) and how the mean intensity
  changes from top to bottom and left to right: the evidence for which flips are safe.

The rules (:func:`make_plan`), each with its reason in the printed table and in plan.yaml:

1. **flips**: an up-down flip is used only when the data looks the same mirrored along that
   axis: every class found in at least 10% of the sampled images has its mean position within
   0.1 of the middle along it, and the image's mean-intensity profile along it differs from its
   mirror by at most 0.15 of the intensity spread. Upright photos (hair at the top, shoes at the
   bottom, sky above) fail it, so they are never flipped upside down; dermoscopy lesions pass.
   Left-right: never when a class name carries a side or a reading direction (``left_lung``,
   ``text``, ``digit``: a mirror would mislabel); always for colour photographs (3 channels:
   people, streets, scenes; a mirrored photo is a plausible photo wherever one class sits);
   otherwise (grayscale scans, other channel counts) by the same symmetry test as up-down. 3D
   volumes are mirrored along all axes (nnU-Net's default). ``--flips`` overrides.
2. **input size**: the median image size, aspect kept, scaled down (never up) to the largest size
   at which the budget allows ``TARGET_EPOCHS`` epochs (from a measured step time, time taken as
   proportional to pixels), but not below a floor: short side 64 px and the smallest class's
   typical object at least ``MIN_OBJECT_PX`` px wide. Rounded to a multiple of the network's
   divisor (2**depth), so no padding is needed.
3. **depth**: pool while the coarsest feature map keeps at least 4 pixels on its short side
   (nnU-Net's rule; at most 6 levels): the bottleneck then sees the whole input, which objects
   as large as the image (a dress, a coat) need. The receptive field is reported against the
   largest class's typical object.
4. **base filters**: 32 on a GPU (nnU-Net's width); 16 on CPUs, where a step costs about the
   square of the width and a short budget buys more epochs with the narrower net (the ``ccp``
   recipe's finding).
5. **batch size**: the most examples whose activations fit a memory budget (a quarter of the RAM,
   at most 4 GiB, on CPUs; 60% of the GPU memory), capped at 8 per CPU replica (the per-image cost
   on a CPU does not fall with larger batches, and a short budget needs optimizer steps) or 16 per
   GPU, at least 2, a multiple of the replicas; 3D: 2 patches (nnU-Net).
6. **loss and class weights**: binary tasks ``bce_dice``; multi-class ``ce_dice`` (nnU-Net's
   CE + Dice). Class weights ``inverse_sqrt`` when the rarest present class is more than 10x less
   frequent than the most frequent one (on CCP they lifted hat and socks from IoU 0).
7. **augmentation**: the flips of rule 1; 2D: zoom 0.85-1.15, shift 5%, rotation 10 degrees
   (15 when up-down flips are allowed: no canonical orientation), brightness and contrast 0.1;
   3D: flips, 90-degree in-plane rotations when the in-plane spacing is isotropic, intensity 0.1.
8. **epochs and schedule**: Adam 1e-3 with cosine decay to 0 at the end of the budget; the epoch
   count that fits the budget is estimated here from the measured step time and set for real by
   ``tfseg fit --budget`` on the machine that trains (:class:`BudgetController`).
9. **test-time flips**: averaged over exactly the trained flips (``evaluate.tta``), none otherwise.

Command line::

    tfseg plan --data DATA [--budget 30m] [--output plan.yaml] [--flips auto]
    tfseg fit --config plan.yaml --output RUN
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time

import numpy as np

from tfseg import rundir
from tfseg.config import format_duration, parse_duration
from tfseg.errors import TfsegError

logger = logging.getLogger(__name__)

TARGET_EPOCHS = 25
MIN_OBJECT_PX = 6
MIN_SIDE = 64
MAX_DEPTH = 6
SYMMETRY_TOLERANCE = 0.1  # class centre off the middle, as a fraction of the axis
INTENSITY_TOLERANCE = 0.15  # mean |profile - mirrored profile|, in units of the image's std
MIN_PRESENCE = 0.1  # classes in fewer sampled images place too few objects to judge symmetry
DEFAULT_BUDGET = "30m"
FLIP_CHOICES = ("auto", "none", "lr", "ud", "all")

# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------


def receptive_field(depth: int) -> int:
    """The receptive field in input pixels of tfseg's U-Net of ``depth`` (two 3x3 convolutions
    per level, 2x2 pooling, 2x2 transposed convolutions) along its deepest path."""
    rf, jump = 1, 1
    for _ in range(depth):  # encoder: two 3x3 convolutions, then a 2x2 pool that doubles the jump
        rf += 2 * 2 * jump + jump
        jump *= 2
    rf += 2 * 2 * jump  # bottleneck
    for _ in range(depth):  # decoder: 2x2 transposed convolution at half the jump, two 3x3
        jump //= 2
        rf += jump + 2 * 2 * jump
    return int(rf)


# Class names that give an image a side or a reading direction: mirroring would swap or garble them.
_SIDED = re.compile(r"(^|[^a-z])(left|right|text|word|letter|digit|character)", re.IGNORECASE)


def choose_flips(fp: dict, override: str = "auto") -> tuple[list[int], str]:
    """Spatial axes safe to flip (0 = top-bottom, 1 = left-right in 2D), with the reason."""
    ndim = fp["ndim"]
    if override not in FLIP_CHOICES:
        raise TfsegError(f"--flips {override!r}: choose one of {', '.join(FLIP_CHOICES)}")
    if override != "auto":
        axes = {"none": [], "lr": [1], "ud": [0], "all": list(range(ndim))}[override]
        if ndim == 3 and override in ("lr", "ud"):
            raise TfsegError(f"--flips {override}: 3D volumes flip along all axes or none (all | none)")
        return axes, f"--flips {override}"
    if ndim == 3:
        return [0, 1, 2], "3D volume: mirrored along every axis (nnU-Net's default)"
    axes, why = [], []
    names = {0: "up-down", 1: "left-right"}
    sided = [n for n in fp["class_names"] if _SIDED.search(str(n))]
    photos = int(fp.get("channels") or 0) == 3
    for axis in (0, 1):
        off = [(abs(p[axis] - 0.5), c) for c, p in enumerate(fp["class_position"])
               if p is not None and c > 0 and fp["class_presence"][c] >= MIN_PRESENCE]
        worst = max(off) if off else (0.0, None)
        mirror = fp["intensity_mirror_difference"][axis]
        symmetric = worst[0] <= SYMMETRY_TOLERANCE and mirror <= INTENSITY_TOLERANCE
        cls = fp["class_names"][worst[1]] if worst[1] is not None else "-"
        evidence = (f"{cls} centred {worst[0]:.2f} off the middle, limit {SYMMETRY_TOLERANCE}; intensity mirror "
                    f"difference {mirror:.2f}, limit {INTENSITY_TOLERANCE}")
        if axis == 1 and sided:
            ok, reason = False, f"class names carry a side or a reading direction ({sided[0]}): a mirror would mislabel"
        elif axis == 1 and photos and not symmetric:
            # Where one class sits says nothing about whether a mirrored photo is a plausible photo
            # (pavement off-centre under left-hand traffic mirrors into right-hand traffic).
            ok, reason = True, f"colour photographs: a mirrored photo is a plausible photo ({evidence})"
        else:
            ok, reason = symmetric, evidence
        if ok:
            axes.append(axis)
        why.append(f"{names[axis]} {'yes' if ok else 'no'} ({reason})")
    return axes, "; ".join(why)


def _device() -> dict:
    """What the plan is for: GPUs, replicas, memory."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        mem = 16 << 30
        try:
            mem = int(tf.config.experimental.get_device_details(gpus[0]).get("memory_limit", 0)) or mem
        except Exception:  # noqa: BLE001 - details vary by platform; assume a 16 GiB card
            pass
        return {"kind": "gpu", "replicas": len(gpus), "memory": 0.6 * mem}
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    return {"kind": "cpu", "replicas": 1, "memory": min(4 << 30, ram / 4), "cores": os.cpu_count() or 1}


def _bytes_per_example(size, base_filters: int, depth: int) -> float:
    """Activation memory of one example in tfseg's U-Net (training: kept for the backward pass).

    Per level: about 10 stored tensors (2 convs with norm and activation, the skip, the decoder's
    concat and 2 convs) of ``base * 2**l`` channels at ``pixels / 4**l`` (``8**l`` in 3D), 4 bytes.
    """
    pixels = math.prod(size)
    shrink = 2 ** len(size)
    levels = sum((2**lvl) / (shrink**lvl) for lvl in range(depth + 1))
    return 10 * 4 * base_filters * pixels * levels


def depth_for(size) -> int:
    """nnU-Net's pooling rule: the deepest U-Net whose coarsest map keeps >= 4 px per axis."""
    depth = 0
    while depth < MAX_DEPTH and min(size) / 2 ** (depth + 1) >= 4:
        depth += 1
    return max(2, depth)


def _round_size(size, multiple: int, floor: int) -> tuple:
    return tuple(max(floor, int(round(s / multiple)) * multiple) for s in size)


def measure_step_seconds(fp: dict, *, size, depth: int, base_filters: int, batch_size: int, loss: str,
                         steps: int = 3) -> float:
    """Seconds per training step of the planned U-Net at ``size``, on random data on this machine
    (after one step of tracing), under ``precision auto``."""
    import keras

    from tfseg import runtime
    from tfseg.losses import get_loss
    from tfseg.models import build_model

    precision = runtime.resolve_precision("auto", num_gpus=runtime.num_gpus())
    old = runtime.set_precision(precision)
    try:
        model = build_model("unet", input_shape=tuple(size) + (fp["channels"],), num_classes=fp["num_classes"],
                            depth=depth, base_filters=base_filters, batch_norm=True)
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=get_loss(loss, num_classes=fp["num_classes"], ignore_index=fp["ignore_index"]))
        rng = np.random.default_rng(0)
        x = rng.random((batch_size, *size, fp["channels"])).astype(np.float32) * (255.0 if fp["ndim"] == 2 else 1.0)
        y = rng.integers(0, fp["num_classes"], (batch_size, *size, 1)).astype(np.int32)
        model.train_on_batch(x, y)
        start = time.perf_counter()
        for _ in range(steps):
            model.train_on_batch(x, y)
        return (time.perf_counter() - start) / steps
    finally:
        runtime.set_precision(old)
        keras.backend.clear_session()


def epoch_seconds(fp: dict, step_seconds: float, batch_size: int) -> float:
    """An epoch's estimated wall time: training steps, plus validation and the batch-norm
    re-estimate (forward passes at about a third of a training step each), plus 10%."""
    train = fp["splits"].get("train", 0)
    steps = max(1, train // batch_size)
    val = fp["splits"].get("val", 0)
    forward = (math.ceil(val / batch_size) + min(32, max(4, math.ceil(128 / batch_size)))) * step_seconds / 3
    return 1.1 * (steps * step_seconds + forward)


def make_plan(fp: dict, *, budget: str = DEFAULT_BUDGET, flips: str = "auto", measure: bool = True,
              device: dict | None = None) -> dict:
    """Applies the rules (module docstring) to a fingerprint, one function a rule; each returns
    its values and its ``(key, value, reason)`` rows.

    Returns:
      ``{"fit": {...}, "evaluate": {...}, "choices": [(key, value, reason), ...], "estimate": {...}}``.
    """
    seconds = parse_duration(budget)
    device = device or _device()
    ndim = fp["ndim"]
    axes, flips_why = choose_flips(fp, flips)
    (loss, weights), loss_rows = _loss_rule(fp)
    base, width_rows = _width_rule(device)
    (size, depth, batch, epochs, estimate), size_rows = _size_rule(fp, device, base, loss, seconds, measure)
    augment, augment_rows = _augment_rule(fp, axes)
    size_key = rundir.size_key(ndim)
    fit = {
        "data": fp["data"],
        "model": "unet",
        "model_kwargs": {"depth": depth, "base_filters": base, "batch_norm": True},
        size_key: "x".join(str(s) for s in size),
        "loss": loss,
        "optimizer": "adam",
        "learning_rate": 1.0e-3,
        "schedule": "cosine",
        "epochs": epochs,
        "budget": format_duration(seconds),
        "batch_size": batch,
        "augment": augment,
    }
    if weights:
        fit["class_weights"] = weights
    splits = fp["splits"]
    eval_split = "test" if splits.get("test") else "val" if splits.get("val") else "train"
    evaluate = {"split": eval_split, "samples": 8, "tta": bool(axes)}
    flip_value = ({0: "none", 1: "left-right", 2: "up-down + left-right"}.get(len(axes), str(axes))
                  if ndim == 2 else ("all axes" if axes else "none"))
    size_row, depth_row, batch_row = size_rows
    choices = [("flips", flip_value, flips_why), size_row, depth_row, *width_rows, batch_row, *loss_rows,
               *augment_rows,
               ("epochs", epochs, f"estimate for {format_duration(seconds)}; `tfseg fit` measures its own steps "
                                  "and sets the final count (budget)"),
               ("schedule", "adam 1e-3, cosine to 0", "decays to 0 exactly at the budget's last epoch"),
               ("evaluate.tta", evaluate["tta"],
                "averages the trained flips only" if axes else "no flips were trained")]
    return {"fit": fit, "evaluate": evaluate, "choices": choices, "estimate": estimate}


def _loss_rule(fp: dict):
    """((loss, class weights or None), rows): BCE + Dice for binary tasks, CE + Dice otherwise,
    inverse-sqrt class weights when the classes are more than 10x apart."""
    k = fp["num_classes"]
    freq = np.asarray(fp["class_frequency"], np.float64)
    present = freq[freq > 0]
    imbalance = float(present.max() / present.min()) if present.size else 1.0
    if fp["binary"]:
        loss, weights = "bce_dice", None
        loss_why = "binary: BCE + Dice (Dice keeps a small foreground from being ignored)"
        weights_why = "binary: the Dice term already balances foreground and background"
    else:
        loss = "ce_dice"
        loss_why = f"{k} classes: cross-entropy + Dice (nnU-Net's loss)"
        if imbalance > 10:
            weights = "inverse_sqrt"
            rare = fp["class_names"][int(np.argmin(np.where(freq > 0, freq, np.inf)))]
            weights_why = (f"rarest present class ({rare}, {present.min():.2%} of pixels) is {imbalance:.0f}x "
                           "rarer than the most frequent (> 10x): 1/sqrt(frequency)")
        else:
            weights = None
            weights_why = f"classes within {imbalance:.1f}x of each other (<= 10x): unweighted"
    return (loss, weights), [("loss", loss, loss_why), ("class_weights", weights or "none", weights_why)]


def _width_rule(device: dict):
    """(base filters, rows): 32 on a GPU (nnU-Net), 16 on a CPU."""
    if device["kind"] == "gpu":
        return 32, [("model_kwargs.base_filters", 32, "GPU: 32 (nnU-Net's width)")]
    return 16, [("model_kwargs.base_filters", 16,
                 "CPU: 16; a step costs about the square of the width, and a short budget buys more epochs")]


def _size_rule(fp: dict, device: dict, base: int, loss: str, seconds: float, measure: bool):
    """((size, depth, batch, epochs, estimate), (size row, depth row, batch row)): the largest size
    (2D pixels, 3D voxels, scaled from the median, never up) at which ``TARGET_EPOCHS`` epochs fit
    the budget at the measured step time, the depth that size allows, the batch that memory allows."""
    ndim = fp["ndim"]
    med = fp["size"]["median"]
    gpu = device["kind"] == "gpu"
    replicas = int(device.get("replicas", 1))
    obj = [o["median_px"] for c, o in enumerate(fp["objects"]) if c > 0 and o["median_px"]]
    smallest = min(obj) if obj else None
    largest = max((o["p90_px"] for c, o in enumerate(fp["objects"]) if c > 0 and o["p90_px"]), default=None)
    floor_scale = MIN_SIDE / min(med)
    if smallest:
        floor_scale = max(floor_scale, MIN_OBJECT_PX / smallest)
    floor_scale = min(1.0, floor_scale)
    full = [min(s, 128) for s in med] if ndim == 3 else list(med)

    def config_at(scale):
        raw = [max(1.0, s * scale) for s in full]
        depth = depth_for(raw) if ndim == 2 else min(4, depth_for(raw))
        size = _round_size(raw, 2**depth, 2**depth * 2 if ndim == 2 else 16)
        per = _bytes_per_example(size, base, depth)
        if ndim == 3:
            batch = 2
        else:
            cap = (16 if gpu else 8) * replicas
            batch = int(max(2, min(cap, device["memory"] // per)))
            batch = min(batch, max(2, fp["splits"].get("train", 2) // 2))
            batch = max(replicas, batch - batch % replicas)
        return size, depth, batch

    estimate: dict = {"budget_seconds": seconds}
    size, depth, batch = config_at(1.0)
    if measure:
        ref = config_at(min(1.0, max(floor_scale, math.sqrt(65536 / math.prod(full)) if ndim == 2 else 0.5)))
        t_ref = measure_step_seconds(fp, size=ref[0], depth=ref[1], base_filters=base, batch_size=ref[2], loss=loss)
        per_pixel = t_ref / (ref[2] * math.prod(ref[0]))
        estimate.update(reference={"size": list(ref[0]), "batch": ref[2], "step_seconds": round(t_ref, 4)})

        def epochs_at(cfg):
            step = per_pixel * cfg[2] * math.prod(cfg[0])
            return seconds * 0.9 / epoch_seconds(fp, step, cfg[2]), step

        lo, hi = floor_scale, 1.0
        if epochs_at(config_at(hi))[0] >= TARGET_EPOCHS:
            scale = hi
        elif epochs_at(config_at(lo))[0] < TARGET_EPOCHS:
            scale = lo
        else:
            for _ in range(20):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if epochs_at(config_at(mid))[0] >= TARGET_EPOCHS else (lo, mid)
            scale = lo
        size, depth, batch = config_at(scale)
        est_epochs, step = epochs_at((size, depth, batch))
        estimate.update(step_seconds=round(step, 4), epochs=int(max(1, est_epochs)),
                        epoch_seconds=round(epoch_seconds(fp, step, batch), 2))
        epochs = int(max(1, min(1000, est_epochs)))
        if scale >= 1.0:
            size_why = f"the median size {'x'.join(map(str, med))}: {est_epochs:.0f} epochs fit the budget at full size"
        elif scale <= floor_scale + 1e-9:
            size_why = (f"{scale:.2f} x the median {'x'.join(map(str, med))}, the floor (short side >= {MIN_SIDE} px, "
                        f"smallest object >= {MIN_OBJECT_PX} px); {est_epochs:.0f} epochs fit the budget")
        else:
            size_why = (f"{scale:.2f} x the median {'x'.join(map(str, med))}, aspect kept: the largest size at "
                        f"which {TARGET_EPOCHS} epochs fit {format_duration(seconds)} "
                        f"(measured {t_ref:.3f} s/step at {'x'.join(map(str, ref[0]))})")
    else:
        epochs = TARGET_EPOCHS
        size_why = f"the median size {'x'.join(map(str, med))} (no step time measured)"
    size_why += f"; a multiple of {2 ** depth}"
    rf = receptive_field(depth)
    depth_why = (f"pool while the coarsest map keeps >= 4 px: {'x'.join(str(s // 2 ** depth) for s in size)} "
                 f"bottleneck, receptive field {rf} px")
    if largest:
        depth_why += f" vs the largest class's objects ~{largest * size[0] / med[0]:.0f} px at this size"
    batch_why = (f"{'3D: 2 patches (nnU-Net)' if ndim == 3 else 'activations within the memory budget'}"
                 f" ({_bytes_per_example(size, base, depth) / 2**20:.0f} MiB per example, "
                 f"{device['memory'] / 2**30:.1f} GiB, {replicas} replica(s)"
                 f"{'' if ndim == 3 else ', cap ' + str((16 if gpu else 8) * replicas)})")
    rows = ((rundir.size_key(ndim), "x".join(str(s) for s in size), size_why),
            ("model_kwargs.depth", depth, depth_why), ("batch_size", batch, batch_why))
    return (size, depth, batch, epochs, estimate), rows


def _augment_rule(fp: dict, axes):
    """(augment dict, rows): the decided flips plus the geometric and photometric jitter."""
    if fp["ndim"] == 2:
        augment: dict = {}
        if 1 in axes:
            augment["hflip"] = 0.5
        if 0 in axes:
            augment["vflip"] = 0.5
        augment.update(scale=[0.85, 1.15], shift=0.05, rotate=15 if 0 in axes else 10, brightness=0.1, contrast=0.1)
        why = "flips as decided; zoom, shift, small rotation, brightness/contrast (photometric jitter)"
    else:
        augment = {"flip3d": bool(axes), "intensity": 0.1}
        sp = fp.get("spacing") or [1, 1, 1]
        if abs(sp[1] - sp[2]) <= 0.1 * max(sp[1], sp[2]):
            augment["rot90"] = True
        why = "flips as decided; 90-degree in-plane rotations when in-plane spacing is isotropic; intensity 0.1"
    return augment, [("augment", json.dumps(augment), why)]
