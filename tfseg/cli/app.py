"""The ``tfseg`` group: logging, and every error as one line (``error: ...``) with its exit code.

Exit codes: 2 for misuse (a flag, a config, an output tfseg may not write), 1 for data failures and
unexpected errors, 130/143 for SIGINT/SIGTERM. An unexpected exception prints one line naming its
type, the file where it has one and its message; ``-v`` shows the traceback.
"""

from __future__ import annotations

import errno
import logging
import sys

import click

from tfseg.errors import TfsegError, first_line, safe


class _Group(click.Group):
    """Turns TfsegError (and a few well-known user errors) into one line and exit code 2."""

    def invoke(self, ctx):
        from tfseg import interrupts

        interrupts.install()  # SIGTERM / SIGINT: one line, exit 143 / 130, within seconds
        try:
            return super().invoke(ctx)
        except TfsegError as e:
            if _disk_full(e):  # a runner's failure wrapped in one line (convert's Beam job)
                _echo_disk_full(e)
            click.echo(f"error: {safe(e)}", err=True)
            sys.exit(getattr(e, "exit_code", 2))  # 1 for data failures (nothing converted), 2 for misuse
        except interrupts.Interrupted as e:
            click.echo(interrupts.message(e.signum), err=True)
            sys.exit(e.exit_code)
        except (KeyboardInterrupt, click.exceptions.Abort):
            click.echo(interrupts.message(interrupts.signal.SIGINT), err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.exceptions.ClickException):
            raise  # --help, a usage error: click prints and exits as it should
        except Exception as e:  # noqa: BLE001 - a full disk reaches us as OSError, h5py's, TF's or Beam's error
            if _disk_full(e):
                _echo_disk_full(e)
            if ctx.params.get("verbose"):
                raise
            click.echo(f"error: {unexpected_line(e)}", err=True)
            sys.exit(1)


def _echo_disk_full(e: BaseException) -> None:
    from tfseg.io import publish

    where = getattr(e, "filename", None) or publish.last_claimed() or "the output"
    click.echo(f"error: {safe(where)}: no space left on the device; nothing was published, and the same "
               "command resumes once space is freed", err=True)
    sys.exit(1)


def _disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is a full disk or quota."""
    seen = 0
    while e is not None and seen < 10:
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _setup_logging(verbose: bool) -> None:
    if not verbose:
        # TensorFlow's C++ start-up lines are hidden unless -v (tfseg.quiet).
        from tfseg.cli import quiet

        quiet.quiet_environment()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("apache_beam", "absl", "tensorflow", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Beam's GCP IO warns on the root logger when its optional GCP clients are absent; tfseg
    # does not use them (install apache-beam[gcp] for Dataflow and the warning goes away).
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: "apitools not found" not in record.getMessage())
        handler.addFilter(_one_line_records(verbose))


def _one_line_records(verbose: bool):
    """A log filter: control characters in messages escaped (a file named "a\nerror: x.png"
    stays on one line); without -v, Beam's logged tracebacks are dropped, since the command
    ends with its own one-line error."""
    def keep(record: logging.LogRecord) -> bool:
        if not verbose and record.exc_info and record.name.startswith("apache_beam"):
            return False
        message = record.getMessage()
        if not message.isprintable():
            record.msg, record.args = safe(message), ()
        return True

    return keep


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="tfseg")
def cli(verbose: bool) -> None:
    """tfseg: semantic segmentation, 2D and 3D, from raw files to a TF Serving model.

    Stages: sample -> convert -> fit -> evaluate -> export -> predict; `tfseg run` chains them
    for a pipeline, `tfseg demo` runs the Carvana demo end to end on generated data.
    """
    _setup_logging(verbose)
    ctx = click.get_current_context()
    if not verbose and ctx.invoked_subcommand not in (None, "sample"):
        # Every other command imports TensorFlow: do it here, with its start-up noise filtered.
        from tfseg.cli import quiet

        quiet.import_tensorflow()


def unexpected_line(e: BaseException) -> str:
    """One line for an exception tfseg did not expect: the file (where the error names one), the
    exception's type and the first line of its message, and where to look next."""
    where = getattr(e, "filename", None)
    return (f"{safe(where) + ': ' if where else ''}{type(e).__name__}: {first_line(e)} (unexpected: run with -v "
            "for the traceback, and include `tfseg env` when reporting it)")


@cli.command("env")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
def env_cmd(as_json: bool) -> None:
    """Versions, CPU features, devices and the precision fit would choose: include it in bug reports."""
    import json

    from tfseg import envinfo

    report = envinfo.collect()
    click.echo(json.dumps(report, indent=2) if as_json else envinfo.format_text(report))


def main() -> None:
    """The ``tfseg`` command (a process of its own: in-process callers use :data:`cli`)."""
    from tfseg import interrupts

    try:
        cli(prog_name="tfseg")
    except SystemExit as e:
        if e.code in (0, None):
            interrupts.finished()  # what is left is the interpreter's exit
        raise
