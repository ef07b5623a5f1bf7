"""The automatic recipe (`tfseg plan`) against a hand-tuned pipeline, at the same training budget.

    python tools/bench_recipe.py --data CCP_DATA --workdir W [--pipeline ccp] [--budget 10m]
        [--raw ../shared/data/ccp] [--sequential]

CCP_DATA is a converted dataset (`tfseg convert --dataset ccp --input ../shared/data/ccp
--output CCP_DATA`; with --raw and no CCP_DATA/dataset.json the tool converts it first). Both
recipes train with `tfseg fit --budget BUDGET` (the hand recipe's epoch count is replaced by the
budget, its cosine ends at the budget's end like the plan's) and are scored by `tfseg evaluate`
with their own evaluate sections (split, test-time flips). By default the two fits run at the
same time, so both see the same machine load; --sequential runs them one after the other.
Prints the per-class IoU table side by side (markdown) and writes W/bench_recipe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import yaml


def _fit_config(section: dict, data: str, budget: str) -> dict:
    fit = dict(section)
    fit.update(data=data, budget=budget, verbose=2)
    return {"fit": fit}


def _start_fit(name: str, cfg: dict, workdir: str) -> tuple[subprocess.Popen, str, float]:
    path = os.path.join(workdir, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    run = os.path.join(workdir, f"{name}-run")
    log = open(os.path.join(workdir, f"{name}-fit.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "tfseg.cli", "fit", "--config", path, "--output", run],
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, run, time.time()


def _evaluate(name: str, run: str, data: str, section: dict, workdir: str) -> dict:
    out = os.path.join(workdir, f"{name}-eval")
    cmd = [sys.executable, "-m", "tfseg.cli", "evaluate", "--run", run, "--data", data,
           "--split", section.get("split", "val"), "--output", out, "--samples", "0", "--overwrite"]
    if section.get("tta"):
        cmd.append("--tta")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--pipeline", default="ccp")
    ap.add_argument("--budget", default="10m")
    ap.add_argument("--raw", default=None)
    ap.add_argument("--sequential", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    if not os.path.isfile(os.path.join(args.data, "dataset.json")):
        from tfseg.pipeline import load_pipeline

        if not args.raw:
            ap.error(f"{args.data}: no dataset.json; pass --raw to convert")
        dataset = load_pipeline(args.pipeline)["dataset"]
        subprocess.run([sys.executable, "-m", "tfseg.cli", "convert", "--dataset", dataset, "--input", args.raw,
                        "--output", args.data], check=True)

    from tfseg.pipeline import load_pipeline
    from tfseg.plan import run_plan

    hand = load_pipeline(args.pipeline)
    t0 = time.time()
    plan = run_plan(args.data, budget=args.budget, output=os.path.join(args.workdir, "plan.yaml"))
    plan_seconds = time.time() - t0
    print(plan["table"], flush=True)

    recipes = {"hand": (hand["fit"], hand.get("evaluate") or {}), "auto": (plan["fit"], plan["evaluate"])}
    results: dict = {"budget": args.budget, "pipeline": args.pipeline, "plan_seconds": round(plan_seconds, 1)}
    procs = {}
    for name, (fit, _) in recipes.items():
        procs[name] = _start_fit(name, _fit_config(fit, args.data, args.budget), args.workdir)
        if args.sequential:
            procs[name][0].wait()
    for name, (proc, run, start) in procs.items():
        if proc.wait() != 0:
            print(f"{name}: fit failed, see {args.workdir}/{name}-fit.log", file=sys.stderr)
            return 1
        with open(os.path.join(run, "run.json")) as f:
            rec = json.load(f)
        results[name] = {"fit_seconds": round(os.path.getmtime(os.path.join(run, "model.keras")) - start, 1),
                         "epochs": rec.get("completed_epochs"), "budget": rec.get("budget"),
                         "config": rec.get("config")}
    for name, (_, section) in recipes.items():
        results[name]["metrics"] = _evaluate(name, procs[name][1], args.data, section, args.workdir)

    h, a = results["hand"]["metrics"], results["auto"]["metrics"]
    lines = ["| class | hand IoU (dataset) | auto IoU (dataset) | hand IoU (per-image) | auto IoU (per-image) |",
             "|---|---|---|---|---|"]
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for cls in h["class_names"]:
        lines.append(f"| {cls} | {f(h['dataset_level']['per_class']['iou'].get(cls))} | "
                     f"{f(a['dataset_level']['per_class']['iou'].get(cls))} | "
                     f"{f(h['per_image_mean']['per_class']['iou'].get(cls))} | "
                     f"{f(a['per_image_mean']['per_class']['iou'].get(cls))} |")
    lines.append(f"| **mean** | **{f(h['dataset_level']['mean_iou'])}** | **{f(a['dataset_level']['mean_iou'])}** | "
                 f"**{f(h['per_image_mean']['mean_iou'])}** | **{f(a['per_image_mean']['mean_iou'])}** |")
    for name in ("hand", "auto"):
        r = results[name]
        c = r["config"]
        size = c.get("image_size") or c.get("patch_size")
        lines.append(f"\n{name}: {r['epochs']} epochs in {r['fit_seconds']} s (budget {args.budget}), "
                     f"{'x'.join(map(str, size)) if size else '-'}, {c.get('model_kwargs')}, batch {c.get('batch_size')}, "
                     f"loss {c.get('loss')}, class_weights {c.get('class_weights')}, augment {c.get('augment')}")
    table = "\n".join(lines)
    print(table)
    for name in ("hand", "auto"):
        results[name].pop("metrics", None)
    results["table"] = table
    with open(os.path.join(args.workdir, "bench_recipe.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
