"""Bounded reading of user files: regular files only, size-capped, one-line errors.

Every file a user names (a model ``config.json``, an accelerator or calibration file, a record of an
earlier stage) is read through here, so ``/dev/zero``, a FIFO, a directory or a multi-GB mistake is a
one-line :class:`~batchpilot.errors.SpecError` instead of a hang or an exhausted machine.

    >>> from pathlib import Path
    >>> path_is(Path("x" * 5000), "exists")  # a name the OS refuses is "no", not an OSError
    False
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from batchpilot.errors import SpecError

#: A config or hardware file larger than this is refused before it is read (a real ``config.json`` is a few
#: KiB; this stops ``/dev/zero`` or a mistaken multi-GB file from exhausting memory).
MAX_JSON_BYTES = 16 * 2**20


def read_small_file(path: Path, what: str) -> bytes:
    """The bytes of a regular file of at most :data:`MAX_JSON_BYTES`; FIFOs and devices are refused unread."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    except FileNotFoundError:
        raise SpecError(f"{what} {str(path)!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise SpecError(f"{what} {str(path)!r} cannot be opened: {getattr(exc, 'strerror', None) or exc}") from None
    try:  # checked before os.fdopen, which raises IsADirectoryError for a directory
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SpecError(f"{what} {str(path)!r} is not a regular file")
        if info.st_size > MAX_JSON_BYTES:
            raise SpecError(f"{what} {str(path)!r} is {info.st_size:,} bytes; the limit is {MAX_JSON_BYTES:,}")
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        try:
            return handle.read(MAX_JSON_BYTES + 1)
        except OSError as exc:
            raise SpecError(f"{what} {str(path)!r} cannot be read: {exc.strerror or exc}") from None


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object from ``path``; every failure is a one-line :class:`SpecError`."""
    return parse_json_object(read_small_file(path, what), f"{what} {str(path)!r}")


def parse_json_object(raw: bytes, where: str) -> dict[str, Any]:
    """Parse UTF-8 ``raw`` bytes holding one JSON object (no NaN/Infinity); failures name ``where``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{where} cannot be read: not UTF-8 text (byte {exc.start})") from None

    def _reject_constant(value: str) -> None:
        raise SpecError(f"{where}: {value} is not a valid JSON number")

    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise SpecError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except RecursionError:
        raise SpecError(f"{where} is nested too deeply") from None
    except SpecError:
        raise
    except ValueError:  # an integer literal longer than sys.get_int_max_str_digits() (4300 by default)
        raise SpecError(f"{where} holds a number literal too long to be a real value") from None
    if not isinstance(data, dict):
        raise SpecError(f"{where} must hold a JSON object, got {type(data).__name__}")
    return data


def path_is(path: Path, test: str) -> bool:
    """``path.is_dir()`` / ``path.exists()`` that answer False for names the OS rejects (too long, NUL)."""
    try:
        return bool(getattr(path, test)())
    except (OSError, ValueError):
        return False
