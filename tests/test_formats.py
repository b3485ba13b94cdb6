"""`read_adapter` reads every format to the same adapter, and refuses what does not fit."""

import pytest
import torch
from tensordict import TensorDict

from wmtp_fn import checkpoint
from wmtp_fn.adapters import AdapterSpec, apply, export_peft, init, install_slots, to_flat
from wmtp_fn.formats import adapter_format, read_adapter
from wmtp_fn.adapters.seeds_io import save_hf_lora
from wmtp_fn.errors import CheckpointError
from wmtp_fn.models.base import Base, build_base, tiny_llama_config
from wmtp_fn.models.meta import save_seeds_policy
from wmtp_fn.models.mtp import mtp_from_llama

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def trained_like(adapter):
    """Non-zero B everywhere (a fresh adapter is the identity and would hide a dropped weight)."""
    gen = torch.Generator().manual_seed(3)
    return adapter.apply(lambda t: torch.randn(t.shape, generator=gen) * 0.1)


@pytest.fixture
def llama(base, tiny_dir):
    return Base.of(base, "causal_lm", tiny_dir)


@pytest.fixture
def written(llama, tmp_path):
    adapter, spec = init(llama, AdapterSpec(rank=4, alpha=8.0, targets=ALL), seed=0)
    adapter = trained_like(adapter)
    checkpoint.save_params(tmp_path / "run" / "adapter", TensorDict({"lora": adapter}, batch_size=[]), {"lora": spec})
    save_hf_lora(tmp_path / "a.hf_lora.pt", adapter, spec)
    export_peft(adapter, spec, tmp_path / "peft")
    return adapter, spec


@pytest.mark.parametrize("where,kind", [("run", "project"), ("run/adapter", "project"), ("peft", "peft"),
                                        ("a.hf_lora.pt", "hf_lora")])
def test_every_format_reads_back_the_same_all_linear_adapter(llama, written, tmp_path, batch, where, kind):
    adapter, spec = written
    assert adapter_format(tmp_path / where) == kind
    got, got_spec = read_adapter(tmp_path / where, llama)
    assert to_flat(got).keys() == to_flat(adapter).keys()
    assert {k.rsplit(".", 2)[-2] for k in to_flat(got)} == set(ALL)  # the FFN weights are there
    for k, v in to_flat(adapter).items():
        torch.testing.assert_close(to_flat(got)[k], v, rtol=0, atol=0)
    assert (got_spec.rank, got_spec.alpha, set(got_spec.targets)) == (4, 8.0, set(ALL))
    assert got_spec.base_fingerprint == llama.fingerprint
    want = apply(llama.module, adapter, spec, **batch).logits
    torch.testing.assert_close(apply(llama.module, got, got_spec, **batch).logits, want, rtol=0, atol=0)


def test_seeds_policy_file_reads_onto_the_mtp_base(llama, tmp_path, batch):
    module = mtp_from_llama(build_base(tiny_llama_config(vocab_size=128), seed=5), 2)
    install_slots(module)
    mtp = Base.of(module, "mtp")
    adapter, spec = init(mtp, AdapterSpec(rank=4, alpha=8.0, targets=ALL), seed=1)
    adapter = trained_like(adapter)
    save_seeds_policy(tmp_path / "p.pt", to_flat(adapter), spec, mtp.module.config)
    assert adapter_format(tmp_path / "p.pt") == "seeds_policy"
    got, got_spec = read_adapter(tmp_path / "p.pt", mtp)
    for k, v in to_flat(adapter).items():
        torch.testing.assert_close(to_flat(got)[k], v)
    assert set(got_spec.targets) == set(ALL)


def test_an_adapter_for_another_base_is_refused(written, tmp_path):
    module = build_base(tiny_llama_config(vocab_size=128), seed=99)
    install_slots(module)
    other = Base.of(module, "causal_lm")
    with pytest.raises(CheckpointError, match="different base"):
        read_adapter(tmp_path / "run", other)


def test_not_an_adapter_is_a_located_error(llama, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: not an adapter directory"):
        read_adapter(tmp_path / "empty", llama)
    with pytest.raises(CheckpointError, match="nowhere: no such adapter"):
        read_adapter(tmp_path / "nowhere", llama)
    torch.save({"checkpoint_type": "full", "backbone_state_dict": {}}, tmp_path / "full.pt")
    with pytest.raises(CheckpointError, match="'full' holds no adapter"):
        read_adapter(tmp_path / "full.pt", llama)


def test_a_project_checkpoint_with_two_adapters_needs_a_name(llama, tmp_path):
    a, spec = init(llama, AdapterSpec(rank=2, alpha=4.0), seed=0)
    b, _ = init(llama, AdapterSpec(rank=2, alpha=4.0), seed=1)
    checkpoint.save_params(tmp_path / "two", TensorDict({"x": a, "y": b}, batch_size=[]), {"x": spec, "y": spec})
    with pytest.raises(CheckpointError, match=r"holds adapters \['x', 'y'\]; choose one"):
        read_adapter(tmp_path / "two", llama)
    got, _ = read_adapter(tmp_path / "two", llama, name="y")
    assert all(torch.equal(to_flat(got)[k], v) for k, v in to_flat(b).items())
    with pytest.raises(CheckpointError, match="no adapter named 'z'"):
        read_adapter(tmp_path / "two", llama, name="z")
