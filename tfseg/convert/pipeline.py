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
(listing, ownership checks, publishing: :func:`tfseg.io.fs.beam_filesystems`) and in the
workers (reading inputs, batch fragments, JSON files; shards are written by TF's TFRecordWriter to
the worker's disk and uploaded, so their bytes equal a local conversion's). TF's own gs:// client
is never used here (it ignores ``STORAGE_EMULATOR_HOST`` and the runner's credentials). A remote
output is staged in a sibling folder of the same bucket, where the workers write.

Progress (:class:`~tfseg.convert.transforms.ConvertProgress`, on stderr from the CLI) counts cases
as they finish when the job runs in the launcher's process (DirectRunner in_memory/multi_threading);
other runners report their totals when the job ends.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import time

import apache_beam as beam

import tfseg
from tfseg import interrupts, preprocess, schema
from tfseg.convert.base import Case, Layout, LayoutInfo, assign_split, parse_split_spec
from tfseg.convert.checks import (  # NothingConverted: what run_convert raises, for its callers
    NothingConverted,
    check_image_size,
    check_input,
    check_remote_path,
    no_case_message,
    one_line,
)
from tfseg.convert.config import CONFIG_JSON, ConvertConfig
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
from tfseg.io import fs, locks, publish

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


@locks.holding_locks
def run_convert(*args, progress_stream=None, **kwargs) -> dict:
    """Converts one dataset from its original layout into sharded TFRecords + dataset.json.

    Args:
      *args, **kwargs: a :class:`~tfseg.convert.config.ConvertConfig` (or a mapping of its keys),
        or its fields themselves: ``run_convert(layout_name, input_dir, output_dir,
        layout_options=None, split="train=0.8,val=0.1,test=0.1", image_size=None, num_shards=None,
        compression="", strict=False, overwrite=False, beam_args=(), threads=None)``.
      progress_stream: where to show progress (:class:`ConvertProgress`; the CLI passes stderr),
        or None.

    Returns:
      ``{"output", "splits": {split: count}, "rejected", "num_shards", "seconds"}``.

    Raises:
      TfsegError: bad input directory or options, existing output, or a rejection with strict.
      NothingConverted: every case was rejected (nothing is published; an older output stays).
    """
    t0 = time.time()
    cfg = ConvertConfig.from_call(args, kwargs)
    # Scheme paths (gs://, s3://, hdfs://) go through Beam's FileSystems, on the launcher too.
    input_dir, output_dir = (str(p).rstrip("/") if fs.is_remote(p) else os.path.abspath(p)
                             for p in (cfg.input_dir, cfg.output_dir))
    if fs.is_remote(input_dir):
        check_remote_path(input_dir, "--input")
    if fs.is_remote(output_dir):
        check_remote_path(output_dir, "--output")
    cfg = dataclasses.replace(cfg, input_dir=input_dir, output_dir=output_dir)
    with fs.beam_filesystems():
        return _run_convert(cfg, t0=t0, progress_stream=progress_stream)


def _run_convert(cfg: ConvertConfig, *, t0: float, progress_stream) -> dict:
    cfg, spec, options, layout = _check_options(cfg)
    # Checked again when publishing; failing here spares listing and converting first.
    owned = dict(complete_marker=schema.DATASET_JSON, overwrite=cfg.overwrite, inputs=[("--input", cfg.input_dir)])
    publish.claim(cfg.output_dir, "convert", **owned)
    info, keyed, shards = _assign_cases(cfg, layout, spec)
    opts = EncodeOptions(info.ndim, info.channels, info.num_classes, info.ignore_index,
                         tuple(cfg.image_size) if cfg.image_size else None)
    with publish.publish_dir(cfg.output_dir, "convert", **owned) as tmp:
        with beam_scratch_dir():
            bar = _run_job(layout, keyed, opts, tmp, shards, cfg, options, progress_stream)
        written, stats, rejected = _gather(cfg, tmp, len(keyed), bar)
        splits = {}
        for s in sorted(shards):
            files = sorted(name for sp, name, _ in written if sp == s)
            splits[s] = {"count": int(sum(n for sp, _, n in written if sp == s)), "files": files}
        dataset = _dataset_info(cfg, info, layout, splits, stats, len(rejected))
        fs.atomic_write_json(fs.join(tmp, CONFIG_JSON), cfg.to_json())
        fs.atomic_write_json(fs.join(tmp, schema.DATASET_JSON), json.loads(dataset.to_json()))
    summary = {
        "output": cfg.output_dir,
        "splits": {s: v["count"] for s, v in splits.items()},
        "rejected": len(rejected),
        "num_shards": shards,
        "seconds": round(time.time() - t0, 2),
    }
    log.info("converted %s", summary)
    return summary


def _check_options(cfg: ConvertConfig) -> tuple[ConvertConfig, dict, object, Layout]:
    """Checks the input and the options before anything is listed or claimed.

    Returns:
      (``cfg`` with ``compression`` as ``""``/``"GZIP"`` and ``image_size`` checked, the split
      spec, Beam's PipelineOptions, the layout).
    """
    check_input(cfg.input_dir)
    compression = (cfg.compression or "").upper()
    if compression in ("NONE",):
        compression = ""
    if compression not in ("", "GZIP"):
        raise TfsegError(f"--compression {compression.lower()!r}: expected gzip or none")
    if cfg.num_shards is not None and cfg.num_shards < 1:
        raise TfsegError(f"--num-shards {cfg.num_shards}: must be at least 1")
    try:
        spec = parse_split_spec(cfg.split)
    except ValueError as e:
        raise TfsegError(f"--split: {e}") from None
    cfg = dataclasses.replace(cfg, compression=compression, image_size=check_image_size(cfg.image_size))
    options = pipeline_options(cfg.beam_args)
    layout = make_layout(cfg.layout_name, cfg.layout_options)
    if fs.is_remote(cfg.input_dir) and not layout.remote_input:
        raise TfsegError(f"--input {cfg.input_dir}: the {cfg.layout_name} layout reads local input only; copy it to a "
                         "local folder first (carvana and folder read gs://, s3://, hdfs://)")
    return cfg, spec, options, layout


def _assign_cases(cfg: ConvertConfig, layout: Layout, spec: dict) -> tuple[LayoutInfo, list, dict]:
    """Lists the cases and gives each its split and shard.

    Returns:
      (the layout's facts, ``[(split, shard, case)]`` in split then id order, shards a split).
    """
    cases = layout.list_cases(cfg.input_dir)
    if not cases:
        raise TfsegError(f"{cfg.input_dir}: no {cfg.layout_name} cases found")
    info: LayoutInfo = layout.info()
    if cfg.image_size is not None and info.ndim != 2:
        raise TfsegError(f"--image-size applies to 2D datasets; {cfg.layout_name} is {info.ndim}D")
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[0]
        raise TfsegError(f"{cfg.input_dir}: two cases share the id {dup!r}; case ids must be unique")
    sizes = fs.file_sizes(cfg.input_dir)  # one listing for a remote input; {} locally
    cases, layout.duplicate_images = same_split_for_identical_images(cases)
    copies = getattr(layout, "duplicate_annotation_files", 0)  # duck-typed layouts have none
    if cfg.strict and (layout.duplicate_images or copies):
        raise TfsegError(f"{cfg.input_dir}: {layout.duplicate_images} image(s) identical to another case's and "
                         f"{copies} duplicate annotation file(s), refused with --strict")
    by_split: dict[str, list[Case]] = {}
    for case in sorted(cases, key=lambda c: c.case_id):
        by_split.setdefault(assign_split(case, spec), []).append(case)
    shards = {
        s: count_shards(sum(file_bytes(c, sizes) for c in cs), len(cs), cfg.num_shards)
        for s, cs in sorted(by_split.items())
    }
    keyed = [(s, shard_of(c.case_id, shards[s]), c) for s, cs in sorted(by_split.items()) for c in cs]
    log.info("%s: %d cases (%s) -> %s", cfg.layout_name, len(cases),
             ", ".join(f"{s} {len(cs)}" for s, cs in sorted(by_split.items())), cfg.output_dir)
    return info, keyed, shards


def _run_job(layout: Layout, keyed: list, opts: EncodeOptions, tmp: str, shards: dict, cfg: ConvertConfig,
             options, progress_stream) -> ConvertProgress | None:
    """Runs the Beam job that writes the shards and the shard summaries into ``tmp``; returns
    its progress bar (None without ``progress_stream``), still open for the totals."""
    threads = cfg.threads or default_threads()
    target = requested_partitions(options) or TARGET_BATCHES  # --dask_npartitions: that many batches
    batches = cut_batches(keyed, batch_size(len(keyed), threads, target))
    dask_partitions(options, len(batches))
    p = beam.Pipeline(options=options)
    build_pipeline(p, layout, keyed, opts, tmp, shards, cfg.compression, threads, batches=batches)
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
        interrupts.check()  # a signal inside the job reaches us wrapped in the runner's error
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
    return bar


def _gather(cfg: ConvertConfig, tmp: str, cases: int, bar) -> tuple[list, dict, list]:
    """Merges the shard summaries, writes rejected.jsonl and checks the job's totals.

    Returns:
      (``[(split, shard file, records)]``, split statistics, rejections).

    Raises:
      TfsegError: records missing, or a rejection with ``strict``.
      NothingConverted: every case was rejected.
    """
    written, stats, rejected = read_summaries(tmp)
    fs.rmtree(fs.join(tmp, SPILL_DIR))
    fs.atomic_write_text(fs.join(tmp, schema.REJECTED_JSONL),
                              "".join(json.dumps(row, sort_keys=True) + "\n" for row in rejected))
    n_written = sum(n for _, _, n in written)
    if bar is not None:  # the totals (all of them for runners whose workers could not report)
        bar.rejected = len(rejected)
        bar.update(n_written + len(rejected) - bar.done)
        bar.close()
    if n_written + len(rejected) != cases:
        # Never publish a dataset the runner silently shortened.
        raise TfsegError(f"{cfg.output_dir}: the runner returned {n_written} records + {len(rejected)} rejections "
                         f"for {cases} cases; nothing was written (try --direct_running_mode=in_memory)")
    if n_written == 0:
        # Raised inside the publishing block: nothing is published, an older output stays.
        raise NothingConverted(no_case_message(cfg.input_dir, rejected))
    if rejected and cfg.strict:
        first = rejected[0]
        raise TfsegError(
            f"{len(rejected)} case(s) rejected with --strict; first: {first['file']}: {first['reason']}")
    return written, stats, rejected


def same_split_for_identical_images(cases: list[Case]) -> tuple[list[Case], int]:
    """Cases whose image files are byte-identical (the same photo listed twice, or annotated
    twice) put in one group, so that they land in one split and a model is never scored on a photo
    it trained on; returns the cases and how many were identical to an earlier one (one warning).

    Local 2D images only: files are grouped by size and only those of a size two files share are
    read and hashed. Cases with an official split keep it; identical photos across official splits
    are counted and named in the warning.
    """
    import hashlib

    by_size: dict[int, list[Case]] = {}
    for case in cases:
        image = case.paths.get("image")
        if image and not fs.is_remote(image) and os.path.isfile(image):
            by_size.setdefault(os.path.getsize(image), []).append(case)
    first: dict[str, Case] = {}  # digest -> the first case with that image
    same: dict[str, Case] = {}  # case id -> the case it duplicates
    for group in by_size.values():
        if len(group) < 2:
            continue
        for case in sorted(group, key=lambda c: c.case_id):
            with open(case.paths["image"], "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            if digest in first:
                same[case.case_id] = first[digest]
            else:
                first[digest] = case
    if not same:
        return cases, 0
    across = [(c, o) for c in cases if (o := same.get(c.case_id)) and c.split and o.split and c.split != o.split]
    example = next(iter(same.items()))
    log.warning("%d case(s) have an image byte-identical to another case's (e.g. %s = %s); each is kept in the "
                "split of the first%s", len(same), example[0], example[1].case_id,
                f"; {len(across)} cross the official splits (e.g. {across[0][0].case_id} in {across[0][0].split}, "
                f"{across[0][1].case_id} in {across[0][1].split})" if across else "")
    # A copy takes the split key of the first (assign_split hashes ``group or case_id``).
    out = [dataclasses.replace(c, group=(o.group or o.case_id)) if (o := same.get(c.case_id)) and not c.split else c
           for c in cases]
    return out, len(same)


def _dataset_info(cfg: ConvertConfig, info: LayoutInfo, layout: Layout, splits: dict, stats: dict,
                  rejected: int) -> schema.DatasetInfo:
    """dataset.json's content."""
    formats = sorted({f for st in stats.values() for f in st["image_formats"]})
    return schema.DatasetInfo(
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
        exif_oriented={s: stats[s]["exif_oriented"] for s in sorted(stats) if stats[s].get("exif_oriented")},
        duplicates={k: v for k, v in (("images", layout.duplicate_images),
                                      ("annotation_files", getattr(layout, "duplicate_annotation_files", 0))) if v},
        regions=dict(info.regions),
        label_convention=info.label_convention,
        modalities=list(info.modalities),
        image_format=(formats[0] if len(formats) == 1 else "mixed") if info.ndim == 2 and formats else None,
        compression=cfg.compression,
        tfseg_version=tfseg.__version__,
        preprocessing=_preprocessing_record(info, cfg.image_size, layout),
        conversion_args={
            "dataset": cfg.layout_name,
            "input": cfg.input_dir,
            "layout_options": {k: v for k, v in (cfg.layout_options or {}).items() if v is not None},
            "split": cfg.split,
            "image_size": list(cfg.image_size) if cfg.image_size else None,
            "num_shards": cfg.num_shards,
            "compression": cfg.compression,
            "strict": cfg.strict,
            "beam_args": list(cfg.beam_args),
            "rejected": rejected,
        },
    )


def _preprocessing_record(info: LayoutInfo, image_size, layout: Layout) -> dict:
    """dataset.json's ``preprocessing``: what later stages must do to an original image or volume."""
    if info.ndim == 2:
        return preprocess.resize_record(image_size) if image_size else {}
    # Layouts that predate the record (or duck-typed ones) have none.
    return dict(getattr(layout, "preprocessing", dict)())


def _log_metrics(result) -> None:
    try:
        counters = result.metrics().query().get("counters", [])
    except Exception:  # noqa: BLE001 - metrics are best effort on some runners
        return
    for c in counters:
        if c.key.metric.namespace == NAMESPACE:
            log.info("metric %s = %s", c.key.metric.name, c.committed)
