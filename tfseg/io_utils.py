"""Atomic publication of outputs: nothing half-written is ever visible at the final path."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator

from tfseg.errors import TfsegError


@contextlib.contextmanager
def atomic_output_dir(final: str, *, overwrite: bool = False, complete_marker: str | None = None) -> Iterator[str]:
    """Yields a temporary directory beside ``final`` and renames it into place on success.

    Args:
      final: the directory to publish.
      overwrite: replace an existing ``final``. Without it an existing complete output
        (``complete_marker`` present, or any non-empty directory when no marker is given) is
        refused; an incomplete one (marker absent) is replaced.
      complete_marker: a file name whose presence in ``final`` means "complete".

    Raises:
      TfsegError: ``final`` exists and is complete, and ``overwrite`` is False.
    """
    final = os.path.abspath(final)
    if os.path.exists(final) and not os.path.isdir(final):
        raise TfsegError(f"{final}: exists and is not a directory")
    if os.path.isdir(final) and os.listdir(final) and not overwrite:
        complete = complete_marker is None or os.path.exists(os.path.join(final, complete_marker))
        if complete:
            raise TfsegError(f"{final}: a complete output already exists; pass --overwrite to replace it")
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs get the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(final):
        trash = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=parent)
        os.rename(final, os.path.join(trash, "old"))
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and an atomic rename."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
