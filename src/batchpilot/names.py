"""One rule for the names people type: model presets, accelerators, networks and the published-batch registry.

Examples::

    >>> from batchpilot.names import resolve, words_match
    >>> gpus = ["h100-nvl", "h100-pcie", "h100-sxm", "h800", "a10g", "l40s"]
    >>> resolve("accelerator", "H100 SXM", gpus)
    'h100-sxm'
    >>> resolve("accelerator", "h100", gpus)
    Traceback (most recent call last):
    batchpilot.names.AmbiguousNameError: accelerator 'h100' is ambiguous: it matches h100-nvl, h100-pcie, h100-sxm; name one of them
    >>> words_match("llama-3", ["llama-33b", "LLaMA 33B"]), words_match("llama-3", ["Llama 3 405B"])
    (False, True)

A name is read as WORDS (split at anything but letters, digits and the dot of a decimal number) and each
word as RUNS of letters or of digits: ``Llama-3.1-8B`` is ``llama | 3.1 | 8 b``. Matching, in order:

1. exact: the same text up to case, surrounding space and ``_``/space/``-`` (``DeepSeek V3`` = ``deepseek-v3``);
2. the same runs: separators do not matter (``llama3-8b`` = ``Llama 3 8B`` = ``llama-3-8b``), then the same
   letters and digits (``deepseekv3`` = ``deepseek-v3``) when only one name has them;
3. a prefix of whole runs that ends where a word of the name ends (``h100`` → ``h100-sxm``, ``h100-pcie``,
   ...; ``llama-3`` → ``llama-3-8b``, ``llama-3-70b``), the last run also as the start of a word when it is
   letters (``h100-s`` → ``h100-sxm``). Never inside a number (``llama-3`` is not ``llama-33b`` nor
   ``llama-3.1-8b``; ``h100`` is not ``h800``) and never into a letter suffix after digits (``a10`` is not
   ``a10g``, ``l40`` is not ``l40s``, ``mi300`` is not ``mi300x``: those are other products). Aliases that
   are hub ids (``org/name``) match whole only.

One match is the answer; several raise :class:`AmbiguousNameError` listing them (never a silent pick);
none raise :class:`~batchpilot.errors.UnknownNameError` with the closest name (``difflib``) and every known
name. Aliases (instance types, hub ids, other spellings) count as names of what they point to.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from batchpilot.errors import UnknownNameError

_WORD = re.compile(r"[a-z0-9]+(?:(?<=\d)\.(?=\d)[a-z0-9]+)*")
"""A word: letters and digits (a dot only inside a number: ``3.1``, ``2.5``)."""
_RUN = re.compile(r"\d+(?:\.\d+)*|[a-z]+")


class AmbiguousNameError(UnknownNameError):
    """A name that matches several catalog entries; the message lists them."""


@dataclass(frozen=True, slots=True)
class _Parsed:
    runs: tuple[str, ...]
    """Letter and digit runs of every word, in order."""
    word_ends: frozenset[int]
    """Indices of the runs that end a word."""


def _parse(text: str) -> _Parsed:
    runs: list[str] = []
    ends: set[int] = set()
    for word in _WORD.findall(text.lower()):
        runs += _RUN.findall(word)
        ends.add(len(runs) - 1)
    return _Parsed(tuple(runs), frozenset(ends))


def normalize(name: str) -> str:
    """Case, surrounding space, spaces and underscores do not matter: ``DeepSeek V3`` → ``deepseek-v3``."""
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def _compact(name: str) -> str:
    return re.sub(r"[^a-z0-9.]", "", name.lower())


def same_name(query: str, name: str) -> bool:
    """Rules 1 and 2 of the module: ``query`` is ``name`` up to case and separators (``Llama 3 8B``,
    ``llama3-8b``) or has its letters and digits (``deepseekv3``); prefixes do not count."""
    parsed = _parse(query).runs
    return normalize(query) == normalize(name) or (bool(parsed) and parsed == _parse(name).runs) or (
        _compact(query) == _compact(name) != "")


def _starts(query: _Parsed, name: _Parsed) -> bool:
    """``query``'s runs begin ``name``'s and end where a word of ``name`` ends (rule 3 of the module)."""
    q, n = query.runs, name.runs
    if not q or len(q) > len(n) or q[:-1] != n[: len(q) - 1]:
        return False
    last = len(q) - 1
    if q[last].isalpha():
        return n[last].startswith(q[last])
    return q[last] == n[last] and (last in name.word_ends)


def _index(names: Iterable[str], aliases: Mapping[str, str] | None) -> dict[str, str]:
    """Every spelling (name or alias) → the name it means."""
    index = {n: n for n in names}
    for alias, target in (aliases or {}).items():
        if target in index:
            index.setdefault(alias, target)
    return index


def _close(query: str, names: list[str]) -> str:
    close = difflib.get_close_matches(normalize(query), names, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def unknown(kind: str, query: str, names: Iterable[str]) -> UnknownNameError:
    """``unknown KIND 'query'. Did you mean 'x'? Known: a, b, ...`` (one line)."""
    known = sorted(names)
    return UnknownNameError(f"unknown {kind} {query!r}.{_close(query, known)} Known: {', '.join(known)}")


def matches(query: str, names: Iterable[str], aliases: Mapping[str, str] | None = None) -> list[str]:
    """The names ``query`` means under the module's rules, sorted: one for a match, several when ambiguous,
    none when unknown."""
    index = _index(names, aliases)
    key = normalize(query)
    exact = {target for spelling, target in index.items() if normalize(spelling) == key}
    if exact:
        return sorted(exact)
    parsed = _parse(query)
    same_runs = {target for spelling, target in index.items() if parsed.runs and _parse(spelling).runs == parsed.runs}
    if same_runs:
        return sorted(same_runs)
    compact = {target for spelling, target in index.items() if _compact(spelling) == _compact(query) != ""}
    if len(compact) == 1:
        return sorted(compact)
    # prefixes of names and plain aliases; a hub id (``org/name``) matches only whole: ``mistral`` is not
    # a prefix of ``mistralai/Mixtral-8x7B-v0.1``
    return sorted({target for spelling, target in index.items()
                   if "/" not in spelling and _starts(parsed, _parse(spelling))})


def resolve(kind: str, query: str, names: Iterable[str], aliases: Mapping[str, str] | None = None) -> str:
    """The one name ``query`` means; :class:`AmbiguousNameError` (candidates listed) or
    :class:`~batchpilot.errors.UnknownNameError` (closest name and all names) otherwise."""
    names = list(names)
    found = matches(query, names, aliases)
    if len(found) == 1:
        return found[0]
    if found:
        raise AmbiguousNameError(f"{kind} {query!r} is ambiguous: it matches {', '.join(found)}; name one of them")
    raise unknown(kind, query, names)


def _contains(query: _Parsed, text: _Parsed) -> bool:
    q, t = query.runs, text.runs
    for start in range(len(t) - len(q) + 1):
        window = t[start:start + len(q)]
        if window[:-1] == q[:-1] and (window[-1] == q[-1] or (q[-1].isalpha() and window[-1].startswith(q[-1]))):
            return True
    return False


def words_match(query: str, texts: Iterable[str]) -> bool:
    """Whether every word of ``query`` occurs in one of ``texts`` as whole runs (the last may be the start of a
    word of letters), or equals one of them up to separators: ``llama-3`` occurs in ``Llama 3 405B`` but not in
    ``llama-33b``; ``70b`` occurs in ``llama-2-70b``; ``deepseekv3`` equals ``deepseek-v3``."""
    parsed_texts = [(_parse(t), _compact(t)) for t in texts]
    for word in query.split():
        parsed, compact = _parse(word), _compact(word)
        if not parsed.runs:
            continue
        if not any(_contains(parsed, p) or (compact and compact == c) for p, c in parsed_texts):
            return False
    return True
