import subprocess
import sys
import textwrap

import pytest
import torch
from tensordict import TensorDict

from tests.adapters.helpers import randomize
from wmtp_fn.adapters import AdapterSpec, init, to_flat
from wmtp_fn.checkpoint import (
    latest,
    load_adapter,
    load_params,
    read_checkpoint,
    read_seed_checkpoint,
    save_hf_lora,
    save_params,
    save_step,
)
from wmtp_fn.models.base import build_base, tiny_llama_config
from wmtp_fn.adapters import install_slots


@pytest.fixture
def adapter(base):
    ad, spec = init(base, AdapterSpec(rank=4, alpha=8.0, dropout=0.05, use_dora=True), seed=0)
    return randomize(ad, seed=1), spec


def test_params_round_trip_is_bitwise_and_checked(base, adapter, tmp_path):
    ad, spec = adapter
    head = TensorDict({"weight": torch.randn(1, 64), "bias": torch.zeros(1)}, batch_size=[])
    params = TensorDict({"lora": ad, "value_head": head}, batch_size=[])
    save_params(tmp_path / "ck", params, {"lora": spec}, meta={"metrics": {"val_loss": 1.5}})
    loaded, specs, meta = load_params(tmp_path / "ck")
    assert specs["lora"] == spec and meta["metrics"] == {"val_loss": 1.5}
    for k, v in to_flat(params).items():
        assert torch.equal(to_flat(loaded)[k], v), k
    got, got_spec = load_adapter(tmp_path / "ck", "lora", base)
    assert got_spec.base_fingerprint == spec.base_fingerprint
    with pytest.raises(KeyError, match=r"no adapter named 'critic'; it has \['lora'\]"):
        load_adapter(tmp_path / "ck", "critic")


def test_loading_onto_another_base_fails_with_both_fingerprints(adapter, tmp_path):
    ad, spec = adapter
    save_params(tmp_path / "ck", TensorDict({"lora": ad}, batch_size=[]), {"lora": spec})
    other = build_base(tiny_llama_config(vocab_size=128), seed=77)
    install_slots(other)
    with pytest.raises(ValueError, match="made for a different base"):
        load_adapter(tmp_path / "ck", "lora", other)


def test_corrupt_meta_is_a_clear_error(adapter, tmp_path):
    ad, spec = adapter
    path = save_params(tmp_path / "ck", TensorDict({"lora": ad}, batch_size=[]), {"lora": spec})
    (path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"meta.json: invalid JSON"):
        read_checkpoint(path)


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
    with pytest.raises(ValueError, match="checkpoint_type 'sharded' is not supported"):
        read_seed_checkpoint(tmp_path / "odd.pt")


def test_keep_prunes_old_steps(tmp_path):
    for step in range(5):
        save_step(tmp_path, step, {"params": {"x": torch.full((2,), float(step))}}, {"step": step}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003", "step_00000004"]
    tensors, meta = read_checkpoint(latest(tmp_path))
    assert meta["step"] == 4 and torch.equal(tensors["params"]["x"], torch.full((2,), 4.0))


def test_a_write_killed_midway_leaves_the_previous_checkpoint_loadable(tmp_path):
    """A real SIGKILL in the middle of writing step 2's tensors."""
    script = textwrap.dedent(f"""
        import os, signal, torch, safetensors.torch
        from wmtp_fn import checkpoint
        root = {str(tmp_path)!r}
        checkpoint.save_step(root, 1, {{"params": {{"x": torch.ones(1000)}}}}, {{"step": 1}})
        def dying_save(tensors, filename, metadata=None):
            with open(filename, "wb") as f:
                f.write(b"half a file")
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.save_file = dying_save
        checkpoint.save_step(root, 2, {{"params": {{"x": torch.zeros(1000)}}}}, {{"step": 2}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert (tmp_path / "latest").read_text().strip() == "step_00000001"
    assert not (tmp_path / "step_00000002").exists()
    tensors, meta = read_checkpoint(latest(tmp_path))
    assert meta["step"] == 1 and torch.equal(tensors["params"]["x"], torch.ones(1000))
    assert list(tmp_path.glob(".step_00000002.tmp-*"))  # the torn write stayed a temporary
    save_step(tmp_path, 3, {"params": {"x": torch.zeros(3)}}, {"step": 3})
    assert not list(tmp_path.glob(".step_*.tmp-*"))  # cleaned up by the next save


def test_a_resave_killed_between_its_renames_is_recovered(tmp_path):
    """Re-saving step 1 (e.g. on Ctrl-C): the old copy is renamed aside, then SIGKILL."""
    script = textwrap.dedent(f"""
        import os, signal, torch
        from wmtp_fn import checkpoint
        root = {str(tmp_path)!r}
        checkpoint.save_step(root, 1, {{"params": {{"x": torch.ones(4)}}}}, {{"step": 1}})
        real_rename = os.rename
        def dying_rename(src, dst):
            real_rename(src, dst)
            if ".old-" in str(dst):
                os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.os.rename = dying_rename
        checkpoint.save_step(root, 1, {{"params": {{"x": torch.zeros(4)}}}}, {{"step": 1}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert not (tmp_path / "step_00000001").exists()  # the window the crash hit
    tensors, meta = read_checkpoint(latest(tmp_path))  # readers put the old copy back
    assert meta["step"] == 1 and torch.equal(tensors["params"]["x"], torch.ones(4))
    assert not list(tmp_path.glob(".step_00000001.old-*"))
