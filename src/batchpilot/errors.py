"""The library's exception family.

Every error a user can cause (bad config, bad flag value, infeasible plan) is a ``BatchpilotError``
whose message is one line carrying the offending values, the rule and, where there is one, the fix.
The CLI turns it into that one line on stderr and exit code 2.
"""

from __future__ import annotations

from collections.abc import Sequence


class BatchpilotError(ValueError):
    """Base class: a user-caused problem, reported as one line and exit code 2.

    ``fixes``: the changes the message lists as what would work, each worded as in the message (the planner's
    "nothing fits …; fits with: A; B" carries ``("A", "B")``), for a face that lists them one per line; empty when
    the message lists none.

        >>> err = InfeasibleError("nothing fits; fits with: --offload", fixes=["--offload"])
        >>> str(err), err.fixes
        ('nothing fits; fits with: --offload', ('--offload',))
    """

    def __init__(self, *args: object, fixes: Sequence[str] = ()) -> None:
        super().__init__(*args)
        self.fixes: tuple[str, ...] = tuple(fixes)


class SpecError(BatchpilotError):
    """A model, hardware or settings specification is missing a field or holds a bad value."""


class UnknownNameError(BatchpilotError):
    """A preset / accelerator / registry name that does not exist."""


class InfeasibleError(BatchpilotError):
    """No configuration satisfies the request (nothing fits, batch not reachable, ...)."""


class DataError(BatchpilotError):
    """Training data cannot be read or is unusable (missing, empty, binary, ...)."""
