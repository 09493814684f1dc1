"""Error types that carry enough context for a user to fix their input.

Every message names the culprit (file, field or value) and what was expected, so
that a sweep submitted to a cluster fails with something actionable.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class WsssError(Exception):
    """Base class for errors caused by user input rather than by a bug."""


class ConfigError(WsssError):
    """A config or search-space value is malformed, unknown or out of range."""


class DataError(WsssError):
    """A dataset file or folder is missing, unreadable or inconsistent.

    Args:
        message: names the file and what was expected.
        kind: which kind of problem (``training.data_check.PROBLEMS``), so a whole-dataset check
            can group what it finds; None where no finer kind applies.
    """

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


class UndefinedMetric(DataError, ValueError):
    """A metric has nothing to be computed over: no image with smoke in its ground truth, no
    context mask, no image at all. A fact of the data, not a bug; still a ``ValueError``, as
    the metrics raised before it existed."""


class CheckpointError(WsssError):
    """A checkpoint path does not exist or does not hold what was expected."""


class TrainingDiverged(WsssError):
    """The loss became NaN or infinite; the trial cannot continue."""


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """Return ' (did you mean "x"?)' for the closest valid name, or ''."""
    close = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.5)
    return f' (did you mean "{close[0]}"?)' if close else ""
