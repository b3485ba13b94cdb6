"""A tiny stand-in for the sandbox in tests of the evaluation: run a program in a plain
``python -I`` subprocess with a wall-clock timeout and classify the outcome like the sandbox
does (passed / failed / timeout / error). No isolation: only for the project's own test
programs (HumanEval's canonical solutions, known mutants, hand-written failures)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


@dataclass(frozen=True)
class LocalResult:
    status: str
    message: str
    stderr: str


def run_local(program: str, timeout_s: float = 5.0) -> LocalResult:
    """passed: exit status 0; failed: exit status 1 (what an uncaught exception, a syntax
    error included, ends Python with);
    timeout: still running after ``timeout_s``; error: anything else (a signal, os._exit)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        try:
            proc = subprocess.run(
                [sys.executable, "-I", "-B", path], cwd=tmp, capture_output=True, text=True,
                timeout=timeout_s, env={"PYTHONHASHSEED": "0", "PATH": os.environ.get("PATH", "")},
            )
        except subprocess.TimeoutExpired as e:
            stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            return LocalResult("timeout", f"wall clock {timeout_s} s", stderr)
    if proc.returncode == 0:
        return LocalResult("passed", "", proc.stderr)
    lines = proc.stderr.strip().splitlines()
    if proc.returncode == 1:
        return LocalResult("failed", lines[-1] if lines else "", proc.stderr)
    return LocalResult("error", f"exit status {proc.returncode}", proc.stderr)


def run_many(programs: list[str], timeout_s: float = 5.0, workers: int = 4) -> list[LocalResult]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_local(p, timeout_s), programs))
