"""The smallest ref_tuning run that still exercises everything: a one-layer 64-wide tiny Llama,
32 training records, two micro-batches per step. As command-line flags and as a config."""

from __future__ import annotations

from pathlib import Path

from wmtp_fn.config import apply_override, load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "experiments" / "ref_tuning.py"

TINY = {
    "base.tiny_hidden_size": 64,
    "base.tiny_layers": 1,
    "data.n_samples": 32,
    "data.val_n_samples": 4,
    "data.max_length": 320,
    "data.too_long": "skip",
    "train.steps": 6,
    "train.batch_size": 4,
    "train.micro_batch_size": 2,
    "train.log_every": 2,
    "train.eval_every": 3,
    "train.save_every": 0,
}


def flags(out_dir, **overrides) -> list[str]:
    """`--config experiments/ref_tuning.py --config.k=v ...` of the tiny run (+ `overrides`)."""
    values = {**TINY, "out_dir": str(out_dir), **overrides}
    return ["--config", str(CONFIG), *(f"--config.{k}={v}" for k, v in values.items())]


def tiny_config(out_dir, **overrides):
    """The same run as a locked ConfigDict, set through the command line's own parser."""
    config = load_config(CONFIG)
    for key, value in {**TINY, "out_dir": str(out_dir), **overrides}.items():
        apply_override(config, key, str(value))
    return config
