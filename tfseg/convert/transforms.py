"""The conversion job's Beam graph: load and encode cases, write shards, statistics, rejections.

Graph (all named PTransforms, added by :func:`build_pipeline`)::

    Create(batches of (split, shard, Case)) -> ConvertCases (LoadAndEncode DoFn -> ("ok", Encoded)
        | ("rejected", row); each record spilled to _records/ and passed on as its path)
      examples -> WriteShards:  key (split, shard) -> GroupByKey -> write each shard sorted by id
      examples -> SummarizeSplits: gathered, SplitStatsFn per split -> _stats.json
      rejected -> WriteRejected: sorted -> rejected.jsonl
      (shard list, stats, rejected) -> Flatten -> Done   (one sink that depends on everything)

Shard keys come from a stable hash of the case id (:mod:`tfseg.convert.shards`) and each shard's
records are sorted by case id, so converting the same input twice gives byte-identical shards
whatever the runner's bundling (Beam's WriteToTFRecord starts bundles at random shards, hence not
used); records are serialized deterministically (schema), so the bytes are the same in every
process too.

The graph avoids what Beam's DaskRunner does not support, so the same job runs there: no
multi-output ParDo (Dask merges tagged outputs into one bag), no output from finish_bundle
(dropped; hence batches cut on the launcher instead of BatchElements), no CombineGlobally or
CombinePerKey (side inputs / no output), and one final transform that reads every branch (Dask
computes only the last transform's graph).

DoFns and the functions they call are module-level, so Beam can pickle them to its workers.
Progress (:class:`ConvertProgress`) counts cases as the LoadAndEncode DoFn finishes them when it
runs in the launcher's process (:func:`set_progress`); other runners report their totals when the
job ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.typehints import Dict, Tuple

from tfseg import outputs, schema
from tfseg.convert.base import BadCase, Case, Layout
from tfseg.convert.checks import one_line
from tfseg.convert.encode import CaseStats, EncodeOptions, Encoded, encode_case
from tfseg.convert.shards import SPILL_DIR, read_bytes, shard_name, spill_path, upload, write_bytes
from tfseg.progress import Progress

log = logging.getLogger(__name__)

NAMESPACE = "tfseg.convert"
STATS_FILE = "_stats.json"
SHARDS_FILE = "_shards.json"
REJECTED = "rejected"


def convert_one(layout: Layout, opts: EncodeOptions, element: tuple[str, int, Case], spill_dir: str | None = None):
    """Loads and encodes one case: ``("ok", Encoded, msec)`` or ``("rejected", row, msec)``.

    Thread-safe (layouts load with PIL/scipy/nibabel, which release the GIL while decoding).
    With ``spill_dir`` the record is written to :func:`spill_path` and Encoded carries the path.
    The case's pixels count against the worker's pixel budget (:mod:`tfseg.convert.base`) until
    it is encoded.
    """
    from tfseg.convert.base import begin_case, release_pixels, reserve_pixels

    split, shard, case = element
    t0 = time.perf_counter()
    try:
        begin_case()
        try:
            if opts.image_size is not None:  # the resized copy counts too (reserved before decoding)
                reserve_pixels(opts.image_size[0] * opts.image_size[1])
            record, stats = encode_case(layout.load_case(case), case, opts)
        finally:
            release_pixels()
    except BadCase as e:
        return "rejected", {"file": e.path, "reason": e.reason, "case_id": case.case_id, "split": split}, 0
    except Exception as e:  # noqa: BLE001 - one bad file must not kill a many-hour job
        # One line in the log (the reason is also in rejected.jsonl); the traceback with -v.
        log.warning("%s: rejected after an unexpected error: %s", case.main_path, one_line(e))
        log.debug("%s: traceback", case.main_path, exc_info=True)
        return "rejected", {"file": case.main_path, "reason": one_line(e), "case_id": case.case_id, "split": split}, 0
    if spill_dir:  # outside the try: a failing output filesystem fails the job, rejects nothing
        path = spill_path(spill_dir, split, shard, case.case_id)
        write_bytes(path, record)
        msec = int((time.perf_counter() - t0) * 1000)
        return "ok", Encoded(split, shard, case.case_id, b"", stats, path), msec
    msec = int((time.perf_counter() - t0) * 1000)
    return "ok", Encoded(split, shard, case.case_id, record, stats), msec


class LoadAndEncodeFn(beam.DoFn):
    """[(split, shard, Case), ...] (a batch) -> ``("ok", Encoded)`` each, or for unconvertible
    cases ``("rejected", {"file", "reason", "case_id", "split"})``; counted in Beam Metrics.

    One output, tagged by value rather than with Beam's TaggedOutput: the DaskRunner puts every
    output of a multi-output ParDo into one bag, so a consumer of the rejections would also get
    the examples.

    A batch is converted by a small thread pool: decoding (PIL) and compression (zlib) release
    the GIL, so one worker process keeps several cores busy without Beam's multi-process
    pickling of every record (see tools/bench_convert.py).
    """

    def __init__(self, layout: Layout, opts: EncodeOptions, threads: int = 1, spill_dir: str | None = None):
        self.layout = layout
        self.opts = opts
        self.threads = max(1, threads)
        self.spill_dir = spill_dir
        self.converted = Metrics.counter(NAMESPACE, "cases_converted")
        self.rejected = Metrics.counter(NAMESPACE, "cases_rejected")
        self.msec = Metrics.distribution(NAMESPACE, "case_msec")
        self._pool = None

    def __getstate__(self):
        return {**self.__dict__, "_pool": None}

    def setup(self):
        if self.threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="tfseg-convert")

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def process(self, batch: list[tuple[str, int, Case]]):
        run = self._pool.map if self._pool is not None and len(batch) > 1 else map
        # Metrics are updated here, in the bundle's thread: Beam ignores updates from others.
        for kind, value, msec in run(lambda e: convert_one(self.layout, self.opts, e, self.spill_dir), batch):
            if kind == "ok":
                self.converted.inc()
                self.msec.update(msec)
            else:
                self.rejected.inc()
                # One line per rejection (the full list goes to rejected.jsonl).
                log.warning("rejected %s: %s", value["file"], value["reason"])
            _progress_case(kind)
            yield kind, value


# --------------------------------------------------------------------------------------------
# Progress (issue 14 item 4).
# --------------------------------------------------------------------------------------------


class ConvertProgress(Progress):
    """Cases converted / total and rejections so far: one redrawn line on a terminal, whole lines
    (every twentieth of the cases, or 30 s) elsewhere (:class:`tfseg.progress.Progress`).

    Fed by the LoadAndEncode DoFn when it runs in the launcher's process (the DirectRunner's
    in_memory and multi_threading modes, the default); for runners whose workers are other
    processes or machines (multi_processing, Dask, Dataflow, ...) Beam offers no live counters on
    the launcher, so the bar gets the totals when the job ends (the runner's own UI shows its
    progress meanwhile).
    """

    def __init__(self, total: int, stream=None, **kwargs):
        super().__init__(total, "converting", unit="cases", stream=stream, **kwargs)
        self.rejected = 0

    def case_done(self, kind: str) -> None:
        if kind == REJECTED:
            self.rejected += 1
        self.update(1)

    def line(self) -> str:
        head, sep, rest = super().line().partition(", ")
        return f"{head} ({self.rejected} rejected){sep}{rest}"


# The launcher's bar while a job runs; None in worker processes (their updates are dropped).
_PROGRESS: ConvertProgress | None = None
_PROGRESS_LOCK = threading.Lock()


def set_progress(bar: ConvertProgress | None) -> None:
    """Points the LoadAndEncode DoFns running in this process at the launcher's bar (None: none)."""
    global _PROGRESS
    _PROGRESS = bar


