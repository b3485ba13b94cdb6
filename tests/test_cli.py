"""The command line: one line per expected error with the right exit status, nothing written
for bad inputs, --debug for the traceback, and the experiments and keys listed."""

import json
import shutil
import subprocess
import sys

import pytest

from tests.pipelines.tiny import CONFIG, ROOT, flags
from wmtp_fn.config import flat_config, load_config
from wmtp_fn.errors import BaseModelError, ConfigError
from wmtp_fn.run import main


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


RECORD = {"problem_id": "p1", "instruction": "Add.", "input": "", "output": "return a + b",
          "is_correct": True, "difficulty": 3}


@pytest.mark.parametrize("argv, message", [
    (["--config.train.stpes=3"], "error: --config.train.stpes: no such key; did you mean --config.train.steps?"),
    (["--config.lora.rnak=8"], "error: --config.lora.rnak: no such key; did you mean --config.lora.rank?"),
    (["--config.train.steps=many"], "error: --config.train.steps=many: expected an int (the default is 6)"),
    (["--config.base.compile=maybe"], "error: --config.base.compile=maybe: expected true or false"),
    (["--config.train=3"], "error: --config.train is a group of keys: set one of them (--config.train.<key>=…) or pass a dict literal"),
    (["--config.train.resume=sometimes"], "error: train.resume is 'sometimes'; expected 'auto' or 'never'"),
    (["--config.train.batch_size=3"], "error: train.batch_size=3 is not a multiple of train.micro_batch_size=2"),
    (["--config.data.tokenizer=/no/such/tok"], "error: data.tokenizer: '/no/such/tok' is not a directory (expected a tokenizer or HuggingFace model directory)"),
    (["--config.data.train_path=/no/such.jsonl"], "error: data.train_path: '/no/such.jsonl' is not a file (expected a JSONL file of records, see docs/data.md)"),
    (["--bogus"], "error: unexpected argument '--bogus'; options look like --config.train.steps=100 (see --help)"),
])
def test_usage_errors_are_one_line_with_status_2(argv, message, tmp_path, capsys):
    assert main(flags(tmp_path / "run") + argv) == 2
    assert one_error_line(capsys) == message
    assert not (tmp_path / "run").exists()  # nothing written


