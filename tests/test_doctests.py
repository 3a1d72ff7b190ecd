"""Every docstring example in the library runs (``>>>`` lines are doctests): an example that no longer
matches what the code returns fails here."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import pytest

import batchpilot

OPTIONAL = {"batchpilot.serve.app": "starlette", "batchpilot.measure.finetune": "peft"}
"""Modules of an optional extra, walked where the extra is installed (``.ci/run`` installs ``serve``)."""
MODULES = sorted(m.name for m in pkgutil.walk_packages(batchpilot.__path__, "batchpilot.")
                 if not m.name.endswith("__main__")
                 and (m.name not in OPTIONAL or importlib.util.find_spec(OPTIONAL[m.name]) is not None))


def test_the_library_has_examples() -> None:
    """Guard against a walk that finds nothing (then every parametrised case below would be vacuous)."""
    examples = sum(len(t.examples) for name in MODULES
                   for t in doctest.DocTestFinder().find(importlib.import_module(name)))
    assert len(MODULES) > 50 and examples >= 20


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} docstring examples failed"
