"""Expected errors of a run: what a user can fix (a bad config, data file, base or checkpoint).

The entry point prints one of these as a single line and exits (2 for usage errors, 1 for the
rest); anything else is a bug and keeps its traceback. Each also derives from the built-in type a
caller would catch (``ValueError``, ``FileNotFoundError``), so library users lose nothing.
"""

from __future__ import annotations


class WmtpError(Exception):
    """Base of every expected error; its message names the file, field or key and the fix."""

    exit_code = 1


class ConfigError(WmtpError, ValueError):
    """A config key or value the run cannot use (a usage error: exit code 2)."""

    exit_code = 2


class BaseModelError(WmtpError, ValueError):
    """The base model directory is missing, unreadable or not a supported architecture."""


class CheckpointError(WmtpError, ValueError):
    """A checkpoint or run directory that cannot be read, or does not belong to this run."""
