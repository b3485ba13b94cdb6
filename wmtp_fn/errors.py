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


class NonFiniteError(WmtpError, FloatingPointError):
    """Training stopped: too many steps in a row had a non-finite loss or gradient."""


class Interrupted(KeyboardInterrupt):
    """The run stopped on SIGINT or SIGTERM (a KeyboardInterrupt, so `except Exception` does not
    swallow it). `step` is the step whose checkpoint was written, or None when a second signal
    aborted at once (the last checkpoint on disk stays the resume point). The entry point prints
    the message and exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, step: int | None = None):
        self.signum = signum
        self.step = step
        self.exit_code = 128 + signum
        if step is None:
            msg = "aborted by a second signal; the last checkpoint is kept; rerun the same command to resume from it"
        else:
            msg = f"interrupted at step {step}; checkpoint written; rerun the same command to resume"
        super().__init__(msg)
