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

Paths with a scheme (``gs://``, ``s3://``, ``ram://`` ...) go through ``tf.io.gfile``; plain
paths through ``os`` (faster, and atomic renames). Inside :func:`beam_filesystems` (the convert
stage, whose Beam workers write through Beam's ``FileSystems``) the schemes Beam knows (gs://,
s3://, hdfs://, ...) go through Beam's ``FileSystems`` instead, and remote outputs are staged in a
sibling folder on the same store (workers of a cluster runner cannot write into the launcher's
disk); ``ram://`` and the TF stages keep ``tf.io.gfile``.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from typing import Iterable, Iterator

from tfseg.errors import TfsegError

logger = logging.getLogger(__name__)

OWNER_FILE = ".tfseg-output.json"
# Names starting with this are tfseg's own bookkeeping (staging folders, other workers' files).
INTERNAL_PREFIX = ".tfseg-"
STAGING_PREFIX = INTERNAL_PREFIX + "staging-"
LOCK_PREFIX = INTERNAL_PREFIX + "lock-"
# A result that could not be published (see publish_dir) is left beside the output under this suffix.
UNPUBLISHED_SUFFIX = ".unpublished-"

STAGES = ("sample", "convert", "fit", "evaluate", "export", "predict", "run")


# --------------------------------------------------------------------------------------------
# Paths on any filesystem.
# --------------------------------------------------------------------------------------------


def is_remote(path: str) -> bool:
    """True for ``scheme://`` paths (gs://, s3://, hdfs://, ram://): no os calls on these."""
    return "://" in str(path)


def _gfile():
    if _BEAM_DEPTH:
        return _BeamGfile
    import tensorflow as tf

    return tf.io.gfile


# --------------------------------------------------------------------------------------------
# Beam's FileSystems as a tf.io.gfile look-alike (the convert stage; see beam_filesystems).
# --------------------------------------------------------------------------------------------

_BEAM_DEPTH = 0


@contextlib.contextmanager
def beam_filesystems() -> Iterator[None]:
    """Inside this block, scheme paths Beam knows go through ``apache_beam.io.filesystems``.

    The convert stage runs in it: its Beam workers read and write gs://, s3://, hdfs:// through
    Beam's FileSystems (which honours ``STORAGE_EMULATOR_HOST`` and the runner's credentials,
    where TF's gs:// client may not), so the launcher's ownership checks and publishing use the
    same client. ``ram://`` (a TF-only filesystem) keeps ``tf.io.gfile``.
    """
    global _BEAM_DEPTH
    _BEAM_DEPTH += 1
    try:
        yield
    finally:
        _BEAM_DEPTH -= 1


def uses_beam(path: str) -> bool:
    """True when ``path`` goes through Beam's FileSystems (a remote path inside
    :func:`beam_filesystems`, on a scheme other than TF's own ``ram://``)."""
    return bool(_BEAM_DEPTH) and is_remote(path) and not str(path).startswith("ram://")


def _beam_fs():
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


_RAW = "uncompressed"  # Beam infers gzip from a ".gz" name otherwise: tfseg stores bytes as given


def _beam_files_under_prefix(prefix: str) -> list[tuple[str, int]]:
    """(full path, size) of every object whose name starts with ``prefix``."""
    result = _beam_fs().match([str(prefix) + "**"])[0]
    return sorted((m.path, m.size_in_bytes) for m in result.metadata_list)


def _beam_files_under(path: str, limit: int | None = None) -> list[tuple[str, int]]:
    """(full path, size) of every object under folder ``path`` (recursively)."""
    fs = _beam_fs()
    pattern = str(path).rstrip("/") + "/**"
    result = fs.match([pattern], limits=[limit] if limit else None)[0]
    return sorted((m.path, m.size_in_bytes) for m in result.metadata_list if not m.path.endswith("/"))


class _BeamWriter(io.BytesIO):
    """A file opened for writing: its bytes are uploaded in one create() on close."""

    def __init__(self, path: str, text: bool):
        super().__init__()
        self.path, self.text = path, text

    def write(self, data):  # type: ignore[override]
        return super().write(data.encode("utf-8") if self.text else data)

    def close(self) -> None:
        if not self.closed:
            data = self.getvalue()
            with _beam_fs().create(self.path, compression_type=_RAW) as f:
                f.write(data)
        super().close()


class _BeamGfile:
    """The part of ``tf.io.gfile`` this module uses, on Beam's FileSystems for the paths
    :func:`uses_beam` selects (object stores: a folder exists when an object lies under it;
    makedirs is a no-op there) and on ``tf.io.gfile`` for the others."""

    @staticmethod
    def _tf():
        import tensorflow as tf

        return tf.io.gfile

    @classmethod
    def exists(cls, path: str) -> bool:
        if not uses_beam(path):
            return cls._tf().exists(path)
        return _beam_fs().exists(path) or cls.isdir(path)

    @classmethod
    def isdir(cls, path: str) -> bool:
        if not uses_beam(path):
            return cls._tf().isdir(path)
        return bool(_beam_files_under(path, limit=1))

    @classmethod
    def listdir(cls, path: str) -> list[str]:
        if not uses_beam(path):
            return cls._tf().listdir(path)
        base = str(path).rstrip("/") + "/"
        return sorted({p[len(base):].split("/", 1)[0] for p, _ in _beam_files_under(path)} - {""})

    @classmethod
    def makedirs(cls, path: str) -> None:
        if not uses_beam(path):
            return cls._tf().makedirs(path)
        if str(path).startswith(("gs://", "s3://")):
            return None  # object stores have no folders
        with contextlib.suppress(OSError):  # hdfs://: exists already
            _beam_fs().mkdirs(path)

    @classmethod
    def rmtree(cls, path: str) -> None:
        if not uses_beam(path):
            return cls._tf().rmtree(path)
        files = [p for p, _ in _beam_files_under(path)]
        for i in range(0, len(files), 1000):
            _beam_fs().delete(files[i:i + 1000])
        if not str(path).startswith(("gs://", "s3://")):
            with contextlib.suppress(OSError):
                _beam_fs().delete([path])

    @classmethod
    def remove(cls, path: str) -> None:
        if not uses_beam(path):
            return cls._tf().remove(path)
        _beam_fs().delete([path])

    @classmethod
    def GFile(cls, path: str, mode: str = "r"):  # noqa: N802 - tf.io.gfile's name
        if not uses_beam(path):
            return cls._tf().GFile(path, mode)
        if "w" in mode:
            return _BeamWriter(path, text="b" not in mode)
        with _beam_fs().open(path, compression_type=_RAW) as f:
            data = f.read()
        return io.BytesIO(data) if "b" in mode else io.StringIO(data.decode("utf-8"))

    @classmethod
    def copy(cls, src: str, dst: str, overwrite: bool = False) -> None:
        if not uses_beam(src) and not uses_beam(dst):
            return cls._tf().copy(src, dst, overwrite=overwrite)
        fs = _beam_fs()
        if uses_beam(src) and uses_beam(dst) and src.split("://")[0] == dst.split("://")[0]:
            fs.copy([src], [dst])  # server-side on object stores
            return None
        with (fs.open(src, compression_type=_RAW) if uses_beam(src) else cls.GFile(src, "rb")) as fin:
            with (fs.create(dst, compression_type=_RAW) if uses_beam(dst) else cls.GFile(dst, "wb")) as fout:
                shutil.copyfileobj(fin, fout, 16 * 2**20)
        return None

    @classmethod
    def walk(cls, top: str):
        if not uses_beam(top):
            yield from cls._tf().walk(top)
            return
        base = str(top).rstrip("/")
        folders: dict[str, list[str]] = {}
        for p, _ in _beam_files_under(base):
            head, _, name = p.rpartition("/")
            folders.setdefault(head, []).append(name)
        for folder in sorted(folders):
            yield folder, [], sorted(folders[folder])


def join(path: str, *parts: str) -> str:
    if is_remote(path):
        return "/".join([str(path).rstrip("/"), *parts])
    return os.path.join(path, *parts)


def normalize(path: str) -> str:
    """Absolute local path (symlinks resolved), or the remote path without a trailing slash."""
    if is_remote(path):
        return str(path).rstrip("/")
    return os.path.realpath(os.path.abspath(os.path.expanduser(str(path))))


def dirname(path: str) -> str:
    if is_remote(path):
        scheme, _, rest = str(path).rstrip("/").partition("://")
        head = rest.rsplit("/", 1)[0] if "/" in rest else rest
        return f"{scheme}://{head}"
    return os.path.dirname(path)


def basename(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1] if is_remote(path) else os.path.basename(path)


def exists(path: str) -> bool:
    return _gfile().exists(path) if is_remote(path) else os.path.lexists(path)


def isdir(path: str) -> bool:
    return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    if is_remote(path):
        g = _gfile()
        return g.exists(path) and not g.isdir(path)
    return os.path.isfile(path)


def listdir(path: str) -> list[str]:
    if is_remote(path):
        return sorted(name.rstrip("/") for name in _gfile().listdir(path))
    return sorted(os.listdir(path))


def makedirs(path: str) -> None:
    if is_remote(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def rmtree(path: str) -> None:
    if is_remote(path):
        if _gfile().exists(path):
            _gfile().rmtree(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def remove(path: str) -> None:
    if is_remote(path):
        if _gfile().exists(path):
            _gfile().remove(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def read_text(path: str) -> str:
    if is_remote(path):
        with _gfile().GFile(path, "r") as f:
            return f.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_bytes(path: str) -> bytes:
    if is_remote(path):
        with _gfile().GFile(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def copy_file(src: str, dst: str) -> None:
    if is_remote(src) or is_remote(dst):
        _gfile().copy(src, dst, overwrite=True)
    else:
        shutil.copyfile(src, dst)


def copy_tree(src: str, dst: str) -> None:
    """Copies folder ``src`` into ``dst`` (created), on any filesystem."""
    if not is_remote(src) and not is_remote(dst):
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return
    g = _gfile()
    for root, _, names in g.walk(src):
        rel = root[len(src.rstrip("/")):].strip("/")
        target = join(dst, rel) if rel else dst
        g.makedirs(target)
        for n in names:
            g.copy(join(root, n), join(target, n), overwrite=True)


def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path``: temporary file + rename locally, one object write remotely."""
    if is_remote(path):
        if str(path).startswith("ram://") and _gfile().exists(path):
            _gfile().remove(path)  # TF's ram:// filesystem does not truncate on "w"
        with _gfile().GFile(path, "w") as f:
            f.write(text)
        return
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------------------------
# Ownership.
# --------------------------------------------------------------------------------------------


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


def _check_writable_location(path: str, option: str) -> None:
    """Local paths: a file in the way, or a folder we may not write into, fails now."""
    if is_remote(path):
        return
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


# --------------------------------------------------------------------------------------------
# One writer per output.
# --------------------------------------------------------------------------------------------

# Lock files this process holds: lock path -> token. Released by the stage entry point that took
# them (:func:`holding_locks`), or at exit.
_HELD: dict[str, str] = {}
# What each held output held when it was claimed (lock path -> relative paths): publish_dir
# replaces or removes nothing that appeared since.
_SEEN: dict[str, frozenset[str]] = {}
# Open descriptors of the local lock files this process holds (their kernel locks).
_FDS: dict[str, int] = {}
_BEAM_LOCKS: set[str] = set()


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
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
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
    if not lock:
        return _claim_state(path, stage, complete_marker, overwrite, option)
    held = lock_path(path) in _HELD
    acquire_lock(path, stage, option=option)
    try:
        state = _claim_state(path, stage, complete_marker, overwrite, option)
        if not held:
            _SEEN[lock_path(path)] = _snapshot(path)
        return state
    except BaseException:
        if not held:
            release_lock(path)
        raise


_LAST_CLAIMED: list[str] = []

PAUSE_ENV = "TFSEG_TEST_PAUSE_AT"


def pause_point(name: str) -> None:
    """A named step where a test may stop this process (for a kill -9 at that moment): with
    ``TFSEG_TEST_PAUSE_AT=name`` the process writes ``TFSEG_TEST_PAUSE_FILE`` (its pid) and waits
    there until killed. Points: ``publish`` (a staged output complete, not yet renamed into place),
    ``backup`` (a fit's new backup written under its temporary name, not yet renamed),
    ``backup-rename`` (half-way through renaming the old pair aside), ``epoch``
    (a fit's epoch finished and backed up)."""
    if os.environ.get(PAUSE_ENV) != name:
        return
    flag = os.environ.get("TFSEG_TEST_PAUSE_FILE")
    if flag:
        atomic_write_text(flag, str(os.getpid()))
    while True:
        time.sleep(1)


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
    for folder, dirs, files in _gfile().walk(base):
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


def safe(text: str) -> str:
    """``text`` with control characters escaped, for one-line messages (a file may be named
    ``"a\nerror: b.png"``)."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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


# --------------------------------------------------------------------------------------------
# Publishing.
# --------------------------------------------------------------------------------------------


def _staging_name(final: str) -> str:
    return f"{STAGING_PREFIX}{basename(final)}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a staging folder's writer, say)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(final: str) -> None:
    """Removes staging folders that killed runs of this host left beside ``final``.

    Only folders named ``.tfseg-staging-NAME-HOST-PID-*`` holding tfseg's ownership record, whose
    process is gone, are removed: nothing else is touched.
    """
    if uses_beam(final):  # staged beside the output, on the same store
        parent = dirname(normalize(final))
        prefix = join(parent, f"{STAGING_PREFIX}{basename(final)}-{socket.gethostname()}-")
        names = {p[len(parent) + 1:].split("/", 1)[0]
                 for p, _ in _beam_files_under_prefix(prefix)}
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
    prefix = f"{STAGING_PREFIX}{name}-{socket.gethostname()}-"
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        if not entry.startswith(prefix):
            continue
        pid = entry[len(prefix):].split("-", 1)[0]
        full = os.path.join(parent, entry)
        if pid.isdigit() and not pid_alive(int(pid)) and owner(full) is not None:
            logger.info("removing %s, left by an interrupted run", full)
            shutil.rmtree(full, ignore_errors=True)


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
    held = lock_path(final) in _HELD
    state = claim(final, stage, complete_marker=complete_marker, overwrite=overwrite, inputs=inputs,
                  option=option)
    seen = _SEEN.get(lock_path(final), frozenset())
    try:
        with _staged(final, stage, state, seen, complete_marker, option) as staging:
            yield staging
    finally:
        if not held:
            release_lock(final)


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
        os.chmod(staging, 0o777 & ~_umask())
    try:
        yield staging
    except BaseException:
        rmtree(staging)
        raise
    if complete_marker is not None and not isfile(join(staging, complete_marker)):
        rmtree(staging)
        raise RuntimeError(f"tfseg {stage} did not write its completion marker {complete_marker}")
    pause_point("publish")
    new = _appeared(final, seen)
    if new:
        _refuse_publish(final, staging, stage, new, option)
    if is_remote(final):
        _publish_by_copy(staging, final, complete_marker, seen=seen if state != "absent" else frozenset())
        rmtree(staging)
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
    g = _gfile()
    if is_remote(staging):  # staged on the same store (beam_filesystems)
        rels = [p[len(staging.rstrip("/")) + 1:] for p, _ in _beam_files_under(staging)]
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
