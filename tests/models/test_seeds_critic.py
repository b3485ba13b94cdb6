"""The seeds' critic files: their value-head key names and their whole critic checkpoints."""

import pytest
import torch
from torch import nn

from tests.adapters.helpers import randomize
from wmtp_fn.adapters import AdapterSpec, init, install_slots, to_flat
from wmtp_fn.errors import CheckpointError
from wmtp_fn.models.base import build_base, tiny_llama_config
from wmtp_fn.models.value_head import (
    from_seeds_state, init_value_head, read_seed_critic, seeds_kind, to_seeds_state, value_head,
)
from wmtp_fn.objectives.critic import value_model
from wmtp_fn.models.value_head import ValueHeadSpec

D = 64
TARGETS = ("q_proj", "v_proj", "down_proj")


class SeedsMLPHead(nn.Module):
    """The seeds' mlp head as the seeds built it: an `mlp` nn.Sequential (Linear, GELU,
    Dropout, Linear, GELU, Dropout, Linear); written here from the seeds' description."""

    def __init__(self, d: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, d // 4), nn.GELU(), nn.Dropout(0.0), nn.Linear(d // 4, d // 8),
                                 nn.GELU(), nn.Dropout(0.0), nn.Linear(d // 8, 1))

    def forward(self, h):
        return self.mlp(h).squeeze(-1)


def slotted_base(layers: int) -> nn.Module:
    base = build_base(tiny_llama_config(num_hidden_layers=layers), seed=3)
    install_slots(base)
    return base


def random_head(kind: str, seed: int):
    head = init_value_head(kind, D, seed=seed)
    return head.apply(lambda t: t + 0.1 * torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)))


def test_mlp_head_in_the_seeds_key_names_loads_strictly_into_the_seeds_module_and_computes_the_same():
    head = random_head("mlp", 1)
    seeds = SeedsMLPHead(D)
    seeds.load_state_dict(to_seeds_state(head, "mlp"), strict=True)  # every key, no extra
    h = torch.randn(2, 5, D)
    torch.testing.assert_close(seeds(h), value_head(head, h, kind="mlp"))
    back = from_seeds_state(seeds.state_dict(), "mlp")
    for key, t in head.items(True, True):
        assert torch.equal(back[key], t), key


def test_linear_keys_need_the_seeds_config_to_tell_linear_from_sigmoid_and_a_missing_bias_is_zero():
    state = {"linear.weight": torch.randn(1, D)}
    assert seeds_kind(state, {"training": {"value_head_type": "sigmoid"}}) == "sigmoid"
    with pytest.raises(ValueError, match="linear or a sigmoid head.*value_head_type is None"):
        seeds_kind(state, {})
    head = from_seeds_state(state, "linear")
    assert torch.equal(head["out", "bias"], torch.zeros(1)) and torch.equal(head["out", "weight"], state["linear.weight"])
    with pytest.raises(ValueError, match="unexpected key 'mlp.0.weight' for a linear head"):
        from_seeds_state({**state, "mlp.0.weight": torch.zeros(1)}, "linear")


def seeds_lora_key(key: str) -> str:
    """Our key `model.layers.0.self_attn.q_proj.lora_A` as the seeds' FSDP-wrapped critic wrote it:
    relative to `LlamaModel` under the critic's `backbone`, with the checkpoint wrapper's infix."""
    parts = key.removeprefix("model.").split(".")
    assert parts[0] == "layers"
    return ".".join(["backbone", *parts[:2], "_checkpoint_wrapped_module", *parts[2:]])


def test_a_seeds_critic_checkpoint_loads_and_gives_the_values_of_the_critic_that_wrote_it(tmp_path):
    """Done-means 5: a critic file in the seeds' layout (prefixes, infixes, optimizer state, the
    seeds' head names, the full lora_config) reads back as the project's critic."""
    base = slotted_base(2)
    adapter, spec = init(base, AdapterSpec(rank=4, alpha=8.0, targets=TARGETS), seed=0)
    adapter = randomize(adapter, seed=5)
    head = random_head("mlp", 2)
    flat = to_flat(adapter)
    seeds_file = {
        "checkpoint_type": "hf_lora",
        "lora_state_dict": {seeds_lora_key(k): v.to(torch.bfloat16).float() for k, v in flat.items()},
        "value_head_state_dict": {
            "mlp.0.weight": head["fc1", "weight"], "mlp.0.bias": head["fc1", "bias"],
            "mlp.3.weight": head["fc2", "weight"], "mlp.3.bias": head["fc2", "bias"],
            "mlp.6.weight": head["out", "weight"], "mlp.6.bias": head["out", "bias"],
        },
        "optimizer_state_dict": {"state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.ones(3)}},
                                 "param_groups": [{"lr": 2e-5, "betas": (0.9, 0.95), "params": [0]}]},
        "lora_config": {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": list(TARGETS), "use_lora": True},
        "base_model_path": "storage/models/ref-sheared-llama-2.7b",
        "epoch": 1.0, "train_metrics": {}, "val_metrics": {"val_pairwise_accuracy": 0.63},
        "config": {"training": {"value_head_type": "mlp", "use_lora": True}},
    }
    assert any("_checkpoint_wrapped_module" in k and k.startswith("backbone.") for k in seeds_file["lora_state_dict"])
    path = tmp_path / "checkpoint_final.pt"
    torch.save(seeds_file, path)

    got_adapter, got_spec, got_head, head_spec = read_seed_critic(path, base)
    assert (head_spec.kind, head_spec.d) == ("mlp", D) and got_spec.rank == 4 and got_spec.targets == TARGETS
    ids = torch.randint(0, 1024, (2, 9), generator=torch.Generator().manual_seed(0))
    wrote = value_model(base, spec, ValueHeadSpec("mlp", D))
    read = value_model(base, got_spec, head_spec)
    rounded = adapter.apply(lambda t: t.to(torch.bfloat16).float())  # the file stored bf16-rounded weights
    expected = wrote({"critic": rounded, "value_head": head}, ids)
    assert expected.abs().max() > 1e-3  # non-trivial values: the adapter and head are random, not at init
    assert torch.equal(read({"critic": got_adapter, "value_head": got_head}, ids), expected)
    # without the adapter the values differ: the adapter really was loaded
    assert not torch.allclose(wrote({"critic": adapter.apply(torch.zeros_like), "value_head": head}, ids), expected)


def test_a_seeds_checkpoint_without_a_value_head_is_not_a_critic(tmp_path):
    base = slotted_base(1)
    adapter, _ = init(base, AdapterSpec(rank=2, alpha=4.0, targets=("q_proj",)), seed=0)
    path = tmp_path / "ref.pt"
    torch.save({"checkpoint_type": "hf_lora", "lora_state_dict": to_flat(adapter), "value_head_state_dict": {},
                "lora_config": {"rank": 2, "alpha": 4.0, "target_modules": ["q_proj"]}}, path)
    with pytest.raises(CheckpointError, match="value_head_state_dict is empty: not a critic"):
        read_seed_critic(path, base)
