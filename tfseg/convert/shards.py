"""Where records go: the shard of a case, shard names and counts, and spilled record files.

A case's shard comes from a stable hash of its id and a split's shard count from its input size
(never from the runner's workers), so every runner writes the same shards. Spilled records (one
file a case, under ``_records/`` until its shard is written) and remote shards go through Beam's
``FileSystems``, so gs://, s3:// and hdfs:// outputs work in every worker.
"""

from __future__ import annotations

import math
import os

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


# Spilled records live under OUTPUT/_records until their shard is written.
SPILL_DIR = "_records"


def spill_path(spill_dir: str, split: str, shard: int, case_id: str) -> str:
    """Where a spilled record lives until its shard is written."""
    import hashlib

    name = hashlib.sha1(case_id.encode("utf-8")).hexdigest() + ".rec"
    return "/".join([spill_dir.rstrip("/"), f"{split}-{shard:05d}", name])


def write_bytes(path: str, data: bytes) -> None:
    """Writes ``path`` through Beam's FileSystems (local or remote)."""
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(path, compression_type="uncompressed") as f:
        f.write(data)


def read_bytes(path: str) -> bytes:
    """Reads ``path`` through Beam's FileSystems (local or remote)."""
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path, compression_type="uncompressed") as f:
        return f.read()


def upload(local_path: str, path: str) -> None:
    """Copies a local file to ``path`` on a filesystem Beam knows (gs://, s3://, hdfs://)."""
    import shutil

    from apache_beam.io.filesystems import FileSystems

    with open(local_path, "rb") as fin, FileSystems.create(path, compression_type="uncompressed") as fout:
        shutil.copyfileobj(fin, fout, 16 * 2**20)
