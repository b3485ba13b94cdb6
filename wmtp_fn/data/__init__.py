"""The data layer: records and their validation, the offset index, prompt templates,
tokenisation, collation, seeded resumable samplers, label verification and the embedded
HumanEval-derived dataset. Building datasets (HumanEval, mutations, BPE) lives in ``data.build``;
running untrusted programs in ``wmtp_fn.sandbox``.

One module per concept:
    schema      Record, parse_record, DataError (located, exact messages)
    jsonl       iter_records / iter_located: streaming JSONL with raise/skip policies
    index       build_index, read_at, read_many, subset: offsets, not loaded records
    template    ALPACA_WITH_INPUT, ALPACA_NO_INPUT, render_prompt
    encode      encode, encode_many: prompt-masked input_ids/labels
    collate     collate, collate_pairs: padded [B, T] tensors
    sampling    sample_by_difficulty, sample_pairs, Cursor, next_batch
    split       split_problems: train/validation by problem
    stream      record batches for the train step from a resumable cursor
    pairs       critic pairs (correct, incorrect) of one problem, streamed the same way
    verify      completion_program, verify_records, label_holds (runs the sandbox)
    embedded    embedded_dataset_path, embedded_tokenizer_path, embedded_split
    build/      humaneval (python -m wmtp_fn.data.build.humaneval), mutations, bpe
"""

from wmtp_fn.data.collate import collate, collate_pairs
from wmtp_fn.data.embedded import (
    embedded_dataset_path,
    embedded_split,
    embedded_stats_path,
    embedded_tokenizer_path,
)
from wmtp_fn.data.encode import IGNORE_INDEX, encode, encode_many
from wmtp_fn.data.index import Index, build_index, read_at, read_many, subset
from wmtp_fn.data.jsonl import iter_located, iter_records
from wmtp_fn.data.sampling import Cursor, next_batch, sample_by_difficulty, sample_pairs
from wmtp_fn.data.schema import DataError, Record, parse_record, record_to_json
from wmtp_fn.data.split import split_problems
from wmtp_fn.data.template import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, render_prompt

__all__ = [
    "ALPACA_NO_INPUT", "ALPACA_WITH_INPUT", "Cursor", "DataError", "IGNORE_INDEX", "Index",
    "Record", "build_index", "collate", "collate_pairs",
    "embedded_dataset_path", "embedded_split", "embedded_stats_path", "embedded_tokenizer_path",
    "encode", "encode_many", "iter_located", "iter_records", "next_batch", "parse_record",
    "read_at", "read_many", "record_to_json", "render_prompt",
    "sample_by_difficulty", "sample_pairs", "split_problems", "subset",
]
