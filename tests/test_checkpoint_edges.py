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



def test_specs_from_meta_reads_value_heads_and_the_untagged_adapters_of_older_checkpoints():
    from wmtp_fn.adapters.spec import AdapterSpec
    from wmtp_fn.checkpoint import specs_from_meta, subtree_meta
    from wmtp_fn.models.value_head import ValueHeadSpec

    lora, head = AdapterSpec(rank=4, alpha=8.0), ValueHeadSpec(kind="mlp", d=16, dropout=0.1, bias_init=0.5)
    meta = json.loads(json.dumps(subtree_meta({"policy": lora, "value_head": head})))
    assert meta["subtrees"]["value_head"]["kind"] == "value_head"
    assert specs_from_meta(meta) == {"policy": lora, "value_head": head}
    assert specs_from_meta({"adapters": {"lora": lora.to_dict()}}) == {"lora": lora}
    assert specs_from_meta({}) == {}


def test_unknown_subtree_kinds_and_missing_params_are_named_with_the_path(tmp_path):
    from wmtp_fn.checkpoint import load_params
    from wmtp_fn.errors import CheckpointError

    bad = {"subtrees": {"x": {"kind": "mlp", "spec": {}}}}
    write_checkpoint(tmp_path / "p", {"params": {"a": torch.zeros(1)}}, bad)
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'p'}: subtree 'x' has kind 'mlp'; "
                                              r"expected one of \['lora', 'value_head'\]$"):
        load_params(tmp_path / "p")
    write_checkpoint(tmp_path / "s", {"state": {"a": torch.zeros(1)}}, {})
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 's'}: checkpoint has no params\.safetensors$"):
        load_params(tmp_path / "s")


def test_a_spec_of_no_known_kind_is_refused_by_type():
    from wmtp_fn.checkpoint import subtree_meta

    with pytest.raises(TypeError, match=r"^no checkpoint kind for a dict spec$"):
        subtree_meta({"x": {"rank": 4}})


def test_load_adapter_reads_the_adapter_named_lora_by_default(base, tmp_path):
    from tensordict import TensorDict

    from wmtp_fn.adapters import AdapterSpec, init, to_flat
    from wmtp_fn.checkpoint import load_adapter, save_params

    ad, spec = init(base, AdapterSpec(rank=2), seed=3)
    other = ad.apply(lambda t: t + 1.0)
    save_params(tmp_path / "ck", TensorDict({"policy": other, "lora": ad}, batch_size=[]), {"policy": spec, "lora": spec})
    got, _ = load_adapter(tmp_path / "ck")
    assert all(torch.equal(to_flat(got)[k], v) for k, v in to_flat(ad).items())


def test_read_checkpoint_messages_and_the_version_check(tmp_path):
    from wmtp_fn.checkpoint import latest
    from wmtp_fn.errors import CheckpointError

    with pytest.raises(FileNotFoundError, match=rf"^{tmp_path / 'none'}: not a checkpoint directory \(no meta\.json\)$"):
        read_checkpoint(tmp_path / "none")
    write_checkpoint(tmp_path / "c", {}, {})
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["version"] == 1
    meta_path = tmp_path / "c" / "meta.json"
    meta_path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match=rf"^{meta_path}: format is 'other', expected 'wmtp_fn\.checkpoint'$"):
        read_checkpoint(tmp_path / "c")
    meta_path.write_text(json.dumps({"format": "wmtp_fn.checkpoint", "version": 2}))
    with pytest.raises(CheckpointError, match=rf"^{meta_path}: version 2 is newer than this code reads \(1\)$"):
        read_checkpoint(tmp_path / "c")
    meta_path.write_text(json.dumps({"format": "wmtp_fn.checkpoint"}))  # no version: an old checkpoint, read
    assert read_checkpoint(tmp_path / "c")[1] == {"format": "wmtp_fn.checkpoint"}
    (tmp_path / "latest").write_text("step_9\n")
    with pytest.raises(FileNotFoundError, match=r"names 'step_9', which is not a complete checkpoint$"):
        latest(tmp_path)


def test_specs_from_meta_names_a_checkpoint_by_default():
    from wmtp_fn.checkpoint import specs_from_meta
    from wmtp_fn.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"^checkpoint: subtree 'x' has kind None;"):
        specs_from_meta({"subtrees": {"x": {"spec": {}}}})


def test_save_step_keeps_the_three_newest_by_default(tmp_path):
    from wmtp_fn.checkpoint import save_step

    for step in range(1, 6):
        save_step(tmp_path, step, {"params": {"a": torch.full((1,), float(step))}}, {"step": step})
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003", "step_00000004", "step_00000005"]


def _toy_train_state():
    from tests.train.train_toy_lm import init_extra, init_params
    from wmtp_fn.train import adamw
    from wmtp_fn.train.state import init_train_state

    return init_train_state(init_params(), adamw.AdamWConfig(lr=1e-2), seed=3, extra=init_extra())


def test_save_run_writes_params_apart_and_its_meta_key_by_key(tmp_path):
    from safetensors.torch import load_file

    from wmtp_fn.adapters.spec import AdapterSpec
    from wmtp_fn.checkpoint import save_run
    from wmtp_fn.data.sampling import Cursor
    from wmtp_fn.train.tree import leaf_keys

    state = _toy_train_state()
    spec = AdapterSpec(rank=2, alpha=4.0)
    path = save_run(tmp_path, state, Cursor(seed=5, epoch=1, position=7), specs={"lora": spec},
                    config={"train.lr": 0.01, "name": "x"}, info={"val_loss": 1.5}, keep=None)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["kind"] == "train"
    assert meta["config"] == {"train.lr": 0.01, "name": "x"}
    assert meta["metrics"] == {"val_loss": 1.5}
    assert meta["cursor"] == {"seed": 5, "epoch": 1, "position": 7}
    assert meta["subtrees"] == {"lora": {"kind": "lora", "spec": spec.to_dict()}}
    params = load_file(str(path / "params.safetensors"))
    # the params alone, keyed as in an adapter-only checkpoint (no "params." prefix)
    assert sorted(params) == sorted(".".join(k) if isinstance(k, tuple) else k for k in leaf_keys(state.params))
    for k, v in params.items():
        assert torch.equal(v, state.params.get(tuple(k.split(".")))), k
    rest = load_file(str(path / "state.safetensors"))
    assert rest and not any(k.startswith("params.") for k in rest)
    assert any(k.startswith("extra.") for k in rest) and any(k.startswith("opt") for k in rest)


def test_save_run_passes_keep_on(tmp_path):
    from dataclasses import replace

    from wmtp_fn.checkpoint import save_run
    from wmtp_fn.data.sampling import Cursor

    state = _toy_train_state()
    for step in range(1, 6):
        save_run(tmp_path, replace(state, step=step), Cursor(seed=0), specs={}, config={}, info={}, keep=1)
    assert [p.name for p in tmp_path.glob("step_*")] == ["step_00000005"]
    for step in range(6, 11):
        save_run(tmp_path, replace(state, step=step), Cursor(seed=0), specs={}, config={}, info={}, keep=None)
    assert len(list(tmp_path.glob("step_*"))) == 6
