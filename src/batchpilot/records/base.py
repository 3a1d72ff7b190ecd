"""What every record shares: the typed ⇄ JSON codec, the schema-version check, the atomic writer and the
bounded reader.

A record is a frozen dataclass whose fields mirror its JSON object key for key (nested objects are nested
dataclasses, lists are tuples), so one generic codec writes and reads them all:

- writing (:meth:`Record.to_dict`; :func:`to_json` for a nested value): ``schema_version`` first, then
  every field in declaration order; non-finite floats become ``null`` (JSON has no infinity); a field
  declared with :data:`EXTRA` metadata is left out while it is ``None`` (a key that only one producer adds, e.g.
  ``plan --json``'s warnings);
- reading (:meth:`Record.from_dict`): the version is checked first, then every field is checked against its
  annotation (``int`` refuses ``true`` and ``4.0``, ``float`` takes ``null`` as ∞, ``Literal`` its values);
  unknown keys are ignored; the first problem is one line naming the file, the key path, what was found
  and how to get a good record (re-run the stage that writes it).

    >>> from dataclasses import dataclass
    >>> from typing import ClassVar
    >>> @dataclass(frozen=True, kw_only=True, slots=True)
    ... class Example(Record):
    ...     SCHEMA_VERSION: ClassVar[int] = 1
    ...     KIND: ClassVar[str] = "example record"
    ...     RERUN: ClassVar[str] = "write it again"
    ...     ratio: float
    >>> Example(ratio=float("inf")).to_dict()
    {'schema_version': 1, 'ratio': None}
    >>> Example.from_dict({"schema_version": 1, "ratio": None})
    Example(ratio=inf)
    >>> Example.from_dict({"schema_version": 2, "ratio": 1.0})
    Traceback (most recent call last):
    ...
    batchpilot.records.base.RecordError: example record has schema_version 2; this batchpilot reads only schema_version 1; write it again
"""

from __future__ import annotations

import json
import math
import os
import types
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from batchpilot.errors import BatchpilotError
from batchpilot.io import read_json_object

R = TypeVar("R", bound="Record")

_SHOWN_CHARS = 40
"""How much of a bad value an error message quotes."""


class RecordError(BatchpilotError):
    """A record this batchpilot cannot read or write: missing or unknown schema version, a missing key, a value
    of the wrong type, a file that cannot be written."""


EXTRA: dict[str, Any] = {"omit_none": True}
"""Field metadata of a key that only some producers fill: ``field(default=None, metadata=EXTRA)`` is absent
from the JSON object while ``None``."""


