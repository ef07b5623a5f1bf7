"""The one filesystem layer: every path tfseg reads or writes, local or remote, goes through here.

Paths with a scheme (``gs://``, ``s3://``, ``ram://`` ...) go through ``tf.io.gfile``; plain paths
through ``os`` (faster, and atomic renames). Inside :func:`beam_filesystems` (the convert stage,
whose Beam workers write through Beam's ``FileSystems``) the schemes Beam knows (gs://, s3://,
hdfs://, ...) go through Beam's ``FileSystems`` instead; ``ram://`` (TF-only) keeps
``tf.io.gfile``. Files tfseg writes whole (records, configs, markers) are written under a
temporary name and renamed (:func:`atomic_write_text`); leftovers of processes that died are
swept by :func:`sweep_dead`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
from typing import Iterator

logger = logging.getLogger(__name__)

# Names starting with this are tfseg's own bookkeeping (staging folders, locks, temporary files).
INTERNAL_PREFIX = ".tfseg-"


def is_remote(path: str) -> bool:
    """True for ``scheme://`` paths (gs://, s3://, hdfs://, ram://): no os calls on these."""
    return "://" in str(path)


def gfile():
    """The client for scheme paths: Beam's FileSystems inside :func:`beam_filesystems`, else
    ``tf.io.gfile``."""
    if _BEAM_DEPTH:
        return _BeamGfile
    import tensorflow as tf

    return tf.io.gfile


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


def beam_files_under_prefix(prefix: str) -> list[tuple[str, int]]:
    """(full path, size) of every object whose name starts with ``prefix``."""
    result = _beam_fs().match([str(prefix) + "**"])[0]
    return sorted((m.path, m.size_in_bytes) for m in result.metadata_list)


def beam_files_under(path: str, limit: int | None = None) -> list[tuple[str, int]]:
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
        return bool(beam_files_under(path, limit=1))

    @classmethod
    def listdir(cls, path: str) -> list[str]:
        if not uses_beam(path):
            return cls._tf().listdir(path)
        base = str(path).rstrip("/") + "/"
        return sorted({p[len(base):].split("/", 1)[0] for p, _ in beam_files_under(path)} - {""})

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
        files = [p for p, _ in beam_files_under(path)]
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
        for p, _ in beam_files_under(base):
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
    return gfile().exists(path) if is_remote(path) else os.path.lexists(path)


def isdir(path: str) -> bool:
    return gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    if is_remote(path):
        g = gfile()
        return g.exists(path) and not g.isdir(path)
    return os.path.isfile(path)


def listdir(path: str) -> list[str]:
    if is_remote(path):
        return sorted(name.rstrip("/") for name in gfile().listdir(path))
    return sorted(os.listdir(path))


def makedirs(path: str) -> None:
    if is_remote(path):
        gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def rmtree(path: str) -> None:
    if is_remote(path):
        if gfile().exists(path):
            gfile().rmtree(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def remove(path: str) -> None:
    if is_remote(path):
        if gfile().exists(path):
            gfile().remove(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def read_text(path: str) -> str:
    if is_remote(path):
        with gfile().GFile(path, "r") as f:
            return f.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_bytes(path: str) -> bytes:
    if is_remote(path):
        with gfile().GFile(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


@contextlib.contextmanager
def local_copy(path: str, read=None) -> Iterator[str]:
    """``path`` itself when local; else a temporary local copy of it (``read(path)`` gives its
    bytes, :func:`read_bytes` by default), for libraries that read local files only (nibabel,
    h5py). The copy is removed on exit; its name keeps ``path``'s (``.nii.gz`` matters)."""
    if not is_remote(path):
        yield path
        return
    data = (read or read_bytes)(path)
    with tempfile.TemporaryDirectory(prefix="tfseg-local-") as folder:
        local = os.path.join(folder, basename(path) or "file")
        with open(local, "wb") as f:
            f.write(data)
        yield local


def copy_file(src: str, dst: str) -> None:
    if is_remote(src) or is_remote(dst):
        gfile().copy(src, dst, overwrite=True)
    else:
        shutil.copyfile(src, dst)


def copy_tree(src: str, dst: str) -> None:
    """Copies folder ``src`` into ``dst`` (created), on any filesystem."""
    if not is_remote(src) and not is_remote(dst):
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return
    g = gfile()
    for root, _, names in g.walk(src):
        rel = root[len(src.rstrip("/")):].strip("/")
        target = join(dst, rel) if rel else dst
        g.makedirs(target)
        for n in names:
            g.copy(join(root, n), join(target, n), overwrite=True)


def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path``: temporary file + rename locally, one object write remotely."""
    if is_remote(path):
        if str(path).startswith("ram://") and gfile().exists(path):
            gfile().remove(path)  # TF's ram:// filesystem does not truncate on "w"
        with gfile().GFile(path, "w") as f:
            f.write(text)
        return
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a staging folder's writer, say)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def link_or_copy(src: str, dst: str) -> None:
    """``dst`` as the same file as ``src``: a hard link on a local disk (one copy of the bytes, so
    a run's published model and its checkpoint cost one file), a copy elsewhere or where the
    filesystem has no links."""
    if not is_remote(src) and not is_remote(dst):
        try:
            os.link(src, dst)
            return
        except OSError:  # another device, or a filesystem without hard links
            pass
    copy_file(src, dst)


def file_sizes(root: str) -> dict[str, int]:
    """{path: bytes} of every file under a remote ``root`` read through Beam's FileSystems (one
    listing, for convert's shard sizes); {} otherwise (local files are sized one by one)."""
    if not uses_beam(root):
        return {}
    return dict(beam_files_under(root))


def sweep_dead(parent: str, prefix: str, *, what: str = "left by an interrupted run", only=None) -> None:
    """Removes the entries ``PREFIX + PID + ...`` of folder ``parent`` whose process (of this host)
    no longer runs: staging folders, temporary files and scratch folders of killed runs.

    Args:
      parent: the folder to sweep (local or remote); absent folders are skipped.
      prefix: the name prefix, up to the pid (``.tfseg-tmp-``, ``tfseg-beam-``).
      what: the log line's reason.
      only: an optional predicate on the full path; entries it refuses are kept (e.g. a staging
        folder without tfseg's ownership record is not tfseg's).
    """
    if not isdir(parent):
        return
    for name in listdir(parent):
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        full = join(parent, name)
        if pid.isdigit() and not pid_alive(int(pid)) and (only is None or only(full)):
            logger.info("removing %s, %s", full, what)
            if isdir(full):
                rmtree(full)
            else:
                remove(full)
