"""Recipe levers (issue 21) on an accelerator that has no TensorFlow: tfseg's own U-Net and losses
under Keras's JAX (or PyTorch) backend, trained on a packed copy of a converted dataset.

Why: one 15-epoch CCP arm of ``tools/bench_levers.py`` takes over 3 hours on a 2-core CPU without
AVX512-BF16, and a lever needs two seeds and a baseline. The lent accelerator machines have JAX,
PyTorch and Keras-compatible Python but no TensorFlow (and 600 MB of wheels cannot travel), so
this harness keeps what decides the comparison (tfseg's model builders, its ce_dice loss with
class weights, Keras's Adam and EMA, the cosine schedule, the pipeline's augmentation ranges,
batch-norm statistics re-estimated on augmented training batches, left-right test-time flips,
scores from tfseg.scoring at each image's original size) and replaces what needs TensorFlow:

* the input pipeline: images and masks resized once to the training size by tfseg's own resize
  (``pack``, run where TensorFlow is), then flipped, zoomed, shifted and rotated at that size with
  ``keras.ops.image.affine_transform`` (bilinear image, nearest mask), brightness and contrast as
  in :mod:`tfseg.data.augment`. tfseg's pipeline maps the original image in one interpolation;
  here there are two (resize, then augment). Images travel as JPEG (quality 95), masks as PNG.
* the fused batch norm: Keras's BatchNormalization (:func:`tfseg.models.norm.batch_norm`).

So its absolute numbers are this harness's, not ``tfseg fit``'s: compare arms with the baseline
arm of the same invocation, and read the baseline against the CPU baseline of BENCHMARKS.md.

    python tools/bench_levers_gpu.py pack --data CCP_DATA --out .carry/ccp --size 256x160 --size 320x208
    KERAS_BACKEND=jax python tools/bench_levers_gpu.py run --packed .carry/ccp --out RESULTS \\
        --epochs 66 --seeds 1,2 --jobs 4 --arm baseline --arm 'ema:ema=0.99' --arm 'lovasz:lovasz=0.5'

An arm is ``NAME`` or ``NAME:KEY=VALUE;...`` with keys ``ema`` (EMA momentum), ``lovasz`` (Lovasz
weight), ``deep_supervision`` (weight of the first auxiliary output; nnU-Net's halving below it),
``depth``, ``base_filters``, ``size`` (training HxW, packed), ``infer`` (comma-separated HxW sizes
to also evaluate at, packed), ``epochs_scale`` (multiplies ``--epochs``: give an arm whose step
costs more the same CPU time). ``time`` mode times training steps of each arm on this machine's
CPU (TensorFlow backend) to set those scales. Each finished run is kept in OUT/runs, so a run
can be stopped and restarted; OUT/levers.json and OUT/levers.md hold the table.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tfseg from this checkout, installed or not

ARM_KEYS = {"ema": float, "lovasz": float, "deep_supervision": float, "depth": int, "base_filters": int,
            "size": str, "infer": str, "epochs_scale": float}


# ------------------------------------------------------------------------------------------------
# pack (TensorFlow)
# ------------------------------------------------------------------------------------------------


def _blob(items: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.cumsum([0] + [len(b) for b in items]).astype(np.int64)
    return np.frombuffer(b"".join(items), np.uint8), offsets


def _unblob(data: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    raw = data.tobytes()
    return [raw[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def _encode(array: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(data)))
    return a if a.ndim == 3 else a[..., None]


def pack(args) -> int:
    """Writes PACKED/meta.json and one .npz per split and size (see the module docstring)."""
    from tfseg import preprocess, schema
    from tfseg.data.input import read_examples
    from tfseg.losses import class_weights_from_counts

    info = schema.load_dataset_info(args.data)
    os.makedirs(args.out, exist_ok=True)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.size]
    for split in ("train", "val"):
        examples = [(e["image"].numpy(), e["mask"].numpy()) for e in read_examples(args.data, split)]
        for h, w in sizes:
            images = [_encode(preprocess.to_model_size(im, (h, w)).numpy().round().clip(0, 255).astype(np.uint8),
                              "JPEG") for im, _ in examples]
            masks = [_encode(preprocess.resize_mask(m, (h, w)).numpy().astype(np.uint8), "PNG")
                     for _, m in examples]
            np.savez(os.path.join(args.out, f"{split}-{h}x{w}.npz"), **dict(zip(
                ("images", "image_offsets", "masks", "mask_offsets"), (*_blob(images), *_blob(masks)))))
        if split == "val":  # truth at each image's stored size: where tfseg evaluate scores
            masks = [_encode(m.astype(np.uint8), "PNG") for _, m in examples]
            np.savez(os.path.join(args.out, "val-truth.npz"), **dict(zip(("masks", "mask_offsets"), _blob(masks))))
    meta = {"num_classes": info.num_classes, "class_names": list(info.class_names),
            "ignore_index": info.ignore_index,
            "class_weights": class_weights_from_counts(info.class_pixel_counts["train"], "inverse_sqrt"),
            "sizes": [f"{h}x{w}" for h, w in sizes], "source": os.path.abspath(args.data)}
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    total = sum(os.path.getsize(os.path.join(args.out, n)) for n in os.listdir(args.out))
    print(f"packed {args.data} into {args.out}: {total / 2**20:.1f} MiB")
    return 0


# ------------------------------------------------------------------------------------------------
# run (any Keras backend)
# ------------------------------------------------------------------------------------------------


def load_split(packed: str, split: str, size: str):
    z = np.load(os.path.join(packed, f"{split}-{size}.npz"))
    images = np.stack([_decode(b) for b in _unblob(z["images"], z["image_offsets"])])
    masks = np.stack([_decode(b) for b in _unblob(z["masks"], z["mask_offsets"])])
    return images, masks


def load_truth(packed: str) -> list[np.ndarray]:
    z = np.load(os.path.join(packed, "val-truth.npz"))
    return [_decode(b)[..., 0] for b in _unblob(z["masks"], z["mask_offsets"])]


def recipe(pipeline: str = "ccp") -> dict:
    import yaml

    with open(os.path.join(HERE, "..", "pipelines", f"{pipeline}.yaml")) as f:
        return yaml.safe_load(f)["fit"]


def parse_arm(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    arm = {}
    for item in filter(None, (s.strip() for s in rest.split(";"))):
        key, _, value = item.partition("=")
        if key.strip() not in ARM_KEYS:
            raise SystemExit(f"arm {name}: unknown key {key!r} (keys: {', '.join(ARM_KEYS)})")
        arm[key.strip()] = ARM_KEYS[key.strip()](value.strip())
    return name.strip(), arm


def affine_rows(rng, n: int, hw, aug: dict) -> np.ndarray:
    """(n, 8) output->input maps for keras.ops.image.affine_transform: left-right flip, rotation,
    zoom (> 1 magnifies) and shift about the image centre, drawn as tfseg.data.augment draws them,
    mapped by tfseg.preprocess.affine_row (the tf.data augmentation's arithmetic) at equal sizes."""
    from tfseg.preprocess import affine_row

    h, w = hw
    rows = np.zeros((n, 8), np.float32)
    lo, hi = aug.get("scale", [1.0, 1.0])
    shift = float(aug.get("shift", 0))
    for i in range(n):
        flip = -1.0 if rng.random() < float(aug.get("hflip", 0)) else 1.0
        angle = math.radians(rng.uniform(-1, 1) * float(aug.get("rotate", 0)))
        zoom = rng.uniform(lo, hi)
        rows[i, :6] = affine_row(hw, hw, flip_x=flip, flip_y=1.0, cos=math.cos(angle), sin=math.sin(angle), zoom=zoom,
                                 shift_x=rng.uniform(-shift, shift) * w, shift_y=rng.uniform(-shift, shift) * h)
    return rows


def augment(images, masks, rng, aug: dict, fill: int):
    """A batch augmented on the backend's device: float32 images (0..255) and int32 masks."""
    from keras import ops

    n, h, w = images.shape[:3]
    rows = ops.convert_to_tensor(affine_rows(rng, n, (h, w), aug))
    x = ops.image.affine_transform(ops.cast(images, "float32"), rows, interpolation="bilinear", fill_value=0)
    y = ops.image.affine_transform(ops.cast(masks, "float32"), rows, interpolation="nearest", fill_value=fill)
    b, c = float(aug.get("brightness", 0)), float(aug.get("contrast", 0))
    if b:
        x = x + ops.convert_to_tensor(rng.uniform(-b, b, (n, 1, 1, 1)).astype(np.float32) * 255.0)
    if c:
        mean = ops.mean(x, axis=(1, 2), keepdims=True)
        x = (x - mean) * ops.convert_to_tensor(rng.uniform(1 - c, 1 + c, (n, 1, 1, 1)).astype(np.float32)) + mean
    return ops.clip(x, 0.0, 255.0), ops.cast(ops.round(y), "int32")


def build(arm: dict, fit: dict, num_classes: int, hw):
    """(training model, inference model) built by tfseg.models; with deep supervision the training
    model has auxiliary heads on the two coarser decoder levels, upsampled to the full size."""
    import keras

    from tfseg.models import build_model

    kwargs = dict(fit.get("model_kwargs") or {})
    kwargs.update({k: arm[k] for k in ("depth", "base_filters") if k in arm})
    model = build_model(fit["model"], input_shape=(*hw, 3), num_classes=num_classes, **kwargs)
    if not arm.get("deep_supervision"):
        return model, model, kwargs
    if not any(layer.name == "dec1_relu2" for layer in model.layers):
        raise SystemExit(f"deep_supervision needs a size divisible by the model's 2**depth, got {hw}")
    outputs = [model.output]
    for level in (1, 2):
        x = model.get_layer(f"dec{level}_relu2").output
        x = keras.layers.Conv2D(num_classes, 1, dtype="float32", name=f"aux{level}_logits")(x)
        x = keras.layers.UpSampling2D(2**level, interpolation="bilinear", dtype="float32", name=f"aux{level}_up")(x)
        outputs.append(keras.layers.Softmax(dtype="float32", name=f"aux{level}")(x))
    return keras.Model(model.input, outputs, name="deep_supervision"), model, kwargs


def reestimate_batch_norm(model, batches) -> None:
    """tfseg.fit.bnstats' rule: each layer's statistics recomputed over training batches
    (augmented), model in training mode, momentum 0 so a call leaves the batch's moments."""
    from keras import ops

    from tfseg.models.norm import batch_norm_layers

    layers = batch_norm_layers(model)
    saved = [layer.momentum for layer in layers]
    sums = [[0.0, 0.0] for _ in layers]
    for layer in layers:
        layer.momentum = 0.0
    for x in batches:
        model(x, training=True)
        for s, layer in zip(sums, layers):
            mean = ops.convert_to_numpy(layer.moving_mean).astype(np.float64)
            var = ops.convert_to_numpy(layer.moving_variance).astype(np.float64)
            s[0] = s[0] + mean
            s[1] = s[1] + var + mean**2
    k = len(batches)
    for s, layer, m in zip(sums, layers, saved):
        mean = s[0] / k
        layer.moving_mean.assign((mean).astype(np.float32))
        layer.moving_variance.assign(np.maximum(s[1] / k - mean**2, 0.0).astype(np.float32))
        layer.momentum = m


def score(model, images, truth, num_classes: int, ignore_index, batch: int = 20) -> dict:
    """Left-right test-time flips, probabilities resized to each image's stored size, then
    tfseg.scoring's dataset-level and per-image mean IoU."""
    from keras import ops

    from tfseg import scoring

    cms = []
    for i in range(0, len(images), batch):
        x = ops.convert_to_tensor(images[i:i + batch].astype(np.float32))
        p = (model(x, training=False) + ops.flip(model(ops.flip(x, axis=2), training=False), axis=2)) / 2.0
        for j, t in enumerate(truth[i:i + batch]):
            q = ops.image.resize(p[j:j + 1], t.shape, interpolation="bilinear")
            pred = ops.convert_to_numpy(ops.argmax(q[0], axis=-1))
            cms.append(scoring.confusion_matrix(t, pred, num_classes, ignore_index))
    cms = np.stack(cms)
    cm = cms.sum(axis=0)
    return {"dataset": scoring.mean_iou(cm), "per_image": scoring.nanmean(scoring.per_image_class_mean(cms, scoring.per_class_iou)),
            "per_class": [None if np.isnan(v) else float(v) for v in scoring.per_class_iou(cm)]}


def train_one(args, name: str, arm: dict, seed: int) -> dict:
    import keras

    from tfseg.losses import get_loss

    fit = recipe(args.pipeline)
    with open(os.path.join(args.packed, "meta.json")) as f:
        meta = json.load(f)
    keras.config.set_dtype_policy(args.policy)
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    size = arm.get("size", fit["image_size"])
    hw = tuple(int(v) for v in size.split("x"))
    images, masks = load_split(args.packed, "train", size)
    if args.limit:  # a smoke run
        images, masks = images[:args.limit], masks[:args.limit]
    num_classes, ignore = meta["num_classes"], meta["ignore_index"]
    fill = 0 if ignore is None else ignore  # tfseg.data.input.mask_fill_value
    train_model, model, kwargs = build(arm, fit, num_classes, hw)
    lk = dict(fit.get("loss_kwargs") or {})
    if arm.get("lovasz"):
        lk["lovasz_weight"] = arm["lovasz"]
    loss = get_loss(fit["loss"], num_classes=num_classes, ignore_index=ignore, class_weights=meta["class_weights"], **lk)
    batch = int(fit["batch_size"])
    steps = len(images) // batch
    epochs = max(1, round(args.epochs * arm.get("epochs_scale", 1.0)))
    schedule = keras.optimizers.schedules.CosineDecay(float(fit["learning_rate"]), steps * epochs)
    ema = {"use_ema": True, "ema_momentum": arm["ema"]} if arm.get("ema") else {}
    optimizer = keras.optimizers.Adam(schedule, **ema)
    if train_model is model:
        train_model.compile(optimizer=optimizer, loss=loss)
    else:  # nnU-Net's weights: halved per level, normalized to sum 1
        w = [1.0, arm["deep_supervision"], arm["deep_supervision"] / 2]
        train_model.compile(optimizer=optimizer, loss=[loss] * 3, loss_weights=[v / sum(w) for v in w])
    aug = dict(fit.get("augment") or {})
    start = time.time()
    losses = []
    for epoch in range(epochs):
        order = rng.permutation(len(images))
        total = 0.0
        for s in range(steps):
            idx = np.sort(order[s * batch:(s + 1) * batch])
            x, y = augment(images[idx], masks[idx], rng, aug, fill)
            out = train_model.train_on_batch(x, y if train_model is model else [y, y, y])
            total += float(out if np.ndim(out) == 0 else out[0])
        losses.append(total / steps)
        if not math.isfinite(losses[-1]):
            break
    train_s = time.time() - start
    if ema:
        optimizer.finalize_variable_values(train_model.trainable_variables)
    picks = [rng.choice(len(images), batch, replace=False) for _ in range(16)]  # tfseg's 128 images
    stat_batches = [augment(images[i], masks[i], rng, aug, fill)[0] for i in picks]
    reestimate_batch_norm(model, stat_batches)
    truth = load_truth(args.packed)
    result = {"arm": name, "seed": seed, "settings": arm, "epochs": epochs, "steps": steps * epochs,
              "train_seconds": round(train_s, 1), "loss": [round(v, 4) for v in losses], "backend": keras.backend.backend(),
              "model_kwargs": kwargs, "size": size, "scores": {}}
    for s in [size] + [v for v in arm.get("infer", "").split(",") if v and v != size]:
        infer_hw = tuple(int(v) for v in s.split("x"))
        net = model
        if infer_hw != hw:  # the same weights in a model built at that size (tfseg pads inside)
            from tfseg.models import build_model

            net = build_model(fit["model"], input_shape=(*infer_hw, 3), num_classes=num_classes, **kwargs)
            net.set_weights(model.get_weights())
        val_images, _ = load_split(args.packed, "val", s)
        result["scores"][s] = score(net, val_images, truth, num_classes, ignore)
    return result


def table(results: list[dict]) -> str:
    arms: dict[str, list[dict]] = {}
    for r in results:
        arms.setdefault(r["arm"], []).append(r)
    lines = ["| arm | settings | epochs | scored at | dataset mean IoU: mean (spread) | per-image: mean (spread) | seeds | train s/run |",
             "|---|---|---|---|---|---|---|---|"]

    def fmt(xs):
        return f"{statistics.mean(xs):.3f} ({max(xs) - min(xs):.3f})"

    for name, rs in arms.items():
        for size in rs[0]["scores"]:
            ds = [r["scores"][size]["dataset"] for r in rs if size in r["scores"]]
            pi = [r["scores"][size]["per_image"] for r in rs if size in r["scores"]]
            settings = "; ".join(f"{k}={v}" for k, v in rs[0]["settings"].items()) or "-"
            lines.append(f"| {name} | {settings} | {rs[0]['epochs']} | {size} | {fmt(ds)} | {fmt(pi)} | {len(ds)} | "
                         f"{statistics.mean(r['train_seconds'] for r in rs):.0f} |")
    return "\n".join(lines)


def run(args) -> int:
    runs_dir = os.path.join(args.out, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    arms = [parse_arm(a) for a in args.arm or ["baseline"]]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.only:  # one run, in this process (the workers of --jobs)
        name, seed = args.only.rsplit("@", 1)
        arm = dict(arms)[name]
        result = train_one(args, name, arm, int(seed))
        path = os.path.join(runs_dir, f"{name}-s{seed}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)
        return 0
    # Arm by arm, both seeds together: a run cut short by --deadline leaves whole arms.
    todo = [(n, s) for n, _ in arms for s in seeds if not os.path.exists(os.path.join(runs_dir, f"{n}-s{s}.json"))]
    deadline = time.time() + args.deadline if args.deadline else math.inf
    running: list[tuple[subprocess.Popen, str]] = []
    log = open(os.path.join(args.out, "runs.log"), "a")
    base = [sys.executable, os.path.abspath(__file__), "run", "--packed", args.packed, "--out", args.out,
            "--epochs", str(args.epochs), "--pipeline", args.pipeline, "--seeds", args.seeds, "--policy", args.policy,
            "--limit", str(args.limit)]
    for a in args.arm:
        base += ["--arm", a]
    while running or (todo and time.time() < deadline):
        while todo and len(running) < args.jobs and time.time() < deadline:
            name, seed = todo.pop(0)
            log.write(f"{time.strftime('%H:%M:%S')} start {name}@{seed}\n")
            log.flush()
            running.append((subprocess.Popen(base + ["--only", f"{name}@{seed}"], stdout=log, stderr=subprocess.STDOUT), f"{name}@{seed}"))
        time.sleep(1)
        for p, tag in list(running):
            if p.poll() is not None:
                running.remove((p, tag))
                log.write(f"{time.strftime('%H:%M:%S')} end {tag} rc={p.returncode}\n")
                log.flush()
                write_summary(args.out)
    write_summary(args.out)
    print(open(os.path.join(args.out, "levers.md")).read())
    return 0


def write_summary(out: str) -> None:
    runs_dir = os.path.join(out, "runs")
    results = []
    for n in sorted(os.listdir(runs_dir)):
        if n.endswith(".json"):
            with open(os.path.join(runs_dir, n)) as f:
                results.append(json.load(f))
    with open(os.path.join(out, "levers.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "levers.md"), "w") as f:
        f.write(table(results) + "\n")


def time_arms(args) -> int:
    """Median seconds per training step of each arm on this machine (the backend's default
    device), with the pipeline's batch size: the basis of ``epochs_scale``."""
    import keras

    from tfseg.losses import get_loss

    fit = recipe(args.pipeline)
    with open(os.path.join(args.packed, "meta.json")) as f:
        meta = json.load(f)
    base = None
    for text in args.arm or ["baseline"]:
        name, arm = parse_arm(text)
        hw = tuple(int(v) for v in arm.get("size", fit["image_size"]).split("x"))
        train_model, model, _ = build(arm, fit, meta["num_classes"], hw)
        lk = {"lovasz_weight": arm["lovasz"]} if arm.get("lovasz") else {}
        loss = get_loss(fit["loss"], num_classes=meta["num_classes"], class_weights=meta["class_weights"], **lk)
        n = 1 if train_model is model else 3
        train_model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=[loss] * n if n > 1 else loss)
        b = int(fit["batch_size"])
        x = np.random.default_rng(0).uniform(0, 255, (b, *hw, 3)).astype(np.float32)
        y = np.random.default_rng(0).integers(0, meta["num_classes"], (b, *hw, 1)).astype(np.int32)
        times = []
        for i in range(args.steps + 2):
            t = time.perf_counter()
            train_model.train_on_batch(x, y if n == 1 else [y] * 3)
            times.append(time.perf_counter() - t)
        step = statistics.median(times[2:])
        base = base or step
        print(f"| {name} | {step:.3f} s | {step / base:.2f}x |", flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--size", action="append", required=True)
    for command in ("run", "time"):
        r = sub.add_parser(command)
        r.add_argument("--packed", required=True)
        r.add_argument("--pipeline", default="ccp")
        r.add_argument("--arm", action="append", default=[])
        if command == "run":
            r.add_argument("--out", required=True)
            r.add_argument("--epochs", type=int, default=15)
            r.add_argument("--seeds", default="1,2")
            r.add_argument("--jobs", type=int, default=1, help="runs at a time (processes)")
            r.add_argument("--deadline", type=float, default=0, help="start no run after this many seconds")
            r.add_argument("--policy", default="mixed_bfloat16", help="Keras dtype policy (tfseg's on bf16 CPUs)")
            r.add_argument("--limit", type=int, default=0, help="train on the first N images (smoke runs)")
            r.add_argument("--only", help=argparse.SUPPRESS)
        else:
            r.add_argument("--steps", type=int, default=6)
    args = ap.parse_args(argv)
    return {"pack": pack, "run": run, "time": time_arms}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
