"""Parsing and display of quantities. Internally: bytes, seconds, FLOPs, tokens (plain numbers).

Conventions (stated once, used everywhere):
- Counts (tokens, sequences, parameters): SI suffixes K=1e3, M=1e6, B/G=1e9, T=1e12; binary
  suffixes Ki=2^10, Mi=2^20, Gi=2^30 (so ``4Mi`` tokens = 4,194,304 = 1024 × 4096).
- Bytes: ``GB`` = 10^9, ``GiB`` = 2^30 (likewise KB/KiB, MB/MiB, TB/TiB); a bare number is bytes.
- Durations: ``90`` or ``90s``, ``10m``, ``1.5h``.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable

from batchpilot.errors import BatchpilotError, UnknownNameError

KIB = 2**10
MIB = 2**20
GIB = 2**30
TIB = 2**40

_COUNT_SUFFIX = {
    "": 1,
    "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12,
    "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40,
}
_BYTE_SUFFIX = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": KIB, "mib": MIB, "gib": GIB, "tib": TIB,
    "k": KIB, "m": MIB, "g": GIB, "t": TIB,  # bare letters follow the 'ulimit'/'free' habit: binary
}
_SECONDS_SUFFIX = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


_EXACT_DIGITS = 30  # whole-number literals up to this many digits are parsed exactly (floats lose digits past 2^53)


def _split(text: str, what: str) -> tuple[float | int, str]:
    match = _NUMBER.match(str(text))
    if not match:
        raise BatchpilotError(f"{what} {text!r} is not a number with an optional unit (e.g. 4M, 6GiB, 10m)")
    literal = match.group(1)
    value: float | int = int(literal) if literal.isdigit() and len(literal) <= _EXACT_DIGITS else float(literal)
    if not math.isfinite(value):
        raise BatchpilotError(f"{what} {text!r} is not finite")
    return value, match.group(2).lower()


def _given(value: float | int, what: str) -> float | int:
    """A number passed as a number (not text): finite and not a bool; big ints stay exact."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BatchpilotError(f"{what} {value!r} is not a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise BatchpilotError(f"{what} {value!r} is not finite")
    return value


def parse_count(text: str | int, what: str = "count") -> int:
    """Parse a positive integer count such as ``1024``, ``4M`` (4e6) or ``4Mi`` (4·2^20)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, suffix = _given(text, what), ""
    else:
        value, suffix = _split(str(text), what)
    if suffix not in _COUNT_SUFFIX:
        raise BatchpilotError(f"{what} {text!r}: unknown suffix {suffix!r}; use one of K, M, B, T, Ki, Mi, Gi")
    total = value * _COUNT_SUFFIX[suffix]
    if total > 2**62:
        raise BatchpilotError(f"{what} {text!r} is too large (limit 2^62)")
    if total < 1 or total != int(total):
        raise BatchpilotError(f"{what} {text!r} must be a positive whole number")
    return int(total)


def parse_bytes(text: str | int, what: str = "size") -> int:
    """Parse a positive byte size such as ``6GiB`` (6·2^30), ``80GB`` (80e9) or ``1048576``."""
    value, suffix = (_given(text, what), "") if isinstance(text, int) else _split(str(text), what)
    if suffix not in _BYTE_SUFFIX:
        raise BatchpilotError(f"{what} {text!r}: unknown unit {suffix!r}; use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB")
    total = value * _BYTE_SUFFIX[suffix]
    if total > 2**62:
        raise BatchpilotError(f"{what} {text!r} is too large (limit 2^62 bytes)")
    if total < 1:
        raise BatchpilotError(f"{what} {text!r} must be positive")
    return int(total)


def parse_seconds(text: str | float, what: str = "duration") -> float:
    """Parse a positive duration such as ``90``, ``90s``, ``10m`` or ``1.5h`` into seconds."""
    value, suffix = (_given(text, what), "") if isinstance(text, (int, float)) else _split(str(text), what)
    if suffix not in _SECONDS_SUFFIX:
        raise BatchpilotError(f"{what} {text!r}: unknown unit {suffix!r}; use s, m, h or d")
    total = float(value) * _SECONDS_SUFFIX[suffix] if abs(value) < 1e300 else math.inf
    if not math.isfinite(total) or total <= 0:
        raise BatchpilotError(f"{what} {text!r} must be a positive finite duration")
    return total


def parse_whole(value: object, what: str = "value") -> int:
    """A whole number, ``-3`` to ``12``, as text or int (at most 30 digits); its range is the caller's to check,
    where the rule and the fix are known."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.lstrip("+-").isdigit() or len(text) > _EXACT_DIGITS:
        raise BatchpilotError(f"{what} {value!r} is not a whole number")
    return int(text)


def parse_fraction(value: object, what: str = "fraction") -> float:
    """A fraction in [0, 1): ``0.1`` or ``10%``."""
    raw = str(value).strip()
    try:
        fraction = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise BatchpilotError(f"{what} {value!r} is not a fraction; use e.g. 10% or 0.1") from None
    if not 0.0 <= fraction < 1.0:
        raise BatchpilotError(f"{what} {value!r} must be in [0, 1) as a fraction or [0%, 100%) as a percentage, "
                              "e.g. 10%")
    return fraction


def parse_choice(value: object, what: str, choices: Iterable[str]) -> str:
    """One of ``choices``, case-insensitive, returned in lower case."""
    text = str(value).strip().lower()
    allowed = tuple(choices)
    if text not in allowed:
        raise BatchpilotError(f"{what} {value!r} is not one of: {', '.join(allowed)}")
    return text


def format_bytes(num_bytes: float) -> str:
    """Binary units, labelled exactly: ``1.50 GiB``."""
    for unit, size in (("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(num_bytes) >= size:
            return f"{num_bytes / size:.2f} {unit}"
    return f"{num_bytes:.0f} B"


def format_count(count: float) -> str:
    """SI units for counts: ``6.74B``, ``4.19M``."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.2f}{unit}"
    return f"{count:.0f}"


def unknown_name(kind: str, name: str, known: Iterable[str]) -> UnknownNameError:
    """An error for an unknown name listing the known ones and the closest match, if any."""
    known = sorted(known)
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return UnknownNameError(f"unknown {kind} {name!r}.{hint} Known: {', '.join(known)}")
