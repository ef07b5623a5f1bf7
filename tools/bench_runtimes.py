"""The fastest CPU runtime for a tfseg model: TF SavedModel, LiteRT (float32, int8), ONNX Runtime
(float32, int8) and OpenVINO (reading the ONNX file), on one trained 2D run.

In one invocation:

1. exports the run through :func:`tfseg.export.run_export` (the real paths): SavedModel,
   LiteRT ``none`` and ``int8`` (calibrated on ``--calibration`` training records), ONNX; then
   ONNX Runtime's int8 (``quantize_static``, QDQ, calibrated on the same records) from the ONNX
   file, and OpenVINO compiles the ONNX file if ``openvino`` is installed (``tfseg[bench]``);
2. scores each on ``--split`` (dataset-level mean IoU over the classes present, the masks at
   the records' size): the SavedModel through its serving signature, the others through the
   model-size predictor's resize (:class:`tfseg.predict.base.ModelSizePredictor`), so "IoU lost"
   is what a deployment loses against TF Serving;
3. times the model call alone on uint8 images at the model size, one image and a batch of 8,
   each thread setting in its own process (TensorFlow fixes its thread pools at start), the
   runtimes interleaved so that load from other processes hits all alike. TensorFlow runs the
   frozen graph the LiteRT and ONNX converters read (uint8 in, mask and probabilities out);
   LiteRT's files take one image per call (a batch of 8 is 8 calls, as an app makes them). At
   each extra ``--sizes`` entry the same weights are exported at that size (no IoU there).

Reports p50/p95 latency per call, images per second, file size and IoU lost; ratios against the
SavedModel of the same invocation. Run::

    python tools/bench_runtimes.py --run RUN_DIR --data CCP_DATA --work /tmp/bench_rt \\
        --sizes 512x512 --repeats 20 --json bench_runtimes.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

RUNTIMES = ("savedmodel", "litert_f32", "litert_int8", "onnx_f32", "onnx_int8", "openvino")


def _machine() -> str:
    with open("/proc/cpuinfo") as f:
        info = f.read()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return f"{model}, {os.cpu_count()} cores{', AVX512-BF16' if 'avx512_bf16' in info else ''}, {platform.python_version()}"


def _size_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _resized_run(run_dir: str, size: tuple[int, int], out: str) -> str:
    """RUN_DIR's weights at another input size (a fully convolutional model takes it)."""
    from tfseg import models, rundir

    if os.path.isfile(os.path.join(out, "run.json")):
        return out
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(run_dir, "run.json")) as f:
        cfg = json.load(f)
    # The same architecture built for the new size, with the trained weights.
    model = models.build_model(cfg["model"], input_shape=tuple(size) + (cfg["channels"],),
                               num_classes=cfg["num_classes"], **cfg.get("model_kwargs", {}))
    model.set_weights(rundir.load_model(run_dir).get_weights())
    model.save(os.path.join(out, "model.keras"))
    cfg["image_size"] = list(size)
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump(cfg, f)
    return out


def _calibration(data: str, run_dir: str, count: int) -> np.ndarray:
    from tfseg import rundir
    from tfseg.export import litert

    return litert.calibration_images(data, rundir.load_run_info(run_dir), count)


def _onnx_int8(onnx_path: str, out_path: str, images: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"image": im[None]} for im in images])

        def get_next(self):
            return next(self.items, None)

    pre = out_path + ".pre.onnx"
    quant_pre_process(onnx_path, pre, skip_symbolic_shape=True)
    quantize_static(pre, out_path, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True)
    os.remove(pre)


def export_all(run_dir: str, work: str, tag: str, data: str, calibration: int) -> dict:
    """Every runtime's file for RUN_DIR: {runtime: path}."""
    from tfseg.export import run_export

    base = os.path.join(work, f"exports-{tag}")
    paths = {}
    for runtime, kwargs in (("savedmodel", {}), ("litert_f32", {"format": "litert"}),
                            ("litert_int8", {"format": "litert", "quantize": "int8", "calibration_records": calibration,
                                             "calibration_data": data}),
                            ("onnx_f32", {"format": "onnx"})):
        final = os.path.join(base, runtime, "1")
        if not os.path.isdir(final):
            run_export(run_dir, base, runtime, version=1, **kwargs)
        paths[runtime] = final
    q = os.path.join(base, "onnx_int8", "1")
    if not os.path.isfile(os.path.join(q, "model.onnx")):
        shutil.copytree(paths["onnx_f32"], q, dirs_exist_ok=True)
        os.remove(os.path.join(q, "model.onnx"))
        _onnx_int8(os.path.join(paths["onnx_f32"], "model.onnx"), os.path.join(q, "model.onnx"),
                   _calibration(data, run_dir, calibration))
    paths["onnx_int8"] = q
    try:
        import openvino  # noqa: F401

        paths["openvino"] = paths["onnx_f32"]
    except ImportError:
        pass
    return paths


