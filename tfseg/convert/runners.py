"""Which Beam runner runs the conversion job, and with what options.

``--runner`` names (short, any case, or a PipelineRunner class), Beam options checked before the
job starts (Beam itself only warns about unknown ones), PipelineOptions defaults (DirectRunner,
in_memory), one Dask partition per batch, whether the workers run in the launcher's process (live
progress), and the private temp folder Beam's runners would otherwise litter.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterable

from tfseg.convert.checks import one_line
from tfseg.errors import TfsegError
from tfseg.io import fs

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
    from apache_beam.options.pipeline_options import (
        PipelineOptions,
        _BeamArgumentParser,
    )

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
    """Beam's PipelineOptions from the arguments tfseg passes on (:func:`check_beam_args`), with
    tfseg's defaults (DirectRunner, in_memory); a non-direct runner's own checks are made now."""
    from apache_beam.options.pipeline_options import (
        DirectOptions,
        PipelineOptions,
        StandardOptions,
    )

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
        from apache_beam.options.pipeline_options_validator import (
            PipelineOptionsValidator,
        )
        from apache_beam.runners.runner import create_runner

        errors = PipelineOptionsValidator(options, create_runner(runner)).validate()
        if errors:
            raise TfsegError(f"--runner {runner}: " + "; ".join(e.strip().rstrip(".") for e in errors))
    return options


def runner_name(options) -> str:
    """The runner's class name (``DirectRunner``, ``DaskRunner``, ...), for messages."""
    from apache_beam.options.pipeline_options import StandardOptions

    return str(options.view_as(StandardOptions).runner or "DirectRunner").rpartition(".")[2]


def in_launcher_process(options) -> bool:
    """Whether the job's DoFns run in this process (the DirectRunner's in_memory and
    multi_threading modes), so they can feed the launcher's progress bar."""
    from apache_beam.options.pipeline_options import DirectOptions

    mode = options.view_as(DirectOptions).direct_running_mode
    return runner_name(options) in ("DirectRunner", "SwitchingDirectRunner") and mode in ("in_memory",
                                                                                        "multi_threading")


def requested_partitions(options) -> int | None:
    """``--dask_npartitions`` when the DaskRunner runs the job and the user set it, else None:
    the convert job then cuts that many batches (a cluster with more than ~16 worker threads
    wants more than the default 64)."""
    from apache_beam.options.pipeline_options import StandardOptions

    if "dask" not in str(options.view_as(StandardOptions).runner or "").lower():
        return None
    from apache_beam.runners.dask.dask_runner import DaskOptions

    return options.view_as(DaskOptions).npartitions or None


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
    fs.sweep_dead(base, _SCRATCH_PREFIX, what="a Beam scratch folder of a killed run")
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
