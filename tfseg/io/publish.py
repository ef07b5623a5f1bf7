"""Who owns an output folder, and how a stage publishes one: the one rule every stage follows.

tfseg never deletes, moves or overwrites anything it did not write. Every output folder a stage
creates holds an ownership record, ``.tfseg-output.json`` (``{"stage": "convert", ...}``), written
before anything else. A stage writes only into

- an absent folder, or an empty one (nothing in it can be lost), or
- an earlier output of the *same* stage: complete (its completion marker is present; replaced
  only with ``--overwrite``) or unfinished (the ownership record without the completion marker;
  resumed or replaced).

Anything else is refused before any work starts (:func:`claim`), and so is an output that equals,
contains or lies inside one of the command's inputs.

Publishing (:func:`publish_dir`) stages the new output in a fresh sibling folder; the stage writes
its completion marker last. On local disks the staged folder then replaces the old output with two
renames; on object stores (gs://, s3://, which have no rename) the old completion marker is
removed first, the files are copied and the completion marker is copied last, so a reader that
trusts only folders with a completion marker never sees a half-written output either way. A
failure inside the ``with`` block publishes nothing and leaves an older output as it was. Staging
folders of killed runs on this host are removed by the next run.

Files go through :mod:`tfseg.io.fs`, the one writer per output through :mod:`tfseg.io.locks`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from typing import Iterable, Iterator

from tfseg import interrupts
from tfseg.errors import TfsegError, safe
from tfseg.io import locks
from tfseg.io.faults import pause_point
from tfseg.io.fs import (
    INTERNAL_PREFIX,
    atomic_write_json,
    basename,
    beam_files_under,
    beam_files_under_prefix,
    dirname,
    exists,
    gfile,
    is_remote,
    isdir,
    isfile,
    join,
    listdir,
    makedirs,
    normalize,
    pid_alive,
    read_text,
    remove,
    rmtree,
    sweep_dead,
    umask,
    uses_beam,
)

logger = logging.getLogger(__name__)

OWNER_FILE = ".tfseg-output.json"


STAGING_PREFIX = INTERNAL_PREFIX + "staging-"


# A result that could not be published (see publish_dir) is left beside the output under this suffix.
UNPUBLISHED_SUFFIX = ".unpublished-"


STAGES = ("sample", "convert", "fit", "evaluate", "export", "predict", "run")


def owner(path: str) -> str | None:
    """The stage that wrote folder ``path`` (its ownership record), or None."""
    record = join(path, OWNER_FILE)
    try:
        if not isfile(record):
            return None
        stage = json.loads(read_text(record)).get("stage")
    except (OSError, ValueError, AttributeError):
        return None
    return stage if isinstance(stage, str) else None


def mark_owned(path: str, stage: str) -> None:
    """Creates folder ``path`` (if needed) and writes its ownership record."""
    from tfseg import __version__

    makedirs(path)
    atomic_write_json(join(path, OWNER_FILE), {"stage": stage, "tfseg_version": __version__})


def _visible_entries(path: str) -> list[str]:
    return [n for n in listdir(path) if not n.startswith(INTERNAL_PREFIX)]


def _inside(child: str, parent: str) -> bool:
    if child == parent:
        return True
    sep = "/" if is_remote(parent) else os.sep
    return child.startswith(parent.rstrip(sep) + sep)


def check_not_overlapping(output: str, inputs: Iterable[tuple[str, str]], *, option: str = "--output") -> None:
    """Refuses an output that equals, contains or lies inside an input.

    Args:
      output: the output path.
      inputs: ``(option, path)`` pairs, e.g. ``("--input", "raw/")``; None paths are skipped.

    Raises:
      TfsegError: naming both options and paths.
    """
    out = normalize(output)
    for name, path in inputs:
        if not path:
            continue
        src = normalize(path)
        if out == src:
            raise TfsegError(f"{option} {output}: is the same folder as {name} {path}; choose another {option}")
        if _inside(out, src):
            raise TfsegError(f"{option} {output}: lies inside {name} {path}; choose a folder outside it")
        if _inside(src, out):
            raise TfsegError(f"{option} {output}: contains {name} {path}; choose a folder that does not")


def _check_not_inside_another_output(path: str, stage: str, option: str) -> None:
    """Refuses an output inside another stage's output (predict's masks inside an export's NAME
    folder would be a numbered folder TF Serving loads as a version): the nearest folder above
    ``path`` that tfseg wrote must be this stage's own or a ``tfseg run`` workdir. Local paths."""
    if is_remote(path):
        return
    here = os.path.abspath(path)
    parent = os.path.dirname(here)
    while parent != here:
        written_by = owner(parent)
        if written_by is not None:
            if written_by not in (stage, "run"):
                raise TfsegError(f"{option} {path}: lies inside {parent}, an output of `tfseg {written_by}`; "
                                 "choose a folder outside it")
            return
        here, parent = parent, os.path.dirname(parent)


