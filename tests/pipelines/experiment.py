"""An experiment config for a pipeline test: the file as `run` loads it, a run directory, overrides."""

from pathlib import Path

from wmtp_fn.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def experiment(name: str, out_dir, **overrides):
    """`experiments/<name>.py`'s locked config with `out_dir` and `{"a.b": value}` overrides set."""
    cfg = load_config(ROOT / "experiments" / f"{name}.py")
    cfg.out_dir = str(out_dir)
    for dotted, value in overrides.items():
        node = cfg
        *path, leaf = dotted.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    return cfg
