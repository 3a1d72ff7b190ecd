"""Typed records: every stage's result as a frozen dataclass with one writer and one loader.

One module per record (``schema_version`` in brackets)::

    probe.py          ProbeResult      probe.json, ``batchpilot probe --json``
    memory_curve.py   MemoryCurve      memory_curve.json (tune's analytic and traced curves at the probed sizes)
    noise.py          NoiseRecord      noise.json, ``batchpilot noise --json``; NoiseScale (an estimate)
    plan.py           PlanRecord       plan.json, ``batchpilot plan --json``
    train_summary.py  TrainSummary     summary.json of a training run, ``batchpilot train --json``
    verify.py         VerifyRecord     verify.json (tune's verification run against the plan)
    tune_state.py     TuneRunRecord    tune.json (the stages' outcomes), and ``batchpilot tune --json``

Each record writes with ``to_dict()`` / ``save(path)`` (atomic) and reads with ``from_dict()`` / ``load(path)``
(bounded reading through :mod:`batchpilot.io`); a missing or unknown ``schema_version`` is refused in one line
that names the file, both versions and the stage to run again (:mod:`batchpilot.records.base`). The layer sits
under ``estimate`` and over ``specs``: records hold plain values and specs, never the models that compute them.
"""