def _check_writable_location(path: str, option: str) -> None:
    """Local paths: a file in the way, or a folder we may not write into, fails now."""
    if is_remote(path):
        return
    if os.path.islink(path):  # publishing renames the output aside: that would move the link, not its folder
        raise TfsegError(f"{option} {path}: is a symbolic link (to {os.readlink(path)}); tfseg never replaces or "
                         "moves a link: give the folder it points to, or another name")
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.islink(probe) and not os.path.exists(probe):
        raise TfsegError(f"{option} {path}: {probe} is a dangling symbolic link")
    if not os.path.isdir(probe):
        raise TfsegError(f"{option} {path}: {probe} is a file, not a folder")
    target = probe if probe == os.path.abspath(path) else probe
    if not os.access(target, os.W_OK | os.X_OK):
        raise TfsegError(f"{option} {path}: no permission to write in {target}")


def claim(path: str, stage: str, *, complete_marker: str | None, overwrite: bool = False,
          inputs: Iterable[tuple[str, str]] = (), option: str = "--output", lock: bool = True) -> str:
    """Checks, before any work, that ``stage`` may write its output at ``path``.

    Args:
      path: the output folder.
      stage: the stage that writes it (one of :data:`STAGES`).
      complete_marker: the file whose presence means "complete" (None: the stage has no
        completion marker, every earlier output counts as complete).
      overwrite: the user asked to replace an earlier complete output of the same stage.
      inputs: ``(option, path)`` pairs the output must not equal, contain or lie inside.
      option: the option name used in messages.
      lock: take the output's lock (:func:`acquire_lock`) first, held until the stage entry
        point returns; False for long-lived folders that several writers add to.

    Returns:
      ``"absent"`` (or an empty folder), ``"unfinished"`` (an earlier output of this stage
      without its completion marker) or ``"complete"`` (only with ``overwrite``).

    Raises:
      TfsegError: the output is refused; nothing was touched.
    """
    assert stage in STAGES, stage
    _LAST_CLAIMED[:] = [str(path)]
    check_not_overlapping(path, inputs, option=option)
    _check_writable_location(path, option)
    _check_not_inside_another_output(path, stage, option)
    if not lock:
        return _claim_state(path, stage, complete_marker, overwrite, option)
    held = locks.holds(path)
    locks.acquire_lock(path, stage, option=option)
    try:
        state = _claim_state(path, stage, complete_marker, overwrite, option)
        if not held:
            locks.remember_seen(path, _snapshot(path))
        return state
    except BaseException:
        if not held:
            locks.release_lock(path)
        raise


_LAST_CLAIMED: list[str] = []


def last_claimed() -> str | None:
    """The output this process claimed last (named in the CLI's full-disk line)."""
    return _LAST_CLAIMED[-1] if _LAST_CLAIMED else None


def _snapshot(path: str) -> frozenset[str]:
    """Relative paths of everything under folder ``path`` now (empty when it does not exist):
    what a claim saw, so that publishing can tell what appeared since."""
    if not isdir(path):
        return frozenset()
    if not is_remote(path):
        root = os.path.abspath(path)
        seen = set()
        for folder, dirs, files in os.walk(root):
            rel = os.path.relpath(folder, root)
            seen.update(os.path.normpath(os.path.join(rel, n)) for n in dirs + files)
        return frozenset(seen)
    base = str(path).rstrip("/")
    seen = set()
    for folder, dirs, files in gfile().walk(base):
        rel = str(folder).rstrip("/")[len(base):].strip("/")
        seen.update(f"{rel}/{n.rstrip('/')}" if rel else n.rstrip("/") for n in list(dirs) + list(files))
    return frozenset(seen)


