"""The training batch stream when records are too long to encode: skipped ones are reported,
and a data set in which *no* record fits is a clear error instead of an endless loop."""

import json

import pytest
import torch
from ml_collections import ConfigDict

from wmtp_fn.data.index import build_index
from wmtp_fn.data.sampling import Cursor
from wmtp_fn.data.schema import DataError
from wmtp_fn.data.template import render_prompt
from wmtp_fn.data import stream as common


class CharTokenizer:
    """One token per character (code point + 10); BOS 1, EOS 2, PAD 3."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 3
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) + 10 for c in text]}


def records(tmp_path, instructions):
    path = tmp_path / "data.jsonl"
    with path.open("w") as f:
        for i, instruction in enumerate(instructions):
            f.write(json.dumps({"problem_id": f"P/{i}", "instruction": instruction, "input": "", "output": "x",
                                "is_correct": True, "difficulty": 3}) + "\n")
    index = build_index(str(path))
    offsets = sorted(o for e in index["problems"].values() for o in e["correct_offsets"])
    return common.RecordSet(index, tuple(offsets))


# BOS + the rendered prompt of "ok" + "x" + EOS fits; an instruction 90 characters longer does not.
MAX_LENGTH = 1 + len(render_prompt("ok")) + 2
DATA = ConfigDict(dict(max_length=MAX_LENGTH, use_chat_template=False, too_long="skip", pad_to_multiple_of=0))


@pytest.fixture
def bounded(monkeypatch):
    """Turn an endless loop into a failure: at most 200 draws from the sampler."""
    real, calls = common.next_batch, []

    def counted(*args, **kwargs):
        calls.append(1)
        assert len(calls) <= 200, "batch_stream kept drawing batches without end"
        return real(*args, **kwargs)

    monkeypatch.setattr(common, "next_batch", counted)


def warned(capsys):
    """The problems the stream reported as skipped (one warning line each, as they happen)."""
    out = capsys.readouterr()
    return {line.split(": ", 2)[2].split(":")[0] for line in (out.out + out.err).splitlines() if "skipped (too long)" in line}


def test_every_record_too_long_is_a_clear_error(tmp_path, bounded, capsys):
    recs = records(tmp_path, ["a long instruction " * 5] * 5)
    stream = common.batch_stream(recs, CharTokenizer(), DATA, batch_size=2, micro_batch_size=1, device=torch.device("cpu"))
    with pytest.raises(DataError, match=rf"none of the 5 records .* fits max_length={MAX_LENGTH}"):
        stream(Cursor(0))
    assert warned(capsys) == {f"problem 'P/{i}'" for i in range(5)}


def test_only_the_records_that_fit_are_batched(tmp_path, bounded, capsys):
    recs = records(tmp_path, ["a long instruction " * 5, "ok", "a long instruction " * 5])
    stream = common.batch_stream(recs, CharTokenizer(), DATA, batch_size=3, micro_batch_size=2, device=torch.device("cpu"))
    cursor = Cursor(0)
    for _ in range(3):
        mbs, cursor = stream(cursor)
        assert len(mbs) == 1 and mbs[0]["input_ids"].shape[0] == 1  # the one short record
        # labels: only the response ("x" = 130) and EOS are targets
        assert mbs[0]["labels"][0][mbs[0]["labels"][0] != -100].tolist() == [130, 2]
    assert warned(capsys) == {"problem 'P/0'", "problem 'P/2'"}
