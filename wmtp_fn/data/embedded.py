"""The bundled HumanEval-derived dataset and tokenizer (built by ``wmtp_fn.data.build.humaneval``)."""

from __future__ import annotations

from pathlib import Path

from wmtp_fn.data.index import Index, build_index, subset
from wmtp_fn.data.split import split_problems

_DIR = Path(__file__).resolve().parent / "embedded"


def embedded_dir() -> Path:
    return _DIR


def embedded_dataset_path() -> Path:
    """``humaneval_code.jsonl``: 164 problems, one canonical and up to 4 mutants each."""
    return _DIR / "humaneval_code.jsonl"


def embedded_tokenizer_path() -> Path:
    """A HuggingFace tokenizer directory: ``AutoTokenizer.from_pretrained(path)``."""
    return _DIR / "tokenizer"


def embedded_stats_path() -> Path:
    return _DIR / "stats.json"


def embedded_split(val_fraction: float = 0.1, seed: int = 42) -> tuple[Index, Index]:
    """``(train_index, val_index)`` of the embedded dataset, split by problem.

    Built fresh on each call (streaming the file once, well under a second), so nothing is
    cached behind the caller's back; keep the result if you need it twice.
    """
    index = build_index(embedded_dataset_path())
    train, val = split_problems(index, val_fraction, seed)
    return subset(index, train), subset(index, val)
