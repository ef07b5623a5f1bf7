"""What every dataset layout provides to the Beam conversion job.

A layout reads one dataset in its original on-disk layout. It lists cases cheaply (paths only,
on the launcher), and loads one case into numpy arrays (in a Beam worker). Everything shared
(validation, resizing, encoding, statistics, sharding, splits) lives in
:mod:`tfseg.convert.pipeline`, so a new layout is two small functions.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np


class BadCase(Exception):
    """A case that cannot be converted; the job records it in rejected.jsonl and goes on.

    Args:
      path: the offending file.
      reason: one line, e.g. "truncated JPEG" or "mask 640x480 != image 1918x1280".
    """

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Case:
    """One example to convert, as listed on the launcher (paths only, nothing loaded).

    Attributes:
      case_id: unique id, written as the record's source id (e.g. the file stem).
      files: named source paths, e.g. ``{"image": ..., "mask": ...}``; layout-specific.
      group: cases sharing a group always land in the same split (Carvana's car id).
      split: the dataset's official split for this case, or None to split by hash of ``group``.
    """

    case_id: str
    files: tuple[tuple[str, str], ...]
    group: str = ""
    split: str | None = None

    @property
    def paths(self) -> dict[str, str]:
        return dict(self.files)

    @property
    def main_path(self) -> str:
        return self.files[0][1] if self.files else self.case_id


@dataclasses.dataclass
class Loaded2D:
    """A decoded 2D case.

    Attributes:
      image: (H, W, C) uint8.
      mask: (H, W) uint8 class ids after the layout's label mapping (ignore = ignore_index),
        or None for unlabelled cases.
      image_bytes: the original encoded image when it can be stored as-is (JPEG/PNG), else None.
      image_format: ``"jpeg"`` or ``"png"`` for ``image_bytes``.
    """

    image: np.ndarray
    mask: np.ndarray | None
    image_bytes: bytes | None = None
    image_format: str | None = None


@dataclasses.dataclass
class Loaded3D:
    """A decoded, normalized 3D case.

    Attributes:
      volume: (D, H, W, C) float32, normalized.
      label: (D, H, W) uint8 class ids after the layout's label mapping, or None.
      spacing: voxel spacing in mm along D, H, W.
    """

    volume: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class LayoutInfo:
    """Static facts about a layout, copied into dataset.json."""

    name: str
    ndim: int
    channels: int
    class_names: tuple[str, ...]
    ignore_index: int | None = None
    label_mapping: dict = dataclasses.field(default_factory=dict)
    regions: dict = dataclasses.field(default_factory=dict)
    label_convention: str | None = None
    modalities: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class Layout:
    """Base class of the dataset layouts. Subclasses set ``name`` and implement three methods.

    Layout objects are pickled to Beam workers: keep their state to plain options.
    """

    name: str = ""

    def info(self) -> LayoutInfo:
        raise NotImplementedError

    def list_cases(self, root: str) -> list[Case]:
        """Lists the cases under ``root``; raises TfsegError if the layout is not found there."""
        raise NotImplementedError

    def load_case(self, case: Case) -> Any:
        """Loads one case as Loaded2D or Loaded3D; raises BadCase for unreadable inputs."""
        raise NotImplementedError

    @classmethod
    def make_sample(cls, output: str, count: int, seed: int = 0) -> None:
        """Writes ``count`` synthetic cases in this layout's original file formats to ``output``,
        with shapes a model can learn (``tfseg sample``; used by tests and the demo)."""
        raise NotImplementedError


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) from a string: the same on every machine, Python and run."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def parse_split_spec(spec: str) -> list[tuple[str, float]]:
    """Parses ``"train=0.8,val=0.1,test=0.1"`` into normalized (name, fraction) pairs.

    Raises:
      ValueError: malformed, negative or all-zero fractions.
    """
    parts = []
    for item in spec.split(","):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"split spec {spec!r}: expected NAME=FRACTION,... got {item!r}")
        frac = float(value)
        if frac < 0:
            raise ValueError(f"split spec {spec!r}: negative fraction for {name!r}")
        parts.append((name.strip(), frac))
    total = sum(f for _, f in parts)
    if total <= 0:
        raise ValueError(f"split spec {spec!r}: fractions sum to 0")
    return [(n, f / total) for n, f in parts]


def assign_split(case: Case, spec: list[tuple[str, float]]) -> str:
    """The official split if the case has one, otherwise by a stable hash of its group id."""
    if case.split:
        return case.split
    x = hash_fraction(case.group or case.case_id)
    acc = 0.0
    for name, frac in spec:
        acc += frac
        if x < acc:
            return name
    return spec[-1][0]

