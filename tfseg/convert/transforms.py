"""The conversion job's Beam graph: load and encode cases, write shards, statistics, rejections.

Graph (all named PTransforms, added by :func:`build_pipeline`)::

    Create(batches: ((split, shard, index), [(split, shard, Case), ...]), cut on the launcher,
           each of one shard, consecutive by case id)
      -> ConvertBatches (EncodeBatch DoFn: the batch's records -> one fragment file under
         _records/; out goes one small BatchResult: fragment path, count, the batch's split
         statistics accumulator, its rejections)
      -> WriteShards: key (split, shard) + an empty slot per shard -> GroupByKey -> each shard
         written from its fragments in batch order, its summary (count, statistics
         accumulator, rejections) to _shards/SPLIT-SHARD.json
    then the launcher merges the summaries (read_summaries): dataset.json's counts and
    statistics, rejected.jsonl

Shard keys come from a stable hash of the case id (:mod:`tfseg.convert.shards`) and each shard's
records are in case-id order (batches are consecutive id ranges of one shard, written in order),
so converting the same input twice gives byte-identical shards whatever the runner's bundling
(Beam's WriteToTFRecord starts bundles at random shards, hence not used); records are serialized
deterministically (schema), so the bytes are the same in every process too.

What crosses the one shuffle is one small element per batch, never a record: on a distributed
runner every shuffled element is serialized and every GroupByKey is a dask task shuffle whose
task count grows with the partitions (tools/bench_convert.py --scaling: the per-case graph, with
four shuffles, took 27-41x the in-process CPU per case on Dask).

The graph avoids what Beam's DaskRunner does not support, so the same job runs there: no
multi-output ParDo (Dask merges tagged outputs into one bag), no output from finish_bundle
(dropped; hence batches cut on the launcher instead of BatchElements), no CombineGlobally or
CombinePerKey (side inputs / no output), and one final transform that reads every branch (Dask
computes only the last transform's graph): here the graph is one chain.

DoFns and the functions they call are module-level, so Beam can pickle them to its workers.
:class:`ConvertCases` (per-case output, records in the elements) is the composable form for
pipelines that embed the conversion. Progress (:class:`ConvertProgress`) counts cases as the
EncodeBatch or LoadAndEncode DoFn finishes them when it runs in the launcher's process (:func:`set_progress`); other runners report their totals when the
job ends.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import threading
import time
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from tfseg.convert.base import BadCase, Case, Layout
from tfseg.convert.checks import one_line
from tfseg.convert.encode import CaseStats, Encoded, EncodeOptions, encode_case
from tfseg.convert.shards import (
    SPILL_DIR,
    fragment_path,
    open_write,
    read_frames,
    shard_name,
    upload,
    write_bytes,
    write_frame,
    write_tfrecord,
)
from tfseg.io import fs
from tfseg.progress import Progress

log = logging.getLogger(__name__)

NAMESPACE = "tfseg.convert"
SUMMARY_DIR = "_shards"  # one summary a shard (count, statistics, rejections) until the launcher merges them
REJECTED = "rejected"


def convert_one(layout: Layout, opts: EncodeOptions, element: tuple[str, int, Case]):
    """Loads and encodes one case: ``("ok", Encoded, msec)`` or ``("rejected", row, msec)``.

    Thread-safe (layouts load with PIL/scipy/nibabel, which release the GIL while decoding).
    The case's pixels count against the worker's pixel budget (:mod:`tfseg.convert.base`) until
    it is encoded.
    """
    from tfseg.convert.base import _pil_reason, begin_case, release_pixels, reserve_pixels

    split, shard, case = element
    t0 = time.perf_counter()
    try:
        begin_case()
        try:
            try:  # the id is stored as the record's source_id, in UTF-8
                case.case_id.encode("utf-8")
            except UnicodeEncodeError:
                raise BadCase(case.main_path, "file name is not valid UTF-8 (rename it; its id is stored as UTF-8)") from None
            if opts.image_size is not None:  # the resized copy counts too (reserved before decoding)
                reserve_pixels(opts.image_size[0] * opts.image_size[1])
            with fs.beam_filesystems():  # inputs on gs://, s3://, hdfs:// through Beam, in any worker
                record, stats = encode_case(layout.load_case(case), case, opts)
        finally:
            release_pixels()
    except BadCase as e:
        return "rejected", {"file": e.path, "reason": e.reason, "case_id": case.case_id, "split": split}, 0
    except Exception as e:  # noqa: BLE001 - one bad file must not kill a many-hour job
        if type(e).__name__ == "DecompressionBombError":  # PIL's, from a reader that opens a file itself
            reason = f"decompression bomb rejected ({_pil_reason(e)})"
            return "rejected", {"file": case.main_path, "reason": reason, "case_id": case.case_id, "split": split}, 0
        # One line in the log (the reason is also in rejected.jsonl); the traceback with -v.
        log.warning("%s: rejected after an unexpected error: %s", case.main_path, one_line(e))
        log.debug("%s: traceback", case.main_path, exc_info=True)
        return "rejected", {"file": case.main_path, "reason": one_line(e), "case_id": case.case_id, "split": split}, 0
    msec = int((time.perf_counter() - t0) * 1000)
    return "ok", Encoded(split, shard, case.case_id, record, stats), msec


class _ThreadedConvert:
    """A DoFn's conversion threads: cases of a batch converted by a small pool, results in order
    with at most ``2 x threads`` of them held at once (a batch may be hundreds of cases)."""

    def __init__(self, threads: int):
        self.threads = max(1, threads)
        self._pool = None

    def __getstate__(self):
        return {**self.__dict__, "_pool": None}

    def setup(self):
        if self.threads > 1 and self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="tfseg-convert")

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def map(self, fn, items: list):
        if self._pool is None or len(items) < 2:
            yield from map(fn, items)
            return
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(self._pool.submit(fn, item))
            if len(pending) >= 2 * self.threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class _ConvertingFn(beam.DoFn):
    """Converts cases on a small thread pool and counts them in Beam Metrics (the base of
    :class:`LoadAndEncodeFn` and :class:`EncodeBatchFn`)."""

    def __init__(self, layout: Layout, opts: EncodeOptions, threads: int = 1):
        self.layout = layout
        self.opts = opts
        self.pool = _ThreadedConvert(threads)
        self.converted = Metrics.counter(NAMESPACE, "cases_converted")
        self.rejected = Metrics.counter(NAMESPACE, "cases_rejected")
        self.msec = Metrics.distribution(NAMESPACE, "case_msec")

    def setup(self):
        self.pool.setup()

    def teardown(self):
        self.pool.teardown()


class LoadAndEncodeFn(_ConvertingFn):
    """[(split, shard, Case), ...] (a batch) -> ``("ok", Encoded)`` each, or for unconvertible
    cases ``("rejected", {"file", "reason", "case_id", "split"})``; counted in Beam Metrics.

    One output, tagged by value rather than with Beam's TaggedOutput: the DaskRunner puts every
    output of a multi-output ParDo into one bag, so a consumer of the rejections would also get
    the examples.

    A batch is converted by a small thread pool: decoding (PIL) and compression (zlib) release
    the GIL, so one worker process keeps several cores busy without Beam's multi-process
    pickling of every record (see tools/bench_convert.py).
    """

    def process(self, batch: list[tuple[str, int, Case]]):
        # Metrics are updated here, in the bundle's thread: Beam ignores updates from others.
        for kind, value, msec in self.pool.map(lambda e: convert_one(self.layout, self.opts, e), batch):
            _count_case(self, kind, value, msec)
            yield kind, value


def _count_case(fn, kind: str, value, msec: int) -> None:
    if kind == "ok":
        fn.converted.inc()
        fn.msec.update(msec)
    else:
        fn.rejected.inc()
        # One line per rejection (the full list goes to rejected.jsonl).
        log.warning("rejected %s: %s", value["file"], value["reason"])
    _progress_case(kind)


class BatchResult(NamedTuple):
    """What a converted batch passes on (its records are in ``fragment``).

    Attributes:
      split, shard, index: the batch's key (:func:`cut_batches`).
      fragment: the fragment file holding its records ("" when every case was rejected).
      count: records in the fragment.
      stats: :class:`SplitStatsFn` accumulator of those records, or None.
      rejected: the rejected cases' rows.
    """

    split: str
    shard: int
    index: int
    fragment: str
    count: int
    stats: Any
    rejected: tuple


class EncodeBatchFn(_ConvertingFn):
    """((split, shard, index), [(split, shard, Case), ...]) -> one :class:`BatchResult`: the
    batch's records, in case-id order, written to its fragment by this worker; counted in Beam
    Metrics like :class:`LoadAndEncodeFn`."""

    def __init__(self, layout: Layout, opts: EncodeOptions, spill_dir: str, threads: int = 1):
        super().__init__(layout, opts, threads)
        self.spill_dir = spill_dir

    def process(self, element):
        (split, shard, index), batch = element
        stats_fn = SplitStatsFn()
        acc, rejected, count = None, [], 0
        path = fragment_path(self.spill_dir, split, shard, index)
        f = None
        try:
            for kind, value, msec in self.pool.map(lambda e: convert_one(self.layout, self.opts, e), batch):
                _count_case(self, kind, value, msec)
                if kind != "ok":
                    rejected.append(value)
                    continue
                if f is None:  # a failing output filesystem fails the job, rejects nothing
                    f = open_write(path)
                write_frame(f, value.record)
                acc = stats_fn.add_input(acc if acc is not None else stats_fn.create_accumulator(), value.stats)
                count += 1
        finally:
            if f is not None:
                f.close()
        yield BatchResult(split, shard, index, path if count else "", count, acc, tuple(rejected))


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


# Batches a job is cut into, at most (more when shards split them): enough for a few per worker
# thread on a small cluster, few enough that the runner's per-batch costs (a dask task and its
# shuffle tasks, a bundle, a fragment file) stay small beside the cases (bench_convert --scaling).
TARGET_BATCHES = 64


def batch_size(n_cases: int, threads: int, target: int = TARGET_BATCHES) -> int:
    """Cases a batch holds: enough for the DoFn's ``threads`` and the job cut into about
    ``target`` batches."""
    return max(2 * max(1, threads), math.ceil(n_cases / max(1, target)))


def cut_batches(keyed_cases: list[tuple[str, int, Case]], size: int
                ) -> list[tuple[tuple[str, int, int], list[tuple[str, int, Case]]]]:
    """((split, shard, index), cases) batches of at most ``size`` cases, each of one shard and
    consecutive in case-id order, so a shard is its batches' records in index order. Cut on the
    launcher: every run and runner sees the same batches."""
    groups: dict[tuple[str, int], list] = {}
    for split, shard, case in sorted(keyed_cases, key=lambda e: (e[0], e[1], e[2].case_id)):
        groups.setdefault((split, shard), []).append((split, shard, case))
    size = max(1, size)
    return [((split, shard, i // size), cases[i:i + size])
            for (split, shard), cases in sorted(groups.items()) for i in range(0, len(cases), size)]


class ConvertCases(beam.PTransform):
    """Loads and encodes batches of cases (lists of (split, shard, Case), see
    :func:`batch_cases`); returns ``{"examples": PCollection[Encoded], "rejected":
    PCollection[dict]}``: the per-case form, records in the elements, for pipelines that embed
    the conversion (the convert job itself uses :class:`ConvertBatches`).

    Args:
      layout: the dataset layout (pickled to the workers).
      opts: validation/encoding options.
      threads: conversion threads per worker (default :func:`default_threads`).
    """

    def __init__(self, layout: Layout, opts: EncodeOptions, threads: int | None = None, label: str | None = None):
        super().__init__(label)
        self.layout = layout
        self.opts = opts
        self.threads = threads or default_threads()

    def expand(self, batches):
        results = batches | "LoadAndEncode" >> beam.ParDo(LoadAndEncodeFn(self.layout, self.opts, self.threads))
        return {
            "examples": results | "Examples" >> beam.FlatMap(lambda kv: [kv[1]] if kv[0] == "ok" else []),
            REJECTED: results | "Rejections" >> beam.FlatMap(lambda kv: [kv[1]] if kv[0] == REJECTED else []),
        }


class ConvertBatches(beam.PTransform):
    """Batches from :func:`cut_batches` -> one :class:`BatchResult` each, the records written
    to fragments under ``spill_dir`` by the workers that encode them."""

    def __init__(self, layout: Layout, opts: EncodeOptions, spill_dir: str, threads: int | None = None,
                 label: str | None = None):
        super().__init__(label)
        self.layout = layout
        self.opts = opts
        self.spill_dir = spill_dir
        self.threads = threads or default_threads()

    def expand(self, batches):
        return batches | "EncodeBatch" >> beam.ParDo(
            EncodeBatchFn(self.layout, self.opts, self.spill_dir, self.threads))


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
    """((split, shard), [BatchResult | None, ...]) -> the shard's file name, writing the shard
    from its batches' fragments in index order (so in case-id order) and its summary (count,
    statistics accumulator, rejections) to ``_shards/SPLIT-SHARD.json``; fragments are deleted
    once the shard is written."""

    def __init__(self, output_dir: str, compression: str, num_shards: dict[str, int]):
        self.output_dir = output_dir
        self.compression = compression
        self.num_shards = num_shards
        self.records = Metrics.counter(NAMESPACE, "records_written")

    def process(self, element):
        (split, shard), values = element
        batches = sorted((v for v in values if v is not None), key=lambda b: b.index)
        name = shard_name(split, shard, self.num_shards[split], self.compression)
        records = (record for b in batches if b.fragment for record in read_frames(b.fragment))
        if self.compression:
            count = self._write_with_tf(name, records)
        else:
            # Framed here as TF's writer frames them (the same bytes; no TensorFlow import in
            # the workers, seconds of each multi_processing worker's start-up), straight to
            # the output's filesystem.
            count = 0
            with open_write(fs.join(self.output_dir, name)) as f:
                for record in records:
                    write_tfrecord(f, record)
                    count += 1
        if count != sum(b.count for b in batches):
            raise OSError(f"{name}: {count} records in its fragments, {sum(b.count for b in batches)} expected")
        fragments = [b.fragment for b in batches if b.fragment]
        if fragments:
            from apache_beam.io.filesystems import FileSystems

            FileSystems.delete(fragments)
        stats_fn = SplitStatsFn()
        accs = [b.stats for b in batches if b.stats is not None]
        acc = stats_fn.merge_accumulators(accs) if accs else None
        rejected = [r for b in batches for r in b.rejected]
        # The shard's summary goes to a small file the launcher merges: a gather of every
        # shard's result would be one more dask task shuffle over all the batch partitions.
        summary = {"split": split, "name": name, "count": count, "stats": _acc_to_json(acc), "rejected": rejected}
        _write_text(fs.join(self.output_dir, SUMMARY_DIR, f"{split}-{shard:05d}.json"),
                    json.dumps(summary, sort_keys=True))
        self.records.inc(count)
        yield name

    def _write_with_tf(self, name: str, records) -> int:
        """A compressed shard, by TF's TFRecordWriter (its gzip stream is the reference bytes)."""
        import tensorflow as tf

        options = tf.io.TFRecordOptions(compression_type=self.compression)
        remote = fs.is_remote(self.output_dir)
        if remote:
            # TF's gs:// client may not reach the store the runner's FileSystems reach (an
            # emulator, other credentials): written to local disk and uploaded through Beam's.
            import tempfile

            fd, target = tempfile.mkstemp(prefix=f".{name}.", suffix=".part")
            os.close(fd)
        else:
            target = os.path.join(self.output_dir, name)
        count = 0
        try:
            with tf.io.TFRecordWriter(target, options=options) as writer:
                for record in records:
                    writer.write(record)
                    count += 1
            if remote:
                upload(target, fs.join(self.output_dir, name))
        finally:
            if remote:
                with contextlib.suppress(OSError):
                    os.unlink(target)
        return count