class _Bad(Exception):
    """A problem at a key path while decoding (turned into one :class:`RecordError` line by the caller)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path, self.problem = path, problem


# ---------------------------------------------------------------------------------------------- writing
def to_json(value: Any) -> Any:
    """The plain-JSON form of a record value (dataclasses field by field, tuples as lists, ∞/NaN as null)."""
    if is_dataclass(value) and not isinstance(value, type):
        custom = getattr(value, "json_encode", None)
        if custom is not None:
            return to_json(custom())
        return {f.name: to_json(getattr(value, f.name)) for f in fields(value)
                if not (f.metadata.get("omit_none") and getattr(value, f.name) is None)}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"a record cannot hold a {type(value).__name__} ({value!r:.60})")


def write_json_atomic(path: str | Path, data: dict[str, Any], what: str) -> Path:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``: never half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RecordError(f"cannot write {what} {str(path)!r}: {exc.strerror or exc}") from None
    return path


# ---------------------------------------------------------------------------------------------- reading
def _shown(value: Any) -> str:
    """A bad value, short and on one line, for a message."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    text = json.dumps(value, ensure_ascii=True) if value is None or isinstance(value, (bool, int, float, str)) \
        else type(value).__name__
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "…"


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def decode(tp: Any, value: Any, path: str) -> Any:
    """``value`` (plain JSON) checked against annotation ``tp`` and built into it; :class:`_Bad` on a mismatch."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return _decode_union(tp, value, path)
    if origin is Literal:
        if any(value == choice and type(value) is type(choice) for choice in get_args(tp)):
            return value
        raise _Bad(path, f"must be one of {', '.join(map(repr, get_args(tp)))}, got {_shown(value)}")
    if tp in (bool, int, float, str):
        return _decode_scalar(tp, value, path)
    if origin is tuple:
        return _decode_tuple(tp, value, path)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise _Bad(path, f"must be an object, got {_shown(value)}")
        value_type = get_args(tp)[1] if get_args(tp) else Any
        return {k: decode(value_type, v, _join(path, k)) for k, v in value.items()}
    if isinstance(tp, type) and is_dataclass(tp):
        return decode_dataclass(tp, value, path)
    raise TypeError(f"records cannot hold a field of type {tp!r}")  # a programming error, not a bad file


def _decode_union(tp: Any, value: Any, path: str) -> Any:
    options = [a for a in get_args(tp) if a is not type(None)]
    if value is None and len(options) < len(get_args(tp)):
        return None
    problems = []
    for option in options:
        try:
            return decode(option, value, path)
        except _Bad as bad:
            problems.append(bad)
    if len(problems) == 1:
        raise problems[0]
    raise _Bad(path, f"has an unexpected value {_shown(value)}")


def _decode_scalar(tp: type, value: Any, path: str) -> Any:
    if tp is float and value is None:
        return math.inf  # the writers store ∞ (and NaN) as null
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if type(value) is tp:
        return value
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    raise _Bad(path, f"must be {names[tp]}, got {_shown(value)}")


def _decode_tuple(tp: Any, value: Any, path: str) -> tuple[Any, ...]:
    if not isinstance(value, list):
        raise _Bad(path, f"must be a list, got {_shown(value)}")
    args = get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(decode(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise _Bad(path, f"must hold {len(args)} values, got {len(value)}")
    return tuple(decode(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))


def decode_key(tp: Any, data: dict[str, Any], key: str, path: str) -> Any:
    """``data[key]`` decoded as ``tp`` (for a type's own ``json_decode``); a missing key is a problem."""
    if key not in data:
        raise _Bad(_join(path, key), "is missing")
    return decode(tp, data[key], _join(path, key))


def decode_dataclass(cls: type, value: Any, path: str) -> Any:
    """A dataclass from its JSON object: every field checked; missing keys take the field's default."""
    if not isinstance(value, dict):
        raise _Bad(path or "the file", f"must be a JSON object, got {_shown(value)}")
    custom = getattr(cls, "json_decode", None)  # a type whose JSON is not one key per field
    if custom is not None:
        return custom(value, path)
    hints, kwargs = _hints(cls), {}
    for f in fields(cls):
        if not f.init:
            continue
        if f.name in value:
            kwargs[f.name] = decode(hints[f.name], value[f.name], _join(path, f.name))
        elif f.default is MISSING and f.default_factory is MISSING:
            raise _Bad(_join(path, f.name), "is missing")
    try:
        return cls(**kwargs)
    except BatchpilotError as exc:  # the type's own validation (e.g. RunSettings' choices)
        raise _Bad(path or "the file", f"is not valid ({exc})") from None


class JsonValue:
    """Base of the values records hold (a trial, a plan row, a band): :meth:`to_dict` is their JSON object."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (:func:`to_json`)."""
        data: dict[str, Any] = to_json(self)
        return data


class Record(JsonValue):
    """Base of the stage records: ``schema_version``, one writer (:meth:`to_dict`, :meth:`save`) and one loader
    (:meth:`from_dict`, :meth:`load`). Subclasses are ``@dataclass(frozen=True, kw_only=True, slots=True)``."""

    __slots__ = ()
    SCHEMA_VERSION: ClassVar[int]
    """This batchpilot's version of the record's JSON shape; bumped when a key changes meaning or goes."""
    KIND: ClassVar[str]
    """What the record is called in messages (``"probe record"``)."""
    RERUN: ClassVar[str]
    """How to get a record this batchpilot reads (the stage to run again)."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (``schema_version`` first); the one writer's shape."""
        body = to_json(self)
        return {"schema_version": self.SCHEMA_VERSION, **body}

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` to ``path`` atomically."""
        return write_json_atomic(path, self.to_dict(), self.KIND)

    @classmethod
    def from_dict(cls: type[R], data: Any, where: str | None = None) -> R:
        """The record from its JSON object; anything else is one :class:`RecordError` line naming ``where``."""
        where = where or cls.KIND
        if not isinstance(data, dict):
            raise RecordError(f"{where} must hold a JSON object; {cls.RERUN}")
        check_schema_version(data, cls, where)
        try:
            record: R = decode_dataclass(cls, data, "")
        except _Bad as bad:
            raise RecordError(f"{where}: {bad.path} {bad.problem}; {cls.RERUN}") from None
        return record

    @classmethod
    def load(cls: type[R], path: str | Path) -> R:
        """Read ``path`` through the bounded reader (:func:`batchpilot.io.read_json_object`) and :meth:`from_dict`."""
        return cls.from_dict(read_json_object(Path(path), cls.KIND), f"{cls.KIND} {str(path)!r}")


def check_schema_version(data: dict[str, Any], cls: type[Record], where: str) -> None:
    """Refuse a missing or unknown ``schema_version`` in one line: the file, what it holds, what is read."""
    found, supported = data.get("schema_version", MISSING), cls.SCHEMA_VERSION
    if type(found) is int and found == supported:
        return
    held = "no schema_version (written by an earlier batchpilot, or not by batchpilot)" if found is MISSING \
        else f"schema_version {_shown(found)}"
    raise RecordError(f"{where} has {held}; this batchpilot reads only schema_version {supported}; {cls.RERUN}")
