"""LiteRT exports vs the float32 SavedModel: mean IoU, file size and single-image latency.

For each model (the ccp recipe's U-Net, pipelines/ccp.yaml, and a MobileNetV2-U-Net at 224x224),
in one invocation:

1. trains it on a converted dataset for a short wall-time budget (``fit --budget``; or takes a
   finished RUN_DIR with ``--ccp-run`` / ``--mobilenet-run``);
2. exports it four times through :func:`tfseg.export.run_export` (the real paths): the TF
   Serving SavedModel (float32) and LiteRT ``--quantize none``, ``float16`` and ``int8``
   (calibrated on ``--calibration-records`` training records);
3. scores the four exports with :func:`tfseg.evaluate.run_evaluate` ``export_dir=`` (what
   ``tfseg evaluate --model`` does) on the same records: the SavedModel through its serving
   signature, the LiteRT files through the LiteRT interpreter;
4. times one image at a time, at 1 thread and at all threads (each setting in its own process:
   TensorFlow fixes its thread pools at start), calls interleaved so load from other processes
   hits all formats alike:

   * ``model``: the model call alone on a uint8 (1, h, w, C) image at the model size, the same
     function for all four: the SavedModel is the float32 graph the LiteRT converter reads
     (uint8 in, ``mask`` and ``probabilities`` out), run by TensorFlow; the .tflite files are run
     by the LiteRT interpreter (XNNPACK, the default CPU delegate);
   * ``end_to_end``: a decoded record to its mask at the record's size, as evaluate calls them
     (SavedModel: the export's ``predict_images`` signature, which also PNG-encodes the mask;
     LiteRT: :class:`tfseg.predict.litert.LiteRtPredictor`, resizing outside the model).

Size: the SavedModel export folder (saved_model.pb + variables + assets) vs model.tflite.
Ratios are against the float32 SavedModel of the same invocation. Run::

    python tools/bench_litert.py --data CCP_DATA --work /tmp/bench_litert --ccp-budget 12m \\
        --mobilenet-budget 8m --repeats 40 --json bench_litert.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

FORMATS = ("savedmodel", "litert_none", "litert_float16", "litert_int8")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ccp_fit_config() -> dict:
    import yaml

    with open(os.path.join(ROOT, "pipelines", "ccp.yaml")) as f:
        return dict(yaml.safe_load(f)["fit"])


def _mobilenet_fit_config() -> dict:
    cfg = _ccp_fit_config()  # same loss, weights, optimizer and augmentation as the ccp recipe
    cfg.update(model="mobilenetv2_unet", model_kwargs={}, image_size="224x224")
    return cfg


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _train(name: str, cfg: dict, data: str, work: str, budget: str, seed: int) -> tuple[str, dict]:
    from tfseg.fit import run_fit

    run_dir = os.path.join(work, f"run_{name}")
    cfg = dict(cfg, data=data, output=run_dir, budget=budget, verbose=0, tensorboard=False, seed=seed)
    cfg.pop("epochs", None)
    t0 = time.time()
    run_fit(cfg)
    with open(os.path.join(run_dir, "run.json")) as f:
        record = json.load(f)
    return run_dir, {"fit_seconds": round(time.time() - t0, 1), "epochs": record.get("completed_epochs"),
                     "budget": budget, "precision": record.get("precision")}


def _export_all(run_dir: str, exports: str, name: str, calibration: int) -> dict:
    from tfseg.export import run_export

    out = {}
    t0 = time.time()
    out["savedmodel"] = {"path": run_export(run_dir, exports, name, overwrite=True, version=1)}
    out["savedmodel"]["export_seconds"] = round(time.time() - t0, 1)
    for q in ("none", "float16", "int8"):
        t0 = time.time()
        path = run_export(run_dir, exports, f"{name}-litert-{q}", version=1, overwrite=True, format="litert",
                          quantize=q, calibration_records=calibration)
        out[f"litert_{q}"] = {"path": path, "export_seconds": round(time.time() - t0, 1)}
    for fmt, d in out.items():
        d["bytes"] = _dir_bytes(d["path"]) if fmt == "savedmodel" else os.path.getsize(
            os.path.join(d["path"], "model.tflite"))
    meta = json.load(open(os.path.join(out["litert_int8"]["path"], "assets.extra", "tfseg.json")))
    out["litert_int8"]["full_integer"] = meta["litert"]["full_integer"]
    out["litert_int8"]["float_ops"] = meta["litert"]["float_ops"]
    return out


def _score(exports: dict, data: str, split: str, work: str, name: str, max_examples: int | None) -> None:
    from tfseg.evaluate import run_evaluate

    for fmt, d in exports.items():
        m = run_evaluate(None, data, split, os.path.join(work, f"eval_{name}_{fmt}"), num_samples=0,
                         max_examples=max_examples, overwrite=True, export_dir=d["path"])
        d["mean_iou"] = m["dataset_level"]["mean_iou"]
        d["mean_iou_per_image"] = m["per_image_mean"]["mean_iou"]
        d["images"] = m["num_images"]


# --------------------------------------------------------------------------------------------
# Timing worker (one process per thread setting).
# --------------------------------------------------------------------------------------------


def _timeit(fns: dict, repeats: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: {"p50_ms": round(1e3 * float(np.percentile(v, 50)), 2),
                "p90_ms": round(1e3 * float(np.percentile(v, 90)), 2)} for k, v in times.items()}


def _worker(spec_path: str, threads: int) -> dict:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    import tempfile

    from tfseg import data as tfdata
    from tfseg import rundir
    from tfseg import preprocess
    from tfseg.export import with_precision
    from tfseg.export.graph import model_size_signature
    from tfseg.predict.litert import LiteRtPredictor

    spec = json.load(open(spec_path))
    image = next(tfdata.read_examples(spec["data"], spec["split"]).as_numpy_iterator())["image"]
    out = {}
    for name, exports in spec["models"].items():
        run = rundir.load_run_info(spec["runs"][name])
        x = preprocess.uint8_model_input(image, run.size, None)[None]
        # The float32 graph the converter reads (uint8 in, mask + probabilities out), as a SavedModel.
        model = with_precision(rundir.load_model(spec["runs"][name]), "float32")
        graph_dir = tempfile.mkdtemp(prefix="bench-litert-graph-")
        tf.saved_model.save(tf.Module(), graph_dir, signatures={"serving_default": model_size_signature(model, run, batch=1).get_concrete_function()})
        graph = tf.saved_model.load(graph_dir).signatures["serving_default"]
        served = tf.saved_model.load(exports["savedmodel"]["path"]).signatures["predict_images"]
        xt, imt = tf.constant(x), tf.constant(image[None])
        model_fns = {"savedmodel": lambda: graph(image=xt)["mask"].numpy()}
        e2e_fns = {"savedmodel": lambda: served(images=imt)["mask"].numpy()}
        for fmt in FORMATS[1:]:
            p = LiteRtPredictor(exports[fmt]["path"], num_threads=threads)
            model_fns[fmt] = (lambda p=p: p._runner(image=x)["mask"])
            e2e_fns[fmt] = (lambda p=p: p.mask(image))
        out[name] = {"model": _timeit(model_fns, spec["repeats"]), "end_to_end": _timeit(e2e_fns, spec["repeats"])}
    return out


# --------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------


def _table(name: str, result: dict, thread_settings: list[int]) -> str:
    ex = result["exports"]
    base = ex["savedmodel"]
    head = ("| format | mean IoU (dataset) | per-image | size MB | size ratio | "
            + " | ".join(f"model p50/p90 ms, {t} thr | speed-up {t} thr" for t in thread_settings)
            + " | end-to-end p50 ms (" + ", ".join(f"{t} thr" for t in thread_settings) + ") |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for fmt in FORMATS:
        d = ex[fmt]
        cells = [fmt, f"{d['mean_iou']:.4f}", f"{d['mean_iou_per_image']:.4f}", f"{d['bytes'] / 1e6:.2f}",
                 f"{base['bytes'] / d['bytes']:.2f}x"]
        for t in thread_settings:
            lat = result["latency"][str(t)]["model"]
            cells += [f"{lat[fmt]['p50_ms']:.1f} / {lat[fmt]['p90_ms']:.1f}",
                      f"{lat['savedmodel']['p50_ms'] / lat[fmt]['p50_ms']:.2f}x"]
        cells.append(", ".join(f"{result['latency'][str(t)]['end_to_end'][fmt]['p50_ms']:.1f}" for t in thread_settings))
        rows.append("| " + " | ".join(cells) + " |")
    return f"### {name}\n\n" + "\n".join(rows) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a converted dataset (the ccp recipe's: tfseg convert --dataset ccp)")
    p.add_argument("--split", default="val")
    p.add_argument("--work", required=True, help="folder for runs, exports, evaluations")
    p.add_argument("--ccp-run", default=None, help="a finished ccp-recipe RUN_DIR instead of training one")
    p.add_argument("--mobilenet-run", default=None, help="a finished MobileNetV2-U-Net RUN_DIR")
    p.add_argument("--ccp-budget", default="10m", help="fit --budget for the ccp recipe's model")
    p.add_argument("--mobilenet-budget", default="8m", help="fit --budget for the MobileNetV2-U-Net")
    p.add_argument("--calibration-records", type=int, default=200)
    p.add_argument("--max-examples", type=int, default=None, help="score only the first N records")
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--_worker", nargs=2, metavar=("SPEC", "THREADS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        print("RESULT " + json.dumps(_worker(args._worker[0], int(args._worker[1]))))
        return 0

    import logging

    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.work, exist_ok=True)
    results = {}
    runs = {}
    for name, cfg, given, budget in (("ccp_unet", _ccp_fit_config(), args.ccp_run, args.ccp_budget),
                                     ("mobilenetv2_unet_224", _mobilenet_fit_config(), args.mobilenet_run,
                                      args.mobilenet_budget)):
        if given:
            run_dir, fit = given, {"given": given}
        else:
            print(f"{name}: training for {budget} ...", flush=True)
            run_dir, fit = _train(name, cfg, args.data, args.work, budget, args.seed)
        runs[name] = run_dir
        print(f"{name}: {fit}; exporting ...", flush=True)
        exports = _export_all(run_dir, os.path.join(args.work, "exports"), name.replace("_", "-"),
                              args.calibration_records)
        print(f"{name}: scoring ...", flush=True)
        _score(exports, args.data, args.split, args.work, name, args.max_examples)
        results[name] = {"fit": fit, "run_dir": run_dir, "exports": exports, "latency": {}}
    spec = {"data": args.data, "split": args.split, "repeats": args.repeats, "runs": runs,
            "models": {n: r["exports"] for n, r in results.items()}}
    spec_path = os.path.join(args.work, "timing_spec.json")
    json.dump(spec, open(spec_path, "w"))
    settings = sorted({1, os.cpu_count() or 1})
    for threads in settings:
        print(f"timing at {threads} thread(s) ...", flush=True)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--data", args.data, "--work", args.work,
                               "--_worker", spec_path, str(threads)], capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        for name, lat in json.loads(line[0][len("RESULT "):]).items():
            results[name]["latency"][str(threads)] = lat
    import tensorflow as tf

    report = {"command": "python tools/bench_litert.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "cpu_count": os.cpu_count(), "tensorflow": tf.__version__, "results": results}
    try:
        from importlib.metadata import version

        report["ai_edge_litert"] = version("ai-edge-litert")
    except Exception:  # noqa: BLE001
        pass
    for name, r in results.items():
        print(_table(name, r, settings))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
