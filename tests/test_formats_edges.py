"""`wmtp_fn.formats` beyond the round trips of test_formats.py: the run config each format
records (`adapter_run_config`), the `trusted` switch reaching every `torch.save` reader, and the
seeds' critic keys re-rooted onto the base."""

import fractions

import pytest
import torch
from tensordict import TensorDict

from tests.adapters.helpers import randomize
from wmtp_fn import checkpoint
from wmtp_fn.adapters import AdapterSpec, export_peft, init, install_slots, to_flat
from wmtp_fn.adapters.seeds_io import save_hf_lora
from wmtp_fn.errors import CheckpointError
from wmtp_fn.formats import adapter_format, adapter_run_config, read_adapter
from wmtp_fn.models.base import Base, build_base, tiny_llama_config
from wmtp_fn.models.meta import save_seeds_policy
from wmtp_fn.models.mtp import mtp_from_llama

TARGETS = ("q_proj", "v_proj")
FLAT = {"seed": 3, "data.path": "train.jsonl", "data.heldout_fraction": 0.5, "lr": 1e-4}  # a run's flat config


@pytest.fixture
def llama(base, tiny_dir):
    return Base.of(base, "causal_lm", tiny_dir)


@pytest.fixture
def adapter(llama):
    ad, spec = init(llama, AdapterSpec(rank=2, alpha=4.0, targets=TARGETS), seed=0)
    return randomize(ad, seed=1), spec


def project(tmp_path, adapter, config, where="run/adapter"):
    ad, spec = adapter
    meta = None if config is None else {"config": config}
    checkpoint.save_params(tmp_path / where, TensorDict({"lora": ad}, batch_size=[]), {"lora": spec}, meta=meta)
    return tmp_path / where


@pytest.mark.parametrize("where", ["run", "run/adapter"])
def test_a_project_checkpoint_gives_its_runs_flat_config(adapter, tmp_path, where):
    project(tmp_path, adapter, FLAT)
    got = adapter_run_config(tmp_path / where)
    assert got == FLAT


def test_an_hf_lora_file_gives_its_runs_flat_config(adapter, tmp_path):
    ad, spec = adapter
    save_hf_lora(tmp_path / "a.pt", ad, spec, config=FLAT)
    assert adapter_run_config(tmp_path / "a.pt") == FLAT


@pytest.mark.parametrize("config", [
    None,                                                    # no config recorded
    {"data.path": "train.jsonl", "lr": 1e-4},                # no seed
    {"seed": 3, "lr": 1e-4},                                 # no data.* key
    {"seed": 3, "data": {"path": "train.jsonl"}},            # the seeds' nested layout
    {"seed": 3, "dataset.path": "train.jsonl"},              # a prefix that only looks like data.
])
def test_configs_that_are_not_a_flat_run_config_give_none(adapter, tmp_path, config):
    assert adapter_run_config(project(tmp_path, adapter, config, where="p")) is None
    ad, spec = adapter
    save_hf_lora(tmp_path / "a.pt", ad, spec, config=config)
    assert adapter_run_config(tmp_path / "a.pt") is None


def test_a_peft_directory_records_no_run_config(adapter, tmp_path):
    ad, spec = adapter
    export_peft(ad, spec, tmp_path / "peft")
    assert adapter_run_config(tmp_path / "peft") is None


def test_a_seeds_policy_file_gives_its_config(tmp_path):
    module = mtp_from_llama(build_base(tiny_llama_config(vocab_size=128), seed=5), 2)
    install_slots(module)
    ad, spec = init(module, AdapterSpec(rank=2, alpha=4.0, targets=TARGETS), seed=1)
    save_seeds_policy(tmp_path / "p.pt", to_flat(ad), spec, module.config, config=FLAT)
    assert adapter_run_config(tmp_path / "p.pt") == FLAT


def test_trusted_reaches_the_hf_lora_reader(llama, adapter, tmp_path):
    """A file with a pickled object outside the weights: refused by default, read with trusted
    (the format detection reads the file too, and must honour the switch)."""
    ad, spec = adapter
    save_hf_lora(tmp_path / "a.pt", ad, spec, config={"x": fractions.Fraction(1, 3)})
    for untrusted in (lambda: read_adapter(tmp_path / "a.pt", llama), lambda: adapter_format(tmp_path / "a.pt")):
        with pytest.raises(CheckpointError, match="cannot read as a weights-only torch checkpoint"):
            untrusted()
    assert adapter_format(tmp_path / "a.pt", trusted=True) == "hf_lora"
    got, _ = read_adapter(tmp_path / "a.pt", llama, trusted=True)
    assert all(torch.equal(to_flat(got)[k], v) for k, v in to_flat(ad).items())


def test_trusted_reaches_the_seeds_policy_reader(tmp_path):
    module = mtp_from_llama(build_base(tiny_llama_config(vocab_size=128), seed=5), 2)
    install_slots(module)
    mtp = Base.of(module, "mtp")
    ad, spec = init(mtp, AdapterSpec(rank=2, alpha=4.0, targets=TARGETS), seed=1)
    save_seeds_policy(tmp_path / "p.pt", to_flat(ad), spec, module.config, epoch=fractions.Fraction(1, 3))
    with pytest.raises(CheckpointError, match="cannot read as a weights-only torch checkpoint"):
        read_adapter(tmp_path / "p.pt", mtp)
    got, _ = read_adapter(tmp_path / "p.pt", mtp, trusted=True)
    assert to_flat(got).keys() == to_flat(ad).keys()


def test_critic_style_hf_lora_keys_are_rerooted_onto_the_causal_lm(llama, adapter, tmp_path):
    """The seeds' critic wrote keys relative to its `LlamaModel` backbone (`backbone.layers.…`)."""
    ad, spec = adapter
    sd = {"backbone." + k.removeprefix("model."): v for k, v in to_flat(ad).items()}
    torch.save({"checkpoint_type": "hf_lora", "lora_state_dict": sd,
                "lora_config": {"rank": 2, "alpha": 4.0, "target_modules": list(TARGETS)}}, tmp_path / "critic.pt")
    got, got_spec = read_adapter(tmp_path / "critic.pt", llama)
    assert to_flat(got).keys() == to_flat(ad).keys()
    assert all(torch.equal(to_flat(got)[k], v) for k, v in to_flat(ad).items())
    assert got_spec.base_fingerprint == llama.fingerprint
