"""Checking a record's label by running its tests in the sandbox.

A function-completion record (HumanEval style) is its prompt (``instruction``: imports, the
signature, the docstring, helpers), the completion (``output``), the tests (``tests``, which
define ``check``) and the entry point. Two ways to run it (``mode``):

- ``"proxy"`` (the default): the candidate, ``{instruction}{output}``, runs sandboxed; the
  tests run in the trusted judge after the prompt, calling the entry point through the
  sandbox's data-only proxy (``wmtp_fn.sandbox.run_function_tests``). A completion cannot
  forge its verdict.
- ``"in_process"``: one program, ``{instruction}{output}\\n\\n{tests}\\n\\ncheck({entry_point})\\n``,
  that judges itself (``run_program``): for tests that pass the candidate values the proxy
  cannot carry (status ``unsupported`` in the proxy mode). The weaker guarantee: a hostile
  completion can forge its own pass.

A label holds when a correct record passes and an incorrect record fails (raises). A timeout
or an error is never taken as evidence of either: a stored label must be reproducible, and a
slow machine must not turn a correct solution into an incorrect one.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from wmtp_fn.data.schema import DataError, Record
from wmtp_fn.sandbox import Limits, SandboxResult, run_function_tests, run_program

Mode = Literal["proxy", "in_process"]


def _check_runnable(record: Record) -> None:
    if not record.tests or not record.entry_point:
        raise DataError(
            f"problem {record.problem_id!r}",
            "needs 'tests' and 'entry_point' to be verified",
        )


def completion_program(record: Record) -> str:
    """The in-process test program of a function-completion record."""
    _check_runnable(record)
    return f"{record.instruction}{record.output}\n\n{record.tests}\n\ncheck({record.entry_point})\n"


def verify_record(record: Record, *, limits: Limits = Limits(), mode: Mode = "proxy") -> SandboxResult:
    """Run ``record``'s tests against its completion (see the module docstring)."""
    if mode == "in_process":
        return run_program(completion_program(record), limits=limits)
    if mode != "proxy":
        raise ValueError(f"mode must be 'proxy' or 'in_process', got {mode!r}")
    _check_runnable(record)
    return run_function_tests(
        f"{record.instruction}{record.output}", record.entry_point,
        f"{record.tests}\n\ncheck({record.entry_point})\n", prelude=record.instruction,
        limits=limits,
    )


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
    mode: Mode = "proxy",
) -> list[SandboxResult]:
    """Run every record's tests (``workers`` at a time); results in input order."""
    for record in records:
        _check_runnable(record)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda r: verify_record(r, limits=limits, mode=mode), records)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(records), desc="verify", unit="record")
        return list(results)