def _appeared(path: str, seen: frozenset[str]) -> list[str]:
    """Entries of ``path`` that were not there when the output was claimed (tfseg's own internal
    files excepted)."""
    return sorted(e for e in _snapshot(path) - seen if not basename(e).startswith(INTERNAL_PREFIX))


def _refuse_publish(final: str, staging: str, stage: str, new: list[str], option: str) -> None:
    """Keeps the staged result under a visible name beside ``final`` and fails, naming ``new``."""
    kept = f"{normalize(final)}{UNPUBLISHED_SUFFIX}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    if is_remote(staging) or is_remote(final):
        kept = staging  # no rename on object stores: the staged copy stays where it is
    else:
        os.rename(staging, kept)
    shown = ", ".join(safe(n) for n in new[:5]) + (f" and {len(new) - 5} more" if len(new) > 5 else "")
    raise TfsegError(f"{option} {final}: changed while tfseg {stage} ran (new: {shown}); nothing in it was "
                     f"replaced or removed, and the result is in {kept}")


def _claim_state(path: str, stage: str, complete_marker: str | None, overwrite: bool, option: str) -> str:
    if not exists(path):
        return "absent"
    if not isdir(path):
        raise TfsegError(f"{option} {path}: exists and is not a folder")
    entries = _visible_entries(path)
    written_by = owner(path)
    if not entries and written_by in (None, stage):
        return "absent"
    if written_by != stage:
        what = f"an output of `tfseg {written_by}`" if written_by else f"a folder tfseg did not write ({len(entries)} entr{'y' if len(entries) == 1 else 'ies'})"
        raise TfsegError(
            f"{option} {path}: is {what}; tfseg {stage} writes only into a new folder or its own earlier "
            "output, so choose another"
        )
    if complete_marker is None or isfile(join(path, complete_marker)):
        if not overwrite:
            raise TfsegError(f"{option} {path}: a complete `tfseg {stage}` output already exists; pass --overwrite to replace it")
        return "complete"
    return "unfinished"


def _staging_name(final: str) -> str:
    return f"{STAGING_PREFIX}{basename(final)}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def clean_stale_staging(final: str) -> None:
    """Removes staging folders that killed runs of this host left beside ``final``.

    Only folders named ``.tfseg-staging-NAME-HOST-PID-*`` holding tfseg's ownership record, whose
    process is gone, are removed: nothing else is touched.
    """
    if uses_beam(final):  # staged beside the output, on the same store
        parent = dirname(normalize(final))
        prefix = join(parent, f"{STAGING_PREFIX}{basename(final)}-{socket.gethostname()}-")
        names = {p[len(parent) + 1:].split("/", 1)[0]
                 for p, _ in beam_files_under_prefix(prefix)}
        for entry in sorted(names):
            pid = entry[len(basename(prefix)):].split("-", 1)[0]
            full = join(parent, entry)
            if pid.isdigit() and not pid_alive(int(pid)) and owner(full) is not None:
                logger.info("removing %s, left by an interrupted run", full)
                rmtree(full)
        return
    if is_remote(final):
        parent, name = tempfile.gettempdir(), basename(final)  # remote outputs stage locally
    else:
        parent, name = os.path.dirname(os.path.abspath(final)), os.path.basename(os.path.abspath(final))
    sweep_dead(parent, f"{STAGING_PREFIX}{name}-{socket.gethostname()}-", only=lambda full: owner(full) is not None)


@contextlib.contextmanager
def publish_dir(final: str, stage: str, *, complete_marker: str | None, overwrite: bool = False,
                inputs: Iterable[tuple[str, str]] = (), option: str = "--output") -> Iterator[str]:
    """Yields a fresh staging folder; on success its content becomes ``final``.

    The stage writes its completion marker last inside the staging folder. The ownership rule
    is checked again here, and once more at the moment of publishing: ``final`` may then hold
    only what the first claim of this process saw. Anything that appeared since is never
    replaced or removed: the command fails naming it and leaves its result beside ``final``
    (``NAME.unpublished-*``).

    Raises:
      TfsegError: the output is refused (see :func:`claim`), or changed while the stage ran.
    """
    held = locks.holds(final)
    state = claim(final, stage, complete_marker=complete_marker, overwrite=overwrite, inputs=inputs,
                  option=option)
    seen = locks.seen(final)
    try:
        with _staged(final, stage, state, seen, complete_marker, option) as staging:
            yield staging
    finally:
        if not held:
            locks.release_lock(final)


