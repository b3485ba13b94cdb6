"""The seeds' `hf_lora` file, field by field: the four-field `lora_config` the seeds wrote (our
extensions only when used), the saved metadata, the `layers` extension, the base fingerprint,
the critic's key spellings, and the weights-only reading with torch's own message."""

import fractions

import pytest
import torch

from tests.adapters.helpers import randomize
from wmtp_fn.adapters import AdapterSpec, init, install_slots, to_flat
from wmtp_fn.adapters.seeds_io import load_torch_dict, read_seed_checkpoint, save_hf_lora, seeds_lora_key
from wmtp_fn.errors import CheckpointError
from wmtp_fn.models.base import build_base, tiny_llama_config

TARGETS = ("q_proj", "v_proj")


@pytest.fixture
def plain_adapter(base):
    adapter, spec = init(base, AdapterSpec(rank=2, alpha=4.0, targets=TARGETS), seed=0)
    return randomize(adapter, seed=1), spec


def test_a_plain_spec_writes_the_seeds_four_field_config_and_default_metadata(plain_adapter, tmp_path):
    adapter, spec = plain_adapter
    raw = torch.load(save_hf_lora(tmp_path / "ck.pt", adapter, spec), weights_only=True)
    assert raw["lora_config"] == {"rank": 2, "alpha": 4.0, "dropout": 0.0, "target_modules": list(TARGETS)}
    assert raw["base_model_path"] == "" and raw["epoch"] == 0.0 and isinstance(raw["epoch"], float)
    assert raw["train_metrics"] == raw["val_metrics"] == raw["config"] == {} and raw["value_head_state_dict"] == {}


def test_layers_are_written_and_read_back(base, tmp_path):
    spec = AdapterSpec(rank=2, alpha=4.0, targets=TARGETS, layers=(1,))
    adapter, spec = init(base, spec, seed=0)
    path = save_hf_lora(tmp_path / "ck.pt", randomize(adapter, seed=1), spec)
    raw = torch.load(path, weights_only=True)
    assert raw["lora_config"]["layers"] == [1]
    assert (raw["lora_config"]["use_rslora"], raw["lora_config"]["use_dora"]) == (False, False)
    ck = read_seed_checkpoint(path, base)
    assert ck.spec == spec and ck.spec.layers == (1,)
    assert to_flat(ck.adapter).keys() == to_flat(adapter).keys()


def test_a_hand_written_layers_field_is_read(tmp_path):
    """A file with only `layers` among our extensions (no use_rslora / use_dora): plain LoRA."""
    sd = {"model.layers.1.self_attn.q_proj.lora_A": torch.ones(2, 64),
          "model.layers.1.self_attn.q_proj.lora_B": torch.ones(64, 2)}
    torch.save({"checkpoint_type": "hf_lora", "lora_state_dict": sd,
                "lora_config": {"rank": 2, "alpha": 4.0, "target_modules": ["q_proj"], "layers": [1]}}, tmp_path / "ck.pt")
    spec = read_seed_checkpoint(tmp_path / "ck.pt").spec
    assert spec.layers == (1,) and (spec.use_rslora, spec.use_dora) == (False, False)


def test_metadata_round_trips(plain_adapter, tmp_path):
    adapter, spec = plain_adapter
    path = save_hf_lora(tmp_path / "ck.pt", adapter, spec, base_model_path="/models/tiny", epoch=2,
                        train_metrics={"loss": 1.5}, val_metrics={"loss": 1.75}, config={"seed": 3})
    meta = read_seed_checkpoint(path).meta
    assert meta == {"base_model_path": "/models/tiny", "epoch": 2.0, "train_metrics": {"loss": 1.5},
                    "val_metrics": {"loss": 1.75}, "config": {"seed": 3}}


def test_the_recorded_base_fingerprint_is_checked(plain_adapter, tmp_path):
    adapter, spec = plain_adapter
    path = save_hf_lora(tmp_path / "ck.pt", adapter, spec)
    other = build_base(tiny_llama_config(vocab_size=128), seed=99)
    install_slots(other)
    with pytest.raises(ValueError, match="different base"):
        read_seed_checkpoint(path, other)


@pytest.mark.parametrize("key, want", [
    ("backbone.layers.0.self_attn.q_proj.lora_A", "layers.0.self_attn.q_proj.lora_A"),
    ("layers.0._checkpoint_wrapped_module.mlp.up_proj.lora_B", "layers.0.mlp.up_proj.lora_B"),
    ("backbone._checkpoint_wrapped_module.layers.1.self_attn.v_proj.lora_A", "layers.1.self_attn.v_proj.lora_A"),
    ("model.layers.0.self_attn.q_proj.lora_A", "model.layers.0.self_attn.q_proj.lora_A"),
])
def test_seeds_lora_key_strips_the_critic_prefix_and_checkpoint_wrappers(key, want):
    assert seeds_lora_key(key) == want


def test_keys_with_a_model_prefix_are_rerooted_onto_a_bare_decoder(base, tmp_path):
    """An hf_lora file of the causal LM (`model.layers.…`) read onto its `LlamaModel`: the
    prefix is stripped."""
    sd = {"model.layers.0.self_attn.q_proj.lora_A": torch.full((2, 64), 0.5),
          "model.layers.0.self_attn.q_proj.lora_B": torch.full((64, 2), 0.25),
          "model.layers.1.self_attn.q_proj.lora_A": torch.full((2, 64), 0.5),
          "model.layers.1.self_attn.q_proj.lora_B": torch.full((64, 2), 0.25)}
    torch.save({"checkpoint_type": "hf_lora", "lora_state_dict": sd,
                "lora_config": {"rank": 2, "alpha": 4.0, "target_modules": ["q_proj"]}}, tmp_path / "ck.pt")
    ck = read_seed_checkpoint(tmp_path / "ck.pt", base.model)
    assert set(to_flat(ck.adapter)) == {k.removeprefix("model.") for k in sd}
    assert torch.equal(ck.adapter["layers", "1", "self_attn", "q_proj", "lora_B"], sd["model.layers.1.self_attn.q_proj.lora_B"])


def test_load_torch_dict_is_weights_only_by_default(tmp_path):
    torch.save({"epoch": fractions.Fraction(1, 3)}, tmp_path / "p.pt")
    with pytest.raises(CheckpointError, match="cannot read as a weights-only torch checkpoint"):
        load_torch_dict(tmp_path / "p.pt")
    assert load_torch_dict(tmp_path / "p.pt", trusted=True) == {"epoch": fractions.Fraction(1, 3)}


@pytest.mark.parametrize("content", ["junk", "pickle"])
def test_the_error_carries_torchs_own_first_line(tmp_path, content):
    path = tmp_path / "x.pt"
    if content == "junk":
        path.write_bytes(b"not a checkpoint at all")
    else:
        torch.save({"epoch": fractions.Fraction(1, 3)}, path)
    try:
        torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - the reference: what torch itself says
        first = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    with pytest.raises(CheckpointError) as info:
        load_torch_dict(path)
    assert str(info.value) == (f"{path}: cannot read as a weights-only torch checkpoint ({first}); "
                               "if you trust this file, pass trusted=True")
