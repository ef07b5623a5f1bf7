"""The convert stage as an Apache Beam job: a dataset layout -> sharded TFRecords + dataset.json.

Everything that is the same for every layout lives here: validation (size mismatch, labels out
of range, undecodable files), optional resizing, encoding, class pixel counts and size
statistics (Beam combiners, in the same pass), deterministic sharding and atomic publication.
Layouts (:mod:`tfseg.convert.base`) only list and load cases.

Graph (all named PTransforms)::

    Create(batches of (split, shard, Case)) -> ConvertCases (LoadAndEncode DoFn -> ("ok", Encoded)
        | ("rejected", row); each record spilled to _records/ and passed on as its path)
      examples -> WriteShards:  key (split, shard) -> GroupByKey -> write each shard sorted by id
      examples -> SummarizeSplits: gathered, SplitStatsFn per split -> _stats.json
      rejected -> WriteRejected: sorted -> rejected.jsonl
      (shard list, stats, rejected) -> Flatten -> Done   (one sink that depends on everything)

Shard keys come from a stable hash of the case id and each shard's records are sorted by case
id, so converting the same input twice gives byte-identical shards whatever the runner's
bundling (Beam's WriteToTFRecord starts bundles at random shards, hence not used); records are
serialized deterministically (schema), so the bytes are the same in every process too.

The graph avoids what Beam's DaskRunner does not support, so the same job runs there: no
multi-output ParDo (Dask merges tagged outputs into one bag), no output from finish_bundle
(dropped; hence batches cut on the launcher instead of BatchElements), no CombineGlobally or
CombinePerKey (side inputs / no output), and one final transform that reads every branch (Dask
computes only the last transform's graph).

Run embedded (DirectRunner, in-memory: measured fastest on a 2-core machine, see
tools/bench_convert.py)::

    tfseg convert --dataset carvana --input data/carvana --output out/carvana

Beam options after the tfseg ones go to PipelineOptions, e.g.::

    tfseg convert ... --direct_running_mode=multi_threading --direct_num_workers=4
    tfseg convert ... --runner=DataflowRunner --project=P --region=R --temp_location=gs://b/tmp
    tfseg convert ... --runner dask --dask_client_address=tcp://scheduler:8786

(A cluster runner needs ``--output`` on a filesystem its workers share.)

Remote paths (gs://, s3://, hdfs://) go through Beam's ``FileSystems`` only, on the launcher
(listing, ownership checks, publishing: :func:`tfseg.outputs.beam_filesystems`) and in the
workers (reading inputs, spilled records, JSON files; shards are written by TF's TFRecordWriter to
the worker's disk and uploaded, so their bytes equal a local conversion's). TF's own gs:// client
is never used here (it ignores ``STORAGE_EMULATOR_HOST`` and the runner's credentials). A remote
output is staged in a sibling folder of the same bucket, where the workers write.

Progress (:class:`ConvertProgress`, on stderr from the CLI) counts cases as the LoadAndEncode DoFn
finishes them when it runs in the launcher's process (DirectRunner in_memory/multi_threading);
other runners report their totals when the job ends.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import threading
import time
from typing import Any, Iterable

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.typehints import Dict, Tuple

from tfseg import outputs, preprocess, schema
from tfseg.convert.base import BadCase, Case, Layout, LayoutInfo, assign_split, parse_split_spec
from tfseg.convert.checks import (
    NothingConverted,
    check_image_size,
    check_input,
    check_remote_path,
    no_case_message,
    one_line,
)
from tfseg.convert.encode import CaseStats, EncodeOptions, Encoded, encode_case
from tfseg.convert.shards import (
    SPILL_DIR,
    count_shards,
    file_bytes,
    read_bytes,
    shard_name,
    shard_of,
    spill_path,
    upload,
    write_bytes,
)
from tfseg.errors import TfsegError
from tfseg.progress import Progress

log = logging.getLogger(__name__)

NAMESPACE = "tfseg.convert"
STATS_FILE = "_stats.json"
SHARDS_FILE = "_shards.json"


# --------------------------------------------------------------------------------------------
# Beam transforms.
# --------------------------------------------------------------------------------------------

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


def _progress_case(kind: str) -> None:
    bar = _PROGRESS
    if bar is not None:
        with _PROGRESS_LOCK:  # multi_threading: bundles in several threads
            bar.case_done(kind)


def in_launcher_process(options) -> bool:
    from apache_beam.options.pipeline_options import DirectOptions

    mode = options.view_as(DirectOptions).direct_running_mode
    return runner_name(options) in ("DirectRunner", "SwitchingDirectRunner") and mode in ("in_memory",
                                                                                         "multi_threading")


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


# --------------------------------------------------------------------------------------------
# Launcher.
# --------------------------------------------------------------------------------------------


def make_layout(layout_name: str, layout_options: dict | None = None) -> Layout:
    """Instantiates a layout with the options it accepts.

    Raises:
      TfsegError: unknown layout, or an option the layout does not take.
    """
    from tfseg.convert import get_layout_class

    cls = get_layout_class(layout_name)
    options = {k: v for k, v in (layout_options or {}).items() if v is not None}
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in options:
        if key not in params and not takes_any:
            raise TfsegError(f"--{key.replace('_', '-')} does not apply to --dataset {layout_name}")
    return cls(**options)


# Short runner names (case-insensitive) beside Beam's own table, which lacks the DaskRunner.
_EXTRA_RUNNERS = {"daskrunner": "apache_beam.runners.dask.dask_runner.DaskRunner"}
_SHOWN_RUNNERS = "direct, dask, dataflow, flink, spark, prism, portable"


def resolve_runner(name: str) -> str:
    """A ``--runner`` value -> the name Beam's create_runner accepts, checked now.

    ``dask``, ``direct``, ``dataflow``, ``flink``, ``spark`` (any case, with or without
    ``Runner``), Beam's own names, or a fully qualified PipelineRunner class.

    Raises:
      TfsegError: an unknown runner, or one whose module does not import (its extra is missing).
    """
    import importlib

    from apache_beam.runners.runner import _RUNNER_MAP

    table = {**_RUNNER_MAP, **_EXTRA_RUNNERS}
    key = name.strip().lower()
    qualified = table.get(key) or table.get(key + "runner")
    if qualified is None:
        if "." not in name:
            raise TfsegError(f"--runner {name}: unknown Beam runner; known: {_SHOWN_RUNNERS} "
                             "(any case), or a fully qualified PipelineRunner class")
        qualified = name.strip()
    module, _, cls = qualified.rpartition(".")
    try:
        runner_cls = getattr(importlib.import_module(module), cls)
    except ImportError as e:
        extra = {"dask": ' (pip install "dask[distributed]")', "dataflow": " (pip install 'apache-beam[gcp]')",
                 "interactive": " (pip install 'apache-beam[interactive]')"}
        hint = next((h for k, h in extra.items() if k in qualified.lower()), "")
        raise TfsegError(f"--runner {name}: cannot load {qualified}: {one_line(e)}{hint}") from None
    except AttributeError:
        raise TfsegError(f"--runner {name}: {module} has no {cls}") from None
    from apache_beam.runners.runner import PipelineRunner

    if not (isinstance(runner_cls, type) and issubclass(runner_cls, PipelineRunner)):
        raise TfsegError(f"--runner {name}: {qualified} is not a Beam PipelineRunner")
    # Beam's own names stay as its table spells them; the others are passed fully qualified.
    return cls if (key in _RUNNER_MAP or key + "runner" in _RUNNER_MAP) else qualified


def _option_parser():
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    class Parser(_BeamArgumentParser):
        def error(self, message):  # argparse would print usage and exit
            raise TfsegError(f"Beam option: {message}")

    parser = Parser(allow_abbrev=False, add_help=False)
    seen = {}
    for cls in PipelineOptions.__subclasses__():
        seen.setdefault(str(cls), cls)
    for cls in seen.values():
        cls._add_argparse_args(parser)  # what PipelineOptions.get_all_options parses with
    return parser


def check_beam_args(beam_args: Iterable[str], tfseg_options: Iterable[str] = ()) -> list[str]:
    """Validates the arguments tfseg passes to Beam and normalizes ``--runner``.

    Every option must be one Beam's PipelineOptions knows (Beam itself only warns and drops the
    rest, so a misspelled tfseg flag would be ignored).

    Args:
      beam_args: the arguments tfseg did not recognize.
      tfseg_options: the command's own option names, for a "did you mean" hint.

    Returns:
      The arguments with the runner name resolved (:func:`resolve_runner`).

    Raises:
      TfsegError: an option neither tfseg nor Beam knows, a bad value, or an unknown runner.
    """
    import difflib

    args = list(beam_args)
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a == "--runner" and i + 1 < len(args):
            out += ["--runner", resolve_runner(args[i + 1])]
            i += 2
            continue
        if a.startswith("--runner="):
            out.append("--runner=" + resolve_runner(a.split("=", 1)[1]))
        else:
            out.append(a)
        i += 1
    if any(a.startswith("--dask_") for a in out):
        try:  # registers DaskOptions, so its flags are known whatever the runner
            import apache_beam.runners.dask.dask_runner  # noqa: F401
        except ImportError:
            pass
    parser = _option_parser()
    _, unknown = parser.parse_known_args(out)
    flags = [u for u in unknown if u.startswith("-")]
    if flags or unknown:
        bad = (flags or unknown)[0]
        name = bad.split("=", 1)[0]
        known = list(tfseg_options) + list(parser._option_string_actions)
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        norm = name.replace("_", "-")
        close = close or [k for k in tfseg_options if k.replace("_", "-") == norm]
        hint = f" (did you mean {close[0]}?)" if close else ""
        what = "unknown option" if bad.startswith("-") else "unexpected argument"
        raise TfsegError(f"{what} {bad!r}: neither tfseg nor Beam's PipelineOptions knows it{hint}")
    return out


def pipeline_options(beam_args: Iterable[str]):
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

    args = check_beam_args(beam_args)
    runner = next((a.split("=", 1)[1] if "=" in a else args[i + 1]
                   for i, a in enumerate(args) if a.split("=", 1)[0] == "--runner" and ("=" in a or i + 1 < len(args))),
                  None)
    options = PipelineOptions(args)
    given = " ".join(args)
    if "--runner" not in given:
        options.view_as(StandardOptions).runner = "DirectRunner"
    if "--direct_running_mode" not in given:
        # In-memory (one worker, which converts with its own thread pool) measured fastest on
        # 2 cores (tools/bench_convert.py); multi_processing pays for pickling every record
        # between processes.
        options.view_as(DirectOptions).direct_running_mode = "in_memory"
    if runner and "direct" not in runner.lower():
        # What the runner would refuse at p.run() with a traceback (Dataflow's project, region,
        # temp_location, ...), refused now in one line.
        from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
        from apache_beam.runners.runner import create_runner

        errors = PipelineOptionsValidator(options, create_runner(runner)).validate()
        if errors:
            raise TfsegError(f"--runner {runner}: " + "; ".join(e.strip().rstrip(".") for e in errors))
    return options


def runner_name(options) -> str:
    from apache_beam.options.pipeline_options import StandardOptions

    return str(options.view_as(StandardOptions).runner or "DirectRunner").rpartition(".")[2]


def dask_partitions(options, n_batches: int) -> None:
    """On the DaskRunner, one dask partition per batch of cases (at most 256) unless the user set
    ``--dask_npartitions`` / ``--dask_partition_size``: Beam's default of 128 elements a
    partition would convert every batch in one task, on one worker."""
    from apache_beam.options.pipeline_options import StandardOptions

    if "dask" not in str(options.view_as(StandardOptions).runner or "").lower():
        return
    from apache_beam.runners.dask.dask_runner import DaskOptions

    dask = options.view_as(DaskOptions)
    if not dask.npartitions and not dask.partition_size:
        dask.npartitions = max(1, min(256, n_batches))


_SCRATCH_PREFIX = "tfseg-beam-"


@contextlib.contextmanager
def beam_scratch_dir():
    """Points ``tempfile`` (and ``$TMPDIR`` for worker processes) at a private folder while the
    Beam job runs, and removes it afterwards: Beam's runners leave empty ``beam-temp*``,
    ``beam-requirements-cache`` and ``tmp*`` folders in the temp dir otherwise. Folders of
    killed runs (their process id no longer alive) are removed by the next run.
    """
    import shutil
    import tempfile

    base = tempfile.gettempdir()
    for name in os.listdir(base):
        if name.startswith(_SCRATCH_PREFIX):
            pid = name[len(_SCRATCH_PREFIX):].split("-", 1)[0]
            if pid.isdigit() and not outputs.pid_alive(int(pid)):
                shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    scratch = tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-", dir=base)
    old_tempdir, old_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = scratch
    os.environ["TMPDIR"] = scratch
    try:
        yield scratch
    finally:
        tempfile.tempdir = old_tempdir
        if old_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env
        shutil.rmtree(scratch, ignore_errors=True)


def run_convert(
    layout_name: str,
    input_dir: str,
    output_dir: str,
    *,
    layout_options: dict | None = None,
    split: str = "train=0.8,val=0.1,test=0.1",
    image_size: tuple[int, int] | None = None,
    num_shards: int | None = None,
    compression: str = "",
    strict: bool = False,
    overwrite: bool = False,
    beam_args: Iterable[str] = (),
    threads: int | None = None,
    progress_stream=None,
) -> dict:
    """Converts one dataset from its original layout into sharded TFRecords + dataset.json.

    Args:
      layout_name: a name in :data:`tfseg.convert.LAYOUTS`.
      input_dir: the dataset's root in its original layout.
      output_dir: where the converted dataset is published (atomically).
      layout_options: layout constructor options (``image_dir``, ``num_classes``, ...).
      split: ``NAME=FRACTION,...`` for layouts without an official split.
      image_size: (H, W) to resize 2D images (bilinear) and masks (nearest) to.
      num_shards: shards per split; default from the data size (~150 MB a shard).
      compression: ``""`` or ``"gzip"``.
      strict: any rejected case fails the conversion (nothing is published).
      overwrite: replace an existing complete output.
      beam_args: Beam PipelineOptions arguments (``--runner``, ``--direct_num_workers``, ...).
      threads: conversion threads per Beam worker (default: the machine's cores, at most 8).
      progress_stream: where to show progress (:class:`ConvertProgress`; the CLI passes stderr),
        or None.

    Returns:
      ``{"output", "splits": {split: count}, "rejected", "num_shards", "seconds"}``.

    Raises:
      TfsegError: bad input directory or options, existing output, or a rejection with strict.
      NothingConverted: every case was rejected (nothing is published; an older output stays).
    """
    t0 = time.time()
    # Scheme paths (gs://, s3://, hdfs://) go through Beam's FileSystems, on the launcher too.
    input_dir = str(input_dir).rstrip("/") if outputs.is_remote(input_dir) else os.path.abspath(input_dir)
    output_dir = str(output_dir).rstrip("/") if outputs.is_remote(output_dir) else os.path.abspath(output_dir)
    if outputs.is_remote(input_dir):
        check_remote_path(input_dir, "--input")
    if outputs.is_remote(output_dir):
        check_remote_path(output_dir, "--output")
    with outputs.beam_filesystems():
        return _run_convert(layout_name, input_dir, output_dir, t0=t0, layout_options=layout_options, split=split,
                            image_size=image_size, num_shards=num_shards, compression=compression, strict=strict,
                            overwrite=overwrite, beam_args=beam_args, threads=threads,
                            progress_stream=progress_stream)


def _run_convert(layout_name, input_dir, output_dir, *, t0, layout_options, split, image_size, num_shards,
                 compression, strict, overwrite, beam_args, threads, progress_stream) -> dict:
    global _PROGRESS
    check_input(input_dir)
    compression = (compression or "").upper()
    if compression in ("NONE",):
        compression = ""
    if compression not in ("", "GZIP"):
        raise TfsegError(f"--compression {compression.lower()!r}: expected gzip or none")
    if num_shards is not None and num_shards < 1:
        raise TfsegError(f"--num-shards {num_shards}: must be at least 1")
    try:
        spec = parse_split_spec(split)
    except ValueError as e:
        raise TfsegError(f"--split: {e}") from None
    image_size = check_image_size(image_size)
    options = pipeline_options(beam_args)
    layout = make_layout(layout_name, layout_options)
    if outputs.is_remote(input_dir) and not layout.remote_input:
        raise TfsegError(f"--input {input_dir}: the {layout_name} layout reads local input only; copy it to a local "
                         "folder first (carvana and folder read gs://, s3://, hdfs://)")
    # Checked again when publishing; failing here spares listing and converting first.
    outputs.claim(output_dir, "convert", complete_marker=schema.DATASET_JSON, overwrite=overwrite,
                  inputs=[("--input", input_dir)])
    cases = layout.list_cases(input_dir)
    if not cases:
        raise TfsegError(f"{input_dir}: no {layout_name} cases found")
    info: LayoutInfo = layout.info()
    if image_size is not None and info.ndim != 2:
        raise TfsegError(f"--image-size applies to 2D datasets; {layout_name} is {info.ndim}D")
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[0]
        raise TfsegError(f"{input_dir}: two cases share the id {dup!r}; case ids must be unique")

    from tfseg.convert.base import file_sizes

    sizes = file_sizes(input_dir)  # one listing for a remote input; {} locally
    by_split: dict[str, list[Case]] = {}
    for case in sorted(cases, key=lambda c: c.case_id):
        by_split.setdefault(assign_split(case, spec), []).append(case)
    shards = {
        s: count_shards(sum(file_bytes(c, sizes) for c in cs), len(cs), num_shards)
        for s, cs in sorted(by_split.items())
    }
    keyed = [(s, shard_of(c.case_id, shards[s]), c) for s, cs in sorted(by_split.items()) for c in cs]
    opts = EncodeOptions(info.ndim, info.channels, info.num_classes, info.ignore_index,
                         tuple(image_size) if image_size else None)
    log.info("%s: %d cases (%s) -> %s", layout_name, len(cases),
             ", ".join(f"{s} {len(cs)}" for s, cs in sorted(by_split.items())), output_dir)

    from tfseg.outputs import atomic_write_json

    with outputs.publish_dir(output_dir, "convert", complete_marker=schema.DATASET_JSON, overwrite=overwrite,
                             inputs=[("--input", input_dir)]) as tmp:
        with beam_scratch_dir():
            dask_partitions(options, len(batch_cases(keyed, 2 * (threads or default_threads()))))
            p = beam.Pipeline(options=options)
            build_pipeline(p, layout, keyed, opts, tmp, shards, compression, threads)
            bar = ConvertProgress(len(keyed), progress_stream) if progress_stream is not None else None
            if bar is not None and not in_launcher_process(options):
                log.info("%s converts in its own workers: progress shows when the job ends (meanwhile see the "
                         "runner's UI)", runner_name(options))
            finished = False
            try:
                _PROGRESS = bar
                result = p.run()
                state = result.wait_until_finish()
                finished = True
            except TfsegError:
                raise
            except Exception as e:  # noqa: BLE001 - the runner's own errors (a cluster unreachable, ...)
                log.debug("the Beam job failed", exc_info=True)
                raise TfsegError(f"the Beam job failed on {runner_name(options)}: {one_line(e)} "
                                 "(nothing was published; -v shows the traceback)") from None
            finally:
                _PROGRESS = None
                if bar is not None and bar.tty and bar.done:
                    # Erase the redrawn line (the final one comes with the totals), or keep it
                    # above the error message.
                    bar.stream.write("\r\033[K" if finished else "\n")
                    bar.stream.flush()
            if state is not None and str(state).split(".")[-1] not in ("DONE", "UNKNOWN"):
                raise TfsegError(f"the Beam job ended {state} on {runner_name(options)}; nothing was published")
            _log_metrics(result)
            client = getattr(result, "client", None)  # the DaskRunner's own dask.distributed Client
            if client is not None and hasattr(client, "close"):
                client.close()  # else it outlives the job (and logs errors once the cluster goes)

        def read_json(name, default):
            path = outputs.join(tmp, name)
            if not outputs.exists(path):  # GatherAll of an empty PCollection writes nothing
                return default
            obj = json.loads(outputs.read_text(path))
            outputs.remove(path)
            return obj

        stats = read_json(STATS_FILE, {})
        written = read_json(SHARDS_FILE, [])
        outputs.rmtree(outputs.join(tmp, SPILL_DIR))
        rejected_path = outputs.join(tmp, schema.REJECTED_JSONL)
        if not outputs.exists(rejected_path):
            outputs.atomic_write_text(rejected_path, "")
        rejected = [json.loads(line) for line in outputs.read_text(rejected_path).splitlines() if line.strip()]
        n_written = sum(n for _, _, n in written)
        if bar is not None:  # the totals (all of them for runners whose workers could not report)
            bar.rejected = len(rejected)
            bar.update(n_written + len(rejected) - bar.done)
            bar.close()
        if n_written + len(rejected) != len(keyed):
            # Never publish a dataset the runner silently shortened.
            raise TfsegError(f"{output_dir}: the runner returned {n_written} records + {len(rejected)} rejections "
                             f"for {len(keyed)} cases; nothing was written (try --direct_running_mode=in_memory)")
        if n_written == 0:
            # Raised inside the publishing block: nothing is published, an older output stays.
            raise NothingConverted(no_case_message(input_dir, rejected))
        if rejected and strict:
            first = rejected[0]
            raise TfsegError(
                f"{len(rejected)} case(s) rejected with --strict; first: {first['file']}: {first['reason']}")

        splits = {}
        for s in sorted(shards):
            files = sorted(name for sp, name, _ in written if sp == s)
            splits[s] = {"count": int(sum(n for sp, _, n in written if sp == s)), "files": files}
        formats = sorted({f for st in stats.values() for f in st["image_formats"]})
        dataset = schema.DatasetInfo(
            name=info.name,
            ndim=info.ndim,
            channels=info.channels,
            num_classes=info.num_classes,
            class_names=list(info.class_names),
            ignore_index=info.ignore_index,
            label_mapping=dict(info.label_mapping),
            splits=splits,
            class_pixel_counts={s: stats[s]["class_pixel_counts"] for s in sorted(stats)
                                if stats[s]["class_pixel_counts"] is not None},
            size_summary={s: stats[s]["size"] for s in sorted(stats)},
            regions=dict(info.regions),
            label_convention=info.label_convention,
            modalities=list(info.modalities),
            image_format=(formats[0] if len(formats) == 1 else "mixed") if info.ndim == 2 and formats else None,
            compression=compression,
            tfseg_version=_version(),
            preprocessing=_preprocessing_record(info, image_size, layout),
            conversion_args={
                "dataset": layout_name,
                "input": input_dir,
                "layout_options": {k: v for k, v in (layout_options or {}).items() if v is not None},
                "split": split,
                "image_size": list(image_size) if image_size else None,
                "num_shards": num_shards,
                "compression": compression,
                "strict": strict,
                "beam_args": list(beam_args),
                "rejected": len(rejected),
            },
        )
        atomic_write_json(outputs.join(tmp, schema.DATASET_JSON), json.loads(dataset.to_json()))
    summary = {
        "output": output_dir,
        "splits": {s: v["count"] for s, v in splits.items()},
        "rejected": len(rejected),
        "num_shards": shards,
        "seconds": round(time.time() - t0, 2),
    }
    log.info("converted %s", summary)
    return summary


def _preprocessing_record(info: LayoutInfo, image_size, layout: Layout) -> dict:
    """dataset.json's ``preprocessing``: what later stages must do to an original image or volume."""
    if info.ndim == 2:
        return preprocess.resize_record(image_size) if image_size else {}
    # Layouts that predate the record (or duck-typed ones) have none.
    return dict(getattr(layout, "preprocessing", dict)())


def _version() -> str:
    try:
        from tfseg import __version__

        return __version__
    except ImportError:
        return ""


def _log_metrics(result) -> None:
    try:
        counters = result.metrics().query().get("counters", [])
    except Exception:  # noqa: BLE001 - metrics are best effort on some runners
        return
    for c in counters:
        if c.key.metric.namespace == NAMESPACE:
            log.info("metric %s = %s", c.key.metric.name, c.committed)
