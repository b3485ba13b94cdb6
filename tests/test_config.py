"""Config files and overrides: values typed by the key's default (as ml-collections parses them),
the lock kept, and the comments of a config's source found for --help."""

import pytest
from ml_collections import ConfigDict

from wmtp_fn.config import apply_override, assignments, describe, flat_config, parse_value
from wmtp_fn.errors import ConfigError


def small() -> ConfigDict:
    c = ConfigDict()
    c.train = ConfigDict({"steps": 10, "lr": 1e-3, "fast": False, "name": "x"})
    c.lora = ConfigDict({"targets": ("q_proj", "v_proj")})
    c.bins = ConfigDict({"all": [1, 25]})
    c.lock()
    return c


@pytest.mark.parametrize("text, default, expected", [
    ("12", 10, 12),
    ("-3", 10, -3),
    ("5e-4", 1e-3, 5e-4),
    ("2", 1e-3, 2.0),
    ("true", False, True), ("T", False, True), ("1", False, True), ("yes", False, True),
    ("false", True, False), ("F", True, False), ("0", True, False), ("no", True, False),
    ("runs/a b", "x", "runs/a b"),
    ("007", "x", "007"),  # a string key keeps the text, even when it looks like a number
    ('("q_proj", "o_proj")', ("a",), ("q_proj", "o_proj")),
    ('["q_proj"]', ("a",), ("q_proj",)),
    ("q_proj,o_proj", ("a",), ("q_proj", "o_proj")),
    ("q_proj", ("a",), ("q_proj",)),
    ("1, 2", (0,), (1, 2)),
    ("[1, 5]", [0, 0], [1, 5]),
])
def test_values_are_parsed_by_the_type_of_the_default(text, default, expected):
    got = parse_value("--config.k", text, default)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("text, default, message", [
    ("1.5", 10, "--config.k=1.5: expected an int"),
    ("ten", 1e-3, "--config.k=ten: expected a number"),
    ("maybe", False, "--config.k=maybe: expected true or false"),
])
def test_values_of_the_wrong_type_are_refused(text, default, message):
    with pytest.raises(ConfigError, match=message):
        parse_value("--config.k", text, default)


def test_overrides_set_keys_and_keep_the_lock():
    c = small()
    apply_override(c, "train.fast", None)  # a bare bool flag
    apply_override(c, "train.steps", "3")
    apply_override(c, "bins", '{"easy": [1, 5], "hard": [6, 25]}')
    assert flat_config(c) == {"train.steps": 3, "train.lr": 1e-3, "train.fast": True, "train.name": "x",
                              "lora.targets": ["q_proj", "v_proj"], "bins.easy": [1, 5], "bins.hard": [6, 25]}
    with pytest.raises(ConfigError, match=r"--config.bins.medium: no such key"):
        apply_override(c, "bins.medium", "[2, 3]")  # the replaced group is locked too
    with pytest.raises(ConfigError, match=r"--config.train.step: no such key; did you mean --config.train.steps\?"):
        apply_override(c, "train.step", "3")
    with pytest.raises(ConfigError, match=r"--config.tran.steps: no such key; did you mean --config.train.steps\?"):
        apply_override(c, "tran.steps", "3")
    with pytest.raises(ConfigError, match=r"--config.train.steps: needs a value"):
        apply_override(c, "train.steps", None)


SOURCE = '''
def get_config():
    c = ConfigDict()
    c.out_dir = "runs/#1"  # where the run goes
    c.train = ConfigDict()
    c.train.steps = 200  # optimizer steps
    c.train.lr = 1e-3
    c.bins = ConfigDict({"all": [1, 25]})  # name -> [lo, hi]
    return c
'''


def test_comments_are_read_from_the_config_source(tmp_path):
    found = assignments(SOURCE)
    assert {k: v[1] for k, v in found.items()} == {
        "out_dir": "where the run goes", "train": "", "train.steps": "optimizer steps", "train.lr": "",
        "bins": "name -> [lo, hi]",
    }
    path = tmp_path / "exp.py"
    path.write_text("from ml_collections import ConfigDict\n" + SOURCE)
    c = ConfigDict({"out_dir": "runs/#1", "train": {"steps": 200, "lr": 1e-3}, "bins": {"all": [1, 25]}})
    lines = describe(path, c).splitlines()
    assert [x.split()[0] for x in lines] == ["out_dir", "train.steps", "train.lr", "bins.all"]  # source order
    assert lines[0].startswith("  out_dir = 'runs/#1'") and lines[0].endswith("  # where the run goes")
    assert lines[1].endswith("  # optimizer steps") and "#" not in lines[2]
    assert lines[3].endswith("  # name -> [lo, hi]")  # a dict entry: its literal's comment
