"""Running untrusted programs in a contained process, and judging them from outside it.

    run_function_tests   proxy mode: the tests run in a trusted judge, the candidate behind a
                         data-only channel (for untrusted code)
    run_program          in-process mode: the program judges itself (the weaker guarantee)
    Limits, SandboxResult, SandboxUnavailable, isolation_problem

``host`` is the host side and the threat model; ``driver`` the child processes; ``kernel``
namespaces, root file system, privileges, seccomp; ``proxy`` and ``wire`` the judge's channel;
``guard`` the audit hook; ``uids``, ``cgroup``, ``cleanup`` the host's per-run resources.
"""

from wmtp_fn.sandbox.host import (
    Limits,
    SandboxResult,
    SandboxUnavailable,
    isolation_problem,
    run_function_tests,
    run_program,
)

__all__ = ["Limits", "SandboxResult", "SandboxUnavailable", "isolation_problem",
           "run_function_tests", "run_program"]
