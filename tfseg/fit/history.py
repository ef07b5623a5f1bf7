"""What finished epochs leave in RUN_DIR for a resumed fit: history.csv (read, trimmed to the
finished epochs, rewritten after each epoch by :class:`HistoryWriter`), the epoch count of the
Keras backup (:func:`backup_epoch`), and the patience counters replayed from the history
(:func:`replay_patience`), so a restart neither repeats rows nor grants a fresh patience.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os

import keras

from tfseg import rundir
from tfseg.io import fs
from tfseg.io.fs import atomic_write_text

BACKUP_DIR = "backup"
_TRAINING_METADATA = "training_metadata.json"  # written by keras.callbacks.BackupAndRestore


def backup_epoch(run_dir: str) -> int:
    """The number of finished epochs recorded by BackupAndRestore in RUN_DIR (0 if none)."""
    path = os.path.join(run_dir, BACKUP_DIR, _TRAINING_METADATA)
    try:
        text = fs.read_text(path).strip()
        # TF's ram:// filesystem does not truncate on rewrite, so Keras's rewrites pile up there:
        # the last JSON object is the current one.
        decoder, record, pos = json.JSONDecoder(), None, 0
        objects = 0
        while pos < len(text):
            record, pos = decoder.raw_decode(text, pos)
            objects += 1
        if objects > 1:  # leave one object, which Keras's own reader expects
            atomic_write_text(path, json.dumps(record))
        return int(record["epoch"])
    except Exception:  # noqa: BLE001 - absent or unreadable on any filesystem: no finished epoch
        return 0


def read_history(run_dir: str) -> list[dict]:
    """The rows of RUN_DIR/history.csv as dicts (strings), [] when absent."""
    return read_csv_rows(os.path.join(run_dir, rundir.HISTORY_CSV))


def read_csv_rows(path: str) -> list[dict]:
    """The rows of a CSV file on any filesystem (local, gs://, ram://), [] when absent."""
    if not fs.isfile(path):
        return []
    return list(csv.DictReader(io.StringIO(fs.read_text(path), newline="")))


def trim_history(run_dir: str, finished_epochs: int) -> list[dict]:
    """Keeps the last row of each epoch < ``finished_epochs`` in history.csv; returns the rows.

    A crash between the CSV row and the backup of an epoch (or an earlier resume) can leave rows
    for epochs that will run again; they go, so the file ends with one row per epoch.
    """
    path = os.path.join(run_dir, rundir.HISTORY_CSV)
    if not fs.isfile(path):
        return []
    with io.StringIO(fs.read_text(path), newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        by_epoch: dict[int, dict] = {}
        for row in reader:
            try:
                epoch = int(row.get("epoch", ""))
            except ValueError:
                continue
            if epoch < finished_epochs:
                by_epoch[epoch] = row
    rows = [by_epoch[e] for e in sorted(by_epoch)]
    if not rows:
        fs.remove(path)
        return []
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())
    return rows


def monitored_values(rows: list[dict], monitor: str) -> list[float | None]:
    """The monitored value of each history row, None where it is missing or not finite."""
    values = []
    for row in rows:
        try:
            v = float(row.get(monitor, "nan"))
        except ValueError:
            v = float("nan")
        values.append(v if math.isfinite(v) else None)
    return values


def replay_patience(values, mode: str, patience: int) -> tuple[float | None, int]:
    """(best, wait) of a patience counter after the epochs in ``values``, as Keras counts them.

    Keras's rule (``EarlyStopping``, ``ReduceLROnPlateau`` without cooldown, ``min_delta`` 0): an
    epoch that beats the best resets ``wait`` to 0, any other epoch adds 1 (None values,
    epochs without the metric, are skipped). ``patience`` > 0 is the plateau schedule, where
    reaching it reduced the learning rate (restored with the optimizer from the backup) and reset
    ``wait``; early stopping passes 0, since reaching its patience ended the run.
    """
    best, wait = None, 0
    for v in values:
        if v is None:
            continue
        if best is None or (v > best if mode == "max" else v < best):
            best, wait = v, 0
        else:
            wait += 1
            if patience and wait >= patience:
                wait = 0
    return best, wait


class HistoryWriter(keras.callbacks.Callback):
    """Keras's CSVLogger, rewritten for any filesystem: ``epoch`` then the logs' keys, sorted.

    Object stores cannot append, so the whole file is rewritten after each epoch (a few
    hundred bytes per epoch); the rows of earlier epochs (``rows``) come from :func:`trim_history`.
    """

    def __init__(self, path: str, rows: list[dict]):
        super().__init__()
        self.path = path
        self.rows = [dict(r) for r in rows]

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": str(epoch)}
        for k, v in sorted((logs or {}).items()):
            try:
                row[k] = repr(float(v))
            except (TypeError, ValueError):
                row[k] = str(v)
        self.rows.append(row)
        fields = ["epoch"] + sorted({k for r in self.rows for k in r} - {"epoch"})
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n", restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, out.getvalue())
