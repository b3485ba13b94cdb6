"""Running untrusted programs in a contained process (host side in ``host``, child side in
``driver``)."""

from wmtp_fn.sandbox.host import Limits, SandboxResult, SandboxUnavailable, run_program

__all__ = ["Limits", "SandboxResult", "SandboxUnavailable", "run_program"]
