"""The errors ``chronovisor.eval`` raises for bad input; ``chronovisor.cli`` prints them as one line and exits 2.

Each message is one line that names the file, the key or the run directory, and says the fix.
"""

from __future__ import annotations


class EvalError(Exception):
    """Base class of the input errors of ``chronovisor.eval``."""


class ConfigError(EvalError, ValueError):
    """A sweep config (or a ``--set`` override) is invalid; the message names the offending key."""


class RunDirError(EvalError):
    """A directory is not a run directory, or holds the run of another config."""
