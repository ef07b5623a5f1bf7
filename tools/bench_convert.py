"""Benchmark: tfseg's Beam conversion vs the seeds' single-process loop, on Carvana-size pairs.

Both sides read the same N pairs of 1918x1280 JPEG + GIF mask files (Carvana's layout) in the
same invocation:

- baseline: what the seed projects do: for each pair, PIL-decode the JPEG and the GIF, put the
  raw pixel bytes in a tf.train.Example, write it with one tf.io.TFRecordWriter;
- tfseg: ``run_convert("carvana", ...)`` (validation, lossless masks, class counts, sharded
  deterministic output, dataset.json) under each DirectRunner mode asked for.

Usage::

    python tools/bench_convert.py        # 208 pairs; in_memory with and without worker threads
    python tools/bench_convert.py --configs in_memory,multi_threading,multi_processing --repeats 1
    python tools/bench_convert.py --memory   # peak RSS: 2, 4, 8 pairs of 8000x8000 vs 4 small pairs
    python tools/bench_convert.py --runners  # 200 pairs: DirectRunner in_memory vs multi_processing
                                             # (2 workers) vs DaskRunner (2 workers on loopback)

``--runners`` is ``--count 200 --configs in_memory,multi_processing,dask --workers 2``; ``dask``
starts a dask.distributed scheduler and ``--workers`` worker processes on 127.0.0.1 (outside the
timings) and passes ``--runner dask --dask_client_address``. Ratios are also given against
in_memory, and every runner's shards are checked byte-identical to in_memory's.

Rounds alternate baseline and tfseg runs and keep each side's best wall time, because the
machine may be shared; CPU seconds are printed too.

Distinct cars are generated once (16 views each) and the files repeated under new car ids, so
generation stays short; every pair is still read and decoded separately.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def make_data(root: str, count: int, distinct: int, image_size: tuple[int, int] = (1280, 1918)) -> None:

    seed_dir = os.path.join(root, "_distinct")
    # noise=1 gives ~190 KiB JPEGs, like Carvana's train_hq photos (its train/ ones are ~80 KiB).
    from tfseg.convert import samples

    samples.write("carvana", seed_dir, distinct, seed=0, image_size=image_size, noise=1.0)
    os.makedirs(os.path.join(root, "train"))
    os.makedirs(os.path.join(root, "train_masks"))
    stems = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(seed_dir, "train")))
    for i in range(count):
        src = stems[i % len(stems)]
        view = i % 16 + 1
        stem = f"{i // 16:012x}_{view:02d}"
        shutil.copy(os.path.join(seed_dir, "train", src + ".jpg"), os.path.join(root, "train", stem + ".jpg"))
        shutil.copy(os.path.join(seed_dir, "train_masks", src + "_mask.gif"),
                    os.path.join(root, "train_masks", stem + "_mask.gif"))
    shutil.rmtree(seed_dir)


def baseline(root: str, out: str) -> int:
    """The seeds' loop: PIL decode both files, raw bytes into one TFRecord file."""
    import tensorflow as tf
    from PIL import Image

    def b(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def i(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))

    n = 0
    with tf.io.TFRecordWriter(os.path.join(out, "train.tfrecord")) as writer:
        for f in sorted(os.listdir(os.path.join(root, "train"))):
            stem = os.path.splitext(f)[0]
            image = np.asarray(Image.open(os.path.join(root, "train", f)).convert("RGB"))
            mask = np.asarray(Image.open(os.path.join(root, "train_masks", stem + "_mask.gif")))
            feature = {"image_raw": b(image.tobytes()), "mask_raw": b(mask.tobytes()),
                       "height": i(image.shape[0]), "width": i(image.shape[1])}
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
            n += 1
    return n


