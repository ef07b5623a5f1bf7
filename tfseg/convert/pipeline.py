"""``tfseg convert``'s launcher: a dataset layout -> sharded TFRecords + dataset.json, published atomically.

:func:`run_convert` checks the input and options, lists the cases, assigns splits and shards,
runs the Beam job and writes dataset.json. The job's parts live beside it:

- :mod:`tfseg.convert.base`: what a layout provides (list and load cases; splits, pixel budget).
- :mod:`tfseg.convert.encode`: one case -> one record (validation, class counts, resizing).
- :mod:`tfseg.convert.shards`: shard of a case, shard names and counts, batch fragment files.
- :mod:`tfseg.convert.transforms`: the Beam graph (convert, write shards, statistics, rejections).
- :mod:`tfseg.convert.runners`: ``--runner`` and Beam options, the job's temp folder.
- :mod:`tfseg.convert.checks`: input checks and the one-line errors convert reports.

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
workers (reading inputs, batch fragments, JSON files; shards are written by TF's TFRecordWriter to
the worker's disk and uploaded, so their bytes equal a local conversion's). TF's own gs:// client
is never used here (it ignores ``STORAGE_EMULATOR_HOST`` and the runner's credentials). A remote
output is staged in a sibling folder of the same bucket, where the workers write.

Progress (:class:`~tfseg.convert.transforms.ConvertProgress`, on stderr from the CLI) counts cases
as they finish when the job runs in the launcher's process (DirectRunner in_memory/multi_threading);
other runners report their totals when the job ends.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
from typing import Iterable

import apache_beam as beam

from tfseg import outputs, preprocess, schema
from tfseg.convert.base import Case, Layout, LayoutInfo, assign_split, parse_split_spec
from tfseg.convert.checks import (  # NothingConverted: what run_convert raises, for its callers
    NothingConverted,
    check_image_size,
    check_input,
    check_remote_path,
    no_case_message,
    one_line,
)
from tfseg.convert.encode import EncodeOptions
from tfseg.convert.runners import (
    beam_scratch_dir,
    dask_partitions,
    in_launcher_process,
    pipeline_options,
    requested_partitions,
    runner_name,
)
from tfseg.convert.shards import SPILL_DIR, count_shards, file_bytes, shard_of
from tfseg.convert.transforms import (
    NAMESPACE,
    TARGET_BATCHES,
    ConvertProgress,
    batch_size,
    build_pipeline,
    cut_batches,
    default_threads,
    read_summaries,
    set_progress,
)
from tfseg.errors import TfsegError

__all__ = ["NothingConverted", "make_layout", "run_convert"]

log = logging.getLogger(__name__)


def make_layout(layout_name: str, layout_options: dict | None = None) -> Layout:
    """Instantiates a layout with the options it accepts.

    Raises:
      TfsegError: unknown layout, or an option the layout does not take.
    """
    from tfseg.convert import get_layout_class

    cls = get_layout_class(layout_name)
    options = {k: v for k, v in (layout_options or {}).items() if v is not None}
    params = inspect.signature(cls).parameters  # the class: object.__init__ takes *args, **kwargs
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in options:
        if key not in params and not takes_any:
            raise TfsegError(f"--{key.replace('_', '-')} does not apply to --dataset {layout_name}")
    return cls(**options)


@outputs.holding_locks
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
            threads = threads or default_threads()
            target = requested_partitions(options) or TARGET_BATCHES  # --dask_npartitions: that many batches
            batches = cut_batches(keyed, batch_size(len(keyed), threads, target))
            dask_partitions(options, len(batches))
            p = beam.Pipeline(options=options)
            build_pipeline(p, layout, keyed, opts, tmp, shards, compression, threads, batches=batches)
            bar = ConvertProgress(len(keyed), progress_stream) if progress_stream is not None else None
            if bar is not None and not in_launcher_process(options):
                log.info("%s converts in its own workers: progress shows when the job ends (meanwhile see the "
                         "runner's UI)", runner_name(options))
            finished = False
            try:
                set_progress(bar)
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
                set_progress(None)
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

        written, stats, rejected = read_summaries(tmp)
        outputs.rmtree(outputs.join(tmp, SPILL_DIR))
        outputs.atomic_write_text(outputs.join(tmp, schema.REJECTED_JSONL),
                                  "".join(json.dumps(row, sort_keys=True) + "\n" for row in rejected))
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
