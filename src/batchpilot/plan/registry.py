"""The registry of published training batch sizes: what known models were actually trained with.

Examples::

    >>> from batchpilot.plan.registry import lookup, target_global_batch
    >>> lookup("DeepSeek-V3").schedule.start_sequences
    3072
    >>> target_global_batch("gpt-3-175b", seq_len=4096)[:2]   # 3,145,728 tokens kept, at 4096/sequence
    (768, 3145728)

    batchpilot known
    batchpilot known deepseek --json

Every entry names its source (paper, section, quoted sentence) and says how it was checked
(``verification``). Models whose batch size was never published are entries too, with
``published: false`` and no numbers: the registry never invents one, and
:func:`target_global_batch` refuses them.

Units: ``global_batch_sequences`` × ``seq_len`` = ``global_batch_tokens``, the FINAL batch of a ramped
or staged schedule. Papers write "4M tokens"; where only a power-of-two multiple of the sequence
length makes whole sequences, "M" is read as Mi (4M = 4,194,304 = 1024 × 4096) and the entry's
``notes`` say so. ``tokens_as_published`` keeps the paper's own wording.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from batchpilot.errors import BatchpilotError, SpecError
from batchpilot.io import read_json_object
from batchpilot.names import normalize, resolve, same_name, words_match
from batchpilot.specs.batch import tokens_from_sequences

Stage = Literal["pretraining", "rl"]
ScheduleKind = Literal["constant", "ramp", "staged"]


class NotPublishedError(BatchpilotError):
    """A registry entry whose batch size was not published (or is not a pre-training token batch)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Source:
    """Where an entry's numbers come from."""

    title: str
    """Authors, year, title and arXiv id."""
    url: str
    section: str
    """Section / table / appendix holding the numbers."""
    quote: str
    """The sentence (or table row) that states them."""


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchStage:
    """One stage of a staged schedule: from ``after_tokens`` on, this batch."""

    after_tokens: int
    """Training tokens seen before this stage starts (0 for the first)."""
    global_batch_sequences: int
    global_batch_tokens: int
    seq_len: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Schedule:
    """How the global batch changed during training."""

    kind: ScheduleKind
    shape: str = ""
    """For ramps: ``linear``, or ``not stated`` where the paper says only "gradually"."""
    start_sequences: int | None = None
    """Ramp start in sequences (None when the paper gives only tokens)."""
    start_tokens: int | None = None
    over_tokens_min: int | None = None
    """Ramp length in training tokens; min < max when the paper gives a range (GPT-3: 4–12B)."""
    over_tokens_max: int | None = None
    stages: tuple[BatchStage, ...] = ()

    def describe(self) -> str:
        """One line for tables: ``ramp (shape not stated) from 3072 seqs over the first 469B tokens``."""
        if self.kind == "constant":
            return "constant"
        if self.kind == "staged":
            parts = [f"{s.global_batch_tokens / 2**20:g}Mi@{s.seq_len}" for s in self.stages]
            return "staged " + " → ".join(parts)
        start = f"{self.start_sequences} seqs" if self.start_sequences else f"{self.start_tokens:,} tokens"
        low, high = (self.over_tokens_min or 0) / 1e9, (self.over_tokens_max or 0) / 1e9
        over = f"{low:g}B" if low == high else f"{low:g}–{high:g}B"
        ramp = "linear ramp" if self.shape == "linear" else f"ramp (shape {self.shape or 'not stated'})"
        return f"{ramp} from {start} over the first {over} tokens"