class DaskCluster:
    """A dask scheduler and ``workers`` worker processes on 127.0.0.1 (1 thread each)."""

    def __init__(self, workdir: str, workers: int, nanny: bool = True):
        import subprocess

        sched_file = os.path.join(workdir, "scheduler.json")
        self.log = open(os.path.join(workdir, "dask.log"), "w")
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
             "--no-dashboard", "--scheduler-file", sched_file], stdout=self.log, stderr=subprocess.STDOUT)]
        try:
            for _ in range(240):
                if os.path.exists(sched_file):
                    break
                time.sleep(0.5)
            # Without a nanny, dask starts one worker a process: one process per worker.
            for nworkers in ([workers] if nanny else [1] * workers):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", sched_file,
                     "--nworkers", str(nworkers), "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"]
                    + ([] if nanny else ["--no-nanny"]),
                    stdout=self.log, stderr=subprocess.STDOUT))
            from distributed import Client

            with Client(scheduler_file=sched_file, timeout=60) as client:
                client.wait_for_workers(workers, timeout=180)
            with open(sched_file) as f:
                self.address = json.load(f)["address"]
        except BaseException:
            self.close()
            raise

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the scheduler, nannies and workers so far (live processes)."""
        import psutil

        total = 0.0
        for p in self.procs:
            try:
                proc = psutil.Process(p.pid)
                for q in [proc] + proc.children(recursive=True):
                    t = q.cpu_times()
                    total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def close(self) -> None:
        import subprocess

        for p in reversed(self.procs):
            p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.log.close()


def _timed(fn):
    """(result, wall seconds, CPU seconds of this process, all threads)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def _peak_rss_mib(cmd: list[str], env: dict) -> tuple[float, float]:
    """Runs ``cmd``; returns (its peak resident memory in MiB, wall seconds) from wait4's rusage."""
    import subprocess

    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t  # Linux: ru_maxrss in KiB


