"""Exception types.  A :class:`UsageError` is bad input: the CLI prints it and exits with 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CfbenchError(Exception):
    """Base class of cfbench's own errors."""


class UsageError(CfbenchError, ValueError):
    """Bad input from the user (unknown name, wrong type, out of range).  Exit status 2."""


class DatasetError(UsageError):
    """A dataset is missing, corrupt or truncated.  The message says how to get it."""


class TrainingDiverged(CfbenchError):
    """The training loss became NaN or infinite.  The run is recorded as failed."""


class PluginError(CfbenchError):
    """A plugin could not be loaded or is incompatible."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """Text naming close matches for a typo and listing all valid choices."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"{hint} Valid choices: {', '.join(choices) if choices else '(none)'}."