class _OpenVinoPredictor:
    """OpenVINO compiling model.onnx, behind tfseg's model-size predictor (resize as evaluation)."""

    @staticmethod
    def make(version_dir: str, threads: int | None = None):
        import openvino as ov

        from tfseg.predict.base import ModelSizePredictor

        class Predictor(ModelSizePredictor):
            def __init__(self):
                super().__init__(version_dir)
                config = {"INFERENCE_NUM_THREADS": int(threads)} if threads else {}
                self.compiled = ov.Core().compile_model(os.path.join(version_dir, "model.onnx"), "CPU", config)
                self.request = self.compiled.create_infer_request()

            def call(self, x):
                return self.request.infer({"image": x})

            def model_probabilities(self, x):
                out = self.call(np.ascontiguousarray(x[None]))
                return np.asarray(out[self.compiled.output("probabilities")])[0]

        return Predictor()


def predictor(runtime: str, path: str, threads: int | None = None):
    from tfseg.predict import SavedModelPredictor
    from tfseg.predict.litert import LiteRtPredictor
    from tfseg.predict.onnx import OnnxPredictor

    if runtime == "savedmodel":
        return SavedModelPredictor(path)
    if runtime.startswith("litert"):
        return LiteRtPredictor(path, num_threads=threads)
    if runtime.startswith("onnx"):
        return OnnxPredictor(path, num_threads=threads)
    return _OpenVinoPredictor.make(path, threads)


def score(paths: dict, data: str, split: str, limit: int | None) -> dict:
    """{runtime: dataset-level mean IoU over the classes present} on ``split``."""
    from tfseg import data as tfdata
    from tfseg import schema

    k = schema.load_dataset_info(data).num_classes
    examples = list(tfdata.read_examples(data, split).take(limit or -1).as_numpy_iterator())
    out = {}
    for runtime, path in paths.items():
        p = predictor(runtime, path)
        conf = np.zeros((k, k), np.int64)
        for ex in examples:
            truth = ex["mask"].reshape(ex["mask"].shape[:2]).astype(np.int64)
            pred = p.mask(ex["image"]).astype(np.int64)
            keep = truth < k
            conf += np.bincount(truth[keep] * k + pred[keep], minlength=k * k).reshape(k, k)
        inter = np.diag(conf).astype(float)
        union = conf.sum(0) + conf.sum(1) - inter
        present = conf.sum(1) > 0
        out[runtime] = float(np.mean(inter[present] / np.maximum(union[present], 1)))
        print(f"  {runtime}: mean IoU {out[runtime]:.4f} on {len(examples)} {split} records", flush=True)
    return out


def _model_calls(runtime: str, path: str, run_dir: str, threads: int, batch: int):
    """A no-argument call running the model on a uint8 batch at the model size."""
    import tensorflow as tf

    from tfseg import rundir

    run = rundir.load_run_info(run_dir)
    x = np.random.default_rng(0).integers(0, 256, (batch,) + tuple(run.size) + (run.channels,)).astype(np.uint8)
    if runtime == "savedmodel":
        from tfseg.export import with_precision
        from tfseg.export.graph import model_size_signature

        fn = model_size_signature(with_precision(rundir.load_model(run_dir), "float32"), run, batch=None)
        xt = tf.constant(x)
        return lambda: fn(xt)["mask"].numpy()
    p = predictor(runtime, path, threads)
    if runtime.startswith("litert"):
        return lambda: [p._runner(image=x[i:i + 1])["mask"] for i in range(batch)]
    if runtime.startswith("onnx"):
        return lambda: p._session.run(["mask"], {"image": x})
    return lambda: p.call(x)


