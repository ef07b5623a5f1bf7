"""Where records go: the shard of a case, shard names and counts, and batch fragments.

A case's shard comes from a stable hash of its id and a split's shard count from its input size
(never from the runner's workers), so every runner writes the same shards. The workers that
encode a batch of cases (all of one shard, consecutive by id) write its records to one fragment
file under ``_records/`` (length-prefixed records, in id order); a shard is its fragments' records
in batch order, so no record's bytes travel through a shuffle. Fragments and remote shards go
through Beam's ``FileSystems``, so gs://, s3:// and hdfs:// outputs work in every worker.
"""

from __future__ import annotations

import math
import os
import struct
from typing import BinaryIO, Iterator

from tfseg.convert.base import Case, hash_fraction

# Input bytes a shard holds by default (:func:`count_shards`).
SHARD_TARGET_BYTES = 150 * 2**20


def shard_of(case_id: str, num_shards: int) -> int:
    """The shard a case goes to: a stable hash of its id (same on every machine and run)."""
    return min(num_shards - 1, int(hash_fraction("shard:" + case_id) * num_shards))


def shard_name(split: str, index: int, num_shards: int, compression: str = "") -> str:
    suffix = ".tfrecord.gz" if compression == "GZIP" else ".tfrecord"
    return f"{split}-{index:05d}-of-{num_shards:05d}{suffix}"


def count_shards(case_bytes: int, n_cases: int, requested: int | None) -> int:
    """Shards of a split: ``--num-shards``, else one per ~150 MB of input. Never from the
    runner's worker count, so every runner writes the same shards (byte-identical output)."""
    if requested:
        return requested
    n = max(1, math.ceil(case_bytes / SHARD_TARGET_BYTES))
    return min(n, max(1, n_cases))


def file_bytes(case: Case, sizes: dict[str, int] | None = None) -> int:
    """Bytes of a case's files (``sizes``: a remote input's listing, see base.file_sizes)."""
    total = 0
    for _, path in case.files:
        if sizes:
            total += sizes.get(path, 0)
            continue
        try:
            total += os.path.getsize(path)
        except OSError:
            pass
    return total


# Batch fragments live under OUTPUT/_records until their shard is written.
SPILL_DIR = "_records"

_LENGTH = struct.Struct("<Q")


def fragment_path(spill_dir: str, split: str, shard: int, index: int) -> str:
    """Where batch ``index`` of shard ``shard`` keeps its records until the shard is written
    (the same path on a retry of the batch, which replaces it)."""
    return "/".join([spill_dir.rstrip("/"), f"{split}-{shard:05d}", f"{index:06d}.frag"])


def open_write(path: str) -> BinaryIO:
    """A file opened for writing: plain ``open`` locally (folders made), Beam's FileSystems for
    scheme paths."""
    if "://" in path:
        from apache_beam.io.filesystems import FileSystems

        return FileSystems.create(path, compression_type="uncompressed")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return open(path, "wb")


def open_read(path: str) -> BinaryIO:
    if "://" in path:
        from apache_beam.io.filesystems import FileSystems

        return FileSystems.open(path, compression_type="uncompressed")
    return open(path, "rb")


def _crc32c():
    """CRC-32C (Castagnoli): google-crc32c's (hardware) where installed, else crcmod's, which
    apache-beam[tfrecord] requires."""
    try:
        import google_crc32c

        return google_crc32c.value
    except ImportError:
        import crcmod.predefined

        return crcmod.predefined.mkPredefinedCrcFun("crc-32c")


_CRC = None


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C rotated right by 15 bits plus 0xa282ead8."""
    global _CRC
    if _CRC is None:
        _CRC = _crc32c()
    crc = _CRC(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


_U32 = struct.Struct("<I")


def write_tfrecord(f: BinaryIO, record: bytes) -> None:
    """Appends ``record`` to an uncompressed TFRecord file as TF's TFRecordWriter frames it
    (length, its masked CRC, data, its masked CRC), without importing TensorFlow in the worker."""
    head = _LENGTH.pack(len(record))
    f.write(head)
    f.write(_U32.pack(masked_crc32c(head)))
    f.write(record)
    f.write(_U32.pack(masked_crc32c(record)))


def write_frame(f: BinaryIO, record: bytes) -> None:
    """Appends one record to a fragment: its length (8 bytes, little-endian), then its bytes."""
    f.write(_LENGTH.pack(len(record)))
    f.write(record)


def read_frames(path: str) -> Iterator[bytes]:
    """The records of a fragment, in order.

    Raises:
      OSError: a truncated fragment (a worker died while writing it and was not retried).
    """
    with open_read(path) as f:
        while True:
            head = f.read(_LENGTH.size)
            if not head:
                return
            if len(head) != _LENGTH.size:
                raise OSError(f"{path}: truncated record fragment")
            (n,) = _LENGTH.unpack(head)
            record = f.read(n)
            if len(record) != n:
                raise OSError(f"{path}: truncated record fragment")
            yield record


def write_bytes(path: str, data: bytes) -> None:
    """Writes ``path`` through Beam's FileSystems (local or remote)."""
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(path, compression_type="uncompressed") as f:
        f.write(data)


def upload(local_path: str, path: str) -> None:
    """Copies a local file to ``path`` on a filesystem Beam knows (gs://, s3://, hdfs://)."""
    import shutil

    from apache_beam.io.filesystems import FileSystems

    with open(local_path, "rb") as fin, FileSystems.create(path, compression_type="uncompressed") as fout:
        shutil.copyfileobj(fin, fout, 16 * 2**20)
