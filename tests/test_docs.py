"""The README's Python blocks run as written; docs/ says what the code does (templates, exit
statuses); every relative link resolves."""

import re
from pathlib import Path

import pytest

from wmtp_fn.data.schema import DataError
from wmtp_fn.data.template import ALPACA_NO_INPUT, ALPACA_WITH_INPUT
from wmtp_fn.errors import BaseModelError, CheckpointError, ConfigError, Interrupted, NonFiniteError

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_the_readme_has_python_blocks():
    assert BLOCKS


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_a_readme_python_block_runs_as_written(i, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    exec(compile(BLOCKS[i], f"README.md python block {i}", "exec"), namespace)
    assert set(namespace) - {"__name__", "__builtins__"}, "the block defined nothing"


def test_the_notebook_snippet_blends_two_adapters():
    namespace = {"__name__": "__readme__"}
    exec(compile(BLOCKS[0], "README.md python block 0", "exec"), namespace)
    ref, other, blend = namespace["ref"], namespace["other"], namespace["blend"]
    key = next(k for k in ref.keys(True, True) if k[-1] == "lora_A")
    assert (blend[key] - (ref[key] + other[key]) / 2).abs().max() == 0
    assert namespace["logits"].shape == (2, 12, 1024)


def test_every_relative_link_resolves():
    for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)\)", path.read_text()):
            assert (path.parent / target).exists(), f"{path.name}: link to {target}"


def indented_block(text: str, after: str) -> str:
    """The 4-space-indented block that follows the line `after` in a markdown text, unindented."""
    lines = text.split(after + "\n", 1)[1].splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("    "))
    block = []
    for line in lines[start:]:
        if line and not line.startswith("    "):
            break
        block.append(line[4:])
    return "\n".join(block).rstrip("\n") + "\n"


def test_the_documented_templates_are_the_ones_used():
    data = (DOCS / "data.md").read_text()
    assert indented_block(data, "With input:") == ALPACA_WITH_INPUT
    assert indented_block(data, "Without input:") == ALPACA_NO_INPUT


def test_the_documented_exit_statuses_are_the_ones_used():
    table = dict(re.findall(r"^\| (\d+) +\| (.*?) +\|$", (DOCS / "cli.md").read_text(), flags=re.MULTILINE))
    assert ConfigError.exit_code == 2 and "usage" in table["2"]
    for cls in (DataError, BaseModelError, CheckpointError, NonFiniteError):
        assert cls.exit_code == 1
    assert "run error" in table["1"]
    assert Interrupted(2, 5).exit_code == 130 and "SIGINT" in table["130"]
    assert Interrupted(15, 5).exit_code == 143 and "SIGTERM" in table["143"]
