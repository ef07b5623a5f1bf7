"""Config files (YAML or JSON) and ``--set key=value`` overrides with dotted keys."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import types
import typing
from typing import Any, ClassVar, Iterable

from tfseg.errors import TfsegError, first_line


def load_config(path: str) -> dict:
    """Reads a YAML or JSON mapping.

    Raises:
      TfsegError: missing file, parse error, or not a mapping.
    """
    import yaml

    from tfseg.io import fs

    if not fs.isfile(path):
        raise TfsegError(f"{path}: config file not found")
    try:
        text = fs.read_text(path)
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise TfsegError(f"{path}: cannot parse config ({first_line(e)})") from None
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


# --------------------------------------------------------------------------------------------
# Typed stage configs: frozen dataclasses checked from their annotations.
# --------------------------------------------------------------------------------------------


def setting(default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING, choices: tuple | None = None,
            at_least: float | None = None, above: float | None = None, at_most: float | None = None,
            below: float | None = None, parse=None, note: str = ""):
    """A config dataclass field with its checks as metadata, which :func:`config_from_mapping` runs:

    Args:
      default, default_factory: as for :func:`dataclasses.field`.
      choices: the values allowed (after ``parse``).
      at_least, above, at_most, below: bounds of a number (closed, open, closed, open).
      parse: a function run on a given value before the annotation's coercion (``"256x160"`` ->
        ``(256, 160)``, ``"ADAM"`` -> ``"adam"``); a TfsegError it raises is prefixed with the key.
      note: added to a bound's message in parentheses (``"0 turns it off"``).
    """
    bounds = {k: v for k, v in dict(at_least=at_least, above=above, at_most=at_most, below=below).items()
              if v is not None}
    metadata = {"choices": tuple(choices) if choices is not None else None, "bounds": bounds, "parse": parse,
                "note": note}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def _bound_words(bounds: dict, note: str) -> str:
    low = ("[", bounds["at_least"]) if "at_least" in bounds else ("(", bounds["above"]) if "above" in bounds else None
    high = ("]", bounds["at_most"]) if "at_most" in bounds else (")", bounds["below"]) if "below" in bounds else None
    if low and high:
        words = f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    elif low:
        words = f"{'>=' if low[0] == '[' else '>'} {low[1]:g}"
    else:
        words = f"{'<=' if high[0] == ']' else '<'} {high[1]:g}"
    return f"{words} ({note})" if note else words


def _check_setting(f: dataclasses.Field, value, *, what: str) -> None:
    meta = f.metadata
    if isinstance(value, float) and not math.isfinite(value):
        raise TfsegError(f"{what}: {f.name} must be a finite number, got {value}")
    if value is None or not meta:
        return
    if meta["choices"] is not None and not any(value == c and type(value) is type(c) for c in meta["choices"]):
        raise TfsegError(f"{what}: {f.name} = {value!r} is not one of {', '.join(map(str, meta['choices']))}")
    bounds = meta["bounds"]
    if bounds and isinstance(value, (int, float)) and not isinstance(value, bool):
        inside = (value >= bounds.get("at_least", -math.inf) and value > bounds.get("above", -math.inf)
                  and value <= bounds.get("at_most", math.inf) and value < bounds.get("below", math.inf))
        if not inside:
            raise TfsegError(f"{what}: {f.name} must be {_bound_words(bounds, meta['note'])}, got {value:g}")


def _allows_none(annotation) -> bool:
    return annotation is Any or (typing.get_origin(annotation) in (typing.Union, types.UnionType)
                                 and type(None) in typing.get_args(annotation))


def config_from_mapping(cls, mapping: dict, *, what: str):
    """An instance of the frozen dataclass ``cls`` from ``mapping``: each value parsed by its
    field's ``parse`` (:func:`setting`), coerced to its annotation (:func:`coerce_field`) and
    checked against its choices and bounds, then ``cls.validate()`` when it has one. None for a
    field that has a default and whose annotation does not allow None means the default (an
    empty YAML value, an option not given).

    Args:
      cls: a dataclass whose annotations are ``str``, ``int``, ``float``, ``bool``, ``dict``,
        ``tuple``/``tuple[int, ...]``, ``list``, ``Any`` or ``X | None`` of those.
      mapping: field name -> value (YAML, JSON, ``--set`` or keyword arguments).
      what: how messages name the config, e.g. ``"evaluate config"``.

    Raises:
      TfsegError: an unknown key, a missing required key, a value of the wrong type or outside
        its choices or bounds, named.
    """
    if not isinstance(mapping, dict):
        raise TfsegError(f"{what}: expected a mapping, got {type(mapping).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise TfsegError(f"{what}: unknown key {unknown[0]!r} (known keys: {', '.join(fields)})")
    for name, f in fields.items():
        if name not in mapping and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TfsegError(f"{what}: {name!r} is required")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in mapping.items():
        f = fields[key]
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if value is None and has_default and not _allows_none(hints[key]):
            continue
        parse = f.metadata.get("parse")
        if parse is not None and value is not None:
            try:
                value = parse(value)
            except TfsegError as e:
                raise TfsegError(f"{what}: {key}: {e}") from None
        values[key] = coerce_field(key, value, hints[key], what=what)
        _check_setting(f, values[key], what=what)
    cfg = cls(**values)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def config_from_call(cls, args: tuple, kwargs: dict, *, what: str):
    """``cls`` from a call's positional arguments (in field order) and keyword arguments, the
    way a stage's ``run_<stage>(...)`` takes its config's fields directly.

    Raises:
      TfsegError: as :func:`config_from_mapping`; too many positional arguments or one given twice.
    """
    names = [f.name for f in dataclasses.fields(cls)]
    if len(args) > len(names):
        raise TfsegError(f"{what}: {len(args)} positional values for {len(names)} keys")
    given = dict(zip(names, args))
    twice = sorted(set(given) & set(kwargs))
    if twice:
        raise TfsegError(f"{what}: {twice[0]!r} given twice")
    return config_from_mapping(cls, {**given, **kwargs}, what=what)


def config_to_json(cfg) -> dict:
    """A frozen config as JSON-ready values (tuples as lists), in field order."""
    def plain(v):
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def coerce_field(key: str, value, annotation, *, what: str):
    """``value`` as the type ``annotation`` names: ``"3"`` -> 3 for an int, ``"false"`` -> False for
    a bool, ``[1, 2]`` -> ``(1, 2)`` for a tuple; None only where the annotation allows it.

    Raises:
      TfsegError: ``"{what}: {key} = {value!r} is not a valid {type}"``.
    """
    if annotation is Any:
        return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return coerce_field(key, value, option, what=what)
            except TfsegError:
                continue
        raise TfsegError(f"{what}: {key} = {value!r} is not a valid "
                         f"{' or '.join(_type_name(a) for a in options)}")
    bad = TfsegError(f"{what}: {key} = {value!r} is not a valid {_type_name(annotation)}")
    base = origin or annotation
    if base is bool:
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        raise bad
    if base is int:
        try:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        except (TypeError, ValueError, OverflowError):
            raise bad from None
    if base is float:
        if isinstance(value, bool):
            raise bad
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    if base is str:
        if isinstance(value, (dict, list, tuple, set, bool)) or value is None:
            raise bad
        return str(value)
    if base in (tuple, list):
        if not isinstance(value, (tuple, list)):
            raise bad
        items = [coerce_field(key, v, args[0], what=what) for v in value] if args and args[0] is not Any else list(value)
        return tuple(items) if base is tuple else items
    if base is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise bad
    return value


def _type_name(annotation) -> str:
    base = typing.get_origin(annotation) or annotation
    return {bool: "boolean", int: "integer", float: "number", str: "string", dict: "mapping",
            tuple: "list", list: "list"}.get(base, getattr(base, "__name__", str(base)))


def stage_config(cls, args: tuple, kwargs: dict, *, what: str):
    """The config a ``run_<stage>(...)`` call means: one ``cls`` instance or one mapping, or the
    config's fields as arguments (positional in field order, or by name). Always checked, so an
    instance built by hand gets the same coercion and messages as a config file.

    Raises:
      TfsegError: as :func:`config_from_mapping`.
    """
    if len(args) == 1 and not kwargs and isinstance(args[0], (cls, dict)):
        given = args[0]
        if isinstance(given, cls):
            given = {f.name: getattr(given, f.name) for f in dataclasses.fields(cls)}
        return config_from_mapping(cls, given, what=what)
    return config_from_call(cls, args, kwargs, what=what)


def default_of(cls, name: str):
    """The default of field ``name`` of config dataclass ``cls`` (the CLI's option defaults come
    from the configs, not from literals of their own)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


class StageConfig:
    """What every stage's frozen config dataclass shares: built from a mapping or from a
    ``run_<stage>(...)`` call and written as JSON beside the stage's output. A subclass sets
    ``WHAT``, how messages name it (e.g. ``"convert config"``)."""

    WHAT: ClassVar[str] = "config"

    @classmethod
    def from_dict(cls, config: dict):
        """Raises: TfsegError: an unknown key, a missing one or a value of the wrong type."""
        return config_from_mapping(cls, config, what=cls.WHAT)

    @classmethod
    def from_call(cls, args: tuple, kwargs: dict):
        """From ``run_<stage>``'s arguments: a config, a mapping, or the fields themselves."""
        return stage_config(cls, args, kwargs, what=cls.WHAT)

    def to_json(self) -> dict:
        return config_to_json(self)
