"""What convert refuses and how it says so, in one line (:class:`tfseg.errors.TfsegError`).

Checks made on the launcher before a job starts (the input folder, remote paths,
``--image-size``), :class:`NothingConverted` when every case was rejected, and the one-line reason
an unexpected exception is reported with (rejected.jsonl, runner errors).
"""

from __future__ import annotations

import os

from tfseg.convert.base import MAX_PIXELS, _pil_reason
from tfseg.errors import TfsegError
from tfseg.io import fs


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and its message's first meaningful line."""
    text = _pil_reason(e) if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def check_remote_path(path: str, option: str) -> None:
    """A scheme path must be on a filesystem Beam's FileSystems knows (the job's workers read and
    write through it), and name a folder inside the bucket.

    Raises:
      TfsegError: an unknown scheme (``ram://`` is TF's only), a missing extra, or a bucket root.
    """
    from apache_beam.io.filesystems import FileSystems

    try:
        FileSystems.get_filesystem(path)
    except ValueError:
        scheme = str(path).split("://", 1)[0]
        hint = {"gs": " (pip install google-cloud-storage, or apache-beam[gcp])",
                "s3": " (pip install apache-beam[aws])", "hdfs": " (pip install hdfs)"}.get(scheme, "")
        raise TfsegError(f"{option} {path}: Beam has no filesystem for {scheme}:// here{hint}; convert reads and "
                         "writes through Beam's FileSystems (local, gs://, s3://, hdfs://)") from None
    rest = str(path).split("://", 1)[1].strip("/")
    if "/" not in rest:
        raise TfsegError(f"{option} {path}: is a bucket root; name a folder inside it (e.g. {path.rstrip('/')}/data)")


def check_input(input_dir: str) -> None:
    """Refuses an input folder that is missing (remote: no object under it) or not a folder."""
    if fs.is_remote(input_dir):
        if not fs.isdir(input_dir):
            raise TfsegError(f"{input_dir}: input folder not found (no object under it)")
        return
    if not os.path.exists(input_dir):
        raise TfsegError(f"{input_dir}: input directory not found")
    if not os.path.isdir(input_dir):
        raise TfsegError(f"{input_dir}: --input must be a directory")
    if not os.listdir(input_dir):
        raise TfsegError(f"{input_dir}: input directory is empty")


def check_image_size(image_size) -> tuple[int, int] | None:
    """Validates ``--image-size`` (H, W): positive, at most :data:`MAX_PIXELS` pixels.

    Raises:
      TfsegError: a non-positive side or too many pixels.
    """
    if image_size is None:
        return None
    h, w = (int(x) for x in image_size)
    if h < 1 or w < 1:
        raise TfsegError(f"--image-size {h}x{w}: sides must be positive")
    if h * w > MAX_PIXELS:
        raise TfsegError(f"--image-size {h}x{w}: {h * w} pixels exceeds the limit of {MAX_PIXELS} (2**26, "
                         "e.g. 8192x8192)")
    return h, w


class NothingConverted(TfsegError):
    """Every case was rejected: nothing is published. The CLI exits 1 for it (a data failure,
    not a misuse; ``exit_code``), with the commonest reasons in the one-line message."""

    exit_code = 1


def no_case_message(input_dir: str, rejected: list[dict]) -> str:
    if not rejected:
        return f"{input_dir}: no case converted; nothing was published"
    reasons: dict[str, list[dict]] = {}
    for row in rejected:
        reasons.setdefault(row["reason"], []).append(row)
    top = sorted(reasons.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    first = "; ".join(f"{rows[0]['file']}: {reason}" + (f" (and {len(rows) - 1} alike)" if len(rows) > 1 else "")
                      for reason, rows in top[:2])
    more = f"; {len(top) - 2} other reasons" if len(top) > 2 else ""
    return (f"{input_dir}: no case converted, all {len(rejected)} rejected, nothing was published: "
            f"{first}{more}")
