"""Fit throughput on 2 mirrored replicas against 1, at the same global batch, in one invocation.

    python tools/bench_replicas.py [--size 128] [--batch 8] [--steps 24] [--repeats 2]

Each configuration trains in a fresh subprocess (logical CPU devices must be set before
TensorFlow starts): `tfseg fit` on a synthetic converted dataset, 1 replica (default strategy)
and `--cpu-replicas 2` (MirroredStrategy over two logical CPUs of the same cores), alternating
so that a busy machine slows both alike. Reported: images/s over the steps after the first
epoch (tracing excluded), the ratio 2/1, and the per-step overhead (ms) that mirroring adds.
On a CPU, two logical devices share the same cores, so this measures tf.distribute's overhead,
not a speed-up; on GPUs each replica has its own device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))

_CHILD = """
import json, sys, time
import keras
sys.path.insert(0, {here!r})
from bench_fit import make_2d
from tfseg.fit import run_fit

class Clock(keras.callbacks.Callback):
    def __init__(self):
        super().__init__(); self.times = []
    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter())

clock = Clock()
data, _, _ = make_2d({data!r}, {n}, {size})
cfg = dict(data=data, output={out!r}, model="unet", epochs=2, batch_size={batch}, image_size="{size}x{size}",
           steps_per_epoch={steps}, validation_split="", verbose=0, tensorboard=False, precision="float32",
           model_kwargs=dict(base_filters=16, depth=4), cpu_replicas={replicas})
run_fit(cfg, callbacks=[clock])
t = clock.times[{steps}:]  # the second epoch: traced and warm
print("RESULT", json.dumps({{"images_per_s": (len(t) - 1) * {batch} / (t[-1] - t[0]),
                            "ms_per_step": 1000 * (t[-1] - t[0]) / (len(t) - 1)}}))
"""


def run_once(replicas: int, args, tmp: str, tag: str) -> dict:
    data = os.path.join(tmp, "data")
    out = os.path.join(tmp, f"run-{tag}")
    code = textwrap.dedent(_CHILD.format(here=HERE, data=data, n=max(args.batch * args.steps, 64),
                                         size=args.size, out=out, batch=args.batch, steps=args.steps,
                                         replicas=replicas))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    results = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for replicas in (1, 2) if r % 2 == 0 else (2, 1):
                res = run_once(replicas, args, tmp, f"{replicas}-{r}")
                results[replicas].append(res)
                print(f"replicas={replicas} repeat={r}: {res['images_per_s']:.1f} img/s, "
                      f"{res['ms_per_step']:.0f} ms/step", flush=True)
    one = statistics.median(x["images_per_s"] for x in results[1])
    two = statistics.median(x["images_per_s"] for x in results[2])
    step1 = statistics.median(x["ms_per_step"] for x in results[1])
    step2 = statistics.median(x["ms_per_step"] for x in results[2])
    print(f"U-Net d4/16f {args.size}x{args.size}, global batch {args.batch}, float32: 1 replica {one:.1f} img/s, "
          f"2 replicas {two:.1f} img/s, ratio {two / one:.2f}; per-step overhead of mirroring "
          f"{step2 - step1:+.0f} ms ({step1:.0f} -> {step2:.0f} ms/step)")


if __name__ == "__main__":
    main()
