"""The embedded data rebuilds byte for byte from the script, and every label re-verifies."""

import json
import os
import random

import pytest

from wmtp_fn.data.build.bpe import save_hf_tokenizer, train_bpe
from wmtp_fn.data.build.humaneval import (
    LICENSE_FILE,
    VOCAB_SIZE,
    body_first_line,
    difficulty_proxy,
    main,
    tokenizer_texts,
)
from wmtp_fn.data.embedded import embedded_dataset_path, embedded_dir, embedded_tokenizer_path
from wmtp_fn.data.jsonl import iter_records
from wmtp_fn.sandbox import Limits
from wmtp_fn.data.verify import completion_program, failure_type, label_holds, verify_records

# A deterministic subset that exercises every path of the builder: a rejected empty body
# (HumanEval/2), a mutant that passes the tests and is rejected plus non-ASCII text
# (HumanEval/72), problems that run out of candidates (HumanEval/38, HumanEval/162).
SUBSET = ["HumanEval/2", "HumanEval/38", "HumanEval/72", "HumanEval/162"]


def stored_lines(problem_ids):
    wanted = set(problem_ids)
    with open(embedded_dataset_path(), encoding="utf-8") as f:
        return [line for line in f if json.loads(line)["problem_id"] in wanted]


def test_subset_rebuild_matches_stored_bytes(tmp_path):
    assert main(["--out", str(tmp_path), "--tasks", ",".join(SUBSET), "--no-tokenizer", "--quiet"]) == 0
    rebuilt = (tmp_path / "humaneval_code.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    assert rebuilt == stored_lines(SUBSET)
    assert len(rebuilt) > len(SUBSET)
    assert (tmp_path / LICENSE_FILE).read_bytes() == (embedded_dir() / LICENSE_FILE).read_bytes()


def test_tokenizer_retrains_to_the_same_bytes(tmp_path):
    records = list(iter_records(embedded_dataset_path()))
    save_hf_tokenizer(train_bpe(tokenizer_texts(records), vocab_size=VOCAB_SIZE), str(tmp_path))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (embedded_tokenizer_path() / name).read_bytes(), name


def test_difficulty_proxy_golden():
    # return len(s): Return, Call, Name len, Load, Name s, Load = 6 nodes
    # ceil(2 * sqrt(6)) - 3 = ceil(4.899) - 3 = 2
    assert difficulty_proxy("def f(s):\n", "    return len(s)\n") == 2
    # pass: 1 node → ceil(2) - 3 = -1 → clamped to 1
    assert difficulty_proxy("def f(s):\n", "    pass\n") == 1
    # x = 1 (Assign, Name, Store, Constant = 4) and return x (Return, Name, Load = 3): n = 7
    # ceil(2 * sqrt(7)) - 3 = ceil(5.29) - 3 = 3
    assert difficulty_proxy('def f():\n    """doc"""\n', "    x = 1\n    return x\n") == 3
    assert body_first_line('def f():\n    """doc"""\n') == 3
    with pytest.raises(ValueError):
        body_first_line("def f():")


def _check(records, results):
    results = list(results)
    assert len(results) == len(records), (len(results), len(records))  # one verdict per record
    for record, result in zip(records, results, strict=True):
        assert label_holds(record, result), (record.problem_id, record.is_correct, result)
        if not record.is_correct:
            assert failure_type(result) == record.metadata["failure"], (record.problem_id, result)


def test_seeded_sample_reverifies():
    records = list(iter_records(embedded_dataset_path()))
    sample = random.Random(1234).sample(records, 24)
    _check(sample, verify_records(sample, limits=Limits(timeout_s=10.0)))


def test_tampered_label_is_caught():
    record = next(iter_records(embedded_dataset_path()))
    from dataclasses import replace

    flipped = replace(record, is_correct=False)
    (result,) = verify_records([flipped])
    assert not label_holds(flipped, result)
    assert completion_program(record).endswith("\n\ncheck(has_close_elements)\n")


@pytest.mark.slow
def test_every_stored_label_reverifies():
    records = list(iter_records(embedded_dataset_path()))
    workers = max(1, min(4, os.cpu_count() or 1))
    _check(records, verify_records(records, limits=Limits(timeout_s=10.0), workers=workers))
