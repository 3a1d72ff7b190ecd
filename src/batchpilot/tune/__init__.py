"""batchpilot tune: measure, plan, prove and show, in one command (see :mod:`batchpilot.tune.pipeline`)."""
