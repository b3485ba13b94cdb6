"""Checkpoint metadata values that JSON lacks (one-element tensors, paths, tuples, sets) and
the message for anything else (uncovered mutants of checkpoint._json_default)."""

import json
from pathlib import Path

import pytest
import torch

from wmtp_fn.checkpoint import read_checkpoint, write_checkpoint


def test_meta_values_json_lacks_are_written_as_plain_json(tmp_path):
    meta = {"loss": torch.tensor([2.5]), "dir": Path("a/b"), "pair": (1, 2), "one": {3}, "empty": frozenset()}
    write_checkpoint(tmp_path / "c", {}, meta)
    on_disk = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert {k: on_disk[k] for k in meta} == {"loss": 2.5, "dir": "a/b", "pair": [1, 2], "one": [3], "empty": []}
    assert read_checkpoint(tmp_path / "c")[1]["loss"] == 2.5


def test_other_meta_values_are_refused_by_type(tmp_path):
    for value, name in ((torch.zeros(2), "Tensor"), (object(), "object")):
        with pytest.raises(TypeError, match=rf"^not JSON-serialisable in checkpoint meta: {name}$"):
            write_checkpoint(tmp_path / "c", {}, {"x": value})
    assert not (tmp_path / "c").exists()  # nothing half-written