def _folder_pairs(root: str, count: int, size: tuple[int, int]) -> None:
    """``count`` folder-layout pairs: RGBA PNG images (decoded in full: not stored as-is) of
    ``size`` and {0, 255} masks; one pair generated, the others hard links under new names."""
    from PIL import Image

    h, w = size
    os.makedirs(os.path.join(root, "images"))
    os.makedirs(os.path.join(root, "masks"))
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    r = ((y + 0.5 * x) % 256).astype(np.uint8)
    Image.fromarray(np.stack([r, r[::-1], r[:, ::-1], np.full_like(r, 255)], -1), "RGBA").save(
        os.path.join(root, "images", "p0.png"), compress_level=1)
    m = np.zeros((h, w), np.uint8)
    m[h // 8: h // 2, w // 4: 3 * w // 4] = 255
    Image.fromarray(m).save(os.path.join(root, "masks", "p0.png"))
    for i in range(1, count):
        for sub in ("images", "masks"):
            os.link(os.path.join(root, sub, "p0.png"), os.path.join(root, sub, f"p{i}.png"))


def memory(argv=None) -> None:
    """``--memory``: peak RSS of ``tfseg convert`` (one process, the default DirectRunner) on
    pairs at the 2**26-pixel input limit, for a growing number of pairs, against the same
    command on 4 small pairs (TensorFlow + Beam's own footprint) in the same invocation."""
    p = argparse.ArgumentParser(description="peak memory of tfseg convert")
    p.add_argument("--memory", action="store_true")
    p.add_argument("--size", default="8000x8000", help="HxW of the large pairs (8000x8000 = 64 MP)")
    p.add_argument("--counts", default="2,4,8", help="numbers of large pairs")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    h, w = (int(v) for v in args.size.split("x"))
    work = args.workdir or tempfile.mkdtemp(prefix="bench_convert_mem_")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    cli = [sys.executable, "-c", "from tfseg.cli import main; main()"]
    try:
        rows = []
        for label, count, size in [("small", 4, (64, 64))] + [
                ("large", int(c), (h, w)) for c in args.counts.split(",") if c]:
            raw = os.path.join(work, f"{label}{count}")
            _folder_pairs(raw, count, size)
            rss, wall = _peak_rss_mib(cli + ["convert", "--dataset", "folder", "--input", raw, "--output",
                                             raw + "-out", "--split", "train=1", "--num-classes", "2"], env)
            rows.append((label, count, size, rss, wall))
            shutil.rmtree(raw + "-out", ignore_errors=True)
            shutil.rmtree(raw, ignore_errors=True)
            print(f"  {count} pairs of {size[0]}x{size[1]}: peak RSS {rss:.0f} MiB, {wall:.1f} s", flush=True)
        base = rows[0][3]
        print(f"{os.cpu_count()} CPUs (conversion threads: min(8, CPUs)); load average {os.getloadavg()[0]:.1f}")
        for label, count, (ph, pw), rss, wall in rows:
            print(f"{count} pairs of {ph}x{pw} ({ph * pw / 1e6:.0f} MP each): peak RSS {rss:.0f} MiB = "
                  f"{rss / base:.2f}x the small run, {wall:.1f} s")
        print(json.dumps([{"pairs": c, "size": f"{a}x{b}", "peak_rss_mib": round(r), "ratio": round(r / base, 2)}
                          for _, c, (a, b), r, _ in rows]))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def _subset(all_dir: str, root: str, n: int) -> None:
    """``root``: hard links to the first ``n`` pairs of ``all_dir`` (no new bytes, same files)."""
    os.makedirs(os.path.join(root, "train"))
    os.makedirs(os.path.join(root, "train_masks"))
    for f in sorted(os.listdir(os.path.join(all_dir, "train")))[:n]:
        stem = os.path.splitext(f)[0]
        os.link(os.path.join(all_dir, "train", f), os.path.join(root, "train", f))
        os.link(os.path.join(all_dir, "train_masks", stem + "_mask.gif"),
                os.path.join(root, "train_masks", stem + "_mask.gif"))


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped children: multi_processing's SDK workers
    return r.ru_utime + r.ru_stime


def _settle_children(keep: set[int], timeout: float = 15.0) -> None:
    """Waits until this process has no children left but ``keep`` (the dask cluster), so that
    RUSAGE_CHILDREN holds every SDK worker of the job: the FnApiRunner reaps its multi_processing
    workers from background threads, after the job has returned."""
    import psutil

    end = time.time() + timeout
    me = psutil.Process()
    while time.time() < end:
        if not [c for c in me.children() if c.pid not in keep and c.status() != psutil.STATUS_ZOMBIE]:
            time.sleep(0.2)  # the reaping thread's wait() after the exit
            return
        time.sleep(0.1)


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares ``y = fixed + n * per_case`` over (n, y) points; (fixed, per_case)."""
    n = np.array([p[0] for p in points], np.float64)
    y = np.array([p[1] for p in points], np.float64)
    per_case, fixed = np.polyfit(n, y, 1)
    return float(fixed), float(per_case)


def _task_profile(events: list[dict]) -> list[tuple[str, int, float, float]]:
    """(task prefix, tasks, compute seconds, transfer seconds) from a dask task stream, largest first."""
    import re

    rows: dict[str, list] = {}
    for e in events:
        key = e["key"][0] if isinstance(e["key"], tuple) else e["key"]
        prefix = re.sub(r"-[0-9a-f]{32}$", "", str(key))
        row = rows.setdefault(prefix, [0, 0.0, 0.0])
        row[0] += 1
        for s in e.get("startstops", ()):
            action, start, stop = (s["action"], s["start"], s["stop"]) if isinstance(s, dict) else s[:3]
            if action == "compute":
                row[1] += stop - start
            elif action == "transfer":
                row[2] += stop - start
    return sorted(((k, v[0], v[1], v[2]) for k, v in rows.items()), key=lambda r: -r[2])


def scaling(argv=None) -> None:
    """``--scaling``: fixed and per-case cost of each runner at 1 and 2 workers (issue 24).

    For every config (``MODE:WORKERS``) and job size, ``run_convert`` is timed on the same pairs
    (hard links to one generated set); wall = fixed + n x per-case is fitted over the sizes, for
    wall time and for CPU seconds (this process + reaped children, i.e. multi_processing's SDK
    workers + the dask scheduler/nanny/worker processes). ``in_memory:W`` converts with W threads
    in this process; ``multi_processing:W`` and ``dask:W`` run W worker processes with one
    conversion thread each (a dask cluster per W, started and warmed with one 8-pair job before
    the timings: a long-lived cluster, as a user's would be). Rounds alternate the configs (order
    rotated each round); the best wall of each (config, size) counts. ``--profile`` records the
    dask scheduler's task stream of the largest job per config and prints where the time went;
    ``--no-dask-profiler`` starts the workers with dask's own statistical profiler off (it samples
    the task thread's stack every 10 ms on the worker's event loop, holding the GIL).
    """
    p = argparse.ArgumentParser(description="fixed vs per-case cost of the convert job's runners")
    p.add_argument("--scaling", action="store_true")
    p.add_argument("--sizes", default="50,200,800", help="job sizes (pairs)")
    p.add_argument("--image-size", default="640x960", help="HxW of the generated pairs (Carvana: 1280x1918)")
    p.add_argument("--configs", default="in_memory:1,in_memory:2,multi_processing:1,multi_processing:2,dask:1,dask:2")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--distinct", type=int, default=16)
    p.add_argument("--profile", action="store_true", help="dask task stream of the largest job")
    p.add_argument("--no-nanny", action="store_true",
                   help="start the dask workers without a nanny (whose workers get MALLOC_TRIM_THRESHOLD_=65536)")
    p.add_argument("--no-dask-profiler", action="store_true",
                   help="start the dask workers with their statistical profiler off "
                        "(DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tfseg.convert.pipeline import run_convert

    sizes = sorted(int(s) for s in args.sizes.split(","))
    configs = [c for c in args.configs.split(",") if c]
    h, w = (int(v) for v in args.image_size.split("x"))
    work = args.workdir or tempfile.mkdtemp(prefix="bench_convert_scaling_")
    clusters: dict[int, DaskCluster] = {}
    try:
        t = time.perf_counter()
        all_dir = os.path.join(work, "all")
        make_data(all_dir, max(sizes + [8]), args.distinct, (h, w))
        for n in sizes + [8]:
            if not os.path.exists(os.path.join(work, f"n{n}")):
                _subset(all_dir, os.path.join(work, f"n{n}"), n)
        mean_kib = sum(os.path.getsize(os.path.join(all_dir, "train", f))
                       for f in os.listdir(os.path.join(all_dir, "train"))) / max(sizes) / 1024
        print(f"generated {max(sizes)} pairs of {w}x{h} JPEG (mean {mean_kib:.0f} KiB) + GIF in "
              f"{time.perf_counter() - t:.1f} s; {os.cpu_count()} CPUs (shared cores); "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        import tensorflow  # noqa: F401  - import cost kept out of the timings

        if args.no_dask_profiler:  # inherited by the cluster processes started below
            os.environ["DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED"] = "False"
        for c in configs:
            mode, _, nw = c.partition(":")
            if mode == "dask" and int(nw or 1) not in clusters:
                os.makedirs(os.path.join(work, f"dask{nw}"), exist_ok=True)
                clusters[int(nw or 1)] = DaskCluster(os.path.join(work, f"dask{nw}"), int(nw or 1),
                                                     nanny=not args.no_nanny)

        def beam_args_of(config):
            mode, _, nw = config.partition(":")
            nw = int(nw or 1)
            if mode == "dask":
                return ["--runner", "dask", f"--dask_client_address={clusters[nw].address}"], 1, clusters[nw]
            if mode == "multi_processing":
                return ["--direct_running_mode=multi_processing", f"--direct_num_workers={nw}"], 1, None
            return [f"--direct_running_mode={mode}"], nw, None

        shards: dict[int, dict[str, dict[str, bytes]]] = {}

        def run(config, n, r, keep=False):
            beam_args, threads, cluster = beam_args_of(config)
            out = os.path.join(work, f"out-{config.replace(':', '')}-{n}-{r}")
            load = os.getloadavg()[0]
            c0, k0 = time.process_time(), _children_cpu()
            d0 = cluster.cpu_seconds() if cluster else 0.0
            w0 = time.perf_counter()
            try:
                summary = run_convert("carvana", os.path.join(work, f"n{n}"), out, beam_args=beam_args,
                                      threads=threads)
                wall = time.perf_counter() - w0
                _settle_children({p.pid for c in clusters.values() for p in c.procs})
                cpu = (time.process_time() - c0) + (_children_cpu() - k0) + (
                    (cluster.cpu_seconds() - d0) if cluster else 0.0)
                if keep:
                    shards.setdefault(n, {})[config] = {
                        f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out)) if ".tfrecord" in f}
            finally:
                shutil.rmtree(out, ignore_errors=True)
            assert sum(summary["splits"].values()) == n and summary["rejected"] == 0, summary
            return wall, cpu, load

        for c in configs:  # warm-up: imports in this process and in the dask workers
            run(c, 8, -1) if not c.startswith("multi_processing") else None
        rows: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
        for r in range(args.repeats):
            order = configs[r % len(configs):] + configs[:r % len(configs)]
            for n in sizes:
                for c in order:
                    wall, cpu, load = run(c, n, r, keep=(r == 0))
                    rows.setdefault((c, n), []).append((wall, cpu, load))
                    print(f"  round {r + 1} {c:>18} n={n:5d}: {wall:7.2f} s wall, {cpu:7.2f} CPU-s, "
                          f"{cpu / n * 1000:6.1f} CPU-ms/case, load {load:.1f}", flush=True)
        for n, by_config in sorted(shards.items()):
            ref_name, ref = next(iter(by_config.items()))
            for name, files in by_config.items():
                assert files == ref, f"n={n}: {name}'s shards differ from {ref_name}'s"
            print(f"n={n}: every config's shards byte-identical ({len(ref)} files)")

        profile = {}
        if args.profile:
            from distributed import Client, get_task_stream

            for c in configs:
                mode, _, nw = c.partition(":")
                if mode != "dask":
                    continue
                with Client(clusters[int(nw or 1)].address, timeout=60) as client:
                    with get_task_stream(client) as ts:
                        wall, cpu, load = run(c, sizes[-1], "profile")
                    events = ts.data
                prof = _task_profile(events)
                spans = [(s["start"], s["stop"]) if isinstance(s, dict) else tuple(s[1:3])
                         for e in events for s in e.get("startstops", ())]
                window = (max(b for _, b in spans) - min(a for a, _ in spans)) if spans else 0.0
                profile[c] = {"wall": round(wall, 2), "tasks": len(events), "task_window_s": round(window, 2),
                              "cpu": round(cpu, 2),
                              "prefixes": [{"prefix": k, "tasks": t, "compute_s": round(s, 2),
                                            "transfer_s": round(x, 2)} for k, t, s, x in prof]}
                busy = sum(s for _, _, s, _ in prof)
                print(f"profile {c} n={sizes[-1]}: {wall:.2f} s wall ({window:.2f} s from the first task's start "
                      f"to the last one's end, the rest in the launcher), {len(events)} dask tasks, {busy:.2f} s "
                      f"of task compute, {cpu:.2f} CPU-s in all, load {load:.1f}")
                for k, t, s, x in prof[:12]:
                    print(f"    {k:60.60} {t:6d} tasks {s:7.2f} s compute {x:6.2f} s transfer")
        if rows:
            _scaling_report(args, sizes, configs, rows, profile)
    finally:
        for cluster in clusters.values():
            cluster.close()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def _scaling_report(args, sizes, configs, rows, profile) -> None:
    best = {k: min(v) for k, v in rows.items()}  # the run with the best wall time
    loads = [load for v in rows.values() for _, _, load in v]
    print(f"\nshared cores: load average {min(loads):.1f}-{max(loads):.1f} during the timed runs; "
          f"{args.image_size} pairs, sizes {sizes}, best of {args.repeats}"
          + ("; dask workers' profiler off" if getattr(args, "no_dask_profiler", False) else "")
          + ("; dask workers without a nanny" if getattr(args, "no_nanny", False) else ""))
    print("| config | fixed (s) | per case (ms) | CPU fixed (s) | CPU per case (ms) | CPU per case, n="
          f"{sizes[-2]}->{sizes[-1]} (ms) | images/s at n={sizes[-1]} | CPU per case vs in_memory |")
    print("|---|---|---|---|---|---|---|---|")
    results = {}
    for c in configs:
        fixed, per_case = _fit([(n, best[(c, n)][0]) for n in sizes])
        cfixed, cper = _fit([(n, best[(c, n)][1]) for n in sizes])
        results[c] = {"fixed_s": round(fixed, 2), "per_case_ms": round(per_case * 1000, 1),
                      "cpu_fixed_s": round(cfixed, 2), "cpu_per_case_ms": round(cper * 1000, 1),
                      "walls": {n: round(best[(c, n)][0], 2) for n in sizes},
                      "cpus": {n: round(best[(c, n)][1], 2) for n in sizes},
                      "loads": {n: [round(x[2], 1) for x in rows[(c, n)]] for n in sizes},
                      "images_per_s": round(sizes[-1] / best[(c, sizes[-1])][0], 2),
                      # The slope between the two largest jobs: the batch count (at most
                      # TARGET_BATCHES) has stopped growing there, so this is the cost of a case.
                      "cpu_marginal_ms": round((best[(c, sizes[-1])][1] - best[(c, sizes[-2])][1])
                                               / (sizes[-1] - sizes[-2]) * 1000, 1) if len(sizes) > 1 else None}
    ref = next((results[c] for c in configs if c.startswith("in_memory:1")), None) or next(
        (results[c] for c in configs if c.startswith("in_memory")), None)
    for c, r in results.items():
        vs = f"{r['cpu_per_case_ms'] / ref['cpu_per_case_ms']:.2f}x" if ref else "-"
        r["cpu_per_case_vs_in_memory"] = float(vs[:-1]) if ref else None
        print(f"| {c} | {r['fixed_s']:.2f} | {r['per_case_ms']:.1f} | {r['cpu_fixed_s']:.2f} | "
              f"{r['cpu_per_case_ms']:.1f} | {r['cpu_marginal_ms']} | {r['images_per_s']:.1f} | {vs} |")
    for mode in sorted({c.partition(':')[0] for c in configs}):
        one, two = f"{mode}:1", f"{mode}:2"
        if one in results and two in results:
            s = best[(one, sizes[-1])][0] / best[(two, sizes[-1])][0]
            results[f"speedup_{mode}"] = round(s, 2)
            print(f"{mode}: 2 workers / 1 worker at n={sizes[-1]}: {s:.2f}x (wall)")
    if profile:
        results["profile"] = profile
    print(json.dumps(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--memory" in argv:
        return memory(argv)
    if "--scaling" in argv:
        return scaling(argv)
    if "--runners" in argv:
        argv.remove("--runners")
        argv = ["--count", "200", "--configs", "in_memory,multi_processing,dask", "--workers", "2"] + argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=208, help="pairs (>= 200 for the report)")
    p.add_argument("--distinct", type=int, default=16, help="distinct generated pairs")
    p.add_argument("--configs", default="in_memory,in_memory:threads=1",
                   help="tfseg runs: MODE[:threads=N], MODE in in_memory, multi_threading, multi_processing, "
                        "dask (DaskRunner on a local cluster of --workers processes)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="workers for the parallel modes")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds; the best wall time counts")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tfseg.convert.pipeline import run_convert

    work = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    data = os.path.join(work, "carvana")
    try:
        t = time.perf_counter()
        make_data(data, args.count, args.distinct)
        size = sum(os.path.getsize(os.path.join(data, "train", f)) for f in os.listdir(os.path.join(data, "train")))
        print(f"generated {args.count} pairs of 1918x1280 JPEG (mean {size / args.count / 1024:.0f} KiB) + GIF "
              f"in {time.perf_counter() - t:.1f} s; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
        import tensorflow  # noqa: F401  - import cost kept out of both timings

        def run_baseline(r):
            out = os.path.join(work, f"baseline{r}")
            os.makedirs(out)
            try:
                return baseline(data, out)
            finally:
                shutil.rmtree(out, ignore_errors=True)

        cluster = None
        shards: dict[str, dict[str, bytes]] = {}

        def run_tfseg(config, r):
            nonlocal cluster
            mode, _, extra = config.partition(":")
            threads = int(extra.split("=")[1]) if extra.startswith("threads=") else None
            if mode == "dask":
                beam_args = ["--runner", "dask", f"--dask_client_address={cluster.address}"]
            else:
                beam_args = [f"--direct_running_mode={mode}"]
                if mode != "in_memory":
                    beam_args.append(f"--direct_num_workers={args.workers}")
            out = os.path.join(work, f"tfseg{r}")
            try:
                summary = run_convert("carvana", data, out, beam_args=beam_args, threads=threads)
                if r == 0:
                    shards[config] = {f: open(os.path.join(out, f), "rb").read()
                                      for f in sorted(os.listdir(out)) if ".tfrecord" in f}
            finally:
                shutil.rmtree(out, ignore_errors=True)
            n = sum(summary["splits"].values())
            assert n == args.count and summary["rejected"] == 0, summary
            return n

        if any(c.partition(":")[0] == "dask" for c in args.configs.split(",")):
            t = time.perf_counter()
            cluster = DaskCluster(work, args.workers)
            print(f"dask cluster: scheduler + {args.workers} worker processes on 127.0.0.1 "
                  f"({time.perf_counter() - t:.1f} s to start, not timed)")
        best: dict[str, tuple[float, float]] = {}
        try:
            _rounds(args, run_baseline, run_tfseg, best)
        finally:
            if cluster is not None:
                cluster.close()
        ref = next(iter(shards.values()), None)
        for name, files in shards.items():
            same = files == ref
            print(f"shards of {name}: {len(files)} files, {'byte-identical to' if same else 'DIFFERENT from'} "
                  f"{next(iter(shards))}'s")
            assert same, name
        _report(args, best)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def _rounds(args, run_baseline, run_tfseg, best) -> None:
    for r in range(args.repeats):
        # Alternate the runs so that load from other processes hits every side alike.
        for name in ["baseline"] + [c for c in args.configs.split(",") if c]:
            n, wall, cpu = _timed(lambda: run_baseline(r) if name == "baseline" else run_tfseg(name, r))
            print(f"  round {r + 1} {name}: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
            if name not in best or wall < best[name][0]:
                best[name] = (wall, cpu)


def _report(args, best) -> None:
    base_wall, _ = best["baseline"]
    mem_wall = best.get("in_memory", (None,))[0]
    results = {}
    for name, (wall, cpu) in best.items():
        row = {"seconds": round(wall, 2), "images_per_s": round(args.count / wall, 2), "cpu_seconds": round(cpu, 2)}
        if name != "baseline":
            row["ratio"] = round(base_wall / wall, 2)
            if mem_wall:
                row["vs_in_memory"] = round(mem_wall / wall, 2)
        results[name] = row
        label = "baseline loop (PIL decode + raw bytes + TFRecordWriter)" if name == "baseline" else f"tfseg {name}"
        ratio = f", {base_wall / wall:.2f}x the loop" if name != "baseline" else ""
        if mem_wall and name not in ("baseline", "in_memory"):
            ratio += f", {mem_wall / wall:.2f}x in_memory"
        cpu_note = (" (CPU of child processes not counted)"
                    if name.startswith(("multi_processing", "dask")) else "")
        print(f"{label}: {args.count / wall:.1f} images/s (best of {args.repeats}: {wall:.2f} s wall, "
              f"{cpu:.2f} s CPU{cpu_note}){ratio}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