@beam.typehints.with_input_types(BatchResult)
@beam.typehints.with_output_types(str)
class WriteShards(beam.PTransform):
    """Writes every shard of every split (empty ones too, so dataset.json's list is complete)."""

    def __init__(self, output_dir: str, compression: str, num_shards: dict[str, int], label: str | None = None):
        super().__init__(label)
        self.output_dir = output_dir
        self.compression = compression
        self.num_shards = num_shards

    def expand(self, batches):
        keyed = batches | "KeyByShard" >> beam.Map(lambda b: ((b.split, b.shard), b))
        slots = batches.pipeline | "ShardSlots" >> beam.Create(
            [((s, i), None) for s, n in sorted(self.num_shards.items()) for i in range(n)])
        return (
            (keyed, slots)
            | "Flatten" >> beam.Flatten()
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.ParDo(WriteShardFn(self.output_dir, self.compression, self.num_shards))
        )


class SplitStatsFn(beam.CombineFn):
    """Combines CaseStats into one split's summary: count, class pixel counts, size min/max/mean
    per axis, the image formats seen and how many photos were turned by their EXIF orientation."""

    def create_accumulator(self):
        return {"count": 0, "labelled": 0, "class_counts": None, "dims": None, "formats": set(), "turned": 0}

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
        acc["turned"] += stats.exif_orientation != 1
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
            out["turned"] += acc["turned"]
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
            "exif_oriented": acc["turned"],
        }


