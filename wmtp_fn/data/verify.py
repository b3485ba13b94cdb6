"""Checking a record's label by running its tests in the sandbox.

For function-completion records (HumanEval style) the program is the prompt, the completion,
the tests, and a call of ``check`` on the entry point::

    {instruction}{output}\n\n{tests}\n\ncheck({entry_point})\n

A label holds when a correct record's program passes and an incorrect record's program fails
(raises). A timeout or an error is never taken as evidence of either: a stored label must be
reproducible, and a slow machine must not turn a correct solution into an incorrect one.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from wmtp_fn.sandbox import Limits, SandboxResult, run_program
from wmtp_fn.data.schema import DataError, Record


def completion_program(record: Record) -> str:
    """The test program of a function-completion record."""
    if not record.tests or not record.entry_point:
        raise DataError(
            f"problem {record.problem_id!r}",
            "needs 'tests' and 'entry_point' to be verified",
        )
    return f"{record.instruction}{record.output}\n\n{record.tests}\n\ncheck({record.entry_point})\n"


def failure_type(result: SandboxResult) -> str:
    """``"AssertionError"`` from a failed result's message (the exception's type name)."""
    return result.message.split(":", 1)[0]


def label_holds(record: Record, result: SandboxResult) -> bool:
    return result.status == ("passed" if record.is_correct else "failed")


def verify_records(
    records: Sequence[Record],
    *,
    limits: Limits = Limits(),
    workers: int = 2,
    progress: bool = False,
) -> list[SandboxResult]:
    """Run every record's program (``workers`` at a time); results in input order."""
    programs = [completion_program(r) for r in records]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda p: run_program(p, limits=limits), programs)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(programs), desc="verify", unit="program")
        return list(results)
