"""One writer per output: the lock file ``.tfseg-lock-NAME`` beside each output.

Local disks: the kernel's ``flock``, released when its process dies however it dies (a dead
writer's lock file is only a record, taken over with a log line). Object stores have no exclusive
create through tf.io.gfile or Beam: the lock file is written and read back, which catches writers
that start seconds apart but not two in the same instant. Locks are held until the stage entry
point that took them returns (:func:`holding_locks`), or the process exits.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import socket
import time
import uuid

from tfseg.errors import TfsegError
from tfseg.io.fs import (
    INTERNAL_PREFIX,
    atomic_write_text,
    basename,
    beam_filesystems,
    dirname,
    exists,
    is_remote,
    join,
    normalize,
    pid_alive,
    read_text,
    remove,
    uses_beam,
)

logger = logging.getLogger(__name__)

LOCK_PREFIX = INTERNAL_PREFIX + "lock-"


# Lock files this process holds: lock path -> token. Released by the stage entry point that took
# them (:func:`holding_locks`), or at exit.
_HELD: dict[str, str] = {}


# What each held output held when it was claimed (lock path -> relative paths): publish_dir
# replaces or removes nothing that appeared since.
_SEEN: dict[str, frozenset[str]] = {}


# Open descriptors of the local lock files this process holds (their kernel locks).
_FDS: dict[str, int] = {}


_BEAM_LOCKS: set[str] = set()  # locks taken through Beam's FileSystems (convert on gs://)


def lock_path(path: str) -> str:
    """The lock file of output ``path``: ``.tfseg-lock-NAME`` beside it (inside it would move
    with the folder when a staged output is renamed into place)."""
    final = normalize(path)
    return join(dirname(final), LOCK_PREFIX + basename(final))


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (/proc), or None: with the pid
    it names one process, so a lock is not held by whatever process reuses a dead writer's pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_alive(holder: dict) -> bool | None:
    """True/False for a holder on this host; None when it runs elsewhere (cannot be checked)."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return False
    started = holder.get("proc_start")
    return started is None or _proc_start(pid) in (None, started)


def _describe(holder: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
    return (f"`tfseg {holder.get('stage', '?')}` (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"started {when})")


def _read_holder(lock: str) -> dict:
    try:
        holder = json.loads(read_text(lock))
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}  # torn or unreadable: a writer died while creating it


def _lock_local(lock: str, token: str) -> int | None:
    """Takes the kernel lock (``flock``) on local lock file ``lock`` and writes ``token`` in it;
    the open descriptor, or None when another live process holds it. The kernel drops the lock
    when its process dies, however it dies: a dead writer never blocks, and the file it left is
    only a record."""
    import fcntl

    os.makedirs(os.path.dirname(lock), exist_ok=True)
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        except IsADirectoryError:
            raise TfsegError(f"{lock}: tfseg's lock file for this output is a folder (not tfseg's); move it "
                             "away or choose another output") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed this file while we opened it: lock the new one
            break
        os.close(fd)
    previous = os.read(fd, 1 << 16).decode("utf-8", "replace").strip()
    if previous:
        try:
            holder = json.loads(previous)
        except ValueError:
            holder = {}
        if isinstance(holder, dict) and holder:
            logger.warning("%s: taking over the lock of %s, which no longer runs", holder.get("output", lock),
                           _describe(holder))
    os.ftruncate(fd, 0)
    os.pwrite(fd, token.encode("utf-8"), 0)
    return fd


def acquire_lock(path: str, stage: str, *, option: str = "--output") -> None:
    """Makes this process the one writer of output ``path`` until the stage entry point returns.

    Re-entrant within a process. Local disks: a kernel lock (``flock``) on the lock file, which
    dies with its process (a dead writer's lock is taken over with a log line). Other
    filesystems have no exclusive create through tf.io.gfile or Beam: the lock file is written
    and read back, a dead holder on this host is taken over, one on another host never is.

    Raises:
      TfsegError: another writer holds the output (naming it), exit code 2.
    """
    lock = lock_path(path)
    if lock in _HELD:
        return
    token = json.dumps({"stage": stage, "host": socket.gethostname(), "pid": os.getpid(),
                        "proc_start": _proc_start(os.getpid()), "time": time.time(),
                        "output": normalize(path), "id": uuid.uuid4().hex})
    if not is_remote(lock):
        fd = _lock_local(lock, token)
        if fd is not None:
            _HELD[lock] = token
            _FDS[lock] = fd
            return
        holder = _read_holder(lock)
        who = _describe(holder) if holder else "`tfseg` process"
        raise TfsegError(f"{option} {path}: another {who} is writing it; wait for it to finish or choose "
                         f"another {option}")
    for _ in range(5):
        if not exists(lock):
            atomic_write_text(lock, token)
            if read_text(lock) == token:
                _HELD[lock] = token
                if uses_beam(lock):
                    _BEAM_LOCKS.add(lock)
                return
            continue
        holder = _read_holder(lock)
        alive = _holder_alive(holder) if holder else None
        if alive is False:
            logger.warning("%s: taking over the lock of %s, which no longer runs", path, _describe(holder))
            remove(lock)
            continue
        who = _describe(holder) if holder else "`tfseg` process"
        hint = "" if alive else f"; if that process no longer runs, remove {lock}"
        raise TfsegError(f"{option} {path}: another {who} is writing it; wait for it to finish or choose "
                         f"another {option}{hint}")
    raise TfsegError(f"{option} {path}: could not take its lock {lock}")


def _unlock(lock: str, token: str) -> None:
    fd = _FDS.pop(lock, None)
    # A lock taken through Beam's FileSystems (convert on gs://) is removed through them too.
    client = beam_filesystems() if lock in _BEAM_LOCKS else contextlib.nullcontext()
    _BEAM_LOCKS.discard(lock)
    with contextlib.suppress(Exception), client:
        if read_text(lock) == token:
            remove(lock)  # while still holding it: a waiting opener re-checks the inode
    if fd is not None:
        os.close(fd)


def release_lock(path: str) -> None:
    """Removes this process's lock on ``path``."""
    lock = lock_path(path)
    token = _HELD.pop(lock, None)
    _SEEN.pop(lock, None)
    if token is not None:
        _unlock(lock, token)


def _release_from(mark: int) -> None:
    for lock in list(_HELD)[mark:]:
        token = _HELD.pop(lock)
        _SEEN.pop(lock, None)
        _unlock(lock, token)


atexit.register(_release_from, 0)


def holding_locks(fn):
    """Decorates a stage entry point: the locks it takes are released when it returns or fails."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        mark = len(_HELD)
        try:
            return fn(*args, **kwargs)
        finally:
            _release_from(mark)

    return wrapper


def holds(path: str) -> bool:
    """Whether this process holds the lock of output ``path``."""
    return lock_path(path) in _HELD


def remember_seen(path: str, entries: frozenset[str]) -> None:
    """Records what output ``path`` held when this process claimed it (kept with the lock)."""
    _SEEN[lock_path(path)] = entries


def seen(path: str) -> frozenset[str]:
    """What output ``path`` held when this process claimed it (empty if not recorded)."""
    return _SEEN.get(lock_path(path), frozenset())
