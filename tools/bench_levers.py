"""Recipe levers on a fixed training budget: each arm is the pipeline's fit section plus a few
``--set`` overrides, trained over several seeds and scored by `tfseg evaluate` (the pipeline's
evaluate section: split, test-time flips).

    python tools/bench_levers.py --data CCP_DATA --workdir W --epochs 15 --seeds 1,2 \\
        --arm baseline --arm 'ema:ema=0.99' --arm 'lovasz:loss_kwargs={lovasz: 0.5}' [--pipeline ccp]

An arm is ``NAME`` or ``NAME:KEY=VALUE;KEY=VALUE`` (fit keys, YAML values). Every arm trains the
same number of epochs (the cosine ends there), so arms whose steps cost the same get the same CPU
budget whatever else runs on the machine; the fit log's step times say what each arm cost. Arms run
one after the other; a finished arm/seed (its metrics.json present) is not run again, so the tool
can be stopped and restarted. Each finished arm/seed is also added to ``--record`` (a file kept in
the repository, ``tools/levers-ccp.json`` by default) with the overrides, epochs, machine and
commit it ran on; an arm/seed found there with the same overrides and epochs is not run again, so
the table grows across sessions whose work directories are gone. Prints one markdown row per arm:
mean and spread (max - min) over the seeds of the dataset-level and per-image mean IoU, and writes
W/levers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import yaml


def parse_arm(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition(":")
    return name.strip(), [s.strip() for s in rest.split(";") if s.strip()]


def _machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return f"{model}, {os.cpu_count()} cores{', AVX512-BF16' if 'avx512_bf16' in info else ''}"


def _commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "?"


def load_record(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def find(record: list[dict], pipeline: str, epochs: int, name: str, sets: list[str], seed: int) -> dict | None:
    return next((r for r in record if (r["pipeline"], r["epochs"], r["arm"], r["sets"], r["seed"])
                 == (pipeline, epochs, name, sets, seed)), None)


def add_to_record(path: str, entry: dict) -> None:
    record = load_record(path) + [entry]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def run_arm(name: str, sets: list[str], seed: int, args, pipeline: dict) -> dict:
    known = find(load_record(args.record), args.pipeline, args.epochs, name, sets, seed)
    if known is not None:
        return known
    tag = f"{name}-s{seed}"
    run = os.path.join(args.workdir, f"{tag}-run")
    out = os.path.join(args.workdir, f"{tag}-eval")
    metrics_path = os.path.join(out, "metrics.json")
    if not os.path.exists(metrics_path):
        cfg_path = os.path.join(args.workdir, f"{tag}.yaml")
        fit = dict(pipeline["fit"])
        fit.update(data=args.data, epochs=args.epochs, seed=seed, verbose=2)
        with open(cfg_path, "w") as f:
            yaml.safe_dump({"fit": fit}, f, sort_keys=False)
        cmd = [sys.executable, "-m", "tfseg.cli", "fit", "--config", cfg_path, "--output", run]
        for s in sets:
            cmd += ["--set", s]
        t0 = time.time()
        with open(os.path.join(args.workdir, f"{tag}-fit.log"), "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
        fit_s = time.time() - t0
        section = pipeline.get("evaluate") or {}
        cmd = [sys.executable, "-m", "tfseg.cli", "evaluate", "--run", run, "--data", args.data,
               "--split", section.get("split", "val"), "--output", out, "--samples", "0", "--overwrite"]
        if section.get("tta"):
            cmd.append("--tta")
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(os.path.join(args.workdir, f"{tag}-time.json"), "w") as f:
            json.dump({"fit_seconds": fit_s, "load": os.getloadavg()}, f)
    with open(metrics_path) as f:
        m = json.load(f)
    with open(os.path.join(args.workdir, f"{tag}-time.json")) as f:
        timing = json.load(f)
    entry = {"pipeline": args.pipeline, "epochs": args.epochs, "arm": name, "sets": sets, "seed": seed,
             "dataset": m["dataset_level"]["mean_iou"], "per_image": m["per_image_mean"]["mean_iou"],
             "per_class": m["dataset_level"]["per_class"]["iou"], "fit_seconds": round(timing["fit_seconds"]),
             "load": [round(x, 2) for x in timing["load"]], "machine": _machine(), "commit": _commit(),
             "date": time.strftime("%Y-%m-%d")}
    add_to_record(args.record, entry)
    return entry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--pipeline", default="ccp")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--arm", action="append", default=[])
    ap.add_argument("--record", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "levers-ccp.json"))
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "pipelines", f"{args.pipeline}.yaml")) as f:
        pipeline = yaml.safe_load(f)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    for text in args.arm or ["baseline"]:
        name, sets = parse_arm(text)
        results[name] = {"sets": sets, "seeds": {s: run_arm(name, sets, s, args, pipeline) for s in seeds}}
        with open(os.path.join(args.workdir, "levers.json"), "w") as f:
            json.dump(results, f, indent=1)
    print("| arm | overrides | dataset mean IoU: mean (spread) | per-image: mean (spread) | seeds |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        ds = [v["dataset"] for v in r["seeds"].values()]
        pi = [v["per_image"] for v in r["seeds"].values() if v["per_image"] is not None]
        fmt = lambda xs: f"{statistics.mean(xs):.3f} ({max(xs) - min(xs):.3f})" if xs else "-"  # noqa: E731
        print(f"| {name} | {'; '.join(r['sets']) or '-'} | {fmt(ds)} | {fmt(pi)} | {len(ds)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
