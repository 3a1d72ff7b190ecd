"""Published RL recipes with their whole batch hierarchy (``batchpilot known``, ``rl plan --like``).

    >>> r = recipe("deepseek-r1-zero")
    >>> b = r.batch()
    >>> (b.samples_per_rollout, b.samples_per_update, b.updates_per_rollout, r.gpus, r.accelerator)
    (8192, 512, 16, 512, 'h800')

The entries live in ``batchpilot/data/registry/rl.json`` next to the pre-training registry: the common
fields (name, model, source with its quote, how it was checked) are read by
:mod:`batchpilot.plan.registry` (so ``batchpilot known`` lists them), the ``rl`` object — prompts per
rollout, group size, samples per update, epochs, lengths, the cluster and the framework settings the
recipe states — by this module. A value a paper does not publish is absent (``null``) or flagged
(``max_prompt_published: false``: a planning assumption, said so in the entry's notes).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from batchpilot.errors import SpecError
from batchpilot.io import read_json_object
from batchpilot.plan.registry import RegistryEntry, lookup
from batchpilot.rl.batch import RLBatch
from batchpilot.units import unknown_name


@dataclass(frozen=True, kw_only=True, slots=True)
class RLRecipe:
    """One published RL run's batch hierarchy and setup."""

    entry: RegistryEntry
    """The registry entry (source, quote, verification, notes)."""
    model_preset: str
    algorithm: str
    prompts_per_rollout: int
    group_size: int
    samples_per_update: int
    epochs: int
    max_prompt_tokens: int
    max_prompt_published: bool
    max_response_tokens: int
    reference: bool
    reference_refresh_updates: int | None = None
    gpus: int | None = None
    accelerator: str | None = None
    rollout_tp: int | None = None
    gpu_memory_utilization: float | None = None
    sequence_parallel: int | None = None

    @property
    def name(self) -> str:
        return self.entry.name

    def batch(self) -> RLBatch:
        return RLBatch(prompts_per_rollout=self.prompts_per_rollout, group_size=self.group_size,
                       samples_per_update=self.samples_per_update, epochs=self.epochs,
                       reference_refresh_updates=self.reference_refresh_updates)

    def describe(self) -> str:
        """One line: the whole hierarchy (for ``batchpilot known NAME``)."""
        b = self.batch()
        where = f"; {self.gpus} × {self.accelerator}" if self.gpus and self.accelerator else ""
        prompt = "" if self.max_prompt_published else " (prompt length assumed)"
        plural = "" if b.updates_per_rollout == 1 else "s"
        return (f"{b.prompts_per_rollout} prompts × {b.group_size} = {b.samples_per_rollout:,} samples per rollout, "
                f"{b.samples_per_update:,} per update, {b.updates_per_rollout} update{plural} per rollout (max policy lag "
                f"{b.max_policy_lag}); prompt ≤ {self.max_prompt_tokens:,}{prompt}, response ≤ "
                f"{self.max_response_tokens:,}; {self.algorithm}{where}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model_preset": self.model_preset, "algorithm": self.algorithm,
                **self.batch().to_dict(), "max_prompt_len": self.max_prompt_tokens,
                "max_prompt_published": self.max_prompt_published, "max_response_len": self.max_response_tokens,
                "reference": self.reference, "gpus": self.gpus, "accelerator": self.accelerator,
                "rollout_tp": self.rollout_tp, "gpu_memory_utilization": self.gpu_memory_utilization,
                "sequence_parallel": self.sequence_parallel}


_INTS = ("prompts_per_rollout", "group_size", "samples_per_update", "epochs", "max_prompt_tokens",
         "max_response_tokens")
_OPTIONAL_INTS = ("reference_refresh_updates", "gpus", "rollout_tp", "sequence_parallel")


def _parse(raw: dict[str, Any], where: str) -> RLRecipe:
    block = raw.get("rl")
    if not isinstance(block, dict):
        raise SpecError(f"{where}: an RL entry needs an 'rl' object")
    values: dict[str, Any] = {}
    for key in _INTS + _OPTIONAL_INTS:
        value = block.get(key)
        if value is None and key in _OPTIONAL_INTS:
            values[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"{where}: rl.{key} must be a positive whole number, got {value!r}")
        values[key] = value
    gmu = block.get("gpu_memory_utilization")
    if gmu is not None and (isinstance(gmu, bool) or not isinstance(gmu, (int, float)) or not 0 < gmu <= 1):
        raise SpecError(f"{where}: rl.gpu_memory_utilization must be in (0, 1], got {gmu!r}")
    for key in ("model_preset", "algorithm"):
        if not isinstance(block.get(key), str):
            raise SpecError(f"{where}: rl.{key} must be a string")
    accelerator = block.get("accelerator")
    recipe = RLRecipe(entry=lookup(str(raw["name"])), model_preset=block["model_preset"], algorithm=block["algorithm"],
                      max_prompt_published=bool(block.get("max_prompt_published", False)),
                      reference=bool(block.get("reference", True)), accelerator=accelerator,
                      gpu_memory_utilization=gmu, **values)
    recipe.batch()  # the levels must divide
    if recipe.samples_per_update != recipe.entry.global_batch_sequences:
        raise SpecError(f"{where}: rl.samples_per_update {recipe.samples_per_update} != the entry's "
                        f"global_batch_sequences {recipe.entry.global_batch_sequences}")
    return recipe


def _path() -> Path:
    return Path(str(resources.files("batchpilot") / "data" / "registry" / "rl.json"))


@functools.lru_cache(maxsize=1)
def recipes() -> dict[str, RLRecipe]:
    """Every RL recipe by registry name."""
    data = read_json_object(_path(), "registry file")
    raw_entries = data.get("entries")
    if not isinstance(raw_entries, list):
        raise SpecError("registry file rl.json: 'entries' must be a list")
    out = {}
    for raw in raw_entries:
        recipe = _parse(raw, f"registry file rl.json entry {raw.get('name')!r}")
        out[recipe.name] = recipe
    return out


def recipe(name: str) -> RLRecipe:
    """The RL recipe called ``name`` (or an alias, as ``batchpilot known`` resolves it)."""
    entry = lookup(name)
    found = recipes().get(entry.name)
    if found is None:
        raise unknown_name("RL recipe", name, recipes())
    return found


def recipe_for(entry: RegistryEntry) -> RLRecipe | None:
    """The RL recipe of a registry entry, if it is one."""
    return recipes().get(entry.name)
