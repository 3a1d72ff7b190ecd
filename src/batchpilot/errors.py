"""The library's exception family.

Every error a user can cause (bad config, bad flag value, infeasible plan) is a ``BatchpilotError``
whose message is one line carrying the offending values, the rule and, where there is one, the fix.
The CLI turns it into that one line on stderr and exit code 2.
"""

from __future__ import annotations


class BatchpilotError(ValueError):
    """Base class: a user-caused problem, reported as one line and exit code 2."""


class SpecError(BatchpilotError):
    """A model, hardware or settings specification is missing a field or holds a bad value."""


class UnknownNameError(BatchpilotError):
    """A preset / accelerator / registry name that does not exist."""


class InfeasibleError(BatchpilotError):
    """No configuration satisfies the request (nothing fits, batch not reachable, ...)."""


class DataError(BatchpilotError):
    """Training data cannot be read or is unusable (missing, empty, binary, ...)."""
