"""The one entry point: run any experiment config, with `--config.a.b=value` overrides.

    python -m wmtp_fn --config experiments/ref_tuning.py --config.train.steps=100

A key that does not exist in the config (a typo) is an error, not a silent default.
"""

from __future__ import annotations

import importlib
import sys

from absl import app
from ml_collections import ConfigDict, config_flags

PIPELINES = ("ref_tuning",)

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (experiments/<name>.py)", lock_config=True)


def run_config(config: ConfigDict):
    """Run the pipeline a config names; returns what the pipeline returns."""
    name = config.get("pipeline")
    if name not in PIPELINES:
        raise ValueError(f"config.pipeline is {name!r}; expected one of {PIPELINES}")
    return importlib.import_module(f"wmtp_fn.pipelines.{name}").run(config)


def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; options look like --config.train.steps=100")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config experiments/ref_tuning.py")
    run_config(_CONFIG.value)


def main() -> None:
    app.run(_main, argv=sys.argv)


if __name__ == "__main__":
    main()