@dataclass(frozen=True, kw_only=True, slots=True)
class RegistryEntry:
    """One model's published training batch (or the record that it was not published)."""

    name: str
    """Registry key, lower-case (``deepseek-v3``)."""
    aliases: tuple[str, ...]
    model: str
    """Human-readable model name."""
    stage: Stage
    """``pretraining`` or ``rl`` (reinforcement learning: batches of sampled responses)."""
    published: bool
    global_batch_sequences: int | None
    """Final global batch in sequences (responses for RL)."""
    global_batch_tokens: int | None
    """Final global batch in tokens (None for RL: responses vary in length)."""
    tokens_as_published: str
    """The paper's own wording of the batch (``3.2M``, ``3072 -> 15360 sequences of 4096``)."""
    seq_len: int | None
    """Sequence length of the final batch (maximum response length for RL)."""
    schedule: Schedule | None
    hardware: str | None
    total_training_tokens: int | None
    source: Source
    verification: str
    """How the numbers were checked for this registry, and what was not."""
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Stable JSON record (the ``known --json`` contract)."""
        schedule = None
        if self.schedule is not None:
            s = self.schedule
            schedule = {
                "kind": s.kind, "shape": s.shape, "start_sequences": s.start_sequences,
                "start_tokens": s.start_tokens, "over_tokens_min": s.over_tokens_min,
                "over_tokens_max": s.over_tokens_max,
                "stages": [
                    {"after_tokens": st.after_tokens, "global_batch_sequences": st.global_batch_sequences,
                     "global_batch_tokens": st.global_batch_tokens, "seq_len": st.seq_len}
                    for st in s.stages
                ],
                "description": s.describe(),
            }
        return {
            "name": self.name, "aliases": list(self.aliases), "model": self.model, "stage": self.stage,
            "published": self.published, "global_batch_sequences": self.global_batch_sequences,
            "global_batch_tokens": self.global_batch_tokens, "tokens_as_published": self.tokens_as_published,
            "seq_len": self.seq_len, "schedule": schedule, "hardware": self.hardware,
            "total_training_tokens": self.total_training_tokens,
            "source": {"title": self.source.title, "url": self.source.url, "section": self.source.section,
                       "quote": self.source.quote},
            "verification": self.verification, "notes": self.notes,
        }


# ---------------------------------------------------------------------- reading the data files
class _Reader:
    """Typed access to one entry of a registry file; every problem names the file and the entry."""

    def __init__(self, raw: Any, where: str) -> None:
        if not isinstance(raw, dict):
            raise SpecError(f"{where}: an entry must be a JSON object, got {type(raw).__name__}")
        self.raw, self.where = raw, where

    def text(self, key: str, *, optional: bool = False) -> str:
        value = self.raw.get(key)
        if optional and (value is None or value == ""):
            return ""
        if not isinstance(value, str) or not value.strip():
            raise SpecError(f"{self.where}: {key!r} must be a non-empty string, got {value!r}")
        return value

    def count(self, key: str, raw: dict[str, Any] | None = None, *, optional: bool = False) -> int | None:
        value = (self.raw if raw is None else raw).get(key)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10**16:
            raise SpecError(f"{self.where}: {key!r} must be a whole number in [0, 1e16], got {value!r}")
        return value


def _schedule(r: _Reader) -> Schedule | None:
    raw = r.raw.get("schedule")
    if raw is None:
        return None
    if not isinstance(raw, dict) or raw.get("kind") not in ("constant", "ramp", "staged"):
        raise SpecError(f"{r.where}: schedule must be an object with kind constant, ramp or staged, got {raw!r}")
    stages = []
    for stage in raw.get("stages", []):
        if not isinstance(stage, dict):
            raise SpecError(f"{r.where}: each schedule stage must be an object")
        values = {k: r.count(k, stage) for k in ("after_tokens", "global_batch_sequences", "global_batch_tokens", "seq_len")}
        stages.append(BatchStage(**values))  # type: ignore[arg-type]
    return Schedule(
        kind=raw["kind"], shape=str(raw.get("shape", "")),
        start_sequences=r.count("start_sequences", raw, optional=True),
        start_tokens=r.count("start_tokens", raw, optional=True),
        over_tokens_min=r.count("over_tokens_min", raw, optional=True),
        over_tokens_max=r.count("over_tokens_max", raw, optional=True),
        stages=tuple(stages),
    )


def _entry(raw: Any, where: str) -> RegistryEntry:
    r = _Reader(raw, where)
    where = r.where = f"{where} entry {r.text('name')!r}"
    source = raw.get("source")
    if not isinstance(source, dict):
        raise SpecError(f"{where}: 'source' must be an object with title, url, section, quote")
    s = _Reader(source, f"{where} source")
    aliases = raw.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise SpecError(f"{where}: 'aliases' must be a list of non-empty strings")
    stage = raw.get("stage")
    if stage not in ("pretraining", "rl") or not isinstance(raw.get("published"), bool):
        raise SpecError(f"{where}: 'stage' must be pretraining or rl and 'published' true or false")
    entry = RegistryEntry(
        name=r.text("name").lower(), aliases=tuple(aliases), model=r.text("model"), stage=stage,
        published=raw["published"], global_batch_sequences=r.count("global_batch_sequences", optional=True),
        global_batch_tokens=r.count("global_batch_tokens", optional=True),
        tokens_as_published=r.text("tokens_as_published"), seq_len=r.count("seq_len", optional=True),
        schedule=_schedule(r), hardware=r.text("hardware", optional=True) or None,
        total_training_tokens=r.count("total_training_tokens", optional=True),
        source=Source(title=s.text("title"), url=s.text("url"), section=s.text("section"), quote=s.text("quote")),
        verification=r.text("verification"), notes=r.text("notes", optional=True),
    )
    _validate(entry, where)
    return entry


def _validate(e: RegistryEntry, where: str) -> None:
    """Published numbers must be complete and consistent: sequences × seq_len = tokens, schedules end at the final batch."""
    if not e.published:
        if e.global_batch_sequences is not None or e.global_batch_tokens is not None or e.schedule is not None:
            raise SpecError(f"{where}: a not-published entry must not carry batch numbers or a schedule")
        return
    if e.global_batch_sequences is None or e.seq_len is None or e.schedule is None:
        raise SpecError(f"{where}: a published entry needs global_batch_sequences, seq_len and schedule")
    if e.stage == "pretraining" and e.global_batch_tokens != e.global_batch_sequences * e.seq_len:
        raise SpecError(
            f"{where}: global_batch_tokens {e.global_batch_tokens} != {e.global_batch_sequences} sequences × {e.seq_len}"
        )
    s = e.schedule
    if s.kind == "ramp" and (s.over_tokens_max is None or (s.start_tokens or 0) >= (e.global_batch_tokens or 0)):
        raise SpecError(f"{where}: a ramp needs over_tokens_max and a start below the final batch")
    if s.kind == "staged":
        last = s.stages[-1] if s.stages else None
        if last is None or (last.global_batch_tokens, last.seq_len) != (e.global_batch_tokens, e.seq_len):
            raise SpecError(f"{where}: the last stage must equal the entry's final batch")
        if any(st.global_batch_tokens != st.global_batch_sequences * st.seq_len for st in s.stages):
            raise SpecError(f"{where}: a stage's tokens != sequences × seq_len")


def _registry_dir() -> Path:
    return Path(str(resources.files("batchpilot") / "data" / "registry"))


@functools.lru_cache(maxsize=1)
def entries() -> tuple[RegistryEntry, ...]:
    """Every registry entry, in file then entry order; names and aliases are unique."""
    result: list[RegistryEntry] = []
    for path in sorted(_registry_dir().glob("*.json")):
        data = read_json_object(path, "registry file")
        raw_entries = data.get("entries")
        if not isinstance(raw_entries, list):
            raise SpecError(f"registry file {path.name}: 'entries' must be a list")
        result += [_entry(raw, f"registry file {path.name}") for raw in raw_entries]
    seen: dict[str, str] = {}
    for e in result:
        for key in (e.name, *e.aliases):
            norm = normalize(key)
            if seen.setdefault(norm, e.name) != e.name:
                raise SpecError(f"registry: {key!r} names both {seen[norm]!r} and {e.name!r}")
    return tuple(result)


# ---------------------------------------------------------------------- queries
def names() -> list[str]:
    """Registry keys, sorted."""
    return sorted(e.name for e in entries())


def lookup(name: str) -> RegistryEntry:
    """The entry called ``name`` or one of its aliases, matched as :mod:`batchpilot.names` says: case, spaces,
    underscores and dashes do not matter (``GPT3 175B``), nor separators between words (``llama2-70b``).

    No guessing beyond whole words: ``llama-2-7`` could be the 7B or the 70B, so it is unknown (the closest key
    and the list of keys in the message); ``llama-3`` starts several entries (405B, 70B, 8B), so it asks which.
    """
    by_name = {e.name: e for e in entries()}
    aliases = {alias: e.name for e in entries() for alias in e.aliases}
    return by_name[resolve("registry entry", name, by_name, aliases)]


def exact(query: str) -> RegistryEntry | None:
    """The entry whose own name ``query`` is, up to case and separators (``Llama-3-8B``); None otherwise."""
    found = [e for e in entries() if same_name(query, e.name)]
    return found[0] if len(found) == 1 else None


def search(query: str = "") -> list[RegistryEntry]:
    """Entries whose name, aliases, model, hardware or source title hold every word of ``query`` as whole words
    (:func:`batchpilot.names.words_match`: ``llama-3`` finds Llama 3, never LLaMA 33B)."""
    return [e for e in entries()
            if words_match(query, (e.name, *e.aliases, e.model, e.hardware or "", e.source.title))]


def target_global_batch(name: str, seq_len: int) -> tuple[int, int, RegistryEntry]:
    """The published (final) global batch of ``name`` at ``seq_len``: ``(sequences, tokens, entry)``.

    Tokens per step are kept (the quantity the published batch fixes for the optimizer), so the
    sequence count scales as ``published_tokens / seq_len``, rounded to the nearest whole sequence
    (at least one); the returned tokens are ``sequences × seq_len`` and differ from the published
    tokens by less than half a sequence. Entries whose batch was not published, and RL entries
    (responses of variable length, no token batch), raise :class:`NotPublishedError`.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise BatchpilotError(f"seq_len must be a positive whole number of tokens, got {seq_len!r}")
    entry = lookup(name)
    if not entry.published or entry.global_batch_tokens is None:
        why = ("its batch size was not published" if not entry.published
               else f"its batch is {entry.tokens_as_published} ({entry.stage}), not a token batch")
        usable = ", ".join(e.name for e in entries() if e.published and e.global_batch_tokens is not None)
        raise NotPublishedError(
            f"registry entry {entry.name!r} has no target global batch: {why} ({entry.source.title}); "
            f"use one of {usable}, or give the batch explicitly"
        )
    sequences = max(1, round(entry.global_batch_tokens / seq_len))
    return sequences, tokens_from_sequences(sequences, seq_len_tokens=seq_len), entry