def worker(spec: dict, threads: int) -> dict:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    out = {}
    for tag, entry in spec["sizes"].items():
        for batch in (1, 8):
            calls = {r: _model_calls(r, p, entry["run"], threads, batch) for r, p in entry["paths"].items()}
            for fn in calls.values():  # warm-up: graph optimizations, first allocations
                fn(), fn()
            times = {r: [] for r in calls}
            deadline = time.time() + spec["seconds"]
            n = 0
            while n < spec["repeats"] and (n < 5 or time.time() < deadline):
                for r, fn in calls.items():
                    t0 = time.perf_counter()
                    fn()
                    times[r].append(time.perf_counter() - t0)
                n += 1
            for r, v in times.items():
                out[f"{tag}|{batch}|{r}"] = {"p50_ms": 1e3 * float(np.percentile(v, 50)),
                                             "p95_ms": 1e3 * float(np.percentile(v, 95)), "calls": len(v)}
            print(f"  threads {threads}, {tag}, batch {batch}: {n} rounds", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished 2D fit RUN_DIR")
    ap.add_argument("--data", required=True, help="its converted dataset (calibration and scoring)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--work", required=True)
    ap.add_argument("--sizes", default="", help="extra HxW sizes to time at (comma-separated)")
    ap.add_argument("--calibration", type=int, default=100)
    ap.add_argument("--limit", type=int, default=None, help="score at most this many records")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=20.0, help="time limit per setting (at least 5 rounds)")
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.load(open(args.worker))
        json.dump(worker(spec, spec["threads"]), open(args.worker + ".out", "w"))
        return 0
    from tfseg import rundir

    os.makedirs(args.work, exist_ok=True)
    run = rundir.load_run_info(args.run)
    base_tag = "x".join(map(str, run.size))
    print(f"exporting {args.run} ({base_tag})", flush=True)
    sizes = {base_tag: {"run": os.path.abspath(args.run),
                        "paths": export_all(args.run, args.work, base_tag, args.data, args.calibration)}}
    for text in filter(None, args.sizes.split(",")):
        h, w = (int(v) for v in text.lower().split("x"))
        r = _resized_run(args.run, (h, w), os.path.join(args.work, f"run-{h}x{w}"))
        print(f"exporting at {h}x{w}", flush=True)
        sizes[f"{h}x{w}"] = {"run": r, "paths": export_all(r, args.work, f"{h}x{w}", args.data, args.calibration)}
    print("scoring", flush=True)
    ious = score(sizes[base_tag]["paths"], args.data, args.split, args.limit)
    files = {tag: {r: _size_bytes(os.path.join(p, "model.onnx") if r == "openvino" else
                                  p if r == "savedmodel" else
                                  os.path.join(p, "model.tflite" if r.startswith("litert") else "model.onnx"))
                   for r, p in e["paths"].items()} for tag, e in sizes.items()}
    timings = {}
    for threads in (int(t) for t in args.threads.split(",")):
        spec_path = os.path.join(args.work, f"spec-{threads}.json")
        json.dump({"sizes": sizes, "threads": threads, "repeats": args.repeats, "seconds": args.seconds},
                  open(spec_path, "w"))
        print(f"timing with {threads} thread(s)", flush=True)
        subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", spec_path, "--run", args.run,
                        "--data", args.data, "--work", args.work], check=True)
        timings[threads] = json.load(open(spec_path + ".out"))
    report = {"command": "python tools/bench_runtimes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": _machine(), "mean_iou": ious, "bytes": files, "timings": timings}
    if args.json:
        json.dump(report, open(args.json, "w"), indent=1)
    print(table(report))
    return 0


def table(report: dict) -> str:
    lines = [f"`{report['command']}` on {report['machine']}", ""]
    base_iou = report["mean_iou"].get("savedmodel")
    for tag, files in report["bytes"].items():
        lines += [f"**{tag}**", "",
                  "| runtime | file | IoU lost | " + " | ".join(
                      f"{b} img, {t} thr: p50 / p95 ms, img/s" for t in report["timings"] for b in (1, 8)) + " |",
                  "|---|---|---|" + "---|" * (2 * len(report["timings"]))]
        for r in files:
            lost = (f"{base_iou - report['mean_iou'][r]:+.4f}" if r in report["mean_iou"] and base_iou is not None
                    and tag == next(iter(report["bytes"])) else "-")
            cells = []
            for t, timing in report["timings"].items():
                for b in (1, 8):
                    m = timing.get(f"{tag}|{b}|{r}")
                    sm = timing.get(f"{tag}|{b}|savedmodel")
                    cells.append("-" if m is None else f"{m['p50_ms']:.1f} / {m['p95_ms']:.1f}, {1e3 * b / m['p50_ms']:.1f}"
                                 f" ({sm['p50_ms'] / m['p50_ms']:.2f}x)")
            lines.append(f"| {r} | {files[r] / 1e6:.1f} MB | {lost} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
