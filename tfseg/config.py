"""Config files (YAML or JSON) and ``--set key=value`` overrides with dotted keys."""

from __future__ import annotations

import copy
import json
import math
import os
import re
from typing import Any, Iterable

from tfseg.errors import TfsegError


def load_config(path: str) -> dict:
    """Reads a YAML or JSON mapping.

    Raises:
      TfsegError: missing file, parse error, or not a mapping.
    """
    import yaml

    if not os.path.isfile(path):
        raise TfsegError(f"{path}: config file not found")
    try:
        with open(path) as f:
            text = f.read()
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TfsegError(f"{path}: cannot parse config ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TfsegError(f"{path}: config must be a mapping, got {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """Parses an override value the way YAML would (``3`` -> int, ``[1,2]`` -> list, ``x`` -> str)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(config: dict, overrides: Iterable[str]) -> dict:
    """Returns a copy of ``config`` with ``a.b.c=value`` overrides applied.

    Raises:
      TfsegError: an override without ``=``.
    """
    out = copy.deepcopy(config)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TfsegError(f"--set {item!r}: expected KEY=VALUE (dotted keys for sections, e.g. fit.epochs=5)")
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = parse_value(value)
    return out


def parse_size(text: str | None, ndim: int = 2) -> tuple[int, ...] | None:
    """Parses ``"HxW"`` (or ``"DxHxW"``) into a tuple of ints; None passes through.

    Raises:
      TfsegError: wrong number of dimensions or non-positive sizes.
    """
    if text is None or text == "":
        return None
    if isinstance(text, (list, tuple)):
        parts = [int(x) for x in text]
    else:
        try:
            parts = [int(x) for x in str(text).lower().split("x")]
        except ValueError:
            parts = []
    if len(parts) == 1 and ndim > 1:
        parts = parts * ndim
    if len(parts) != ndim or min(parts) <= 0:
        want = "x".join(["D", "H", "W"][-ndim:]) if ndim <= 3 else "N"
        raise TfsegError(f"size {text!r}: expected {want} with positive integers")
    return tuple(parts)


def parse_duration(text, *, option: str = "--budget") -> float:
    """Seconds from ``"90s"``, ``"20m"``, ``"1h"``, ``"1h30m"`` or a number of seconds.

    Raises:
      TfsegError: anything else, or a duration that is not positive.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "")
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?:in)?)?(?:(\d+(?:\.\d+)?)s?)?", s)
        if not s or not parts or not any(parts.groups()):
            raise TfsegError(f"{option} {text!r}: expected a duration such as 90s, 20m, 1h or 1h30m")
        h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
        seconds = h * 3600 + m * 60 + sec
    if not math.isfinite(seconds) or seconds <= 0:
        raise TfsegError(f"{option} {text!r}: the duration must be positive")
    return seconds


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"