def _progress_case(kind: str) -> None:
    bar = _PROGRESS
    if bar is not None:
        with _PROGRESS_LOCK:  # multi_threading: bundles in several threads
            bar.case_done(kind)


# --------------------------------------------------------------------------------------------
# The graph.
# --------------------------------------------------------------------------------------------


def default_threads() -> int:
    """Threads per worker for LoadAndEncode: the machine's cores, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def batch_cases(keyed_cases: list[tuple[str, int, Case]], size: int) -> list[list[tuple[str, int, Case]]]:
    """Cuts the case list into batches of ``size`` on the launcher (in order, so every run and
    runner sees the same batches; Beam's BatchElements emits its last batch from finish_bundle,
    which the DaskRunner drops)."""
    size = max(1, size)
    return [list(keyed_cases[i:i + size]) for i in range(0, len(keyed_cases), size)]


class ConvertCases(beam.PTransform):
    """Loads and encodes batches of cases (lists of (split, shard, Case), see
    :func:`batch_cases`); returns ``{"examples": PCollection[Encoded], "rejected":
    PCollection[dict]}``.

    Args:
      layout: the dataset layout (pickled to the workers).
      opts: validation/encoding options.
      threads: conversion threads per worker (default :func:`default_threads`).
      spill_dir: write each record there (Encoded.record_path) instead of passing its bytes on.
    """

    def __init__(self, layout: Layout, opts: EncodeOptions, threads: int | None = None, label: str | None = None,
                 spill_dir: str | None = None):
        super().__init__(label)
        self.layout = layout
        self.opts = opts
        self.threads = threads or default_threads()
        self.spill_dir = spill_dir

    def expand(self, batches):
        results = batches | "LoadAndEncode" >> beam.ParDo(
            LoadAndEncodeFn(self.layout, self.opts, self.threads, self.spill_dir))
        return {
            "examples": results | "Examples" >> beam.FlatMap(lambda kv: [kv[1]] if kv[0] == "ok" else []),
            REJECTED: results | "Rejections" >> beam.FlatMap(lambda kv: [kv[1]] if kv[0] == REJECTED else []),
        }


class GatherAll(beam.PTransform):
    """A PCollection -> one list of all its elements (nothing for an empty PCollection).

    A GroupByKey on one key rather than ``combiners.ToList``: CombineGlobally adds a side input
    for its default value, which the DaskRunner evaluates inside a task.
    """

    def expand(self, pcoll):
        return (pcoll
                | "KeyOne" >> beam.Map(lambda x: (0, x))
                | "GroupOne" >> beam.GroupByKey()
                | "Values" >> beam.Map(lambda kv: list(kv[1])))


class WriteShardFn(beam.DoFn):
    """((split, shard), [(case_id, record, record_path) | None, ...]) -> (split, file name, count),
    writing the shard with its records sorted by case id; spilled records are read one at a time
    and deleted once the shard is written."""

    def __init__(self, output_dir: str, compression: str, num_shards: dict[str, int]):
        self.output_dir = output_dir
        self.compression = compression
        self.num_shards = num_shards
        self.records = Metrics.counter(NAMESPACE, "records_written")

    def process(self, element):
        import tensorflow as tf

        (split, shard), values = element
        records = sorted((v for v in values if v is not None), key=lambda v: v[0])
        name = shard_name(split, shard, self.num_shards[split], self.compression)
        options = tf.io.TFRecordOptions(compression_type=self.compression or None)
        remote = outputs.is_remote(self.output_dir)
        if remote:
            # TF's gs:// client may not reach the store the runner's FileSystems reach (an
            # emulator, other credentials): the shard is written by TF's writer to local disk
            # (the same bytes as a local conversion) and uploaded through Beam's FileSystems.
            import tempfile

            fd, target = tempfile.mkstemp(prefix=f".{name}.", suffix=".part")
            os.close(fd)
        else:
            target = os.path.join(self.output_dir, name)
        try:
            with tf.io.TFRecordWriter(target, options=options) as writer:
                for _, record, path in records:
                    writer.write(read_bytes(path) if path else record)
            if remote:
                upload(target, outputs.join(self.output_dir, name))
        finally:
            if remote:
                with contextlib.suppress(OSError):
                    os.unlink(target)
        spilled = [path for _, _, path in records if path]
        if spilled:
            from apache_beam.io.filesystems import FileSystems

            FileSystems.delete(spilled)
        self.records.inc(len(records))
        yield split, name, len(records)


@beam.typehints.with_input_types(Encoded)
@beam.typehints.with_output_types(Tuple[str, str, int])
class WriteShards(beam.PTransform):
    """Writes every shard of every split (empty ones too, so dataset.json's list is complete)."""

    def __init__(self, output_dir: str, compression: str, num_shards: dict[str, int], label: str | None = None):
        super().__init__(label)
        self.output_dir = output_dir
        self.compression = compression
        self.num_shards = num_shards

    def expand(self, examples):
        keyed = examples | "KeyByShard" >> beam.Map(
            lambda e: ((e.split, e.shard), (e.case_id, e.record, e.record_path)))
        slots = examples.pipeline | "ShardSlots" >> beam.Create(
            [((s, i), None) for s, n in sorted(self.num_shards.items()) for i in range(n)])
        return (
            (keyed, slots)
            | "Flatten" >> beam.Flatten()
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.ParDo(WriteShardFn(self.output_dir, self.compression, self.num_shards))
        )


class SplitStatsFn(beam.CombineFn):
    """Combines CaseStats into one split's summary: count, class pixel counts, size min/max/mean
    per axis and the image formats seen."""

    def create_accumulator(self):
        return {"count": 0, "labelled": 0, "class_counts": None, "dims": None, "formats": set()}

    def add_input(self, acc, stats: CaseStats):
        acc["count"] += 1
        if stats.class_counts is not None:
            acc["labelled"] += 1
            c = np.asarray(stats.class_counts, np.int64)
            acc["class_counts"] = c if acc["class_counts"] is None else acc["class_counts"] + c
        shape = np.asarray(stats.shape, np.int64)
        if acc["dims"] is None:
            acc["dims"] = [shape.copy(), shape.copy(), shape.copy()]
        else:
            lo, hi, total = acc["dims"]
            acc["dims"] = [np.minimum(lo, shape), np.maximum(hi, shape), total + shape]
        if stats.image_format:
            acc["formats"].add(stats.image_format)
        return acc

    def merge_accumulators(self, accumulators):
        out = self.create_accumulator()
        for acc in accumulators:
            out["count"] += acc["count"]
            out["labelled"] += acc["labelled"]
            if acc["class_counts"] is not None:
                out["class_counts"] = (acc["class_counts"] if out["class_counts"] is None
                                       else out["class_counts"] + acc["class_counts"])
            if acc["dims"] is not None:
                if out["dims"] is None:
                    out["dims"] = [d.copy() for d in acc["dims"]]
                else:
                    lo, hi, total = out["dims"]
                    a_lo, a_hi, a_total = acc["dims"]
                    out["dims"] = [np.minimum(lo, a_lo), np.maximum(hi, a_hi), total + a_total]
            out["formats"] |= acc["formats"]
        return out

    def extract_output(self, acc):
        size = {}
        if acc["dims"] is not None:
            lo, hi, total = acc["dims"]
            names = ["height", "width"] if len(lo) == 2 else ["depth", "height", "width"]
            for i, name in enumerate(names):
                size[name] = {"min": int(lo[i]), "max": int(hi[i]), "mean": round(float(total[i]) / acc["count"], 2)}
        return {
            "count": acc["count"],
            "labelled": acc["labelled"],
            "class_pixel_counts": None if acc["class_counts"] is None else [int(x) for x in acc["class_counts"]],
            "size": size,
            "image_formats": sorted(acc["formats"]),
        }


def _combine_splits(pairs: list[tuple[str, CaseStats]]) -> dict:
    fn = SplitStatsFn()
    accs: dict[str, Any] = {}
    for split, stats in pairs:
        accs[split] = fn.add_input(accs.get(split) or fn.create_accumulator(), stats)
    return {split: fn.extract_output(acc) for split, acc in sorted(accs.items())}


@beam.typehints.with_input_types(Encoded)
class SummarizeSplits(beam.PTransform):
    """Encoded -> one dict {split: SplitStatsFn output}.

    Gathered on one key and combined in one call rather than with CombinePerKey (per-case
    statistics are a few numbers): the DaskRunner produced no output for CombinePerKey.
    """

    def expand(self, examples):
        return (
            examples
            | "KeyBySplit" >> beam.Map(lambda e: (e.split, e.stats))
            | "Gather" >> GatherAll()
            | "CombinePerSplit" >> beam.Map(_combine_splits)
        )


class _WriteJson(beam.DoFn):
    def __init__(self, path: str, jsonl: bool = False):
        self.path = path
        self.jsonl = jsonl

    def process(self, obj):
        if self.jsonl:
            text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in obj)
        else:
            text = json.dumps(obj, sort_keys=True)
        if outputs.is_remote(self.path):
            write_bytes(self.path, text.encode("utf-8"))
        else:
            with open(self.path, "w") as f:
                f.write(text)
        yield self.path