def _write_text(path: str, text: str) -> None:
    if fs.is_remote(path):
        write_bytes(path, text.encode("utf-8"))
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def _acc_to_json(acc) -> dict | None:
    """A :class:`SplitStatsFn` accumulator as JSON (integers and lists)."""
    if acc is None:
        return None
    return {"count": acc["count"], "labelled": acc["labelled"],
            "class_counts": None if acc["class_counts"] is None else [int(x) for x in acc["class_counts"]],
            "dims": None if acc["dims"] is None else [[int(x) for x in d] for d in acc["dims"]],
            "formats": sorted(acc["formats"]), "turned": acc["turned"]}


def _acc_from_json(obj: dict) -> dict:
    return {"count": obj["count"], "labelled": obj["labelled"],
            "class_counts": None if obj["class_counts"] is None else np.asarray(obj["class_counts"], np.int64),
            "dims": None if obj["dims"] is None else [np.asarray(d, np.int64) for d in obj["dims"]],
            "formats": set(obj["formats"]), "turned": obj.get("turned", 0)}


def read_summaries(output_dir: str) -> tuple[list[list], dict, list[dict]]:
    """Merges the shards' summaries (``_shards/*.json``, written by :class:`WriteShardFn`) and
    removes them; returns (written: [split, file name, count] rows, stats: {split:
    SplitStatsFn output} for the splits with records, rejected rows sorted by file)."""
    folder = fs.join(output_dir, SUMMARY_DIR)
    if not fs.exists(folder):
        return [], {}, []
    docs = [json.loads(fs.read_text(fs.join(folder, name))) for name in fs.listdir(folder)
            if name.endswith(".json")]
    fs.rmtree(folder)
    fn = SplitStatsFn()
    by_split: dict[str, list] = {}
    for d in docs:
        if d["stats"] is not None:
            by_split.setdefault(d["split"], []).append(_acc_from_json(d["stats"]))
    stats = {split: fn.extract_output(fn.merge_accumulators(accs)) for split, accs in sorted(by_split.items())}
    stats = json.loads(json.dumps(stats, sort_keys=True))  # dataset.json's key order, as before
    written = sorted([d["split"], d["name"], d["count"]] for d in docs)
    rows = sorted((r for d in docs for r in d["rejected"]), key=lambda r: (r["file"], r["case_id"], r["reason"]))
    return written, stats, rows


def build_pipeline(p, layout: Layout, keyed_cases: list[tuple[str, int, Case]], opts: EncodeOptions,
                   output_dir: str, num_shards: dict[str, int], compression: str, threads: int | None = None,
                   batches: list | None = None) -> None:
    """Adds the conversion graph to pipeline ``p`` (outputs land in ``output_dir``; the
    launcher merges the shards' summaries with :func:`read_summaries` after the job).

    Records go to batch fragments under ``output_dir/_records`` (deleted as shards are written)
    and only one small result per batch travels through the one shuffle, so memory does not
    grow with the dataset (the DirectRunner keeps whole PCollections in memory) and a
    distributed runner shuffles no pixel data.

    Args:
      batches: :func:`cut_batches` output (default: cut with :func:`batch_size`).
    """
    threads = threads or default_threads()
    if batches is None:
        batches = cut_batches(keyed_cases, batch_size(len(keyed_cases), threads))
    (p
     | "CreateBatches" >> beam.Create(batches)
     | "ConvertBatches" >> ConvertBatches(layout, opts, fs.join(output_dir, SPILL_DIR), threads)
     | "WriteShards" >> WriteShards(output_dir, compression, num_shards))
