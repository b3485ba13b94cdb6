"""Experiment configs: load `experiments/<name>.py`, apply `--config.a.b=value` overrides, describe.

A config file defines `get_config()` returning an `ml_collections.ConfigDict`; it is locked, so
an override of a key that does not exist is an error (with the closest key suggested), and a
value is parsed by the type of the key's default, as ml-collections' `config_flags` does:
bool (`true/false/1/0`), int, float, str (as typed), tuple (a Python literal, or
comma-separated items), a dict literal for a group. Every problem is a `ConfigError` naming the
flag.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import io
import sys
import tokenize
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from wmtp_fn.errors import ConfigError

_TRUE = ("true", "t", "1", "yes")
_FALSE = ("false", "f", "0", "no")


def flat_config(config: ConfigDict) -> dict[str, Any]:
    """`{"a.b": value}` of a config (tuples as lists, JSON-ready), for diffs and logs."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config_items(config).items()}


def config_items(config: ConfigDict | Mapping) -> dict[str, Any]:
    """`{"a.b": value}` of every leaf, in the config's order."""
    out = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, (ConfigDict, Mapping)):
            for k in node.keys():
                walk(f"{prefix}.{k}" if prefix else k, node[k])
        else:
            out[prefix] = node

    walk("", config)
    return out


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path) -> ConfigDict:
    """Run the config file's `get_config()`; the result is locked."""
    path = Path(path)
    flag = f"--config {path}"
    if not path.is_file():
        raise ConfigError(f"{flag}: no such file (python -m wmtp_fn --list shows the experiments)")
    name = f"wmtp_fn_config_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # while it runs: dataclasses and pickling look the module up
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - whatever the file raises, it is the file's problem
        raise ConfigError(f"{flag}: cannot load it ({type(e).__name__}: {e})") from e
    finally:
        sys.modules.pop(name, None)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"{flag}: defines no get_config() function")
    try:
        config = get_config()
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{flag}: get_config() failed ({type(e).__name__}: {e})") from e
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"{flag}: get_config() returned a {type(config).__name__}, expected an ml_collections.ConfigDict")
    config.lock()
    return config


# ----------------------------------------------------------------------------- overrides


def apply_override(config: ConfigDict, key: str, text: str | None) -> None:
    """Set `config.<key>` from the command-line text `text` (None: a bare `--config.key`, which
    means true for a bool key). Raises `ConfigError` naming the flag."""
    flag = f"--config.{key}"
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ConfigDict):
            raise ConfigError(f"{flag}: no such key ({'.'.join(parts[:i])} is a value, not a group of keys)")
        if part not in node:
            raise ConfigError(f"{flag}: no such key{_suggestion(config, key)}")
        if i < len(parts) - 1:
            node = node[part]
    leaf = parts[-1]
    value = parse_value(flag, text, node[leaf])
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{flag}: {e}") from None
    config.lock()  # a group replaced by a dict literal is locked too


def parse_value(flag: str, text: str | None, default: Any) -> Any:
    """The value of `text` for a key whose default is `default`."""
    shown = f"{flag}={text}"
    if text is None:
        if isinstance(default, bool):
            return True
        raise ConfigError(f"{flag}: needs a value, e.g. {flag}={default!r}")
    if isinstance(default, bool):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"{shown}: expected true or false")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{shown}: expected an int (the default is {default!r})") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{shown}: expected a number (the default is {default!r})") from None
    if isinstance(default, str):
        return text
    if isinstance(default, (tuple, list)):
        value = _literal(text)
        if isinstance(value, str):  # not a literal: comma-separated items
            value = tuple(_literal(x.strip()) for x in text.split(",") if x.strip())
        value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        return value if isinstance(default, tuple) else list(value)
    if isinstance(default, ConfigDict):
        value = _literal(text)
        if not isinstance(value, dict):
            raise ConfigError(f"{flag} is a group of keys: set one of them ({flag}.<key>=…) or pass a dict literal")
        return ConfigDict(value)
    if default is None:
        return _literal(text)
    raise ConfigError(f"{flag}: a {type(default).__name__} key cannot be set from the command line")


def _literal(text: str) -> Any:
    """A Python literal (numbers, strings, tuples, lists, dicts, True/False/None), else the text."""
    try:
        return ast.literal_eval(text)
    except (SyntaxError, ValueError):
        return text


def _suggestion(config: ConfigDict, key: str) -> str:
    keys = list(config_items(config))
    groups = {k.rpartition(".")[0] for k in keys} - {""}
    close = difflib.get_close_matches(key, keys + sorted(groups), n=1, cutoff=0.6)
    return f"; did you mean --config.{close[0]}?" if close else "; --help with this --config lists the keys"


# ----------------------------------------------------------------------------- description


def describe(path: str | Path, config: ConfigDict) -> str:
    """Every key of `config` with its default and the comment after its assignment in the
    config file (`c.train.steps = 200  # optimizer steps`), one line each, in the file's order."""
    found = assignments(Path(path).read_text())
    items = config_items(config)
    cells = {k: f"{k} = {v!r}" for k, v in items.items()}
    width = max((len(c) for c in cells.values() if len(c) <= 40), default=0)  # a long tuple does not set it
    lines = []
    for key in sorted(items, key=lambda k: (_assignment_of(k, found)[0], k)):
        comment = _assignment_of(key, found)[1]
        lines.append(f"  {cells[key].ljust(width)}  # {comment}" if comment else f"  {cells[key]}")
    return "\n".join(lines)


def assignments(source: str) -> dict[str, tuple[int, str]]:
    """`{"a.b": (line, comment)}` for each `<name>.a.b = value  # comment` of a config's source
    (comment "" when there is none)."""
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    out = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                key = _dotted_attr(target)
                if key:
                    out[key] = (node.lineno, comments.get(node.end_lineno) or comments.get(node.lineno, ""))
    return out


def _assignment_of(key: str, found: Mapping[str, tuple[int, str]]) -> tuple[int, str]:
    """Where the key is assigned; a key inside a dict literal gets its literal's assignment."""
    while key:
        if key in found:
            return found[key]
        key = key.rpartition(".")[0]
    return (1 << 30, "")


def _dotted_attr(node: ast.AST) -> str | None:
    """`c.a.b` -> "a.b" (the path below the config variable), else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join(reversed(parts)) if isinstance(node, ast.Name) and parts else None
