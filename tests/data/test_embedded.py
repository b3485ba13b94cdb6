"""The embedded dataset and tokenizer: contents, consistency with stats.json, the tokenizer
as transformers loads it, and the prompt/response boundary with real tokens."""

import collections
import json

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from wmtp_fn.data.embedded import (
    embedded_dataset_path,
    embedded_dir,
    embedded_split,
    embedded_stats_path,
    embedded_tokenizer_path,
)
from wmtp_fn.data.encode import encode
from wmtp_fn.data.index import build_index, read_at
from wmtp_fn.data.jsonl import iter_records
from wmtp_fn.data.template import render_prompt


@pytest.fixture(scope="module")
def records():
    return list(iter_records(embedded_dataset_path()))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(embedded_tokenizer_path()))


def test_files_present():
    names = {p.name for p in embedded_dir().iterdir()}
    assert {"humaneval_code.jsonl", "stats.json", "LICENSE-HumanEval.md", "tokenizer"} <= names
    assert {p.name for p in embedded_tokenizer_path().iterdir()} == {
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"
    }
    text = (embedded_dir() / "LICENSE-HumanEval.md").read_text()
    assert "MIT License" in text and "Copyright (c) OpenAI" in text


def test_dataset_shape(records):
    problems = list(dict.fromkeys(r.problem_id for r in records))
    assert len(problems) == 164
    by_problem = collections.defaultdict(list)
    for r in records:
        by_problem[r.problem_id].append(r)
    n_incorrect = collections.Counter()
    for pid, rs in by_problem.items():
        assert rs[0].is_correct and all(not r.is_correct for r in rs[1:])  # canonical first
        assert len({r.difficulty for r in rs}) == 1 and 1 <= rs[0].difficulty <= 25
        assert all(r.input == "" and r.tests and r.entry_point for r in rs)
        assert len({r.output for r in rs}) == len(rs)  # no duplicate completions
        n_incorrect[pid] = len(rs) - 1
    assert sum(1 for n in n_incorrect.values() if n >= 2) >= 150


def test_mutants_replay_on_the_canonical_body(records):
    canonical = {r.problem_id: r.output for r in records if r.is_correct}
    for r in records:
        if r.is_correct:
            continue
        m = r.metadata["mutation"]
        body = canonical[r.problem_id]
        assert body[m["offset"]:m["offset"] + len(m["old"])] == m["old"]
        # one span changed, every other character (formatting, comments) identical
        assert r.output == body[:m["offset"]] + m["new"] + body[m["offset"] + len(m["old"]):]
        assert body.count("\n", 0, m["offset"]) + 1 == m["line"]


def test_stats_match_the_data(records):
    stats = json.loads(embedded_stats_path().read_text())
    per_problem = collections.Counter(r.problem_id for r in records if not r.is_correct)
    problems = {r.problem_id for r in records}
    histogram = collections.Counter(per_problem.get(p, 0) for p in problems)
    assert stats["problems"] == len(problems)
    assert stats["records"] == len(records)
    assert stats["correct"] == sum(r.is_correct for r in records)
    assert stats["incorrect"] == sum(not r.is_correct for r in records)
    assert stats["incorrect_per_problem"] == {str(k): v for k, v in sorted(histogram.items())}
    assert stats["problems_with_at_least_2_incorrect"] >= 150
    assert stats["tokens"]["vocab_size"] == 1024
    assert stats["tokens"]["fraction_at_most_512"] > 0.9


def test_index_and_offsets(records):
    index = build_index(embedded_dataset_path())
    assert index["n_records"] == len(records) and len(index["problems"]) == 164
    entry = index["problems"]["HumanEval/0"]
    assert len(entry["correct_offsets"]) == 1 and entry["correct_offsets"][0] == 0
    assert read_at(embedded_dataset_path(), entry["incorrect_offsets"][-1]).problem_id == "HumanEval/0"


def test_split_is_deterministic_and_disjoint():
    train, val = embedded_split(0.1, seed=42)
    train2, val2 = embedded_split(0.1, seed=42)
    assert train == train2 and val == val2
    assert len(val["problems"]) == 16 and len(train["problems"]) == 148
    assert not set(train["problems"]) & set(val["problems"])


def test_tokenizer_loads_as_fast_tokenizer(tokenizer):
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<unk>", "<s>", "</s>", "<pad>"
    )
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2, 3)
    assert len(tokenizer) == 1024
    assert tokenizer.chat_template is None
    text = "def f(x):\n    return x  # é ✓\n"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == 1 and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text  # byte-level: exact round trip


def test_boundary_with_embedded_tokenizer(records, tokenizer):
    record = records[0]
    ex = encode(record, tokenizer, max_length=2048)
    prompt = render_prompt(record.instruction, record.input)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    output_ids = tokenizer(record.output, add_special_tokens=False)["input_ids"]
    n = 1 + len(prompt_ids)
    assert ex["input_ids"] == [1] + prompt_ids + output_ids + [2]
    assert ex["labels"] == [-100] * n + output_ids + [2]
    # the first label is the first token of the output: decoding the labelled part gives
    # exactly the output and EOS, nothing of the prompt
    assert tokenizer.decode(ex["input_ids"][n:]) == record.output + "</s>"
    assert tokenizer.decode(ex["input_ids"][1:n]) == prompt
    # Why the boundary is made by concatenation: tokenised jointly, the prompt's final "\n" and
    # the body's indentation merge into one token ("\n   ") that straddles the boundary.
    joint = tokenizer(prompt + record.output, add_special_tokens=False)["input_ids"]
    assert joint[: len(prompt_ids) - 1] == prompt_ids[:-1]
    assert tokenizer.decode(joint[len(prompt_ids) - 1]) == "\n   "
    assert joint != prompt_ids + output_ids


def test_truncation_with_embedded_tokenizer(records, tokenizer):
    record = records[0]
    full = encode(record, tokenizer, max_length=2048)
    n_prompt = sum(1 for x in full["labels"] if x == -100)
    cut = encode(record, tokenizer, max_length=n_prompt + 5)
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 5]
    assert cut["labels"][n_prompt:] == full["labels"][n_prompt:n_prompt + 5] and 2 not in cut["labels"]
