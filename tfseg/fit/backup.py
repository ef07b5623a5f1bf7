"""Crash-consistent training state: the backup a resumed fit starts from, and the checkpoints.

Keras's ``BackupAndRestore`` and ``ModelCheckpoint`` write their files in place: a kill -9 or a
full disk while ``latest.weights.h5`` is written leaves a torn HDF5 file, and every later fit
on the folder failed on it. Here every file is written under a temporary name and renamed, and
the backup keeps the previous epoch's pair beside the latest:

    RUN_DIR/backup/latest.weights.h5   + training_metadata.json   (epoch N)
    RUN_DIR/backup/previous.weights.h5 + previous_metadata.json   (epoch N-1)

Each metadata file records the epoch and the SHA-256 of its weights file. On resume,
:func:`recover` verifies the latest pair (metadata readable, the weights file the one it names, the HDF5 file
opens and every dataset reads) and falls back to the previous pair, or to a fresh start, saying
which in one log line; a torn backup is never fatal.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

import keras

from tfseg import errors
from tfseg.io import faults, fs

logger = logging.getLogger(__name__)

LATEST_WEIGHTS = "latest.weights.h5"
LATEST_META = "training_metadata.json"  # Keras's name, so older run folders resume too
PREVIOUS_WEIGHTS = "previous.weights.h5"
PREVIOUS_META = "previous_metadata.json"


def replace_file(src: str, dst: str) -> None:
    """Moves file ``src`` over ``dst`` in one step where the filesystem can (a rename)."""
    if fs.is_remote(dst):
        import tensorflow as tf

        tf.io.gfile.rename(src, dst, overwrite=True)
    else:
        os.replace(src, dst)


def _tmp_name(folder: str, name: str) -> str:
    return fs.join(folder, f"{fs.INTERNAL_PREFIX}tmp-{os.getpid()}-{name}")


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def check_weights_file(path: str, digest: str | None = None) -> str | None:
    """Why the HDF5 weights file ``path`` cannot be trusted, or None when it reads whole (and,
    given ``digest``, is the file its metadata was written for)."""
    if not fs.isfile(path):
        return "missing"
    data = fs.read_bytes(path)
    if digest is not None and _digest(data) != digest:
        return "checksum differs from its metadata: torn or replaced"
    import io

    import h5py

    try:
        with h5py.File(io.BytesIO(data), "r") as f:
            # Reading every dataset: a torn file fails here if not at open.
            f.visititems(lambda name, obj: obj[()] if isinstance(obj, h5py.Dataset) else None)
    except Exception as e:  # noqa: BLE001 - h5py raises OSError, KeyError, ValueError on damage
        return f"unreadable HDF5 ({errors.first_line(e)})"
    return None


def _read_meta(path: str) -> dict | None:
    try:
        text = fs.read_text(path).strip()
        # TF's ram:// filesystem may not truncate on rewrite: the last JSON object is the current one.
        decoder, record, pos = json.JSONDecoder(), None, 0
        while pos < len(text):
            record, pos = decoder.raw_decode(text, pos)
            while pos < len(text) and text[pos].isspace():
                pos += 1
        return record if isinstance(record, dict) and int(record.get("epoch", -1)) >= 0 else None
    except Exception:  # noqa: BLE001 - absent or torn
        return None


def _verify(folder: str, weights: str, meta: str) -> tuple[int | None, str]:
    """(epoch, "") for a pair that reads whole, else (None, why)."""
    record = _read_meta(fs.join(folder, meta))
    if record is None:
        return None, f"{meta} missing or unreadable"
    why = check_weights_file(fs.join(folder, weights), record.get("sha256"))
    if why:
        return None, f"{weights}: {why}"
    return int(record["epoch"]), ""


def recover(run_dir: str, backup_dir: str = "backup") -> int:
    """Leaves ``RUN_DIR/backup`` holding a verified latest pair (or none) and returns its epoch.

    A torn latest pair is replaced by the previous one; with neither readable the broken files
    are removed (tfseg's own) and the fit starts over. Each fallback is one warning line.
    """
    folder = fs.join(run_dir, backup_dir)
    if not fs.isdir(folder):
        return 0
    if not fs.exists(fs.join(folder, LATEST_WEIGHTS)) and not fs.exists(
            fs.join(folder, LATEST_META)) and not fs.exists(fs.join(folder, PREVIOUS_WEIGHTS)):
        return 0
    epoch, why = _verify(folder, LATEST_WEIGHTS, LATEST_META)
    if epoch is not None:
        return epoch
    # Killed between renaming the old pair aside: the latest metadata already names the weights
    # now under the previous name.
    moved, _ = _verify(folder, PREVIOUS_WEIGHTS, LATEST_META)
    if moved is not None:
        logger.warning("%s: the backup was interrupted while being renamed; resuming after epoch %d", run_dir, moved)
        replace_file(fs.join(folder, PREVIOUS_WEIGHTS), fs.join(folder, LATEST_WEIGHTS))
        return moved
    prev, prev_why = _verify(folder, PREVIOUS_WEIGHTS, PREVIOUS_META)
    if prev is not None:
        logger.warning("%s: the latest backup cannot be read (%s); resuming from the previous one, after "
                       "epoch %d", run_dir, why, prev)
        replace_file(fs.join(folder, PREVIOUS_WEIGHTS), fs.join(folder, LATEST_WEIGHTS))
        replace_file(fs.join(folder, PREVIOUS_META), fs.join(folder, LATEST_META))
        return prev
    logger.warning("%s: the backup cannot be read (%s%s); starting over from epoch 1", run_dir, why,
                   f"; previous: {prev_why}" if fs.exists(fs.join(folder, PREVIOUS_WEIGHTS)) else "")
    for name in (LATEST_WEIGHTS, LATEST_META, PREVIOUS_WEIGHTS, PREVIOUS_META):
        fs.remove(fs.join(folder, name))
    return 0


class CrashSafeBackup(keras.callbacks.Callback):
    """A ``BackupAndRestore`` whose files are renamed into place (see the module). It restores
    the weights and the optimizer's state at the start; the fit passes the backup's epoch to
    ``model.fit(initial_epoch=...)`` (the public way; Keras's own callback sets a private field)."""

    def __init__(self, backup_dir: str):
        super().__init__()
        self.backup_dir = backup_dir

    def on_train_begin(self, logs=None):
        weights = fs.join(self.backup_dir, LATEST_WEIGHTS)
        if _read_meta(fs.join(self.backup_dir, LATEST_META)) is None or not fs.isfile(weights):
            return
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(weights)

    def on_epoch_end(self, epoch, logs=None):
        save(self.model, self.backup_dir, epoch + 1)
        faults.pause_point("epoch")


def _check_room(model, folder: str) -> None:
    """Raises ENOSPC when ``folder``'s disk lacks room for the model's weights file.
    HDF5 cannot fail a write cleanly: after a write that ran out of space it crashed the process
    (SIGSEGV) while closing the file at exit, after the one-line error. So the room is checked
    first, generously: the variables' bytes plus 2 KiB a variable (HDF5's headers: about 1 KiB
    measured) and 64 KiB."""
    import errno
    import shutil

    import numpy as np

    optimizer = getattr(model, "optimizer", None)
    variables = list(model.weights) + list(getattr(optimizer, "variables", None) or [])
    need = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables) + 2048 * len(variables) + 65536
    if shutil.disk_usage(folder).free < need:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # the CLI names the output


def drop_previous(backup_dir: str) -> None:
    """Removes the previous pair once the fit is published: it guards the latest pair only while
    that is being written, and a finished run keeps its last state once (issue 31)."""
    for name in (PREVIOUS_WEIGHTS, PREVIOUS_META):
        fs.remove(fs.join(backup_dir, name))


def save(model, backup_dir: str, epoch: int) -> None:
    """Writes the backup of ``epoch`` finished epochs: new files under temporary names, then
    latest -> previous and the new pair -> latest, each a rename."""
    fs.makedirs(backup_dir)
    local = not fs.is_remote(backup_dir)
    tmp_weights = _tmp_name(backup_dir, LATEST_WEIGHTS) if local else None
    if tmp_weights is None:  # h5py writes local files: stage there, then copy up
        fd, staged = tempfile.mkstemp(suffix=".weights.h5")
        os.close(fd)
    else:
        staged = tmp_weights
    try:
        _check_room(model, os.path.dirname(staged))
        model.save_weights(staged, overwrite=True)
        with open(staged, "rb") as f:
            digest = _digest(f.read())
        if tmp_weights is None:
            tmp_weights = _tmp_name(backup_dir, LATEST_WEIGHTS)
            fs.copy_file(staged, tmp_weights)
    except BaseException:
        if os.path.exists(staged):  # a half-written file is not left for the next run to sweep
            os.unlink(staged)
        raise
    finally:
        if staged != tmp_weights and os.path.exists(staged):
            os.unlink(staged)
    tmp_meta = _tmp_name(backup_dir, LATEST_META)
    fs.atomic_write_json(tmp_meta, {"epoch": int(epoch), "batch": 0, "sha256": digest})
    latest_w, latest_m = fs.join(backup_dir, LATEST_WEIGHTS), fs.join(backup_dir, LATEST_META)
    faults.pause_point("backup")
    if fs.isfile(latest_w) and _read_meta(latest_m) is not None:
        replace_file(latest_w, fs.join(backup_dir, PREVIOUS_WEIGHTS))
        faults.pause_point("backup-rename")
        replace_file(latest_m, fs.join(backup_dir, PREVIOUS_META))
    replace_file(tmp_weights, latest_w)
    replace_file(tmp_meta, latest_m)


def inference_view(model):
    """``model``'s layers (the same weights, nothing copied) as an uncompiled model: what a
    checkpoint or the published model holds. The optimizer's state (two Adam moments a weight:
    2/3 of a saved state) lives once, in the backup, where resuming and continuing read it;
    tfseg loads models with ``compile=False`` (a Keras user compiles before training on)."""
    return keras.Model(model.input, model.output, name=model.name)  # the same input structure


class AtomicCheckpoint(keras.callbacks.Callback):
    """``keras.callbacks.ModelCheckpoint`` (the model without its optimizer, :func:`inference_view`;
    every epoch or the best one) whose file is written under a temporary name and renamed: a
    checkpoint on disk is always a whole one.

    Args:
      filepath: the ``.keras`` file.
      monitor, mode: with ``save_best_only``, the log value and whether lower (``min``) or
        higher (``max``) is better.
      save_best_only: write only when ``monitor`` improves on the best so far.
      initial_value_threshold: the best value so far (a resumed run's).
    """

    def __init__(self, filepath: str, *, monitor: str = "val_loss", mode: str = "min",
                 save_best_only: bool = False, initial_value_threshold: float | None = None):
        super().__init__()
        if mode not in ("min", "max"):
            raise ValueError(f"mode {mode!r}: expected min or max")
        self.filepath, self.monitor, self.mode = filepath, monitor, mode
        self.save_best_only = save_best_only
        self.best = initial_value_threshold
        self._warned = False

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best if self.mode == "min" else value > self.best

    def on_epoch_end(self, epoch, logs=None):
        if self.save_best_only:
            value = (logs or {}).get(self.monitor)
            if value is None:
                if not self._warned:
                    logger.warning("checkpoint %s: no %r in the epoch's logs; not written", self.filepath,
                                   self.monitor)
                    self._warned = True
                return
            if not self._improved(float(value)):
                return
            self.best = float(value)
        folder = fs.dirname(self.filepath) if fs.is_remote(self.filepath) else os.path.dirname(self.filepath)
        tmp = _tmp_name(folder, fs.basename(self.filepath))
        inference_view(self.model).save(tmp, overwrite=True)
        replace_file(tmp, self.filepath)


def remove_torn_files(run_dir: str, folders=("backup", "checkpoints")) -> None:
    """Removes the temporary files (``.tfseg-tmp-PID-*``) that dead fits left half written."""
    for folder in folders:
        fs.sweep_dead(fs.join(run_dir, folder), f"{fs.INTERNAL_PREFIX}tmp-",
                      what="left half written by an interrupted fit")