@contextlib.contextmanager
def _staged(final: str, stage: str, state: str, seen: frozenset[str], complete_marker: str | None,
            option: str) -> Iterator[str]:
    # Remote outputs are staged on the local disk (so stages write with plain file calls, PIL and
    # matplotlib included) and uploaded; local ones beside the final folder (same filesystem:
    # published by rename). Under beam_filesystems() (convert) remote outputs are staged beside
    # the final folder on the same store, where the runner's workers write, and copied there.
    parent = tempfile.gettempdir() if is_remote(final) and not uses_beam(final) else dirname(normalize(final))
    makedirs(parent)
    clean_stale_staging(final)
    staging = join(parent, _staging_name(final))
    mark_owned(staging, stage)
    if not is_remote(staging):
        os.chmod(staging, 0o777 & ~umask())
    try:
        yield staging
    except BaseException:
        rmtree(staging)
        raise
    if complete_marker is not None and not isfile(join(staging, complete_marker)):
        rmtree(staging)
        raise RuntimeError(f"tfseg {stage} did not write its completion marker {complete_marker}")
    pause_point("publish")
    try:
        interrupts.check()  # no output is published after SIGINT/SIGTERM, wherever its exception went
    except BaseException:
        rmtree(staging)
        raise
    new = _appeared(final, seen)
    if new:
        _refuse_publish(final, staging, stage, new, option)
    if is_remote(final):
        _publish_by_copy(staging, final, complete_marker, seen=seen if state != "absent" else frozenset())
        rmtree(staging)
        interrupts.published(final)
        return
    final = os.path.abspath(final)
    if os.path.lexists(final):
        # An empty folder, or our own earlier output (claim() checked): swap it out, and look
        # once more at what it holds now that no one can add to it.
        old = os.path.join(parent, _staging_name(final) + "-old")
        os.rename(final, old)
        new = _appeared(old, seen)
        if new:
            os.rename(old, final)
            _refuse_publish(final, staging, stage, new, option)
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.rename(staging, final)
        except OSError:  # a folder with content appeared this instant
            _refuse_publish(final, staging, stage, _appeared(final, seen) or [basename(final)], option)
    interrupts.published(final)


def _publish_by_copy(staging: str, final: str, complete_marker: str | None, *, seen: frozenset[str]) -> None:
    """Object stores: drop the old completion marker, remove the old output's files (only those
    the claim saw), copy the new ones and write the marker last."""
    if seen:
        if complete_marker:
            remove(join(final, complete_marker))
        for rel in sorted(seen, key=lambda r: -r.count("/")):
            target = join(final, *rel.split("/"))
            if isfile(target):
                remove(target)
    g = gfile()
    if is_remote(staging):  # staged on the same store (beam_filesystems)
        rels = [p[len(staging.rstrip("/")) + 1:] for p, _ in beam_files_under(staging)]
    else:
        rels = ["/".join(os.path.relpath(os.path.join(root, n), staging).split(os.sep))
                for root, _, names in os.walk(staging) for n in names]
    # The ownership record first (a folder half copied is still ours), the completion marker last.
    for rel in sorted(rels, key=lambda r: (r != OWNER_FILE, r == complete_marker, r)):
        src = join(staging, *rel.split("/")) if is_remote(staging) else os.path.join(staging, *rel.split("/"))
        dst = join(final, *rel.split("/"))
        g.makedirs(dirname(dst))
        g.copy(src, dst, overwrite=True)


def claim_container(path: str, stage: str, *, inputs: Iterable[tuple[str, str]] = (),
                    option: str = "--output") -> None:
    """Takes ``path`` as a long-lived folder that ``stage`` adds to (an export base, a workdir).

    An absent or empty folder is created and marked; an earlier one of the same stage is reused;
    anything else, or an overlap with an input, is refused.

    Raises:
      TfsegError: the folder is refused; nothing was touched.
    """
    if claim(path, stage, complete_marker=None, overwrite=True, inputs=inputs, option=option, lock=False) == "absent":
        mark_owned(path, stage)