@beam.typehints.with_input_types(Dict[str, Any])
class WriteRejected(beam.PTransform):
    """Rejections -> rejected.jsonl, sorted by file so reruns give the same file."""

    def __init__(self, path: str, label: str | None = None):
        super().__init__(label)
        self.path = path

    def expand(self, rejected):
        return (
            rejected
            | "ToList" >> GatherAll()
            | "Sort" >> beam.Map(lambda rows: sorted(rows, key=lambda r: (r["file"], r["case_id"], r["reason"])))
            | "Write" >> beam.ParDo(_WriteJson(self.path, jsonl=True))
        )


def build_pipeline(p, layout: Layout, keyed_cases: list[tuple[str, int, Case]], opts: EncodeOptions,
                   output_dir: str, num_shards: dict[str, int], compression: str, threads: int | None = None,
                   spill: bool = True) -> None:
    """Adds the conversion graph to pipeline ``p`` (outputs land in ``output_dir``).

    With ``spill`` (the default) each record goes to a file under ``output_dir/_records`` and only
    its path travels through the shuffle, so memory does not grow with the dataset (the
    DirectRunner keeps whole PCollections in memory); the files are deleted as shards are written.
    """
    spill_dir = _join(output_dir, SPILL_DIR) if spill else None
    outputs = (
        p
        | "CreateBatches" >> beam.Create(batch_cases(keyed_cases, 2 * (threads or default_threads())))
        | "ConvertCases" >> ConvertCases(layout, opts, threads, spill_dir=spill_dir)
    )
    examples = outputs["examples"]
    shards = examples | "WriteShards" >> WriteShards(output_dir, compression, num_shards)
    shard_list = (shards | "ShardsToList" >> GatherAll()
                  | "WriteShardList" >> beam.ParDo(_WriteJson(_join(output_dir, SHARDS_FILE))))
    stats = (examples | "SummarizeSplits" >> SummarizeSplits()
             | "WriteStats" >> beam.ParDo(_WriteJson(_join(output_dir, STATS_FILE))))
    rejected = outputs[REJECTED] | "WriteRejected" >> WriteRejected(_join(output_dir, schema.REJECTED_JSONL))
    # One sink that depends on every branch, applied last: the DaskRunner computes only the last
    # transform's graph, so a branch no later transform reads would never run there.
    ((shard_list, stats, rejected) | "AllWritten" >> beam.Flatten()
     | "Done" >> beam.Map(lambda path: path.rstrip("/").rsplit("/", 1)[-1]))


def _join(path: str, *parts: str) -> str:
    from tfseg.outputs import join

    return join(path, *parts)
