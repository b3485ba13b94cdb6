"""The one entry point: run any experiment config, with `--config.a.b=value` overrides.

    python -m wmtp_fn --help                                     usage and the experiments
    python -m wmtp_fn --config experiments/ref_tuning.py --help  an experiment's keys
    python -m wmtp_fn --config experiments/ref_tuning.py --config.train.steps=100
    torchrun --nproc_per_node=2 -m wmtp_fn --config experiments/ref_tuning.py   one process per rank

Expected errors (a bad flag, config, data file, base or checkpoint) print one line,
`error: ...`, and exit with 2 (usage) or 1 (run); `--debug` or `WMTP_DEBUG=1` shows the
traceback instead. Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and exits
with 130 / 143; rerunning the same command resumes.
"""

from __future__ import annotations

import ast
import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ml_collections import ConfigDict

from wmtp_fn.config import apply_override, describe, load_config
from wmtp_fn.errors import ConfigError, Interrupted, WmtpError

def pipelines() -> tuple[str, ...]:
    """Every module of `wmtp_fn.pipelines` but the shared wiring: a pipeline is a file there
    with a `run(config)`."""
    import pkgutil

    import wmtp_fn.pipelines as package

    return tuple(sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.name != "runner"))


PIPELINES = pipelines()

USAGE = """\
usage: python -m wmtp_fn --config CONFIG [--config.KEY=VALUE ...] [--debug]
       python -m wmtp_fn --config CONFIG --help     the config's keys, defaults and comments
       python -m wmtp_fn --list                     the experiments

CONFIG is an experiment file (experiments/<name>.py) or its name. Each --config.KEY=VALUE
overrides one key (e.g. --config.train.steps=100; a bool key alone means true); VALUE is parsed
by the type of the key's default, and a key the config does not have is an error. Rerunning the
same command resumes an interrupted run. Errors print one line and exit with 2 (usage) or 1
(run); --debug (or WMTP_DEBUG=1) shows the traceback."""


@dataclass
class Args:
    config: str | None = None
    overrides: list[tuple[str, str | None]] = field(default_factory=list)
    help: bool = False
    list: bool = False
    debug: bool = False


def parse_args(argv: Sequence[str]) -> Args:
    """`--config PATH`, `--config.KEY=VALUE` / `--config.KEY VALUE`, `--help`, `--list`, `--debug`."""
    args, i = Args(), 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        takes_next = not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--")
        if arg in ("-h", "--help"):
            args.help = True
        elif arg == "--list":
            args.list = True
        elif arg == "--debug":
            args.debug = True
        elif name == "--config":
            if args.config is not None:
                raise ConfigError(f"--config given twice (first {args.config!r}); give one config file")
            if not eq and not takes_next:
                raise ConfigError("--config needs a file, e.g. --config experiments/ref_tuning.py")
            args.config = value if eq else argv[i + 1]
            i += 0 if eq else 1
        elif name.startswith("--config."):
            args.overrides.append((name.removeprefix("--config."), value if eq else (argv[i + 1] if takes_next else None)))
            i += 1 if takes_next else 0
        else:
            raise ConfigError(f"unexpected argument {arg!r}; options look like --config.train.steps=100 (see --help)")
        i += 1
    return args


def config_path(name: str) -> Path:
    """A config file named by path, or by experiment name (`ref_tuning`)."""
    path = Path(name)
    if not path.is_file() and path.suffix != ".py":
        for directory in experiment_dirs():
            if (directory / f"{name}.py").is_file():
                return directory / f"{name}.py"
    return path


def experiment_dirs() -> list[Path]:
    """Where experiments live: `./experiments`, and the one next to the package (a checkout)."""
    found = []
    for d in (Path.cwd() / "experiments", Path(__file__).resolve().parents[1] / "experiments"):
        if d.is_dir() and d.resolve() not in [f.resolve() for f in found]:
            found.append(d)
    return found


def experiments() -> dict[str, tuple[Path, str]]:
    """`{name: (path, one-line description)}` of each `experiments/<name>.py` that defines
    `get_config`; the description is its module docstring's first line."""
    out = {}
    for directory in experiment_dirs():
        for path in sorted(directory.glob("*.py")):
            try:
                tree = ast.parse(path.read_text())
            except SyntaxError:
                continue
            if path.stem in out or not any(isinstance(n, ast.FunctionDef) and n.name == "get_config" for n in tree.body):
                continue
            doc = (ast.get_docstring(tree) or "").strip().splitlines()
            out[path.stem] = (path, doc[0].removeprefix(f"{path.stem}:").strip() if doc else "")
    return out


def experiments_text() -> str:
    found = experiments()
    if not found:
        return "experiments: none found (looked for experiments/*.py with get_config())"
    width = max(map(len, found))
    rows = [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in found.items()]
    shown = {_shown(p.parent) for p, _ in found.values()}
    return f"experiments (in {', '.join(sorted(shown))}/):\n" + "\n".join(rows)


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def run_config(config: ConfigDict):
    """Run the pipeline a config names; returns what the pipeline returns."""
    name = config.get("pipeline")
    if name not in PIPELINES:
        raise ConfigError(f"config.pipeline is {name!r}; expected one of {PIPELINES}")
    return importlib.import_module(f"wmtp_fn.pipelines.{name}").run(config)


def _main(args: Args) -> int:
    if args.list or (args.help and args.config is None):
        print((USAGE + "\n\n" if args.help else "") + experiments_text())
        return 0
    if args.config is None:
        raise ConfigError("--config is required, e.g. --config experiments/ref_tuning.py (--help lists the experiments)")
    path = config_path(args.config)
    config = load_config(path)
    for key, text in args.overrides:
        apply_override(config, key, text)
    if args.help:
        print(f"{_shown(path)}: {experiments().get(path.stem, (None, ''))[1]}\n\nkeys (override with --config.KEY=VALUE):")
        print(describe(path, config))
        return 0
    try:
        run_config(config)
    finally:
        from wmtp_fn.dist.comm import shutdown

        shutdown()  # under torchrun: leave the process group cleanly
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("WMTP_DEBUG", "") not in ("", "0")
    try:
        return _main(parse_args(argv))
    except Interrupted as e:  # a stop signal; the loop saved what can be resumed
        print(f"\n{e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside the train loop (loading, exporting)
        if debug:
            raise
        print("\ninterrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except (WmtpError, FileNotFoundError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)


if __name__ == "__main__":
    sys.exit(main())
