"""The seeds' checkpoint formats: hf_lora written and read back, the seeds' own files, legacy full."""

import pytest
import torch

from tests.adapters.helpers import randomize
from wmtp_fn.adapters import AdapterSpec, init, to_flat
from wmtp_fn.adapters.seeds_io import read_seed_checkpoint, save_hf_lora
from wmtp_fn.errors import CheckpointError


@pytest.fixture(params=["dora", "rslora"])
def adapter(base, request):
    """A trained-looking adapter (random B), in each variant that adds keys to lora_config."""
    spec = AdapterSpec(rank=4, alpha=8.0, dropout=0.05, **{f"use_{request.param}": True})
    ad, spec = init(base, spec, seed=0)
    return randomize(ad, seed=1), spec


def test_hf_lora_round_trip(base, adapter, tmp_path):
    ad, spec = adapter
    head = {"0.weight": torch.randn(16, 64)}
    path = save_hf_lora(
        tmp_path / "ck.pt", ad, spec, value_head=head, base_model_path="/models/tiny", epoch=1.4,
        train_metrics={"loss": 2.0}, val_metrics={"loss": 2.1}, config={"training": {"lr": 1e-4}},
    )
    raw = torch.load(path, weights_only=True)
    assert raw["checkpoint_type"] == "hf_lora"
    assert set(raw) >= {"lora_state_dict", "value_head_state_dict", "lora_config", "base_model_path", "epoch",
                        "train_metrics", "val_metrics", "config"}
    assert "model.layers.0.self_attn.q_proj.lora_A" in raw["lora_state_dict"]
    assert raw["lora_config"]["rank"] == 4 and raw["lora_config"]["alpha"] == 8.0

    ck = read_seed_checkpoint(path, base)
    assert ck.kind == "hf_lora" and ck.spec == spec
    assert ck.meta["epoch"] == 1.4 and ck.meta["config"] == {"training": {"lr": 1e-4}}
    assert torch.equal(ck.value_head["0.weight"], head["0.weight"])
    for k, v in to_flat(ad).items():
        assert torch.equal(to_flat(ck.adapter)[k], v)


def test_seed_written_hf_lora_with_critic_style_keys_is_rerooted(base, tmp_path):
    """The seeds' critic saved keys relative to a LlamaModel backbone (`layers.…`), with the
    plain four-field lora_config and no fingerprint."""
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(2):
        for mod, (o, n) in {"self_attn.q_proj": (64, 64), "self_attn.v_proj": (32, 64)}.items():
            sd[f"layers.{i}.{mod}.lora_A"] = torch.randn(8, n, generator=gen)
            sd[f"layers.{i}.{mod}.lora_B"] = torch.randn(o, 8, generator=gen)
    torch.save({
        "checkpoint_type": "hf_lora", "lora_state_dict": sd, "value_head_state_dict": {},
        "lora_config": {"rank": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
        "base_model_path": "storage/models/x", "epoch": 0.2, "train_metrics": {}, "val_metrics": {}, "config": {},
    }, tmp_path / "seed.pt")
    ck = read_seed_checkpoint(tmp_path / "seed.pt", base)
    assert torch.equal(ck.adapter["model", "layers", "1", "self_attn", "v_proj", "lora_B"], sd["layers.1.self_attn.v_proj.lora_B"])
    assert ck.spec.targets == ("q_proj", "v_proj") and ck.spec.base_fingerprint is None


def test_legacy_full_checkpoint(tmp_path):
    sd = {"layers.0.self_attn.q_proj.weight": torch.randn(4, 4)}
    torch.save({"checkpoint_type": "full", "backbone_state_dict": sd, "value_head_state_dict": {"w": torch.ones(2)},
                "epoch": 2.0}, tmp_path / "full.pt")
    ck = read_seed_checkpoint(tmp_path / "full.pt")
    assert ck.kind == "full" and torch.equal(ck.backbone_state["layers.0.self_attn.q_proj.weight"], sd["layers.0.self_attn.q_proj.weight"])
    assert ck.meta["epoch"] == 2.0 and torch.equal(ck.value_head["w"], torch.ones(2))
    torch.save({"checkpoint_type": "sharded"}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="checkpoint_type 'sharded' is not supported"):
        read_seed_checkpoint(tmp_path / "odd.pt")