def test_config_file_errors(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.py")]) == 2
    assert one_error_line(capsys) == f"error: --config {tmp_path / 'nope.py'}: no such file (python -m wmtp_fn --list shows the experiments)"
    (tmp_path / "no_get.py").write_text("X = 1\n")
    assert main(["--config", str(tmp_path / "no_get.py")]) == 2
    assert one_error_line(capsys).endswith("no_get.py: defines no get_config() function")
    (tmp_path / "broken.py").write_text("def get_config(:\n")
    assert main(["--config", str(tmp_path / "broken.py")]) == 2
    assert "broken.py: cannot load it (SyntaxError: " in one_error_line(capsys)
    assert main([]) == 2
    assert one_error_line(capsys).startswith("error: --config is required")


@pytest.mark.parametrize("case", ["bad_line", "gpt2_base", "bert_base", "missing_base", "base_without_config"])
def test_bad_inputs_are_one_line_with_status_1_and_leave_no_run_directory(case, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(RECORD) + "\n" + json.dumps({**RECORD, "difficulty": "7"}) + "\n")
    other = tmp_path / "other"
    other.mkdir()
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    argv, message = {
        "bad_line": ([f"--config.data.train_path={data}"],
                     f"error: {data}:2: field 'difficulty': expected int, got str ('7')"),
        "gpt2_base": ([f"--config.base.path={tmp_path / 'gpt2'}"],
                      f"error: base.path: '{tmp_path / 'gpt2'}' is a gpt2 model; wmtp_fn supports Llama-architecture models"),
        "bert_base": ([f"--config.base.path={tmp_path / 'bert'}"], "is a bert model; wmtp_fn supports"),
        "missing_base": ([f"--config.base.path={tmp_path / 'none'}"],
                         f"error: base.path: '{tmp_path / 'none'}' is not a directory"),
        "base_without_config": ([f"--config.base.path={other}"], "has no config.json"),
    }[case]
    assert main(flags(tmp_path / "run") + argv) == 1
    line = one_error_line(capsys)
    assert line.startswith(message) if message.startswith("error:") else message in line
    assert not (tmp_path / "run").exists()  # validated before anything was written


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(flags(out, **{"train.steps": 2, "train.save_every": 1})) == 0
    return out


def test_run_errors_of_an_existing_run(finished, tmp_path, capsys):
    capsys.readouterr()
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    assert main(flags(run, **{"train.steps": 2, "train.save_every": 1, "lora.rank": 4})) == 2
    assert one_error_line(capsys) == (
        f"error: {run} holds a run with another config (lora.rank: 16 -> 4); choose another --config.out_dir "
        "or use the same settings to resume"
    )
    assert main(flags(run, **{"train.steps": 2, "train.save_every": 1, "train.resume": "never"})) == 2
    assert "already holds a run (latest checkpoint step_00000002)" in one_error_line(capsys)

    (run / "checkpoints" / "step_00000002" / "meta.json").write_text("{not json")
    assert main(flags(run, **{"train.steps": 2, "train.save_every": 1})) == 1
    assert one_error_line(capsys).startswith(f"error: {run / 'checkpoints' / 'step_00000002' / 'meta.json'}: invalid JSON")
    shutil.rmtree(run / "checkpoints" / "step_00000002")
    assert main(flags(run, **{"train.steps": 2, "train.save_every": 1})) == 1  # FileNotFoundError
    assert one_error_line(capsys) == (
        f"error: {run / 'checkpoints' / 'latest'} names 'step_00000002', which is not a complete checkpoint"
    )


def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="no such key"):
        main(flags(tmp_path) + ["--config.train.stpes=3", "--debug"])
    monkeypatch.setenv("WMTP_DEBUG", "1")
    with pytest.raises(BaseModelError, match="is not a directory"):
        main(flags(tmp_path, **{"base.path": str(tmp_path / "none")}))


def test_the_real_entry_point_prints_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "wmtp_fn", "--config", "experiments/ref_tuning.py", "--config.train.stpes=3",
         f"--config.out_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "error: --config.train.stpes: no such key; did you mean --config.train.steps?\n"


def test_help_lists_the_experiments_with_their_descriptions(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m wmtp_fn --config CONFIG")
    first_line = CONFIG.read_text().split('"""')[1].splitlines()[0]  # the docstring's first line
    assert f"  ref_tuning  {first_line.removeprefix('ref_tuning:').strip()}" in out.splitlines()
    assert main(["--list"]) == 0
    assert "bench" not in capsys.readouterr().out  # experiments/bench/ holds scripts, not configs


def test_help_of_a_config_prints_its_keys_defaults_and_comments(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the experiment is found by name next to the package too
    assert main(["--config", "ref_tuning", "--config.train.steps=7", "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    source = CONFIG.read_text()
    steps = next(x for x in lines if x.strip().startswith("train.steps ="))
    assert steps.split("#")[0].strip() == "train.steps = 7"  # overrides apply before printing
    resume = next(x for x in lines if x.strip().startswith("train.resume ="))
    comment = source.split("c.train.resume = ")[1].splitlines()[0].split("# ", 1)[1]
    assert resume.split("# ", 1)[1] == comment
    bins = next(x for x in lines if x.strip().startswith("data.difficulty_bins.all ="))
    assert "[1, 25]" in bins
    keys = [x.split("=")[0].strip() for x in lines if x.startswith("  ")]
    assert keys.index("seed") < keys.index("base.path") < keys.index("train.steps")  # the file's order
    assert sorted(keys) == sorted(flat_config(load_config(CONFIG)))  # every key once
